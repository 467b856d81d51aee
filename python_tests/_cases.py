"""Seeded inputs and checks shared by the kernel tests of every device (forward and
backward; ``device`` names where the tensors go)."""
from __future__ import annotations

import random
import zlib

import torch

import safeattn
from safeattn import intervals as ivs
from safeattn import reference as ref

FWD_OP = torch.ops.safeattn.interval_attention_fwd.default
BWD_OP = torch.ops.safeattn.interval_attention_bwd.default
ATTN_OP = torch.ops.safeattn.interval_attention.default


def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


def random_intervals(rng: random.Random, b, tq, tk, ni, p_empty_row=0.15) -> torch.Tensor:
    """[B,Tq,NI,2] int32 with empty, overlapping, duplicated and full ranges mixed in."""
    out = torch.zeros(b, tq, ni, 2, dtype=torch.int32)
    for bi in range(b):
        for t in range(tq):
            empty_row = rng.random() < p_empty_row
            prev = None
            for i in range(ni):
                kind = rng.randrange(6)
                if empty_row or kind == 0 or tk == 0:  # empty, anywhere
                    s = rng.randint(0, tk)
                    e = s
                elif kind == 1 and prev is not None:  # exact duplicate
                    s, e = prev
                elif kind == 2 and prev is not None:  # overlap with the previous range
                    s = rng.randint(prev[0], prev[1])
                    e = rng.randint(s, tk)
                elif kind == 3:  # short range, often a single key
                    s = rng.randrange(tk)
                    e = min(tk, s + rng.randint(1, 3))
                elif kind == 4:  # everything
                    s, e = 0, tk
                else:
                    s = rng.randint(0, tk)
                    e = rng.randint(s, tk)
                out[bi, t, i, 0], out[bi, t, i, 1] = s, e
                prev = (s, e)
    return out


def decode_intervals(rng, g, layout, b, tq, tk, ni=None):
    """``[B,Tq,NI,2]`` decode intervals of a ``layout``: ``causal`` (padded rows), ``window``
    (a sliding window), ``probe`` (a token row and a probe row) or random (``ni`` ranges a
    row, by default 1 to 4)."""
    if layout == "causal" or tk < 4:
        pad = torch.randint(0, max(1, tk // 4), (b,), generator=g)
        return ivs.causal(b, tq, tk, pad=pad)
    if layout == "window":
        return ivs.causal(b, tq, tk, window=rng.choice((16, 100, 513)))
    if layout == "probe":
        # Row 0: the new token (causal, not the probe column); row 1: the probe, which sees
        # [CLS] (column 0), a query span, a response window and itself (the last column).
        out = torch.zeros(b, tq, 4, 2, dtype=torch.int32)
        for bi in range(b):
            pad = rng.randint(0, 3)
            qs = rng.randint(pad + 1, tk // 3)
            qe = rng.randint(qs, tk // 2)
            ws = rng.randint(qe, tk - 1)
            we = rng.randint(ws, tk - 1)
            out[bi, 0, 0] = torch.tensor([pad, tk - 1 if tq == 2 else tk])
            if tq == 2:
                out[bi, 1] = torch.tensor([[0, 1], [qs, qe], [ws, we], [tk - 1, tk]])
        return out
    return random_intervals(rng, b, tq, tk, rng.randint(1, 4) if ni is None else ni)


def nan_cases():
    """``(name, q, k, v, iv)`` (CPU, float32) with a NaN among row 0's visible scores, and
    rows 1.. seeing none of it: the kernels must return row 0 NaN (fail closed) and the others
    finite. The long cases reach the KV-split paths (CPU decode split, CUDA split-KV and
    combine), where a split that saw only NaN scores has max -inf; the 70-row case is a
    prefill."""
    g = torch.Generator().manual_seed(7)

    def make(tk, lo1, tq=2):
        q = torch.randn(1, 2, tq, 16, generator=g)
        k = torch.randn(1, 1, tk, 16, generator=g)
        v = torch.randn(1, 1, tk, 16, generator=g)
        iv = torch.tensor([[0, tk]] + [[lo1, tk]] * (tq - 1), dtype=torch.int32)
        return q, k, v, iv.view(1, tq, 1, 2)

    cases = []
    for tq in (2, 70):
        q, k, v, iv = make(80, 4, tq)
        k[0, 0, 3] = float("nan")
        cases.append((f"one key, {tq} rows", q, k, v, iv))
    for tk in (2048, 4096):
        q, k, v, iv = make(tk, tk // 2)
        k[0, 0, : tk // 3] = float("nan")          # whole splits see nothing but NaN
        cases.append((f"keys, {tk}", q, k, v, iv))
    q, k, v, iv = make(2048, 0)
    q[0, :, 0] = float("nan")                       # every score of row 0 is NaN
    cases.append(("query row", q, k, v, iv))
    return cases


def hidden_nonfinite_cases():
    """``(name, q, k, v, iv, hidden)`` (CPU, float32): NaN and inf in the keys and values of
    the columns ``hidden`` that no row sees, inside a KV tile that rows read (between two of
    a row's ranges, next to a one-column range) and across whole KV splits of a long decode.
    A column no row sees must not change any output: uninitialised cache slots hold such
    values."""
    g = torch.Generator().manual_seed(11)

    def make(tq, tk, ranges, hidden):
        q = torch.randn(1, 2, tq, 16, generator=g)
        k = torch.randn(1, 1, tk, 16, generator=g)
        v = torch.randn(1, 1, tk, 16, generator=g)
        for j, c in enumerate(hidden):
            k[0, 0, c] = float("nan") if j % 2 else float("inf")
            v[0, 0, c] = float("nan") if j % 2 == 0 else -float("inf")
        iv = torch.tensor(ranges, dtype=torch.int32).view(1, 1, -1, 2).expand(1, tq, -1, 2)
        return q, k, v, iv.contiguous(), hidden

    return [("inside a tile, decode", *make(1, 80, [[0, 5], [6, 7], [9, 80]], [5, 7, 8])),
            ("inside a tile, 70 rows", *make(70, 80, [[0, 5], [6, 7], [9, 80]], [5, 7, 8])),
            ("split KV, decode", *make(1, 4096, [[0, 1], [3000, 4096]],
                                       [1, 2, *range(1000, 2999, 7)]))]


def assert_hidden_columns_get_no_gradient(q, k, v, iv, hidden):
    """The backward of ``safeattn.interval_attention`` with NaN / inf in the ``hidden``
    columns (no row sees them) equals the one with zeros there, finite, and gives those
    columns zero dk and dv."""
    k0, v0 = k.clone(), v.clone()
    k0[:, :, hidden] = 0
    v0[:, :, hidden] = 0
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    grads = []
    for kk, vv in ((k, v), (k0, v0)):
        xs = [t.clone().requires_grad_() for t in (q, kk, vv)]
        grads.append(torch.autograd.grad(safeattn.interval_attention(*xs, iv), xs, dout))
    for g, g0 in zip(*grads):
        assert g.isfinite().all()
        torch.testing.assert_close(g, g0)
    _, dk, dv = grads[0]
    assert (dk[:, :, hidden] == 0).all() and (dv[:, :, hidden] == 0).all()


# ------------------------------------------------------------------------------ gradients
def qkvg(g, b, hq, hkv, tq, tk, d, dtype, std=1.0, device="cpu"):
    """``q [B,Hq,Tq,D]``, ``k``/``v [B,Hkv,Tk,D]`` and a grad_out like ``q``, drawn from
    ``g`` (q and k scaled by ``std``) in ``dtype`` on ``device``."""
    q = torch.randn(b, hq, tq, d, generator=g) * std
    k = torch.randn(b, hkv, tk, d, generator=g) * std
    v = torch.randn(b, hkv, tk, d, generator=g)
    go = torch.randn(b, hq, tq, d, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v, go))


def random_bwd_case(seed, dtypes, device="cpu"):
    """A backward case from ``seed``: overlapping, duplicated, unordered and empty ranges,
    rows that see nothing (row 0 of batch 0 always), GQA ratios 1-8, head dims 64-256,
    Tq != Tk, with or without softcap. Returns ``(q, k, v, grad_out, intervals, softcap)``."""
    rng = random.Random(4000 + seed)
    g = torch.Generator().manual_seed(seed)
    b = rng.randint(1, 3)
    ratio = (1, 2, 4, 8)[seed % 4]
    hkv = rng.choice((1, 2))
    d = (64, 128, 256)[seed % 3]
    tq = rng.choice((1, 2, 7, 40, 70))
    tk = rng.choice((1, 9, 64, 65, 200))
    dtype = dtypes[seed % len(dtypes)]
    softcap = (None, 3.0)[seed % 2]
    q, k, v, go = qkvg(g, b, hkv * ratio, hkv, tq, tk, d, dtype, device=device)
    iv = random_intervals(rng, b, tq, tk, rng.randint(1, 4), p_empty_row=0.25)
    iv[0, 0] = 0
    return q, k, v, go, iv.to(device), softcap


def kernel_grads(q, k, v, go, iv, scale=None, softcap=None):
    """dq, dk, dv through ``safeattn.interval_attention`` (the device's fwd + bwd kernels)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = safeattn.interval_attention(*leaves, iv, scale=scale, softcap=softcap)
    out.backward(go)
    return [t.grad for t in leaves]


def ref_grads(q, k, v, go, iv, scale=None, softcap=None, dtype=torch.float64):
    """dq, dk, dv through the reference, computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref.interval_attention(*leaves, iv, scale, softcap).backward(go.to(dtype))
    return [t.grad for t in leaves]


def assert_grads_match(q, k, v, go, iv, scale=None, softcap=None, grads=None, *,
                       eps_floor=False, errs=None):
    """The kernel's dq, dk, dv (``grads``, else :func:`kernel_grads`) against the reference ->
    ``grads``. float32: ``max|g - ref64| <= 1e-4 * s`` per gradient, ``s = max(max|ref|, 10% of
    the largest gradient's max)`` (a gradient that is 0 in theory, e.g. dq of a row seeing one
    key, still carries fp32 cancellation noise). bfloat16/float16, the flash-attention rule:
    ``max|g - ref32| <= 2 * max|ref_low - ref32| + 1e-4 * s`` (``ref_low``: autograd through the
    reference in the low dtype itself, same rounded inputs and grad_out).

    ``eps_floor`` adds one rounding unit at the gradient's scale to the low-precision bound
    (``eps(dtype) * s``; FlashAttention's tests add a similar floor): the CUDA kernels compute
    Delta = rowsum(dO * out) from the saved low-precision out, and with a handful of rows
    ``max|ref_low - ref32|`` can come out smaller than that rounding. ``errs`` (dtype -> worst
    ``err / s``) records the errors seen."""
    grads = grads if grads is not None else kernel_grads(q, k, v, go, iv, scale, softcap)
    for name, g, x in zip("qkv", grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.device == x.device, name
        assert torch.isfinite(g).all(), f"d{name} has non-finite values"
    low = q.dtype != torch.float32
    refs = ref_grads(q, k, v, go, iv, scale, softcap, torch.float32 if low else torch.float64)
    rlow = ref_grads(q, k, v, go, iv, scale, softcap, q.dtype) if low else refs
    mx = [r.abs().max().item() if r.numel() else 0.0 for r in refs]
    for name, g, r, lo, m in zip("qkv", grads, refs, rlow, mx):
        if not g.numel():
            continue
        s = max(m, 0.1 * max(mx), 1e-30)
        err = (g.double() - r.double()).abs().max().item()
        bound = 1e-4 * s
        if low:
            bound += 2 * (lo.double() - r.double()).abs().max().item()
            if eps_floor:
                bound += torch.finfo(q.dtype).eps * s
        if errs is not None:
            errs[q.dtype] = max(errs.get(q.dtype, 0.0), err / s)
        assert err <= bound, f"{q.dtype} d{name}: max|g-ref| = {err:.3g} > {bound:.3g}"
    return grads


def bwd_prefill_shapes():
    """The seeded shapes of the backward prefill sweeps (test_backward on CPU, test_cuda):
    ``(b, hq, hkv, t, d, window, pad, softcap, scale)``."""
    rng = random.Random(20250601)
    for ratio in (1, 2, 4, 8):
        for d in (64, 128, 256):
            b = rng.randint(1, 3)
            hkv = rng.choice((1, 2)) if ratio < 8 else 1
            t = rng.choice((1, 5, 33, 64, 97, 130))
            window = rng.choice((None, None, 1, 16, 50))
            pad = rng.choice((None, "rand"))
            softcap, scale = rng.choice(((None, None), (None, None), (20.0, None),
                                         (None, 0.3), (5.0, 0.1)))
            yield b, hkv * ratio, hkv, t, d, window, pad, softcap, scale


def bwd_prefill_id(b, hq, hkv, t, d, dtype, window, pad, softcap, scale) -> str:
    return (f"b{b}-hq{hq}-hkv{hkv}-t{t}-d{d}-{str(dtype)[6:]}-w{window}-{pad}-cap{softcap}-"
            f"s{scale}")


def bwd_prefill_inputs(b, hq, hkv, t, d, dtype, window, pad, softcap, device="cpu"):
    """``(q, k, v, grad_out, intervals)`` of a :func:`bwd_prefill_shapes` case: causal, with a
    sliding ``window`` and (``pad``) random left padding."""
    g = torch.Generator().manual_seed(seed_of(b, hq, hkv, t, d, window, pad, softcap))
    q, k, v, go = qkvg(g, b, hq, hkv, t, t, d, dtype, device=device)
    padt = None
    if pad:  # left padding: padded rows see nothing, padded keys are seen by no row
        padt = torch.randint(0, max(1, t // 2) + 1, (b,), generator=g)
        padt[0] = min(t, 3)
    return q, k, v, go, ivs.causal(b, t, t, window=window, pad=padt, device=device)


def bwd_decode_shapes():
    """The seeded shapes of the backward decode sweeps: ``(b, hq, hkv, tq, tk, d, layout)``."""
    rng = random.Random(77)
    for i, (ratio, d) in enumerate([(1, 64), (2, 128), (4, 256), (8, 64), (1, 256), (4, 128),
                                    (8, 128), (2, 64)]):
        tq = 1 + i % 2
        b = rng.randint(1, 3)
        hkv = rng.choice((1, 2)) if ratio < 8 else 1
        tk = rng.choice((3, 130, 300, 513))
        yield b, hkv * ratio, hkv, tq, tk, d, ("causal", "probe", "random")[i % 3]


def bwd_decode_id(b, hq, hkv, tq, tk, d, dtype, layout) -> str:
    return f"b{b}-hq{hq}-hkv{hkv}-tq{tq}-tk{tk}-d{d}-{str(dtype)[6:]}-{layout}"


def bwd_decode_inputs(b, hq, hkv, tq, tk, d, dtype, layout, device="cpu"):
    """``(q, k, v, grad_out, intervals)`` of a :func:`bwd_decode_shapes` case."""
    rng = random.Random(seed_of(b, hq, tq, tk, d, layout))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v, go = qkvg(g, b, hq, hkv, tq, tk, d, dtype, device=device)
    return q, k, v, go, decode_intervals(rng, g, layout, b, tq, tk).to(device)


def assert_unseen_are_zero(grads, iv, tk):
    """Rows that see nothing get dq = 0; keys that no row sees get dk = dv = 0, exactly."""
    dq, dk, dv = grads
    mask = ref.interval_mask(iv, tk)  # [B,Tq,Tk]
    assert (dq.permute(0, 2, 1, 3)[~mask.any(-1)] == 0).all()
    unseen = ~mask.any(1)  # [B,Tk]
    assert (dk.permute(0, 2, 1, 3)[unseen] == 0).all()
    assert (dv.permute(0, 2, 1, 3)[unseen] == 0).all()


def grad_samples(device="cpu"):
    """``((q, k, v, intervals), kwargs)`` for ``torch.library.opcheck`` of the ops with
    gradients: GQA float32, bfloat16 with several ranges and softcap, float16 padded window."""
    g = torch.Generator().manual_seed(0)
    q, k, v, _ = qkvg(g, 2, 4, 2, 5, 9, 64, torch.float32, device=device)
    yield (q, k, v, ivs.causal(2, 5, 9, device=device)), {}
    q, k, v, _ = qkvg(g, 1, 8, 1, 2, 200, 128, torch.bfloat16, device=device)
    iv = torch.tensor([[[[0, 1], [3, 40], [150, 199]], [[0, 200], [0, 0], [7, 7]]]],
                      dtype=torch.int32, device=device)
    yield (q, k, v, iv), {"scale": 0.1, "softcap": 30.0}
    q, k, v, _ = qkvg(g, 2, 2, 1, 7, 7, 64, torch.float16, device=device)
    iv = ivs.causal(2, 7, 7, window=3, pad=torch.tensor([2, 0]), device=device)
    yield (q, k, v, iv), {"softcap": 5.0}


def opcheck_with_grad(op, i, device="cpu"):
    """``opcheck`` of ``op`` (the fwd or the plain op) on :func:`grad_samples` ``[i]``, with
    inputs that require grad."""
    args, kwargs = list(grad_samples(device))[i]
    args = tuple(x.requires_grad_() if x.is_floating_point() else x for x in args)
    torch.library.opcheck(op, args, kwargs)


def opcheck_bwd(device="cpu"):
    """``opcheck`` of the backward op on every :func:`grad_samples` case."""
    for (q, k, v, iv), kw in grad_samples(device):
        scale, softcap = kw.get("scale"), kw.get("softcap")
        out, lse = FWD_OP(q, k, v, iv, scale, softcap)
        go = torch.randn_like(out)
        torch.library.opcheck(BWD_OP, (go, q, k, v, out, lse, iv, scale, softcap),
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))

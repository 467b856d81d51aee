"""Backward (autograd) of ``interval_attention``: the CPU ``interval_attention_bwd`` kernel
against autograd through ``safeattn.reference`` (DESIGN §2).

Tolerances:
- float32 kernel vs float64 reference gradients, per gradient x in (dq, dk, dv):
  ``max|g_x - ref_x| <= 1e-4 * max(max|ref_x|, 0.1 * max over dq/dk/dv of max|ref|)``
  (the second term covers gradients that are 0 in theory, e.g. dq of a row seeing one key).
- bfloat16/float16, the flash-attention rule: ``max|g - g_ref32| <= 2 * max|g_low - g_ref32|
  + floor``, where ``g_ref32`` is autograd through the reference in float32, ``g_low`` autograd
  through the reference in the low dtype itself (same rounded inputs and grad_out), and the
  floor is the float32 tolerance above.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _cases
import safeattn
from safeattn import intervals as ivs
from safeattn import reference as ref
from _cases import (ATTN_OP as attn_op, BWD_OP as bwd_op, FWD_OP as fwd_op,
                    assert_unseen_are_zero, kernel_grads, opcheck_bwd, opcheck_with_grad, qkvg,
                    random_bwd_case, random_intervals, ref_grads)

LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def bwd_mode(mode):
    """Force the kernel's fused (1) or two-pass split (0) scheme; None = its own choice."""
    old = os.environ.get("SAFEATTN_BWD_FUSED")
    if mode is not None:
        os.environ["SAFEATTN_BWD_FUSED"] = str(mode)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SAFEATTN_BWD_FUSED", None)
        else:
            os.environ["SAFEATTN_BWD_FUSED"] = old


@contextlib.contextmanager
def num_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


ERRS: dict = {}  # dtype -> max error seen (reported by test_report_max_errors)


assert_grads_match = functools.partial(_cases.assert_grads_match, errs=ERRS)


# ------------------------------------------------------------------- the oracle's sanity
@pytest.mark.parametrize("softcap,scale", [(None, None), (2.0, 0.7)])
def test_gradcheck_reference(softcap, scale):
    g = torch.Generator().manual_seed(0)
    q, k, v, _ = qkvg(g, 2, 4, 2, 5, 6, 3, torch.float64)
    iv = random_intervals(random.Random(1), 2, 5, 6, 3, p_empty_row=0.3)
    iv[0, 1] = 0  # a row that sees nothing
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ref.interval_attention(q, k, v, iv, scale, softcap), (q, k, v))


# ------------------------------------------------------------------- seeded sweep: prefill
def _prefill_cases():
    cases = []
    for i, (b, hq, hkv, t, d, window, pad, softcap, scale) in enumerate(
            _cases.bwd_prefill_shapes()):
        dtype = torch.float32 if i % 3 else LOW[(i // 3) % 2]
        mode = i % 2
        cases.append(pytest.param(
            b, hq, hkv, t, d, dtype, window, pad, softcap, scale, mode,
            id=_cases.bwd_prefill_id(b, hq, hkv, t, d, dtype, window, pad, softcap, scale)
            + ("-fused" if mode else "-split")))
    return cases


@pytest.mark.parametrize("b,hq,hkv,t,d,dtype,window,pad,softcap,scale,mode", _prefill_cases())
def test_prefill_causal(b, hq, hkv, t, d, dtype, window, pad, softcap, scale, mode):
    q, k, v, go, iv = _cases.bwd_prefill_inputs(b, hq, hkv, t, d, dtype, window, pad, softcap)
    with bwd_mode(mode):
        grads = assert_grads_match(q, k, v, go, iv, scale, softcap)
    assert_unseen_are_zero(grads, iv, t)


# -------------------------------------------------------------------- seeded sweep: decode
def _decode_cases():
    cases = []
    for i, (b, hq, hkv, tq, tk, d, layout) in enumerate(_cases.bwd_decode_shapes()):
        dtype = torch.float32 if i % 4 else LOW[(i // 4) % 2]
        cases.append(pytest.param(b, hq, hkv, tq, tk, d, dtype, layout, i % 2,
                                  id=_cases.bwd_decode_id(b, hq, hkv, tq, tk, d, dtype, layout)))
    return cases


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,dtype,layout,mode", _decode_cases())
def test_decode(b, hq, hkv, tq, tk, d, dtype, layout, mode):
    q, k, v, go, iv = _cases.bwd_decode_inputs(b, hq, hkv, tq, tk, d, dtype, layout)
    with bwd_mode(mode):
        grads = assert_grads_match(q, k, v, go, iv)
    assert_unseen_are_zero(grads, iv, tk)


# --------------------------------------------------------------- random intervals, prefill
@pytest.mark.parametrize("seed", range(8))
def test_random_intervals(seed):
    """Overlapping, duplicated, unordered and empty ranges; rows that see nothing."""
    q, k, v, go, iv, softcap = random_bwd_case(seed, DTYPES)
    with bwd_mode(seed % 2):
        grads = assert_grads_match(q, k, v, go, iv, softcap=softcap)
    assert_unseen_are_zero(grads, iv, k.shape[2])


@pytest.mark.parametrize("softcap,scale", [(None, 0.01), (None, 0.5), (1.0, None),
                                           (30.0, 2.0), (0.3, 0.5)])
def test_softcap_and_scale(softcap, scale):
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    q, k, v, go = qkvg(g, 2, 8, 2, 40, 150, 128, torch.float32, std=2.0 if softcap else 1.0)
    iv = random_intervals(rng, 2, 40, 150, 3)
    assert_grads_match(q, k, v, go, iv, scale=scale, softcap=softcap)
    if softcap is not None:  # the cap must change the gradient
        plain = ref_grads(q, k, v, go, iv, scale, None)
        capped = ref_grads(q, k, v, go, iv, scale, softcap)
        assert (plain[0] - capped[0]).abs().max() > 1e-2


# ----------------------------------------------------------- both schemes, threads, layouts
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_split_agree(dtype):
    """The fused pass and the two-pass split give the same gradients at 1 and 2 threads."""
    g = torch.Generator().manual_seed(8)
    q, k, v, go = qkvg(g, 2, 4, 2, 70, 90, 64, dtype)
    iv = random_intervals(random.Random(8), 2, 70, 90, 2)
    results = []
    for mode in (0, 1):
        for threads in (1, 2):
            with bwd_mode(mode), num_threads(threads):
                results.append(kernel_grads(q, k, v, go, iv, softcap=7.0))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            torch.testing.assert_close(a, b_, atol=tol, rtol=tol)
    assert_grads_match(q, k, v, go, iv, softcap=7.0, grads=results[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_and_grad_out(dtype):
    """HF-layout (transposed) q/k/v views and an expanded grad_out (the grad of .sum())."""
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, t, d = 2, 4, 2, 37, 64
    q = torch.randn(b, t, hq, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, hkv, d, generator=g).to(dtype).transpose(1, 2)
    iv = ivs.causal(b, t, t, window=20, pad=torch.tensor([0, 4]))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    safeattn.interval_attention(*leaves, iv).sum().backward()
    grads = [x.grad for x in leaves]
    assert_grads_match(q, k, v, torch.ones_like(q), iv, grads=grads)
    go = torch.randn(b, hq, d, t, generator=g).to(dtype).transpose(2, 3)  # strided grad_out
    dq, dk, dv = bwd_op(go, q, k, v, *fwd_op(q, k, v, iv), iv, None, None)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert_grads_match(q, k, v, go, iv, grads=[dq, dk, dv])


def test_only_some_inputs_require_grad():
    g = torch.Generator().manual_seed(4)
    q, k, v, go = qkvg(g, 1, 2, 1, 20, 20, 64, torch.float32)
    iv = ivs.causal(1, 20, 20)
    full = kernel_grads(q, k, v, go, iv)
    for i in range(3):
        leaves = [x.detach().clone() for x in (q, k, v)]
        leaves[i].requires_grad_()
        safeattn.interval_attention(*leaves, iv).backward(go)
        torch.testing.assert_close(leaves[i].grad, full[i], atol=0, rtol=0)
        assert all(leaves[j].grad is None for j in range(3) if j != i)


def test_empty_shapes():
    for (b, hq, hkv, tq, tk, d, ni) in ((2, 4, 2, 3, 0, 64, 1), (2, 4, 2, 3, 10, 64, 0),
                                        (2, 4, 2, 0, 10, 64, 1), (0, 4, 2, 3, 10, 64, 1)):
        q = torch.randn(b, hq, tq, d, requires_grad=True)
        k = torch.randn(b, hkv, tk, d, requires_grad=True)
        v = torch.randn(b, hkv, tk, d, requires_grad=True)
        iv = torch.zeros(b, tq, ni, 2, dtype=torch.int32)
        safeattn.interval_attention(q, k, v, iv).sum().backward()
        for x in (q, k, v):
            assert x.grad.shape == x.shape and (x.grad == 0).all()


# ----------------------------------------------------------------- wrapper and the plain op
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_wrapper_picks_fwd_only_when_grad_is_needed():
    g = torch.Generator().manual_seed(0)
    q, k, v, _ = qkvg(g, 1, 2, 1, 4, 4, 64, torch.float32)
    iv = ivs.causal(1, 4, 4)
    kg = k.detach().requires_grad_()
    for args, grad_mode, want in (((q, k, v), True, "interval_attention.default"),
                                  ((q, kg, v), True, "interval_attention_fwd.default"),
                                  ((q, kg, v), False, "interval_attention.default")):
        with torch.set_grad_enabled(grad_mode), _Ops() as m:
            out = safeattn.interval_attention(*args, iv)
        assert [n for n in m.names if "safeattn" in n] == [f"safeattn.{want}"]
        assert out.requires_grad == (grad_mode and args[1] is kg)


def test_fwd_lse_is_not_differentiable():
    g = torch.Generator().manual_seed(0)
    q, k, v, _ = qkvg(g, 1, 2, 1, 4, 4, 64, torch.float32)
    q.requires_grad_()
    iv = ivs.causal(1, 4, 4, pad=torch.tensor([2]))
    out, lse = fwd_op(q, k, v, iv)
    assert out.requires_grad and not lse.requires_grad
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 4)
    assert torch.isneginf(lse[:, :, :1]).all() and torch.isfinite(lse[:, :, 2:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap,scale", [(None, None), (5.0, 0.3)])
def test_fwd_lse_matches_reference(dtype, softcap, scale):
    """interval_attention_fwd's lse (fp32 from the rounded inputs) against the reference's
    logsumexp in float64, on row blocks and on a split KV; rows that see nothing are -inf."""
    g = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    for b, hq, hkv, tq, tk in ((2, 4, 2, 30, 30), (1, 8, 2, 2, 700)):
        q, k, v, _ = qkvg(g, b, hq, hkv, tq, tk, 64, dtype)
        iv = random_intervals(rng, b, tq, tk, 3)
        iv[0, 0] = 0
        iv[-1, -1, 0] = torch.tensor([0, tk], dtype=torch.int32)
        out, lse = fwd_op(q, k, v, iv, scale, softcap)
        torch.testing.assert_close(out, attn_op(q, k, v, iv, scale, softcap), atol=0, rtol=0)
        want = ref.interval_attention_lse(q.double(), k.double(), iv, scale, softcap)
        assert torch.isneginf(want[0, :, 0]).all() and torch.isneginf(lse[0, :, 0]).all()
        torch.testing.assert_close(lse.double(), want, atol=1e-4, rtol=1e-5)


def test_plain_op_backward_recomputes():
    """Autograd through torch.ops.safeattn.interval_attention (no lse saved) matches."""
    g = torch.Generator().manual_seed(6)
    q, k, v, go = qkvg(g, 2, 4, 1, 30, 30, 128, torch.float32)
    iv = ivs.causal(2, 30, 30, window=9, pad=torch.tensor([3, 0]))
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attn_op(*leaves, iv, 0.2, 4.0).backward(go)
    assert_grads_match(q, k, v, go, iv, 0.2, 4.0, grads=[x.grad for x in leaves])
    torch.testing.assert_close([x.grad for x in leaves],
                               kernel_grads(q, k, v, go, iv, 0.2, 4.0), atol=0, rtol=0)


def test_backward_on_device_without_kernel_says_so(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v, go = qkvg(g, 1, 2, 1, 4, 4, 64, torch.float32)
    q.requires_grad_()
    monkeypatch.setattr(safeattn.ops, "_BWD_DEVICES", frozenset())
    for fn in (safeattn.interval_attention, attn_op):
        with pytest.raises(NotImplementedError, match="no backward kernel for cpu"):
            fn(q, k, v, ivs.causal(1, 4, 4)).backward(go)


# ---------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("op", [fwd_op, attn_op], ids=["fwd", "plain"])
@pytest.mark.parametrize("i", range(3))
def test_opcheck_with_grad(op, i):
    opcheck_with_grad(op, i)


def test_opcheck_bwd():
    opcheck_bwd()


# ----------------------------------------------------------------------- torch.compile
def test_compile_forward_backward_aot_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    q, k, v, go = qkvg(g, 2, 4, 2, 12, 12, 64, torch.float32)
    iv = ivs.causal(2, 12, 12, pad=torch.tensor([0, 3]))

    def loss_fn(q, k, v, iv):
        out = safeattn.ops.interval_attention(q, k, v, iv, softcap=20.0)
        return (out * go).sum() * 2

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (compiled, loss_fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        fn(*leaves, iv).backward()
        grads.append([x.grad for x in leaves])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    assert_grads_match(q, k, v, 2 * go, iv, softcap=20.0, grads=grads[0])
    with torch.no_grad():  # the no-grad path traces too, in the same compiled function
        torch.testing.assert_close(compiled(q, k, v, iv), loss_fn(q, k, v, iv))


# --------------------------------------------------------------------------------- errors
def test_bwd_argument_errors():
    g = torch.Generator().manual_seed(0)
    q, k, v, go = qkvg(g, 2, 4, 2, 5, 9, 64, torch.float32)
    iv = ivs.causal(2, 5, 9)
    out, lse = fwd_op(q, k, v, iv)
    cases = [
        ((go[:, :, :4], q, k, v, out, lse, iv), "grad_out"),
        ((go.half(), q, k, v, out, lse, iv), "grad_out"),
        ((go, q, k, v, out[..., :32], lse, iv), r"\bout\b"),
        ((go, q, k, v, out.bfloat16(), lse, iv), r"\bout\b"),
        ((go, q, k, v, out, lse[:, :3], iv), "lse"),
        ((go, q, k, v, out, lse.double(), iv), "lse"),
        ((go, q, k[:, :1].expand(2, 3, 9, 64), v, out, lse, iv), "head counts"),
        ((go, q, k, v, out, lse, iv.long()), "intervals"),
        ((go, q, k, v, out, lse, iv + 20), "out of range"),
        ((go.double(), q.double(), k.double(), v.double(), out.double(), lse, iv),
         "float32, bfloat16 or float16"),
    ]
    for args, pat in cases:
        with pytest.raises(RuntimeError, match=pat):
            bwd_op(*args, None, None)
    with pytest.raises(RuntimeError, match="softcap"):
        bwd_op(go, q, k, v, out, lse, iv, None, -1.0)


# ------------------------------------------------------------- portable (non-BLAS) loops
_NO_BLAS_SCRIPT = textwrap.dedent("""
    import random, torch
    import test_backward as T
    from safeattn import intervals as ivs
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for b, hq, hkv, tq, tk, d, dtype, cap, mode in [
        (2, 4, 2, 70, 70, 64, torch.float32, None, 0),
        (1, 8, 1, 2, 300, 128, torch.float32, 10.0, 1),
        (2, 4, 1, 33, 33, 128, torch.bfloat16, None, 1),
        (1, 2, 1, 20, 90, 64, torch.float16, 30.0, 0),
    ]:
        q, k, v, go = T.qkvg(g, b, hq, hkv, tq, tk, d, dtype)
        for iv in (ivs.causal(b, tq, tk, window=25, pad=torch.randint(0, 3, (b,))),
                   T.random_intervals(rng, b, tq, tk, 3)):
            with T.bwd_mode(mode):
                T.assert_grads_match(q, k, v, go, iv, softcap=cap)
    print("NO_BLAS_OK")
""")


def test_portable_loops_without_blas():
    env = dict(os.environ, SAFEATTN_NO_BLAS="1")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", _NO_BLAS_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "NO_BLAS_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_report_max_errors():
    """Runs last: prints the largest relative gradient error per dtype (pytest -s shows it)."""
    for dt, e in sorted(ERRS.items(), key=str):
        print(f"max gradient error {dt}: {e:.3g} (relative to max|grad_ref|)")

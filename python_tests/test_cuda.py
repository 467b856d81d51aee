"""CUDA kernels (``csrc/cuda``) against ``safeattn.reference``; skipped without a CUDA device.

Tolerances for ``interval_attention``: float32 output vs the float64 reference, atol 1e-5
(TF32 is switched off for the reference). bfloat16/float16 use the flash-attention rule:
max|out - ref32| <= 2 * max|ref_low - ref32|, where ref32 is the reference on the inputs
upcast to float32 and ref_low the reference computed in the low dtype itself (plus a tiny
floor). Rows that see no key must be exact zeros.
"""
from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import _cases
import safeattn
from _cases import assert_unseen_are_zero, kernel_grads, seed_of
from safeattn import intervals as ivs
from safeattn import reference as ref
from safeattn.ops import BENIGN, MALICIOUS, TRANSITION

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RATIOS = (1, 2, 4, 8)
HEAD_DIMS = (64, 128, 256)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --------------------------------------------------------------------------------- helpers
def qkv(g, b, hq, hkv, tq, tk, d, dtype, std=1.0):
    q = torch.randn(b, hq, tq, d, generator=g) * std
    k = torch.randn(b, hkv, tk, d, generator=g) * std
    v = torch.randn(b, hkv, tk, d, generator=g)
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def empty_rows(iv: torch.Tensor, tk: int) -> torch.Tensor:
    """[B,Tq] bool: rows whose ranges cover no key column."""
    return ~ref.interval_mask(iv, tk).any(-1)


def assert_matches_reference(out, q, k, v, iv, scale=None, softcap=None):
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    assert torch.isfinite(out).all(), "kernel produced non-finite values"
    if out.numel() == 0:
        return
    rows = empty_rows(iv, k.shape[2])  # [B,Tq]
    if rows.any():
        assert (out.transpose(1, 2)[rows] == 0).all(), "a row without visible keys is not zero"
    if q.dtype == torch.float32:
        r = ref.interval_attention(q.double(), k.double(), v.double(), iv, scale, softcap)
        err = (out.double() - r).abs().max().item()
        assert err <= 1e-5, f"float32: max|out-ref64| = {err:.3g} > 1e-5"
        return
    r32 = ref.interval_attention(q.float(), k.float(), v.float(), iv, scale, softcap)
    rlow = ref.interval_attention(q, k, v, iv, scale, softcap)
    err = (out.float() - r32).abs().max().item()
    bound = 2 * (rlow.float() - r32).abs().max().item() + 1e-6
    assert err <= bound, f"{q.dtype}: max|out-ref32| = {err:.3g} > 2*max|ref_low-ref32| = {bound:.3g}"


def run_and_check(q, k, v, iv, scale=None, softcap=None):
    out = safeattn.interval_attention(q, k, v, iv, scale=scale, softcap=softcap)
    assert_matches_reference(out, q, k, v, iv, scale, softcap)
    return out


def random_intervals(rng: random.Random, b, tq, tk, ni, p_empty_row=0.15) -> torch.Tensor:
    return _cases.random_intervals(rng, b, tq, tk, ni, p_empty_row).to(DEV)


def prefill_intervals(rng, g, layout, b, t):
    if layout == "causal":
        return ivs.causal(b, t, t, device=DEV)
    if layout == "window":
        return ivs.causal(b, t, t, window=rng.choice((1, 7, 64, 100)), device=DEV)
    if layout == "pad":
        pad = torch.randint(0, max(1, t // 2), (b,), generator=g)
        return ivs.causal(b, t, t, pad=pad, device=DEV)
    return random_intervals(rng, b, t, t, 3)


def decode_intervals(rng, g, layout, b, tq, tk):
    return _cases.decode_intervals(rng, g, layout, b, tq, tk, ni=3).to(DEV)


def test_cuda_kernels_are_registered():
    for op in ("interval_attention", "paged_interval_attention", "safety_step"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"safeattn::{op}", "CUDA"), (
            f"safeattn::{op} has no CUDA kernel: build with SAFEATTN_CUDA=1")
        assert safeattn.ops.kernel_for(op, torch.device(DEV), torch.float16) == "cuda"


# ------------------------------------------------------------------------------ prefill
def _prefill_cases():
    rng = random.Random(1)
    cases = []
    layouts = ("causal", "random", "window", "pad")
    i = 0
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for ratio in RATIOS:
                b = 1 + i % 3
                hkv = 1 if ratio == 8 else rng.choice((1, 2))
                t = (1, 37, 64, 129, 200, 300)[i % 6]
                layout = layouts[i % 4]
                i += 1
                cases.append(pytest.param(b, hkv * ratio, hkv, t, d, dtype, layout,
                                          id=f"b{b}-hq{hkv * ratio}-hkv{hkv}-t{t}-d{d}-"
                                             f"{str(dtype)[6:]}-{layout}"))
    return cases


@pytest.mark.parametrize("b,hq,hkv,t,d,dtype,layout", _prefill_cases())
def test_prefill(b, hq, hkv, t, d, dtype, layout):
    rng = random.Random(seed_of(b, hq, hkv, t, d, str(dtype), layout))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v = qkv(g, b, hq, hkv, t, t, d, dtype)
    run_and_check(q, k, v, prefill_intervals(rng, g, layout, b, t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_long_causal(dtype):
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(g, 1, 4, 2, 1024, 1024, 128, dtype)
    run_and_check(q, k, v, ivs.causal(1, 1024, 1024, window=700, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(5, 300), (3, 3), (40, 1000)])
def test_few_rows_many_heads_uses_row_blocks(dtype, tq, tk):
    """G*Tq > 16 with a short Tq: the prefill kernel with mostly empty row tiles."""
    rng = random.Random(tq * 7 + tk)
    g = torch.Generator().manual_seed(tq)
    q, k, v = qkv(g, 2, 16, 2, tq, tk, 64, dtype)
    run_and_check(q, k, v, random_intervals(rng, 2, tq, tk, 2))


# ------------------------------------------------------------------------------- decode
def _decode_cases():
    rng = random.Random(7)
    cases = []
    layouts = ("causal", "probe", "random", "window")
    i = 0
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for ratio in RATIOS:
                tq = 1 + i % 2
                b = rng.randint(1, 3)
                hkv = rng.choice((1, 1, 2, 4))
                tk = (1, 17, 130, 300, 1000, 1500, 4096)[i % 7]
                layout = layouts[(i // 2) % 4]
                i += 1
                cases.append(pytest.param(b, hkv * ratio, hkv, tq, tk, d, dtype, layout,
                                          id=f"b{b}-hq{hkv * ratio}-hkv{hkv}-tq{tq}-tk{tk}-"
                                             f"d{d}-{str(dtype)[6:]}-{layout}"))
    return cases


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,dtype,layout", _decode_cases())
def test_decode(b, hq, hkv, tq, tk, d, dtype, layout):
    rng = random.Random(seed_of(b, hq, hkv, tq, tk, d, str(dtype), layout))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v = qkv(g, b, hq, hkv, tq, tk, d, dtype)
    run_and_check(q, k, v, decode_intervals(rng, g, layout, b, tq, tk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hkv", [(1, 1), (3, 8)])
def test_decode_kv_split_fragmented(dtype, b, hkv):
    """Long KV over few groups (many splits); some splits hold nothing a row sees."""
    g = torch.Generator().manual_seed(b)
    tq, tk, d = 2, 4096, 128
    q, k, v = qkv(g, b, hkv * 8, hkv, tq, tk, d, dtype)
    layouts = [
        [[0, 4096]],
        [[0, 100], [3000, 4096]],
        [[5, 6], [700, 1300], [1290, 1400], [4095, 4096]],
        [[17, 17], [2048, 2048]],  # nothing visible
    ]
    for r0, r1 in [(layouts[0], layouts[2]), (layouts[1], layouts[3]), (layouts[3], layouts[3]),
                   (layouts[2], layouts[1])]:
        iv = torch.zeros(b, tq, 4, 2, dtype=torch.int32)
        for t, rows in enumerate((r0, r1)):
            for i, (s, e) in enumerate(rows):
                iv[:, t, i] = torch.tensor([s, e])
        out = run_and_check(q, k, v, iv.to(DEV))
        for t, rows in enumerate((r0, r1)):
            if all(s == e for s, e in rows):
                assert (out[:, :, t] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_split_boundaries(dtype):
    g = torch.Generator().manual_seed(11)
    for tk in (127, 128, 129, 511, 513, 1025, 2049):
        q, k, v = qkv(g, 2, 4, 2, 1, tk, 64, dtype)
        run_and_check(q, k, v, ivs.causal(2, 1, tk, pad=torch.tensor([0, 37]), device=DEV))


# ---------------------------------------------------------------------- options and edges
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(1, 777), (2, 300), (150, 150)])
@pytest.mark.parametrize("softcap,scale", [(30.0, None), (50.0, 0.3), (None, 0.05), (5.0, 1.0)])
def test_softcap_and_scale(dtype, tq, tk, softcap, scale):
    rng = random.Random(seed_of(tq, tk, softcap, scale))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v = qkv(g, 2, 4, 2, tq, tk, 128, dtype)
    iv = random_intervals(rng, 2, tq, tk, 3) if tq > 2 else decode_intervals(
        rng, g, "probe", 2, tq, tk)
    run_and_check(q, k, v, iv, scale=scale, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", (8, 16, 40, 72, 96, 136, 200, 248))
def test_generic_head_dims(dtype, d):
    rng = random.Random(d)
    g = torch.Generator().manual_seed(d)
    for tq, tk in ((70, 70), (2, 700)):
        q, k, v = qkv(g, 2, 4, 2, tq, tk, d, dtype)
        run_and_check(q, k, v, random_intervals(rng, 2, tq, tk, 2))


def test_head_dim_over_256_is_rejected():
    q = torch.zeros(1, 1, 2, 264, device=DEV, dtype=torch.float16)
    iv = ivs.causal(1, 2, 2, device=DEV)
    with pytest.raises(RuntimeError, match="D=264"):
        safeattn.interval_attention(q, q, q, iv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(3, 50), (2, 2000), (100, 100)])
def test_rows_without_visible_keys_are_exactly_zero(dtype, tq, tk):
    g = torch.Generator().manual_seed(tq)
    q, k, v = qkv(g, 2, 4, 1, tq, tk, 64, dtype)
    iv = ivs.causal(2, tq, tk, device=DEV).repeat(1, 1, 2, 1)
    iv[0, 0] = torch.tensor([[5, 5], [0, 0]], dtype=torch.int32)  # empty ranges only
    iv[1, -1] = torch.tensor([[tk, tk], [3, 3]], dtype=torch.int32)
    out = run_and_check(q, k, v, iv)
    assert (out[0, :, 0] == 0).all() and (out[1, :, -1] == 0).all()
    none = torch.zeros(2, tq, 1, 2, dtype=torch.int32, device=DEV)
    assert (safeattn.interval_attention(q, k, v, none) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _cases.nan_cases(), ids=lambda c: c[0])
def test_nan_in_a_visible_key_propagates(case, dtype):
    """A NaN among a row's visible scores makes the row NaN (fail closed) on every
    path: decode with one or several KV splits (where fmaxf drops NaN from the max), the
    combine kernel and prefill; rows that do not see it stay finite."""
    _, q, k, v, iv = case
    out = safeattn.interval_attention(*(x.to(DEV, dtype) for x in (q, k, v)), iv.to(DEV))
    assert out[0, :, 0].isnan().all() and out[0, :, 1:].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _cases.hidden_nonfinite_cases(), ids=lambda c: c[0])
def test_a_column_no_row_sees_changes_nothing(case, dtype):
    """NaN / inf keys and values outside every range (inside a tile the rows read, and over
    whole KV splits) leave the outputs as they are with zeros there: a tile's masked
    columns must not enter P·V as 0 · nan."""
    _, q, k, v, iv, hidden = case
    q, k, v = (x.to(DEV, dtype) for x in (q, k, v))
    k0, v0 = k.clone(), v.clone()
    k0[:, :, hidden] = 0
    v0[:, :, hidden] = 0
    out = safeattn.interval_attention(q, k, v, iv.to(DEV))
    assert out.isfinite().all()
    torch.testing.assert_close(out, safeattn.interval_attention(q, k0, v0, iv.to(DEV)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _cases.hidden_nonfinite_cases(), ids=lambda c: c[0])
def test_a_column_no_row_sees_gets_no_gradient_and_gives_none(case, dtype):
    """The backward too: dq must not take dS · K there as 0 · nan."""
    _, q, k, v, iv, hidden = case
    _cases.assert_hidden_columns_get_no_gradient(*(x.to(DEV, dtype) for x in (q, k, v)),
                                                 iv.to(DEV), hidden)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_shapes(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(g, 2, 2, 1, 3, 0, 64, dtype)
    out = safeattn.interval_attention(q, k, v, torch.zeros(2, 3, 1, 2, dtype=torch.int32,
                                                           device=DEV))
    assert out.shape == q.shape and (out == 0).all()
    q, k, v = qkv(g, 2, 2, 1, 3, 5, 64, dtype)
    out = safeattn.interval_attention(q, k, v, torch.zeros(2, 3, 0, 2, dtype=torch.int32,
                                                           device=DEV))
    assert (out == 0).all()
    q, k, v = qkv(g, 0, 2, 1, 3, 5, 64, dtype)
    assert safeattn.interval_attention(q, k, v, torch.zeros(0, 3, 1, 2, dtype=torch.int32,
                                                            device=DEV)).shape == q.shape
    q, k, v = qkv(g, 1, 2, 1, 0, 5, 64, dtype)
    assert safeattn.interval_attention(q, k, v, torch.zeros(1, 0, 1, 2, dtype=torch.int32,
                                                            device=DEV)).shape == q.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tk", (5, 300))
def test_duplicate_and_overlapping_ranges_count_once(dtype, tk):
    g = torch.Generator().manual_seed(tk)
    q, k, v = qkv(g, 1, 2, 1, 2, tk, 64, dtype)
    base = safeattn.interval_attention(q, k, v, torch.tensor(
        [[[[0, tk]], [[1, tk - 1]]]], dtype=torch.int32, device=DEV))
    for ranges in ([[0, tk], [0, tk]], [[0, tk // 2 + 1], [tk // 3, tk], [0, 1]]):
        iv = torch.tensor([[ranges, [[1, tk - 1]] * len(ranges)]], dtype=torch.int32,
                          device=DEV)
        torch.testing.assert_close(safeattn.interval_attention(q, k, v, iv), base,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq,tk", [(1, 600), (2, 130), (90, 90)])
def test_non_contiguous_and_misaligned_inputs(dtype, tq, tk):
    rng = random.Random(tq + tk)
    g = torch.Generator().manual_seed(tq)
    b, hq, hkv, d = 2, 4, 2, 64
    iv = random_intervals(rng, b, tq, tk, 2)
    # HF-style [B,T,H,D] storage, seen as [B,H,T,D]
    q = torch.randn(b, tq, hq, d, generator=g).to(DEV, dtype).transpose(1, 2)
    k = torch.randn(b, tk, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(b, tk, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    run_and_check(q, k, v, iv)
    # a slice of a longer cache, and views starting one element off 16-byte alignment
    kc = torch.randn(b, hkv, tk + 9, d + 1, generator=g).to(DEV, dtype)[:, :, 4:tk + 4, 1:]
    vc = torch.randn(b, hkv, tk + 9, d + 1, generator=g).to(DEV, dtype)[:, :, 4:tk + 4, 1:]
    run_and_check(q, kc, vc, iv)
    # last dim not contiguous, intervals not contiguous
    qs = torch.randn(b, hq, tq, 2 * d, generator=g).to(DEV, dtype)[..., ::2]
    ivn = torch.cat([iv, iv], dim=2)[:, :, ::2]
    run_and_check(qs, k, v, ivn)


def test_out_of_range_ranges_are_clamped_by_the_kernel():
    """The Python wrapper rejects them; the op itself must still never read out of bounds."""
    g = torch.Generator().manual_seed(3)
    for tq, tk in ((2, 200), (70, 70)):
        q, k, v = qkv(g, 1, 2, 1, tq, tk, 64, torch.float32)
        iv = torch.tensor([[-50, 10], [tk - 3, tk + 100]], dtype=torch.int32)
        iv = iv.expand(1, tq, 2, 2).contiguous().to(DEV)
        out = torch.ops.safeattn.interval_attention.default(q, k, v, iv, None, None)
        clamped = iv.clamp(0, tk)
        ref_out = ref.interval_attention(q.double(), k.double(), v.double(), clamped)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_inputs_unchanged(dtype):
    rng = random.Random(2)
    g = torch.Generator().manual_seed(2)
    for tq, tk in ((2, 3000), (200, 200)):
        q, k, v = qkv(g, 2, 8, 2, tq, tk, 128, dtype)
        iv = random_intervals(rng, 2, tq, tk, 3)
        copies = [t.clone() for t in (q, k, v, iv)]
        a = safeattn.interval_attention(q, k, v, iv)
        b = safeattn.interval_attention(q, k, v, iv)
        assert torch.equal(a, b)
        for t, c in zip((q, k, v, iv), copies):
            assert torch.equal(t, c)


def test_other_device_and_stream():
    """Runs on the tensors' device and the current stream."""
    g = torch.Generator().manual_seed(4)
    q, k, v = qkv(g, 1, 2, 1, 2, 500, 64, torch.float16)
    iv = ivs.causal(1, 2, 500, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = safeattn.interval_attention(q, k, v, iv)
    torch.cuda.current_stream().wait_stream(s)
    assert_matches_reference(out, q, k, v, iv)
    last = torch.cuda.device_count() - 1
    if last > 0:
        args = [t.to(f"cuda:{last}") for t in (q, k, v, iv)]
        out2 = safeattn.interval_attention(*args)
        assert out2.device == args[0].device
        torch.testing.assert_close(out2.cpu(), out.cpu(), atol=0, rtol=0)


def test_cuda_graph_capture_has_no_host_sync():
    """Both ops record into a CUDA graph (any host sync would fail the capture)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = qkv(g, 2, 8, 2, 2, 3000, 128, torch.bfloat16)
    iv = decode_intervals(random.Random(9), g, "probe", 2, 2, 3000)
    h = torch.randn(2, 64, device=DEV)
    w, bias = torch.randn(64, device=DEV), torch.zeros(1, device=DEV)
    state = [torch.zeros(2, dtype=torch.int32, device=DEV) for _ in range(4)]
    refused = torch.zeros(2, dtype=torch.bool, device=DEV)
    active = torch.ones(2, dtype=torch.bool, device=DEV)
    qspan = torch.tensor([[1, 5], [2, 6]], dtype=torch.int32, device=DEV)
    rs = torch.tensor([7, 9], dtype=torch.int32, device=DEV)

    def body():
        out = torch.ops.safeattn.interval_attention.default(q, k, v, iv, None, None)
        p, niv = torch.ops.safeattn.safety_step.default(h, w, bias, *state, refused, active,
                                                         qspan, rs, 0.5, 3, 10, 10, 10)
        return out, p, niv

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, p, niv = body()
    state[3].zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, q, k, v, iv)
    torch.testing.assert_close(p, torch.sigmoid(h @ w), rtol=1e-5, atol=1e-6)
    assert state[3].tolist() == [1, 1]


# --------------------------------------------------------------------------- safety_step
class State:
    FIELDS = ("mode", "consec", "s_t", "step", "refused")

    def __init__(self, b: int, device=DEV):
        self.mode = torch.full((b,), BENIGN, dtype=torch.int32, device=device)
        self.consec = torch.zeros(b, dtype=torch.int32, device=device)
        self.s_t = torch.full((b,), -1, dtype=torch.int32, device=device)
        self.step = torch.zeros(b, dtype=torch.int32, device=device)
        self.refused = torch.zeros(b, dtype=torch.bool, device=device)

    def to(self, device) -> "State":
        s = State.__new__(State)
        for f in self.FIELDS:
            setattr(s, f, getattr(self, f).clone().to(device))
        return s

    def args(self):
        return [getattr(self, f) for f in self.FIELDS]

    def assert_equal(self, other: "State", where=""):
        for f in self.FIELDS:
            a, b = getattr(self, f).cpu(), getattr(other, f).cpu()
            assert torch.equal(a, b), f"{where} {f}: cuda {a.tolist()} != reference {b.tolist()}"


def step_both(kst: State, rst: State, h, weight, bias, active, q_span, resp_start, *,
              theta=0.5, tau=3, r1=10, r2=10, r3=10, rtol=1e-6, atol=1e-7, where=""):
    """CUDA kernel on kst (cuda tensors), reference on rst (cpu copies); compares all."""
    cu = [t.to(DEV) for t in (h, weight, bias, active, q_span, resp_start)]
    p, iv = safeattn.safety_step(cu[0], cu[1], cu[2], *kst.args(), cu[3], cu[4], cu[5],
                                 theta=theta, tau=tau, r1=r1, r2=r2, r3=r3)
    cpu = [t.cpu() for t in (h, weight, bias, active, q_span, resp_start)]
    rp, riv = ref.safety_step(cpu[0], cpu[1], cpu[2], *rst.args(), cpu[3], cpu[4], cpu[5],
                              theta, tau, r1, r2, r3)
    assert p.device.type == "cuda" and p.dtype == torch.float32 and p.shape == (h.shape[0],)
    assert iv.device.type == "cuda" and iv.dtype == torch.int32 and iv.shape == (h.shape[0], 2, 2)
    torch.testing.assert_close(p.cpu(), rp, rtol=rtol, atol=atol, equal_nan=True, msg=where)
    assert torch.equal(iv.cpu(), riv), f"{where} intervals: cuda {iv.tolist()} != ref {riv.tolist()}"
    kst.assert_equal(rst, where)
    return p, iv


def logit_of(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def safe_logit(rng: random.Random, theta: float, p_hit: float = 0.5) -> float:
    """A logit whose p is clearly on one side of theta (no float rounding ties)."""
    hit = rng.random() < p_hit
    if theta <= 0.0:
        return rng.uniform(-20, 20)
    if theta >= 1.0:
        return 40.0 if hit else rng.uniform(-20, 10)
    off = rng.uniform(1e-3, 3.0) * rng.choice((1, 1, 1, 5))
    return logit_of(theta) + (off if hit else -off)


SAFETY_PARAMS = [  # theta, tau, r1, r2, r3
    (0.5, 3, 10, 10, 10),
    (0.5, 1, 5, 15, 10),
    (0.3, 2, 0, 0, 0),
    (0.8, 4, 3, 2, 7),
    (0.0, 3, 10, 10, 10),
    (1.0, 2, 1, 1, 1),
    (0.5, 100, 4, 6, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("theta,tau,r1,r2,r3", SAFETY_PARAMS)
def test_safety_step_random_sequences(theta, tau, r1, r2, r3, dtype):
    """p driven exactly (weight = e_0, bias = 0: the logit is h[:, 0])."""
    rng = random.Random(seed_of(theta, tau, r1, r2, r3, str(dtype)))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    b, d = 9, 24
    weight = torch.zeros(d, dtype=dtype)
    weight[0] = 1
    bias = torch.zeros(1, dtype=dtype)
    kst = State(b)
    rst = kst.to("cpu")
    q_span = torch.tensor([[rng.randint(2, 5), rng.randint(6, 40)] for _ in range(b)],
                          dtype=torch.int32)
    resp_start = q_span[:, 1] + torch.randint(0, 20, (b,), generator=g, dtype=torch.int32)
    p_active = rng.choice((1.0, 0.7))
    for t in range(40):
        logits = [safe_logit(rng, theta, 0.1 if t == 0 else 0.35) for _ in range(b)]
        logits[1] = safe_logit(rng, theta, 0.1 if t == 0 else 0.7)
        h = torch.randn(b, d, generator=g, dtype=torch.float64)
        h[:, 0] = torch.tensor(logits, dtype=torch.float64)
        if rng.random() < 0.15:  # non-finite somewhere in one row: fail closed
            h[rng.randrange(b), rng.randrange(d)] = rng.choice(
                (float("nan"), float("inf"), float("-inf")))
        h = h.to(dtype)
        active = torch.tensor([rng.random() < p_active for _ in range(b)])
        if t == 0:
            active[:4] = True
        step_both(kst, rst, h, weight, bias, active, q_span, resp_start, theta=theta, tau=tau,
                  r1=r1, r2=r2, r3=r3, where=f"t={t}")
    assert kst.step.tolist() == [40] * b


@pytest.mark.parametrize("seed", range(6))
def test_safety_step_general_head_and_strided_h(seed):
    """Random weight/bias, random D (incl. large), h a strided view; p to fp32 rounding."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, d = rng.randint(1, 40), rng.choice((1, 7, 64, 640, 2304, 4096))
    dtype = rng.choice((torch.float32, torch.bfloat16, torch.float16))
    weight = (torch.randn(1, d, generator=g) / math.sqrt(d)).to(dtype)
    bias = torch.randn(1, generator=g).to(dtype)
    kst = State(b)
    for f in ("mode", "consec", "s_t", "step"):
        getattr(kst, f).copy_(torch.randint(0, 4, (b,), generator=g, dtype=torch.int32))
    kst.s_t.copy_(torch.minimum(kst.s_t, kst.step - 1))
    rst = kst.to("cpu")
    q_span = torch.randint(0, 10, (b, 2), generator=g, dtype=torch.int32).sort(dim=1).values
    resp_start = torch.randint(10, 30, (b,), generator=g, dtype=torch.int32)
    for t in range(12):
        hidden = torch.randn(b, 3, d, generator=g).to(DEV, dtype)  # [B,T,D]: position 1
        h = hidden[:, 1]  # a strided view on the device
        logit = h.cpu().float() @ weight.float().reshape(-1) + bias.float()
        p = torch.sigmoid(logit)
        # a theta that no row's p sits next to (the fp32 dot order may differ)
        theta = 0.5
        while (p - theta).abs().min() < 1e-4:
            theta = rng.uniform(0.05, 0.95)
        active = torch.rand(b, generator=g) < 0.8
        step_both(kst, rst, h, weight, bias, active, q_span, resp_start, theta=theta,
                  tau=rng.randint(1, 4), r1=rng.randint(0, 8), r2=rng.randint(0, 8),
                  r3=rng.randint(0, 8), rtol=2e-5, atol=1e-6, where=f"t={t}")


def test_safety_step_transitions():
    """BENIGN -> TRANSITION -> BENIGN -> ... -> refusal, and Rule 1 at prefill."""
    d = 8
    weight = torch.zeros(d)
    weight[0] = 1
    bias = torch.zeros(1)
    lo, hi = -3.0, 3.0
    seq = [  # logits per step for 3 rows
        [lo, hi, lo], [hi, lo, lo], [lo, lo, hi], [hi, lo, hi], [hi, hi, hi], [hi, lo, float("nan")],
    ]
    kst = State(3)
    rst = kst.to("cpu")
    qs = torch.tensor([[1, 4], [2, 5], [1, 9]], dtype=torch.int32)
    rs = torch.tensor([10, 12, 20], dtype=torch.int32)
    act = torch.ones(3, dtype=torch.bool)
    for t, logits in enumerate(seq):
        h = torch.zeros(3, d)
        h[:, 0] = torch.tensor(logits)
        step_both(kst, rst, h, weight, bias, act, qs, rs, tau=2, where=f"t={t}")
    assert kst.refused.tolist() == [True, True, True]
    assert int(kst.mode[1]) == MALICIOUS  # refused at prefill
    assert int(kst.mode[0]) == TRANSITION


def test_safety_step_saturated_p_is_decided_on_the_logit():
    """fp32 p is 1.0 for every one of these logits; θ = sigmoid(18) splits them on the logit,
    and θ = 1 hits no finite logit (a nan still refuses)."""
    d = 8
    weight = torch.zeros(d)
    weight[0] = 1
    bias = torch.zeros(1)
    b = 5
    qs = torch.tensor([[1, 4]] * b, dtype=torch.int32)
    rs = torch.tensor([10] * b, dtype=torch.int32)
    act = torch.ones(b, dtype=torch.bool)
    h = torch.zeros(b, d)
    h[:, 0] = torch.tensor([17.5, 20.0, 30.0, 17.9, 18.1])
    kst = State(b)
    step_both(kst, kst.to("cpu"), h, weight, bias, act, qs, rs, theta=1 / (1 + math.exp(-18.0)))
    assert kst.refused.tolist() == [False, True, True, False, True]
    h[:, 0] = torch.tensor([1e30, 88.0, 40.0, 20.0, float("nan")])
    kst = State(b)
    step_both(kst, kst.to("cpu"), h, weight, bias, act, qs, rs, theta=1.0)
    assert kst.refused.tolist() == [False, False, False, False, True]


def test_safety_step_empty_batch():
    h = torch.zeros(0, 16, device=DEV)
    st = State(0)
    p, iv = safeattn.safety_step(h, torch.zeros(16, device=DEV), torch.zeros(1, device=DEV),
                                 *st.args(), torch.zeros(0, dtype=torch.bool, device=DEV),
                                 torch.zeros(0, 2, dtype=torch.int32, device=DEV),
                                 torch.zeros(0, dtype=torch.int32, device=DEV))
    assert p.shape == (0,) and iv.shape == (0, 2, 2)


# ------------------------------------------------------------------ training: forward lse
# interval_attention_fwd (out + row log-sum-exp) and interval_attention_bwd against the
# reference, over the shape grid of the CPU backward tests (test_backward.py).
fwd_op, bwd_op, attn_op = _cases.FWD_OP, _cases.BWD_OP, _cases.ATTN_OP


def test_cuda_training_kernels_are_registered():
    for op in ("interval_attention_fwd", "interval_attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"safeattn::{op}", "CUDA"), op
        for dtype in DTYPES:
            assert safeattn.ops.kernel_for(op, torch.device(DEV), dtype) == "cuda"
    assert "cuda" in safeattn.ops._FWD_DEVICES and "cuda" in safeattn.ops._BWD_DEVICES


def assert_lse_matches(lse, q, k, iv, scale=None, softcap=None):
    """lse is computed in fp32 from the (rounded) inputs, so every dtype is held to the
    float64 reference on the same inputs; rows that see nothing must be exactly -inf."""
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.device == q.device
    empty = empty_rows(iv, k.shape[2])[:, None, :].expand(lse.shape)  # [B,Hq,Tq]
    assert torch.isneginf(lse[empty]).all(), "a row without visible keys has lse != -inf"
    assert torch.isfinite(lse[~empty]).all(), "non-finite lse on a row that sees keys"
    if not (~empty).any():
        return
    r = ref.interval_attention_lse(q.double(), k.double(), iv, scale, softcap)[~empty]
    err = (lse[~empty].double() - r).abs().max().item()
    tol = 1e-4 * max(1.0, r.abs().max().item())
    assert err <= tol, f"{q.dtype}: max|lse-ref64| = {err:.3g} > {tol:.3g}"


# Prefill blocks, decode without a KV split (many groups, few keys) and decode with split-KV
# partials merged by combine_kernel (few groups, many keys).
_LSE_SHAPES = [  # b, hq, hkv, tq, tk, d, layout
    (2, 8, 2, 100, 100, 128, "causal"),
    (1, 4, 4, 37, 37, 64, "random"),
    (2, 4, 1, 64, 64, 256, "pad"),
    (3, 16, 2, 5, 300, 256, "random"),  # G*Tq > 16: prefill kernel
    (4, 32, 32, 1, 17, 64, "causal"),  # decode, one split
    (3, 16, 4, 2, 130, 128, "probe"),
    (1, 8, 1, 2, 4096, 128, "probe"),  # decode, many splits
    (2, 4, 2, 1, 1500, 64, "window"),
]


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,layout", _LSE_SHAPES)
def test_fwd_lse_matches_reference(b, hq, hkv, tq, tk, d, layout, dtype, softcap):
    rng = random.Random(seed_of(b, hq, hkv, tq, tk, d, layout, str(dtype)))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v = qkv(g, b, hq, hkv, tq, tk, d, dtype)
    if tq == tk:
        iv = prefill_intervals(rng, g, layout, b, tq)
    else:
        iv = decode_intervals(rng, g, layout, b, tq, tk)
    iv[0, 0] = 0  # a row that sees nothing
    out, lse = fwd_op(q, k, v, iv, None, softcap)
    assert torch.equal(out, attn_op(q, k, v, iv, None, softcap)), "fwd out != plain op out"
    assert_matches_reference(out, q, k, v, iv, None, softcap)
    assert_lse_matches(lse, q, k, iv, None, softcap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fwd_lse_empty_shapes(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(g, 2, 2, 1, 3, 0, 64, dtype)  # no keys
    out, lse = fwd_op(q, k, v, torch.zeros(2, 3, 1, 2, dtype=torch.int32, device=DEV))
    assert (out == 0).all() and lse.shape == (2, 2, 3) and torch.isneginf(lse).all()
    q, k, v = qkv(g, 2, 2, 1, 3, 5, 64, dtype)  # no ranges
    out, lse = fwd_op(q, k, v, torch.zeros(2, 3, 0, 2, dtype=torch.int32, device=DEV))
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = qkv(g, 1, 2, 1, 0, 5, 64, dtype)  # no query rows
    out, lse = fwd_op(q, k, v, torch.zeros(1, 0, 1, 2, dtype=torch.int32, device=DEV))
    assert out.shape == q.shape and lse.shape == (1, 2, 0)


# ---------------------------------------------------------------- training: gradients
qkvg = functools.partial(_cases.qkvg, device=DEV)
assert_grads_match = functools.partial(_cases.assert_grads_match, eps_floor=True)


def _bwd_prefill_cases():
    """The shapes of test_backward's prefill sweep, each in every dtype."""
    return [pytest.param(*shape[:5], dtype, *shape[5:],
                         id=_cases.bwd_prefill_id(*shape[:5], dtype, *shape[5:]))
            for shape in _cases.bwd_prefill_shapes() for dtype in DTYPES]


@pytest.mark.parametrize("b,hq,hkv,t,d,dtype,window,pad,softcap,scale", _bwd_prefill_cases())
def test_bwd_prefill_causal(b, hq, hkv, t, d, dtype, window, pad, softcap, scale):
    q, k, v, go, iv = _cases.bwd_prefill_inputs(b, hq, hkv, t, d, dtype, window, pad, softcap,
                                                device=DEV)
    grads = assert_grads_match(q, k, v, go, iv, scale, softcap)
    assert_unseen_are_zero(grads, iv, t)


def _bwd_decode_cases():
    """The shapes of test_backward's decode sweep, each in every dtype."""
    return [pytest.param(*shape[:6], dtype, shape[6],
                         id=_cases.bwd_decode_id(*shape[:6], dtype, shape[6]))
            for shape in _cases.bwd_decode_shapes() for dtype in DTYPES]


@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,dtype,layout", _bwd_decode_cases())
def test_bwd_decode(b, hq, hkv, tq, tk, d, dtype, layout):
    q, k, v, go, iv = _cases.bwd_decode_inputs(b, hq, hkv, tq, tk, d, dtype, layout, device=DEV)
    grads = assert_grads_match(q, k, v, go, iv)
    assert_unseen_are_zero(grads, iv, tk)


@pytest.mark.parametrize("seed", range(8))
def test_bwd_random_intervals(seed):
    """Overlapping, duplicated, unordered and empty ranges; rows that see nothing; Tq != Tk."""
    q, k, v, go, iv, softcap = _cases.random_bwd_case(seed, DTYPES, device=DEV)
    grads = assert_grads_match(q, k, v, go, iv, softcap=softcap)
    assert_unseen_are_zero(grads, iv, k.shape[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hkv,tq,tk,d,window", [
    (1, 4, 1, 300, 300, 128, None),  # 5 key tiles, 1200 stacked rows: rows split over blocks
    (4, 32, 8, 3, 2048, 128, 700),   # 1024 blocks of key tiles: one block per tile
    (2, 8, 2, 40, 300, 64, 100),     # chunked prefill against a cache
    (1, 2, 1, 64, 64, 40, None),     # head dim padded to 64
    (2, 4, 2, 33, 97, 200, 30),      # head dim padded to 256, partial tiles
])
def test_bwd_cache_split_and_head_dims(b, hq, hkv, tq, tk, d, window, dtype):
    g = torch.Generator().manual_seed(seed_of(b, hq, tq, tk, d))
    q, k, v, go = qkvg(g, b, hq, hkv, tq, tk, d, dtype)
    pad = torch.randint(0, 5, (b,), generator=g)
    iv = ivs.causal(b, tq, tk, window=window, pad=pad, device=DEV)
    grads = assert_grads_match(q, k, v, go, iv, softcap=20.0 if d == 200 else None)
    assert_unseen_are_zero(grads, iv, tk)


@pytest.mark.parametrize("softcap,scale", [(None, 0.01), (None, 0.5), (1.0, None),
                                           (30.0, 2.0), (0.3, 0.5)])
def test_bwd_softcap_and_scale(softcap, scale):
    g = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    q, k, v, go = qkvg(g, 2, 8, 2, 40, 150, 128, torch.float32, std=2.0 if softcap else 1.0)
    iv = _cases.random_intervals(rng, 2, 40, 150, 3).to(DEV)
    assert_grads_match(q, k, v, go, iv, scale=scale, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_non_contiguous_inputs_and_grad_out(dtype):
    """HF-layout (transposed) q/k/v views and an expanded grad_out (the grad of .sum())."""
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, t, d = 2, 4, 2, 37, 64
    q = torch.randn(b, t, hq, d, generator=g).to(DEV, dtype).transpose(1, 2)
    k = torch.randn(b, t, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    v = torch.randn(b, t, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    iv = ivs.causal(b, t, t, window=20, pad=torch.tensor([0, 4]), device=DEV)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    safeattn.interval_attention(*leaves, iv).sum().backward()
    assert_grads_match(q, k, v, torch.ones_like(q), iv, grads=[x.grad for x in leaves])
    go = torch.randn(b, hq, d, t, generator=g).to(DEV, dtype).transpose(2, 3)  # strided
    dq, dk, dv = bwd_op(go, q, k, v, *fwd_op(q, k, v, iv), iv, None, None)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    assert_grads_match(q, k, v, go, iv, grads=[dq, dk, dv])


def test_bwd_only_some_inputs_require_grad():
    g = torch.Generator().manual_seed(4)
    q, k, v, go = qkvg(g, 1, 2, 1, 20, 20, 64, torch.float32)
    iv = ivs.causal(1, 20, 20, device=DEV)
    full = kernel_grads(q, k, v, go, iv)
    for i in range(3):
        leaves = [x.detach().clone() for x in (q, k, v)]
        leaves[i].requires_grad_()
        safeattn.interval_attention(*leaves, iv).backward(go)
        # dq is summed with fp32 atomics, so runs may differ in the last bits
        torch.testing.assert_close(leaves[i].grad, full[i], atol=1e-6, rtol=1e-5)
        assert all(leaves[j].grad is None for j in range(3) if j != i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_empty_shapes(dtype):
    for (b, hq, hkv, tq, tk, d, ni) in ((2, 4, 2, 3, 0, 64, 1), (2, 4, 2, 3, 10, 64, 0),
                                        (2, 4, 2, 0, 10, 64, 1), (0, 4, 2, 3, 10, 64, 1)):
        q = torch.randn(b, hq, tq, d, device=DEV, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, tk, d, device=DEV, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, tk, d, device=DEV, dtype=dtype, requires_grad=True)
        iv = torch.zeros(b, tq, ni, 2, dtype=torch.int32, device=DEV)
        safeattn.interval_attention(q, k, v, iv).sum().backward()
        for x in (q, k, v):
            assert x.grad.shape == x.shape and (x.grad == 0).all()


def test_bwd_plain_op_backward_recomputes():
    """Autograd through torch.ops.safeattn.interval_attention (no lse saved) on CUDA."""
    g = torch.Generator().manual_seed(6)
    q, k, v, go = qkvg(g, 2, 4, 1, 30, 30, 128, torch.float32)
    iv = ivs.causal(2, 30, 30, window=9, pad=torch.tensor([3, 0]), device=DEV)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attn_op(*leaves, iv, 0.2, 4.0).backward(go)
    assert_grads_match(q, k, v, go, iv, 0.2, 4.0, grads=[x.grad for x in leaves])


def test_bwd_argument_errors():
    g = torch.Generator().manual_seed(0)
    q, k, v, go = qkvg(g, 2, 4, 2, 5, 9, 64, torch.float32)
    iv = ivs.causal(2, 5, 9, device=DEV)
    out, lse = fwd_op(q, k, v, iv)
    cases = [
        ((go[:, :, :4], q, k, v, out, lse, iv), "grad_out"),
        ((go.half(), q, k, v, out, lse, iv), "grad_out"),
        ((go, q, k, v, out[..., :32], lse, iv), r"\bout\b"),
        ((go, q, k, v, out, lse[:, :3], iv), "lse"),
        ((go, q, k, v, out, lse.double(), iv), "lse"),
        ((go, q, k, v, out, lse.cpu(), iv), "lse"),
        ((go, q, k, v, out, lse, iv.long()), "intervals"),
        ((go.double(), q.double(), k.double(), v.double(), out.double(), lse, iv),
         "float16, bfloat16 or float32"),
    ]
    for args, pat in cases:
        with pytest.raises(RuntimeError, match=pat):
            bwd_op(*args, None, None)
    with pytest.raises(RuntimeError, match="softcap"):
        bwd_op(go, q, k, v, out, lse, iv, None, -1.0)
    q2 = torch.zeros(1, 1, 2, 264, device=DEV)
    lse2 = torch.zeros(1, 1, 2, device=DEV)
    with pytest.raises(RuntimeError, match="D=264"):
        bwd_op(q2, q2, q2, q2, q2, lse2, ivs.causal(1, 2, 2, device=DEV), None, None)


# ------------------------------------------------------------- training: opcheck, end to end
@pytest.mark.parametrize("op", [fwd_op, attn_op], ids=["fwd", "plain"])
@pytest.mark.parametrize("i", range(3))
def test_opcheck_with_grad(op, i):
    _cases.opcheck_with_grad(op, i, DEV)


def test_opcheck_bwd():
    _cases.opcheck_bwd(DEV)


def test_end_to_end_training_step():
    """A GQA attention layer on CUDA: the wrapper runs interval_attention_fwd when grad is
    needed, backward runs the CUDA bwd kernel, and the projections' gradients match the same
    layer over the float64 reference."""
    g = torch.Generator().manual_seed(12)
    b, t, hq, hkv, d, dm = 2, 48, 4, 2, 64, 96
    x = torch.randn(b, t, dm, generator=g)
    ws = [torch.randn(dm, h * d, generator=g) / dm ** 0.5 for h in (hq, hkv, hkv)]
    iv = ivs.causal(b, t, t, window=20, pad=torch.tensor([0, 5]), device=DEV)

    def loss_of(attn, x, wq, wk, wv):
        q = (x @ wq).view(b, t, hq, d).transpose(1, 2)
        k = (x @ wk).view(b, t, hkv, d).transpose(1, 2)
        v = (x @ wv).view(b, t, hkv, d).transpose(1, 2)
        o = attn(q, k, v, iv)
        return (o.transpose(1, 2).reshape(b, t, hq * d) ** 2).mean()

    params = [w.to(DEV).detach().clone().requires_grad_() for w in ws]

    class Ops(TorchDispatchMode):
        names: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as mode:
        loss = loss_of(lambda q, k, v, iv: safeattn.ops.interval_attention(q, k, v, iv,
                                                                           softcap=20.0),
                       x.to(DEV), *params)
    assert [n for n in mode.names if "safeattn" in n] == ["safeattn.interval_attention_fwd.default"]
    loss.backward()

    params64 = [w.to(DEV, torch.float64).detach().requires_grad_() for w in ws]
    loss64 = loss_of(lambda q, k, v, iv: ref.interval_attention(q, k, v, iv, None, 20.0),
                     x.to(DEV, torch.float64), *params64)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=0)
    for w, w64 in zip(params, params64):
        s = w64.grad.abs().max().item()
        err = (w.grad.double() - w64.grad).abs().max().item()
        assert err <= 1e-4 * s, f"max|grad-ref| = {err:.3g} > 1e-4 * {s:.3g}"


# --------------------------------------------------------------- paged_interval_attention
def _paged_cases():
    from test_paged_attention import _cases
    return _cases()


@pytest.mark.parametrize("case", _paged_cases(),
                         ids=lambda c: f"{c['dtype']}-{c['kind']}-tc{c['tc']}")
def test_paged_matches_reference(case):
    from test_paged_attention import gathered, paged_inputs
    c = dict(case)
    softcap, scale = c.pop("softcap"), c.pop("scale")
    g = torch.Generator().manual_seed(seed_of(sorted(case.items(), key=str)))
    args = [t.to(DEV) for t in paged_inputs(g, **c)]
    tk = c["tc"] + c["tn"]
    iv = random_intervals(random.Random(seed_of(tk, c["tq"])), c["b"], c["tq"], tk, 3).to(DEV)
    out = safeattn.ops.paged_interval_attention(*args, iv, scale=scale, softcap=softcap)
    k, v = gathered(*args[1:])
    assert_matches_reference(out, args[0], k, v, iv, scale, softcap)


def test_paged_out_of_range_inputs_are_clamped_by_the_kernel():
    """The Python wrapper rejects them; the op itself must still never read out of bounds."""
    from test_paged_attention import paged_inputs
    g = torch.Generator().manual_seed(5)
    q, cache, slots, ko, vo, kn, vn = (t.to(DEV) for t in paged_inputs(
        g, 2, 4, 2, 1, 20, 1, 64, 16, 3, torch.float32))
    iv = torch.tensor([[-50, 10], [15, 100]], dtype=torch.int32).expand(2, 1, 2, 2)
    bad = slots.clone()
    bad[:, 3] = 10**9
    bad[:, 4] = -7
    out = torch.ops.safeattn.paged_interval_attention.default(
        q, cache, bad, ko, vo, kn, vn, iv.contiguous().to(DEV), None, None)
    fixed = bad.clamp(0, cache.shape[0] * ko.shape[0] - 1)
    want = ref.paged_interval_attention(q.double(), cache.double(), fixed, ko, vo, kn.double(),
                                        vn.double(), iv.clamp(0, 21).to(DEV))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)

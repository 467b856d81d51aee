"""CUDA kernels (``csrc/cuda``) against ``safeattn.reference``; skipped without a CUDA device.

Tolerances for ``interval_attention``: float32 output vs the float64 reference, atol 1e-5
(TF32 is switched off for the reference). bfloat16/float16 use the flash-attention rule:
max|out - ref32| <= 2 * max|ref_low - ref32|, where ref32 is the reference on the inputs
upcast to float32 and ref_low the reference computed in the low dtype itself (plus a tiny
floor). Rows that see no key must be exact zeros.
"""
from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

import safeattn
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
def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


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
    """[B,Tq,NI,2] int32 with empty, overlapping, duplicated and full ranges mixed in."""
    out = torch.zeros(b, tq, ni, 2, dtype=torch.int32)
    for bi in range(b):
        for t in range(tq):
            empty_row = rng.random() < p_empty_row
            for i in range(ni):
                kind = rng.random()
                if empty_row or kind < 0.2:
                    s = rng.randint(0, tk)
                    e = s  # empty
                elif kind < 0.3:
                    s, e = 0, tk  # everything
                elif kind < 0.4 and i > 0:
                    s, e = (int(x) for x in out[bi, t, i - 1])  # duplicate
                else:
                    s = rng.randint(0, tk)
                    e = rng.randint(s, tk)
                out[bi, t, i] = torch.tensor([s, e])
    return out.to(DEV)


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
    if layout == "causal" or tk < 4:
        pad = torch.randint(0, max(1, tk // 4), (b,), generator=g)
        return ivs.causal(b, tq, tk, pad=pad, device=DEV)
    if layout == "window":
        return ivs.causal(b, tq, tk, window=rng.choice((16, 100, 513)), device=DEV)
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
        return out.to(DEV)
    return random_intervals(rng, b, tq, tk, 3)


def test_cuda_kernels_are_registered():
    for op in ("interval_attention", "safety_step"):
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


def test_safety_step_empty_batch():
    h = torch.zeros(0, 16, device=DEV)
    st = State(0)
    p, iv = safeattn.safety_step(h, torch.zeros(16, device=DEV), torch.zeros(1, device=DEV),
                                 *st.args(), torch.zeros(0, dtype=torch.bool, device=DEV),
                                 torch.zeros(0, 2, dtype=torch.int32, device=DEV),
                                 torch.zeros(0, dtype=torch.int32, device=DEV))
    assert p.shape == (0,) and iv.shape == (0, 2, 2)

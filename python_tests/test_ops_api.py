"""Op registration (opcheck), torch.compile tracing, backend selection and argument errors."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

import safeattn
from safeattn import intervals as ivs
from safeattn import reference as ref
from safeattn.ops import kernel_for

attn_op = torch.ops.safeattn.interval_attention.default
step_op = torch.ops.safeattn.safety_step.default


def attn_inputs(b=2, hq=4, hkv=2, tq=5, tk=9, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v, ivs.causal(b, tq, tk)


def step_inputs(b=3, d=8, seed=0, step=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        h=torch.randn(b, d, generator=g), weight=torch.randn(d, generator=g),
        bias=torch.randn(1, generator=g), mode=torch.zeros(b, dtype=torch.int32),
        consec=torch.zeros(b, dtype=torch.int32), s_t=torch.full((b,), -1, dtype=torch.int32),
        step=torch.full((b,), step, dtype=torch.int32), refused=torch.zeros(b, dtype=torch.bool),
        active=torch.ones(b, dtype=torch.bool),
        q_span=torch.tensor([[1, 4]] * b, dtype=torch.int32),
        resp_start=torch.arange(10, 10 + b, dtype=torch.int32))


STEP_ORDER = ("h", "weight", "bias", "mode", "consec", "s_t", "step", "refused", "active",
              "q_span", "resp_start")


# ------------------------------------------------------------------------------- opcheck
def _attn_samples():
    q, k, v, iv = attn_inputs()
    yield (q, k, v, iv), {}
    q, k, v, _ = attn_inputs(b=1, hq=8, hkv=1, tq=2, tk=600, d=128, dtype=torch.bfloat16)
    iv = torch.tensor([[[[0, 1], [3, 40], [500, 599]], [[0, 600], [0, 0], [7, 7]]]],
                      dtype=torch.int32)
    yield (q, k, v, iv), {"scale": 0.1, "softcap": 30.0}
    q, k, v, _ = attn_inputs(tq=3, tk=0, dtype=torch.float16)
    yield (q, k, v, torch.zeros(2, 3, 1, 2, dtype=torch.int32)), {}
    q, k, v, _ = attn_inputs(tq=7, tk=7)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)  # HF layout view
    yield (q, kt, v, ivs.causal(2, 7, 7, window=3, pad=torch.tensor([2, 0]))), {"softcap": 5.0}


@pytest.mark.parametrize("i", range(4))
def test_opcheck_interval_attention(i):
    args, kwargs = list(_attn_samples())[i]
    torch.library.opcheck(attn_op, args, kwargs)


@pytest.mark.parametrize("step,dtype", [(0, torch.float32), (3, torch.float32),
                                        (5, torch.bfloat16)])
def test_opcheck_safety_step(step, dtype):
    a = step_inputs(step=step)
    a["h"], a["weight"], a["bias"] = (a[n].to(dtype) for n in ("h", "weight", "bias"))
    a["active"][1] = False
    torch.library.opcheck(step_op, tuple(a[n] for n in STEP_ORDER) + (0.5, 3, 10, 10, 10))


# ------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v, iv = attn_inputs(tq=6, tk=6)

    def attn(q, k, v, iv):
        return safeattn.ops.interval_attention(q, k, v, iv, softcap=20.0).sum(dim=1) * 2

    torch.testing.assert_close(torch.compile(attn, backend=backend, fullgraph=True)(q, k, v, iv),
                               attn(q, k, v, iv))

    def step(a):
        p, out = safeattn.ops.safety_step(*(a[n] for n in STEP_ORDER), theta=0.4, tau=2, r1=3,
                                          r2=4, r3=5)
        return p + 1, out

    a = step_inputs(b=5)
    a["h"][:, 0] += torch.tensor([-9.0, 9.0, 0.0, 9.0, -9.0])  # some rows hit, some don't
    a["active"][3] = False
    b = {n: t.clone() for n, t in a.items()}
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for _ in range(3):  # in-place state updates must be visible between calls
        got, want = compiled(a), step(b)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, equal_nan=True)
        for n in STEP_ORDER:
            assert torch.equal(a[n], b[n]), n


def test_compile_inductor_interval_attention():
    torch._dynamo.reset()
    q, k, v, iv = attn_inputs(tq=4, tk=4)

    def attn(q, k, v, iv):
        return safeattn.ops.interval_attention(q, k, v, iv, scale=0.2)

    out = torch.compile(attn, fullgraph=True)(q, k, v, iv)
    torch.testing.assert_close(out, attn(q, k, v, iv))
    torch.testing.assert_close(out.double(), ref.interval_attention(
        q.double(), k.double(), v.double(), iv, 0.2), atol=1e-5, rtol=0)


# --------------------------------------------------------------------- backend selection
def test_kernel_for():
    assert kernel_for("interval_attention", torch.device("cpu"), torch.float32) == "cpu"
    assert kernel_for("safety_step", torch.device("cpu"), torch.float32) == "cpu"


@pytest.mark.skipif(torch._C._dispatch_has_kernel_for_dispatch_key(
    "safeattn::interval_attention", "CUDA"), reason="this build has CUDA kernels")
def test_kernel_for_cuda_without_cuda_build():
    with pytest.raises(NotImplementedError) as e:
        kernel_for("interval_attention", torch.device("cuda"), torch.float16)
    msg = str(e.value)
    assert "interval_attention" in msg
    assert "cuda: not built" in msg  # why the CUDA backend refused
    assert "cpu: tensors are on cuda" in msg  # and why the CPU one did


def test_kernel_for_unsupported_cpu_dtype():
    with pytest.raises(NotImplementedError, match=r"cpu: dtype torch\.float64 not in"):
        kernel_for("interval_attention", torch.device("cpu"), torch.float64)
    q, k, v, iv = attn_inputs(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        safeattn.interval_attention(q, k, v, iv)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        attn_op(q, k, v, iv)


# ---------------------------------------------------------------- interval_attention errors
def _bad_attn_cases():
    q, k, v, iv = attn_inputs()  # b=2 hq=4 hkv=2 tq=5 tk=9 d=64
    meta = torch.device("meta")
    bad_iv = iv.clone()
    return {
        "q rank": ((q[0], k, v, iv), r"\bq\b"),
        "k rank": ((q, k[0], v, iv), r"\bk\b"),
        "v rank": ((q, k, v[..., None], iv), r"\bv\b"),
        "intervals rank": ((q, k, v, iv[0]), "intervals"),
        "intervals last dim": ((q, k, v, torch.zeros(2, 5, 1, 3, dtype=torch.int32)),
                               "intervals"),
        "intervals dtype": ((q, k, v, iv.long()), "intervals must be int32"),
        "dtype mismatch k": ((q, k.bfloat16(), v, iv), "dtype"),
        "dtype mismatch v": ((q, k, v.half(), iv), "dtype"),
        "device k": ((q, k.to(meta), v, iv), "device"),
        "device intervals": ((q, k, v, iv.to(meta)), "device"),
        "heads": ((torch.randn(2, 3, 5, 64), k, v, iv), r"q heads \(3\).*k/v heads \(2\)"),
        "kv shapes": ((q, k, v[:, :1], iv), r"\bk and v\b"),
        "batch k/v": ((q, k[:1], v[:1], iv), "batch"),
        "batch intervals": ((q, k, v, iv[:1]), "batch.*intervals"),
        "tq": ((q, k, v, iv[:, :4]), r"intervals has 4 rows, q has Tq=5"),
        "head dim": ((q, k[..., :32], v[..., :32], iv), "head dim"),
        "negative start": ((q, k, v, bad_iv.index_put((torch.tensor(1), torch.tensor(2),
                                                      torch.tensor(0), torch.tensor(0)),
                                                     torch.tensor(-1, dtype=torch.int32))),
                           r"intervals\[1\]\[2\]\[0\] = \[-1, "),
        "end > Tk": ((q, k, v, torch.tensor([[[0, 10]]] * 5, dtype=torch.int32)[None]
                      .expand(2, -1, -1, -1)), r"intervals\[0\]\[0\]\[0\] = \[0, 10\).*Tk=9"),
        "start > end": ((q, k, v, torch.tensor([[[4, 3]]] * 5, dtype=torch.int32)[None]
                         .expand(2, -1, -1, -1)), r"intervals\[.*\] = \[4, 3\)"),
    }


@pytest.mark.parametrize("case", list(_bad_attn_cases()))
def test_interval_attention_bad_args(case):
    args, pattern = _bad_attn_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        safeattn.interval_attention(*args)


@pytest.mark.parametrize("case", ["negative start", "end > Tk", "start > end"])
def test_range_errors_same_from_kernel_python_and_grad_path(case):
    """CPU leaves the range check to the kernel; the Python check (other devices) and the
    training op (interval_attention_fwd) give the same ValueError."""
    (q, k, v, iv), pattern = _bad_attn_cases()[case]
    with pytest.raises(ValueError, match=pattern) as e:
        safeattn.ops._check_ranges(iv, k.shape[2])
    assert str(e.value).startswith("interval_attention: intervals[")
    with pytest.raises(ValueError, match=pattern) as e2:
        safeattn.interval_attention(q.requires_grad_(), k, v, iv)
    assert str(e2.value) == str(e.value)


@pytest.mark.parametrize("softcap", [0.0, -1.0])
def test_bad_softcap(softcap):
    q, k, v, iv = attn_inputs()
    with pytest.raises(ValueError, match="softcap"):
        safeattn.interval_attention(q, k, v, iv, softcap=softcap)
    with pytest.raises(RuntimeError, match="softcap"):
        attn_op(q, k, v, iv, None, softcap)


@pytest.mark.parametrize("bad", [(-1, 3), (0, 10), (4, 3)])
def test_raw_op_rejects_out_of_range_intervals(bad):
    q, k, v, iv = attn_inputs()
    iv = iv.clone()
    iv[1, 3, 0] = torch.tensor(bad)
    with pytest.raises(RuntimeError, match=r"intervals\[1\]\[3\]\[0\].*out of range"):
        attn_op(q, k, v, iv)


def test_raw_op_rejects_bad_shapes():
    q, k, v, iv = attn_inputs()
    for args, pattern in ((( q[0], k, v, iv), r"\bq\b"), ((q, k, v, iv.long()), "intervals"),
                          ((q, k, v[:, :1], iv), "head"), ((q, k, v, iv[:, :4]), "intervals")):
        with pytest.raises(RuntimeError, match=pattern):
            attn_op(*args)


# ------------------------------------------------------------------------ safety_step errors
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(theta=-0.1), "theta"), (dict(theta=1.5), "theta"), (dict(theta=float("nan")), "theta"),
    (dict(tau=0), "tau"), (dict(r1=-1), "r1"), (dict(r2=-1), "r2"), (dict(r3=-5), "r3"),
])
def test_safety_step_bad_params(kwargs, pattern):
    a = step_inputs()
    with pytest.raises(ValueError, match=pattern):
        safeattn.safety_step(*(a[n] for n in STEP_ORDER), **kwargs)


@pytest.mark.parametrize("name,bad,pattern", [
    ("mode", torch.zeros(3, dtype=torch.int64), "mode"),
    ("consec", torch.zeros(3, dtype=torch.float32), "consec"),
    ("s_t", torch.zeros(3, dtype=torch.int16), "s_t"),
    ("step", torch.zeros(4, dtype=torch.int32), "step"),
    ("refused", torch.zeros(3, dtype=torch.int32), "refused"),
    ("active", torch.ones(3, dtype=torch.uint8), "active"),
    ("resp_start", torch.zeros(3, dtype=torch.int64), "resp_start"),
    ("q_span", torch.zeros(3, 3, dtype=torch.int32), "q_span"),
    ("q_span", torch.zeros(3, 2, dtype=torch.int64), "q_span"),
    ("mode", torch.zeros(6, dtype=torch.int32)[::2], "mode.*contiguous"),
    ("weight", torch.randn(7), "weight"),
    ("weight", torch.randn(8, dtype=torch.float64), "weight"),
    ("bias", torch.randn(2), "bias"),
    ("h", torch.randn(3, 8, 1), r"\bh\b"),
    ("h", torch.zeros(3, 8, dtype=torch.int32), r"\bh\b"),
    ("mode", torch.zeros(3, dtype=torch.int32, device="meta"), "mode.*device"),
    ("q_span", torch.zeros(3, 2, dtype=torch.int32, device="meta"), "q_span.*device"),
])
def test_safety_step_bad_tensors(name, bad, pattern):
    a = step_inputs()
    a[name] = bad
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        safeattn.safety_step(*(a[n] for n in STEP_ORDER))


def test_safety_step_failed_checks_leave_state_untouched():
    a = step_inputs()
    a["q_span"] = torch.zeros(3, 3, dtype=torch.int32)
    before = {n: a[n].clone() for n in ("mode", "consec", "s_t", "step", "refused")}
    with pytest.raises(RuntimeError):
        safeattn.safety_step(*(a[n] for n in STEP_ORDER))
    for n, t in before.items():
        assert torch.equal(a[n], t), n


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf")
def test_extension_links_the_shared_libstdcxx():
    """A static libstdc++ copy inside _C crashed every TORCH_CHECK message with a number in it
    (on the H200 image, whose compiler ships only libstdc++.a; see setup.py's _link_args)."""
    lib = importlib.util.find_spec("safeattn._C").origin
    dynamic = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True,
                             check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("[libstdc++.so" in line for line in needed), needed
    q, k, v, iv = attn_inputs()
    with pytest.raises(RuntimeError, match=r"batch sizes differ: q=2 k=1 v=2 intervals=2"):
        attn_op(q, k[:1], v, iv, None, None)

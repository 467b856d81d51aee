"""Small forward, decode, backward and safety_step calls for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python .ci/gpu_sanitize.py
    python .ci/gpu_sanitize.py --device cpu      # the same calls on the CPU kernels

Shapes are tiny (racecheck runs each kernel ~100x slower) but reach every kernel path: the
prefill kernel with GQA, padding and random ranges (fp32, bf16; D 64 and 256), split-KV decode
with a probe row over ~2k keys, the paged op (the vLLM probe's), the backward (dq, dk, dv)
and safety_step. Each output is compared with safeattn.reference, so a kernel that reads
garbage without faulting still fails.
"""
from __future__ import annotations

import argparse
import sys

import torch

import safeattn
from safeattn import intervals as ivs
from safeattn import ops
from safeattn import reference as ref
from safeattn.ops import BENIGN


def check(name, got, want, tol):
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    print(f"{name}: max err {err:.2e}", flush=True)
    if not err <= tol:
        raise SystemExit(f"{name}: max err {err:.3g} > {tol:g}")


def qkv(g, b, hq, hkv, tq, tk, d, dtype, dev, grad=False):
    out = [torch.randn(b, h, t, d, generator=g).to(dev, dtype)
           for h, t in ((hq, tq), (hkv, tk), (hkv, tk))]
    return [x.requires_grad_(grad) for x in out]


def random_ranges(g, b, tq, tk, ni, dev):
    s = torch.randint(0, tk, (b, tq, ni), generator=g)
    e = torch.minimum(s + torch.randint(0, tk, (b, tq, ni), generator=g), torch.tensor(tk))
    return torch.stack([s, e], -1).to(dev, torch.int32)


def attention(name, q, k, v, iv, tol):
    out = safeattn.interval_attention(q, k, v, iv)
    want = ref.interval_attention(q.float(), k.float(), v.float(), iv, None, None)
    check(name, out, want, tol)


def main(dev: str) -> int:
    g = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    for dtype in (torch.float32, torch.bfloat16):
        for d in (64, 256):
            q, k, v = qkv(g, 2, 4, 2, 70, 70, d, dtype, dev)
            pad = torch.tensor([0, 9])
            attention(f"prefill causal+pad {dtype} D{d}", q, k, v,
                      ivs.causal(2, 70, 70, pad=pad, device=dev), tol[dtype])
            attention(f"prefill random ranges {dtype} D{d}", q, k, v,
                      random_ranges(g, 2, 70, 70, 3, dev), tol[dtype])
        q, k, v = qkv(g, 2, 8, 1, 2, 2100, 128, dtype, dev)
        iv = ivs.causal(2, 2, 2100, device=dev).repeat(1, 1, 3, 1)
        iv[:, 1] = torch.tensor([[1, 40], [2080, 2099], [2099, 2100]], dtype=torch.int32)
        attention(f"decode split-KV + probe {dtype}", q, k, v, iv, tol[dtype])
        q, k, v = qkv(g, 1, 4, 2, 1, 333, 64, dtype, dev)
        attention(f"decode Tq=1 {dtype}", q, k, v, ivs.causal(1, 1, 333, device=dev), tol[dtype])
    paged(g, dev)
    backward(g, dev)
    safety_step(g, dev)
    print("gpu_sanitize: all calls ok")
    return 0


def backward(g, dev):
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 1e-1)):
        q, k, v = qkv(g, 2, 4, 2, 65, 65, 64, dtype, dev, grad=True)
        iv = random_ranges(g, 2, 65, 65, 2, dev)
        dout = torch.randn(q.shape, generator=g).to(dev, dtype)
        safeattn.interval_attention(q, k, v, iv).backward(dout)
        got = [x.grad for x in (q, k, v)]
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref.interval_attention(q64, k64, v64, iv, None, None).backward(dout.double())
        for n, a, b in zip("qkv", got, (q64.grad, k64.grad, v64.grad)):
            check(f"backward d{n} {dtype}", a, b, tol * max(1.0, b.abs().max().item()))


def paged(g, dev):
    """The vLLM probe's op: 40 cached columns on shuffled 16-token pages (keys, then values,
    of a head in one row) plus one new key, Gemma-like softcap."""
    b, hq, hkv, tq, d, page, pages, tc = 2, 4, 2, 2, 64, 16, 8, 40
    t = torch.arange(page)[:, None] * d + torch.arange(d)
    key_offsets, value_offsets = t.to(dev), (t + page * d).to(dev)
    slots = torch.stack([torch.randperm(pages * page, generator=g)[:tc] for _ in range(b)])
    iv = random_ranges(g, b, tq, tc + 1, 3, dev)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        cache = torch.randn(pages, hkv, 2 * page * d, generator=g).to(dev, dtype)
        q, k_new, v_new = qkv(g, b, hq, hkv, tq, 1, d, dtype, dev)
        args = (q, cache, slots.to(dev), key_offsets, value_offsets, k_new, v_new, iv)
        out = ops.paged_interval_attention(*args, softcap=30.0)
        want = ref.paged_interval_attention(*(x.float() if x.is_floating_point() else x
                                              for x in args), softcap=30.0)
        check(f"paged probe {dtype}", out, want, tol)


def safety_step(g, dev):
    b, d = 5, 32
    h = torch.randn(b, d, generator=g).to(dev)
    w, bias = torch.randn(d, generator=g).to(dev), torch.zeros(1, device=dev)
    state = [torch.full((b,), BENIGN, dtype=torch.int32, device=dev),
             torch.zeros(b, dtype=torch.int32, device=dev),
             torch.full((b,), -1, dtype=torch.int32, device=dev),
             torch.zeros(b, dtype=torch.int32, device=dev),
             torch.zeros(b, dtype=torch.bool, device=dev)]
    active = torch.tensor([True, True, False, True, True], device=dev)
    q_span = torch.tensor([[3, 9]] * b, dtype=torch.int32, device=dev)
    resp = torch.full((b,), 12, dtype=torch.int32, device=dev)
    rstate = [x.clone() for x in state]
    p, iv = safeattn.safety_step(h, w, bias, *state, active, q_span, resp, theta=0.5, tau=3,
                                 r1=10, r2=10, r3=10)
    rp, riv = ref.safety_step(h, w, bias, *rstate, active, q_span, resp, 0.5, 3, 10, 10, 10)
    check("safety_step p", p, rp, 1e-5)
    check("safety_step intervals", iv, riv, 0)
    for a, r in zip(state, rstate):
        check("safety_step state", a.int(), r.int(), 0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    dev = ap.parse_args().device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_sanitize: no CUDA device (try --device cpu)")
    sys.exit(main(dev))

#!/usr/bin/env python
"""GPU benches: decode, prefill, backward and safe ``generate`` against SDPA and FlexAttention.

    python bench/gpu_bench.py --out OUT/bench.json [--budget-s 210] [--only decode,prefill]
    python bench/gpu_bench.py --dry-run --out x.json   # CPU, tiny shapes: the logic, no timing

Every case times ours and its baselines in the same process, interleaved round by round, on
the same inputs (bf16), and reports medians of CUDA-event timings and same-run ratios
(``baseline / ours``: above 1 means ours is faster). Before each timed call a 256 MiB buffer
is overwritten, so that L2 holds no K/V and the kernels queue up behind it (no launch gaps in
the timing). Each baseline's output is compared with ours once (``max_err``).

Sections, in the order they run (each stops at its share of ``--budget-s``; cases left out are
listed under ``not_run``):

- ``decode``: Tq = 1 (causal) and Tq = 2 (token + probe row, ``attn_cases.probe_intervals``),
  Gemma-3 (4/1 heads, D 256) and Llama-3-8B (32/8, D 128) shapes, B x S in ``DECODE_BS``.
  Bytes = K + V + Q + O; ``pct_copy_bw`` = bytes / time / the measured device copy bandwidth
  (read + write of a 1 GiB ``copy_``). Baselines: SDPA with the flash and the cuDNN backend
  (Tq = 2: the token row over the prefix, plus the probe row with a bool mask on SDPA's
  default backend), and compiled FlexAttention with the same mask (only where ``flex`` is
  marked in ``DECODE_BS``: every shape is one more compile).
- ``prefill``: causal and the SFT ``[CLS]`` interval layout, T in ``PREFILL_T``: TFLOP/s
  (4 * D * Hq * visible pairs), vs SDPA flash (``is_causal``; for the interval layout SDPA
  needs the dense mask and runs its default backend) and compiled FlexAttention with the same
  ``mask_mod`` (block mask built once).
- ``backward``: forward + backward vs the same through FlexAttention (and SDPA flash, causal).
- ``generate``: safe (``each``, ``annealing``) vs plain ``model.generate`` at batch 1 and 32 on
  random-weight models with the real Gemma-3-270M config and a 4-layer Llama-3-8B-shaped one,
  greedy, ``NEW_TOKENS`` tokens, threshold above 1 (nobody refuses); plus host syncs per step
  (``torch.cuda.set_sync_debug_mode``: every synchronizing CUDA call warns once), and one
  profiled call of plain and of ``each`` (``profile``: the ops with the most GPU time, to
  show where the safe steps' overhead goes).

Sizing (at most 3.5 minutes of a 9-minute ``.ci/gpu_check`` on an H200; estimated, not yet
run there): the ours/SDPA timings are milliseconds per case; the cost is FlexAttention's
compile, a few to ~20 s per new shape, so Flex runs on 8 decode shapes, 12 prefill and 4
backward cases. The generate section is 2 models x 2 batch sizes x 3 variants x 4 calls
(1 counting syncs + 3 timed; + 2 profiled) of 48 tokens, ~0.5-1.5 s each with HF's per-step
Python overhead.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python_tests"))  # _hf_tiny: the word-level tokenizer

import attn_cases as ac  # noqa: E402
import safeattn  # noqa: E402
from safeattn import intervals as iv_lib  # noqa: E402

K = 1024
# (B, S, flex?) for decode; every (model, Tq) runs all of them.
DECODE_BS = [(1, 4 * K, False), (1, 32 * K, True), (1, 128 * K, False), (8, 32 * K, False),
             (8, 128 * K, False), (64, 4 * K, False), (64, 32 * K, True)]
PREFILL_T = (2 * K, 8 * K, 16 * K)
BACKWARD_T = (4 * K,)
GEN_BATCH = (1, 32)
NEW_TOKENS = 48
PROMPT_TOKENS = 96
SHARES = {"decode": 0.25, "prefill": 0.3, "backward": 0.15, "generate": 0.3}
FLUSH_BYTES = 256 * 1024 * 1024

# Gemma-3-270M's config.json (random weights: the real ones are too big to carry).
GEMMA3_270M = dict(
    model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
    num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
    layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
    rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    pad_token_id=0, bos_token_id=2, eos_token_id=1)
# Llama-3-8B's shapes with 4 of its 32 layers.
LLAMA3_8B_4L = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=1)


# ----------------------------------------------------------------------------- timing
class Clock:
    """Interleaved timing of named zero-arg callables: CUDA events on a GPU (after an L2
    flush that also keeps the queue full), ``perf_counter`` on a CPU (dry run)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.flush = (torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
                      if self.cuda else None)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fns: dict, rounds: int, warmup: int = 2) -> dict:
        """-> {name: median seconds}; rounds interleave all fns (ABCABC...)."""
        for _ in range(warmup):
            for f in fns.values():
                f()
        self.sync()
        samples = {k: [] for k in fns}
        pending = []
        for _ in range(rounds):
            for k, f in fns.items():
                if self.cuda:
                    self.flush.fill_(1)
                    a, b = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    a.record()
                    f()
                    b.record()
                    pending.append((k, a, b))
                else:
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
        self.sync()
        for k, a, b in pending:
            samples[k].append(a.elapsed_time(b) / 1e3)
        return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting read + write (2 * nbytes per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(3)
    dst = torch.empty_like(src)
    t = Clock(device).time({"copy": lambda: dst.copy_(src)}, rounds=10)["copy"]
    return 2 * nbytes / t


def decode_bytes(b: int, hq: int, hkv: int, tq: int, s: int, d: int, esz: int) -> int:
    """Bytes a decode call must move at least: K and V once, Q in and O out."""
    return (2 * b * hkv * s * d + 2 * b * hq * tq * d) * esz


def attention_flops(hq: int, d: int, pairs: int) -> int:
    """Forward FLOPs of attention over ``pairs`` visible (row, key) pairs: QK^T and PV."""
    return 4 * d * hq * pairs


BACKWARD_FLOP_FACTOR = 3.5  # forward + backward = 2 + 5 matmuls of the forward's 2


# ----------------------------------------------------------------------------- helpers
def qkv(model, b, tq, tk, device, dtype, requires_grad=False):
    hq, hkv, d = ac.MODELS[model]
    g = torch.Generator(device=device).manual_seed(b * 131 + tq * 7 + tk)
    out = [torch.randn(b, h, t, d, generator=g, device=device, dtype=dtype)
           for h, t in ((hq, tq), (hkv, tk), (hkv, tk))]
    return [x.requires_grad_(requires_grad) for x in out]


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION}[name]])


def with_backend(name, fn):
    def run():
        with sdpa_backend(name):
            return fn()
    return run


def max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def try_baselines(candidates: dict, ours_out, rec: dict) -> dict:
    """Run each baseline once; keep those that run (recording max_err vs ours), record the
    error of the others under rec['errors']."""
    ok = {}
    for name, fn in candidates.items():
        try:
            t0 = time.perf_counter()
            out = fn()
            if name.startswith("flex"):
                rec[f"{name}_first_call_s"] = time.perf_counter() - t0
            rec.setdefault("max_err", {})[name] = max_err(out, ours_out)
            ok[name] = fn
        except Exception as e:  # recorded, the bench goes on
            first = str(e).splitlines()[0][:300] if str(e) else ""
            rec.setdefault("errors", {})[name] = f"{type(e).__name__}: {first}"
    return ok


def ratios(times: dict) -> dict:
    return {k: times[k] / times["ours"] for k in times if k != "ours"}


# ----------------------------------------------------------------------------- decode
def sdpa_decode(q, k, v, iv, scale, backend):
    """SDPA decode on ``backend`` ("flash" or "cudnn"). Tq = 2: the token row over the
    prefix [0, S-1) on that backend, then the probe row with its bool mask on SDPA's default
    backend (flash and cuDNN take no arbitrary mask)."""
    def token(qr, kr, vr):
        with sdpa_backend(backend):
            return F.scaled_dot_product_attention(qr, kr, vr, scale=scale, enable_gqa=True)

    s = k.shape[2]
    if q.shape[2] == 1:
        return lambda: token(q, k, v)
    mask = ac.dense_mask(iv[:, 1:], s)
    qa, qb, kp, vp = q[:, :, :1], q[:, :, 1:], k[:, :, :s - 1], v[:, :, :s - 1]
    return lambda: torch.cat([token(qa, kp, vp), F.scaled_dot_product_attention(
        qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)], 2)


def decode_case(model, b, s, tq, use_flex, ctx):
    dev, dt = ctx["device"], ctx["dtype"]
    q, k, v = qkv(model, b, tq, s, dev, dt)
    hq, hkv, d = ac.MODELS[model]
    scale = d ** -0.5
    iv = (iv_lib.causal(b, 1, s, device=dev) if tq == 1 else ac.probe_intervals(b, s).to(dev))
    ours = lambda: safeattn.ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    cands = {f"sdpa_{name}": sdpa_decode(q, k, v, iv, scale, name) for name in ("flash", "cudnn")}
    if use_flex:
        mm = ac.causal_mask_mod(1, s) if tq == 1 else ac.interval_mask_mod(iv)
        cands["flex"] = ac.flex_call(q, k, v, ac.block_mask(mm, b, tq, s, dev), scale,
                                     compiled=ctx["cuda"])
    rec = {"section": "decode", "name": f"decode/{model}-B{b}-S{s}-Tq{tq}", "model": model,
           "B": b, "S": s, "Tq": tq, "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dt)[6:],
           "bytes": decode_bytes(b, hq, hkv, tq, s, d, q.element_size())}
    out = ours()
    fns = {"ours": ours, **try_baselines(cands, out, rec)}
    times = ctx["clock"].time(fns, rounds=ctx["rounds"])
    rec.update(ms={k: t * 1e3 for k, t in times.items()}, ratio=ratios(times),
               pct_copy_bw={k: 100 * rec["bytes"] / t / ctx["copy_bw"] for k, t in times.items()})
    return rec


def decode_cases(ctx):
    """(name, zero-arg case) pairs, in run order."""
    for model in ac.MODELS:
        for tq in (1, 2):
            for b, s, use_flex in ctx["decode_bs"]:
                yield (f"decode/{model}-B{b}-S{s}-Tq{tq}",
                       lambda a=(model, b, s, tq, use_flex): decode_case(*a, ctx))


# ----------------------------------------------------------------------------- prefill
def prefill_layout(layout, t, dev):
    if layout == "causal":
        return iv_lib.causal(1, t, t, device=dev), ac.causal_mask_mod(t, t)
    iv = ac.sft_cls_intervals(1, t).to(dev)
    return iv, ac.interval_mask_mod(iv)


def prefill_baselines(q, k, v, iv, layout, scale):
    if layout == "causal":
        def fn():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)
        return {"sdpa_flash": with_backend("flash", fn)}
    # transformers' path for a custom mask: repeat_kv (done here outside the timing) and a
    # dense mask, which SDPA runs on its memory-efficient backend.
    mask = ac.dense_mask(iv, iv.shape[1])
    g = q.shape[1] // k.shape[1]
    kx, vx = (x.detach().repeat_interleave(g, 1) for x in (k, v))
    return {"sdpa_mask": lambda: F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask,
                                                                scale=scale)}


def prefill_case(model, layout, t, backward, ctx):
    dev, dt = ctx["device"], ctx["dtype"]
    q, k, v = qkv(model, 1, t, t, dev, dt, requires_grad=backward)
    hq, hkv, d = ac.MODELS[model]
    scale = d ** -0.5
    iv, mm = prefill_layout(layout, t, dev)
    cands = prefill_baselines(q, k, v, iv, layout, scale)
    cands["flex"] = ac.flex_call(q, k, v, ac.block_mask(mm, 1, t, t, dev), scale,
                                 compiled=ctx["cuda"])
    ours = lambda: safeattn.ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    if backward:
        if layout != "causal":
            cands.pop("sdpa_mask")  # the dense-mask backward is not a peer worth the memory
        dout = torch.randn_like(q)
        ours, cands = fwd_bwd(ours, q, k, v, dout), {n: fwd_bwd(f, q, k, v, dout)
                                                      for n, f in cands.items()}
    section = "backward" if backward else "prefill"
    rec = {"section": section, "name": f"{section}/{model}-{layout}-T{t}", "model": model,
           "layout": layout, "T": t, "Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dt)[6:],
           "visible_pairs": ac.visible_pairs(iv, t)}
    flops = attention_flops(hq, d, rec["visible_pairs"]) * (BACKWARD_FLOP_FACTOR if backward else 1)
    out = ours()
    fns = {"ours": ours, **try_baselines(cands, out, rec)}
    times = ctx["clock"].time(fns, rounds=ctx["rounds"])
    rec.update(ms={k: x * 1e3 for k, x in times.items()}, ratio=ratios(times),
               tflops={k: flops / x / 1e12 for k, x in times.items()})
    return rec


def fwd_bwd(fn, q, k, v, dout):
    """Forward + backward of ``fn``; returns the input gradients [dq, dk, dv] concatenated
    flat (so outputs compare like forward outputs)."""
    def run():
        for x in (q, k, v):
            x.grad = None
        fn().backward(dout)
        return torch.cat([x.grad.flatten() for x in (q, k, v)])
    return run


def prefill_cases(ctx, backward=False):
    sec = "backward" if backward else "prefill"
    for model in ac.MODELS:
        for layout in ("causal", "sft_cls"):
            for t in ctx[f"{sec}_t"]:
                yield (f"{sec}/{model}-{layout}-T{t}",
                       lambda a=(model, layout, t, backward): prefill_case(*a, ctx))


# ----------------------------------------------------------------------------- generate
def random_model(config: dict, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def gen_models(ctx) -> dict:
    if ctx["cuda"]:
        return {"gemma3-270m": GEMMA3_270M, "llama3-8b-4l": LLAMA3_8B_4L}
    small = dict(hidden_size=64, intermediate_size=128, vocab_size=512)
    return {"gemma3-270m": {**GEMMA3_270M, **small, "num_hidden_layers": 6,
                            "layer_types": GEMMA3_270M["layer_types"][:6], "head_dim": 16,
                            "query_pre_attn_scalar": 16, "sliding_window": 8},
            "llama3-8b-4l": {**LLAMA3_8B_4L, **small, "head_dim": 16}}


def prompt_text(n_words: int) -> str:
    from _hf_tiny import WORDS

    return " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(n_words))


def counting_syncs(fn) -> tuple:
    """``(fn(), synchronizing CUDA calls it made)``; the count is None off CUDA."""
    if not torch.cuda.is_available():
        return fn(), None
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(x.message) for x in w)


def top_ops(fn, cuda: bool, top: int = 8) -> dict:
    """One ``fn()`` under torch.profiler -> its ``top`` ops by self time (the GPU's where it
    runs, else the CPU's) and the total: where the time of a safe step goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    ev = prof.key_averages()
    attr = "self_cpu_time_total"
    if cuda:  # torch < 2.4 names it self_cuda_time_total
        attr = next((a for a in ("self_device_time_total", "self_cuda_time_total")
                     if all(hasattr(e, a) for e in ev)), attr)
    ev = sorted((e for e in ev if getattr(e, attr) > 0), key=lambda e: getattr(e, attr),
                reverse=True)
    return {"time": attr, "total_ms": sum(getattr(e, attr) for e in ev) / 1e3,
            "top": [{"op": e.key[:80], "ms": getattr(e, attr) / 1e3, "calls": e.count}
                    for e in ev[:top]]}


def generate_cases(ctx):
    """One entry per model: load it once, then every batch size (a list of records)."""
    for name, config in gen_models(ctx).items():
        yield f"generate/{name}", lambda name=name, config=config: generate_model(name, config, ctx)


def generate_model(name, config, ctx) -> list:
    from _hf_tiny import tiny_tokenizer

    model = random_model(config, ctx["device"], ctx["dtype"])
    tok = tiny_tokenizer(chat=True)
    model = safeattn.apply_safeattn(model, tok, cls_layer=config["num_hidden_layers"] // 3)
    return [generate_case(name, model, tok, b, ctx) for b in ctx["gen_batch"]]


def generate_case(name, model, tok, b, ctx):
    new = ctx["new_tokens"]
    prompts = [prompt_text(ctx["prompt_words"] - (i % 5)) for i in range(b)]
    enc = safeattn.build_inputs(tok, prompts, device=ctx["device"])
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=tok.pad_token_id)
    calls = {"plain": lambda: model.generate(**enc, **kw)}
    for sched in ("each", "annealing"):
        cfg = safeattn.SafetyConfig(threshold=1.5, schedule=sched)
        calls[sched] = lambda cfg=cfg: model.generate(**enc, **kw, safety=cfg)
    with torch.inference_mode():
        outs, syncs = {}, {}
        for k, f in calls.items():
            outs[k], syncs[k] = counting_syncs(f)
        times = ctx["clock"].time(calls, rounds=ctx["gen_rounds"], warmup=0)
    rec = {"section": "generate", "name": f"generate/{name}-B{b}", "model": name, "B": b,
           "prompt_len": enc["input_ids"].shape[1], "new_tokens": new,
           "cls_layer": model.config.safeattn["cls_layer"], "dtype": str(ctx["dtype"])[6:],
           "ms": {k: x * 1e3 for k, x in times.items()},
           "overhead": {k: times[k] / times["plain"] for k in ("each", "annealing")},
           "same_ids": {k: bool(torch.equal(outs[k], outs["plain"]))
                        for k in ("each", "annealing")},
           "syncs_per_step": {k: (None if n is None else n / new) for k, n in syncs.items()}}
    with torch.inference_mode():
        rec["profile"] = {k: top_ops(calls[k], ctx["cuda"]) for k in ("plain", "each")}
    return rec


# ----------------------------------------------------------------------------- driver
SECTIONS = {"decode": decode_cases, "prefill": prefill_cases,
            "backward": lambda ctx: prefill_cases(ctx, backward=True),
            "generate": generate_cases}


def make_ctx(dry_run: bool) -> dict:
    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device (use --dry-run for the CPU check)")
    device = "cuda" if cuda else "cpu"
    ctx = {"cuda": cuda, "device": device, "dtype": torch.bfloat16, "clock": Clock(device)}
    if cuda:
        ctx.update(decode_bs=DECODE_BS, prefill_t=PREFILL_T, backward_t=BACKWARD_T,
                   gen_batch=GEN_BATCH, new_tokens=NEW_TOKENS, prompt_words=PROMPT_TOKENS,
                   rounds=20, gen_rounds=3, copy_bw=copy_bandwidth(device, 1 << 30))
    else:
        ctx.update(dtype=torch.float32, decode_bs=[(1, 64, True), (3, 300, False)],
                   prefill_t=(64,), backward_t=(48,), gen_batch=(1, 2), new_tokens=2,
                   prompt_words=8, rounds=1, gen_rounds=1, copy_bw=copy_bandwidth(device, 1 << 22))
    return ctx


def env(ctx) -> dict:
    e = {"torch": torch.__version__, "cuda": torch.version.cuda,
         "python": platform.python_version(),
         "device": torch.cuda.get_device_name() if ctx["cuda"] else "cpu (dry run)",
         "copy_bw_GBps": ctx["copy_bw"] / 1e9, "dry_run": not ctx["cuda"]}
    try:
        import transformers
        e["transformers"] = transformers.__version__
    except ImportError:
        pass
    return e


def run_sections(names, ctx, budget_s: float) -> tuple[list, list]:
    cases, not_run = [], []
    for sec in names:
        deadline = time.perf_counter() + SHARES[sec] * budget_s
        for name, fn in SECTIONS[sec](ctx):
            if time.perf_counter() > deadline:
                not_run.append({"name": name, "reason": "section time budget spent"})
                continue
            t0 = time.perf_counter()
            try:
                recs = fn()
            except Exception as e:  # recorded, the next case runs
                not_run.append({"name": name, "reason": f"{type(e).__name__}: {e}"[:500],
                                "traceback": traceback.format_exc()[-2000:]})
                recs = []
            for rec in recs if isinstance(recs, list) else [recs]:
                rec["wall_s"] = time.perf_counter() - t0
                cases.append(rec)
                print(f"{rec['name']}: {short(rec)}", flush=True)
            if ctx["cuda"]:
                torch.cuda.empty_cache()
    return cases, not_run


def short(rec: dict) -> str:
    keys = ("ratio", "overhead", "pct_copy_bw", "tflops", "syncs_per_step", "errors")
    return "  ".join(f"{k}={fmt(rec[k])}" for k in keys if k in rec)


def fmt(x):
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in x.items()) + "}"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def targets(cases: list) -> list:
    """The issue's H200 targets, evaluated on what ran (never asserted)."""
    def pick(sec, pred=lambda c: True):
        return [c for c in cases if c["section"] == sec and pred(c)]

    out = []

    def add(name, values, op, thr):
        values = [x for x in values if x is not None and not math.isnan(x)]
        if values:
            worst = min(values) if op == ">=" else max(values)
            out.append({"target": name, "worst": worst, "n": len(values), "bound": f"{op} {thr}",
                        "met": worst >= thr if op == ">=" else worst <= thr})

    add("decode % of copy bandwidth, S >= 32k (ours)",
        [c["pct_copy_bw"]["ours"] for c in pick("decode", lambda c: c["S"] >= 32 * K)], ">=", 80)
    add("prefill causal vs SDPA flash", [c["ratio"].get("sdpa_flash") for c in pick(
        "prefill", lambda c: c["layout"] == "causal")], ">=", 0.8)
    add("prefill interval vs FlexAttention", [c["ratio"].get("flex") for c in pick(
        "prefill", lambda c: c["layout"] != "causal")], ">=", 1.0)
    add("backward interval vs FlexAttention", [c["ratio"].get("flex") for c in pick(
        "backward", lambda c: c["layout"] != "causal")], ">=", 1.0)
    add("generate each overhead, B=32", [c["overhead"]["each"] for c in pick(
        "generate", lambda c: c["B"] == 32)], "<=", 1.10)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="seconds for all sections (split by SHARES)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, float32, eager Flex, no budget: checks the logic")
    args = ap.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        raise ValueError(f"--only: unknown section(s) {bad}; choose from {list(SECTIONS)}")
    ctx = make_ctx(args.dry_run)
    t0 = time.perf_counter()
    cases, not_run = run_sections(names, ctx, args.budget_s if ctx["cuda"] else math.inf)
    result = {"env": env(ctx), "cases": cases, "not_run": not_run,
              "targets": targets(cases) if ctx["cuda"] else [],
              "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for t in result["targets"]:
        print(f"target {t['target']}: worst {t['worst']:.3g} ({t['bound']}, n={t['n']}) -> "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"{len(cases)} cases, {len(not_run)} not run, {result['wall_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

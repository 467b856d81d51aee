"""safeattn.interval_attention vs the SDPA calls it replaces (CPU).

Run: ``python -m pytest bench -q``. Results: bench/results/summary.json; ``python
bench/summarize.py`` reprints the table. Timings are recorded against targets, never asserted;
the only assertions check that ours and the baseline compute the same thing.

Baselines follow transformers' ``sdpa_attention_forward`` (CPU, a mask given): ``repeat_kv``
(expand + reshape copy) of K and V, then ``F.scaled_dot_product_attention(q, k, v,
attn_mask=mask, scale=...)`` with a dense bool mask ``[B, 1, Tq, Tk]`` built once outside the
timing (transformers builds it once per forward and shares it across layers). The output
transpose that both paths would need afterwards is left out of both.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attn_cases import (MODELS, SLIDING, block_mask, causal_mask_mod, dense_mask, flex_call,
                        interval_mask_mod, probe_intervals, sft_cls_intervals)
from safeattn import intervals as iv_lib
from safeattn import ops
from safeattn.reference import interval_mask

DECODE_B = (1, 4)
DECODE_S = (128, 1024, 4096)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {"float32": 2e-4, "bfloat16": 3e-2}

try:  # enable_gqa arrived in torch 2.5
    F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8),
                                   torch.zeros(1, 1, 1, 8), enable_gqa=True)
    HAS_GQA = True
except TypeError:
    HAS_GQA = False


# ----------------------------------------------------------------------------- baselines
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] (a copy)."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def hf_sdpa(q, k, v, mask, scale):
    """transformers.integrations.sdpa_attention.sdpa_attention_forward with a 4-D mask, CPU."""
    groups = q.shape[1] // k.shape[1]
    k = repeat_kv(k, groups)
    v = repeat_kv(v, groups)
    mask = mask[:, :, :, : k.shape[-2]]
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                          attn_mask=mask, dropout_p=0.0, scale=scale,
                                          is_causal=False)


def sdpa_causal(q, k, v, scale):
    """SDPA's own causal path, GQA in-kernel when this torch has enable_gqa."""
    if HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=True)
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), is_causal=True,
                                          scale=scale)


# ----------------------------------------------------------------------------- helpers
def make_qkv(model, b, tq, tk, dtype, seed=0):
    hq, hkv, d = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(DTYPES[dtype])
    k = torch.randn(b, hkv, tk, d, generator=g).to(DTYPES[dtype])
    v = torch.randn(b, hkv, tk, d, generator=g).to(DTYPES[dtype])
    return q, k, v


def describe(kind, name, model, q, k, intervals, dtype, target, baseline_desc, **more):
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    esz = q.element_size()
    pairs = int(interval_mask(intervals, tk).sum())  # visible (row, col) pairs over the batch
    return {
        "name": name, "kind": kind, "model": model, "dtype": dtype,
        "threads": torch.get_num_threads(),
        "shapes": {"q": list(q.shape), "k": list(k.shape), "v": list(k.shape),
                   "intervals": list(intervals.shape)},
        "B": b, "Hq": hq, "Hkv": k.shape[1], "D": d, "Tq": tq, "Tk": tk,
        "visible_pairs": pairs,
        "bytes": (2 * q.numel() + 2 * k.numel()) * esz,  # Q + K + V + O
        "flops": 4 * d * pairs * hq,
        "target": target, "baseline_desc": baseline_desc, **more,
    }


def check_close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def raw_op(q, k, v, intervals, scale):
    return lambda: torch.ops.safeattn.interval_attention.default(q, k, v, intervals, scale, None)


# ----------------------------------------------------------------------------- cases
DECODE_GRID = [(m, b, s, "float32") for m in MODELS for b in DECODE_B for s in DECODE_S]
DECODE_CASES = DECODE_GRID + [("gemma3-270m", 1, 1024, "bfloat16"),
                              ("llama3-8b", 4, 1024, "bfloat16")]


def _id(p):
    m, b, s, dt = p
    return f"{m}-B{b}-S{s}-{dt}"


@pytest.mark.parametrize("model,b,s,dtype", DECODE_CASES, ids=[_id(p) for p in DECODE_CASES])
def test_decode(compare, model, b, s, dtype):
    """Tq=1, the new token sees the whole prefix; vs transformers-style masked SDPA."""
    q, k, v = make_qkv(model, b, 1, s, dtype)
    scale = q.shape[-1] ** -0.5
    iv = iv_lib.causal(b, 1, s)
    mask = dense_mask(iv, s)
    ours = lambda: ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    base = lambda: hf_sdpa(q, k, v, mask, scale)  # noqa: E731
    check_close(ours(), base(), dtype)
    extras = {"ours_raw_op": raw_op(q, k, v, iv, scale)}
    if HAS_GQA:  # info: what transformers runs when it can drop the mask (no padding)
        extras["sdpa_nomask_gqa"] = lambda: F.scaled_dot_product_attention(
            q, k, v, scale=scale, enable_gqa=True)
    case = describe("decode", f"decode/{_id((model, b, s, dtype))}", model, q, k, iv, dtype,
                    ("speedup", ">=", 1.0),
                    "repeat_kv + SDPA(attn_mask=bool[B,1,1,Tk]) (transformers sdpa, mask given)")
    compare(case, ours, base, extras=extras, budget_s=1.0)


@pytest.mark.parametrize("model,b,s,dtype", DECODE_GRID, ids=[_id(p) for p in DECODE_GRID])
def test_probe_overhead(compare, model, b, s, dtype):
    """Tq=2 (token + probe) vs our own Tq=1 decode on the same cache: the probe should be ~free."""
    q2, k, v = make_qkv(model, b, 2, s, dtype)
    q1 = q2[:, :, :1].contiguous()
    scale = q2.shape[-1] ** -0.5
    iv2 = probe_intervals(b, s)
    iv1 = iv_lib.causal(b, 1, s)
    ours = lambda: ops.interval_attention(q2, k, v, iv2, scale=scale)  # noqa: E731
    base = lambda: ops.interval_attention(q1, k, v, iv1, scale=scale)  # noqa: E731
    check_close(ours(), torch.cat([hf_sdpa(q2[:, :, i:i + 1].contiguous(), k, v,
                                           dense_mask(iv2[:, i:i + 1], s), scale)
                                   for i in range(2)], dim=2), dtype)
    case = describe("probe_overhead", f"probe_overhead/{_id((model, b, s, dtype))}", model, q2,
                    k, iv2, dtype, ("overhead", "<=", 1.05),
                    "ours, Tq=1 decode (token row only, full prefix)")
    extras = {"ours_raw_op": raw_op(q2, k, v, iv2, scale),
              "baseline_raw_op": raw_op(q1, k, v, iv1, scale)}
    compare(case, ours, base, extras=extras, budget_s=1.0)


@pytest.mark.parametrize("model,b,s,dtype", DECODE_GRID, ids=[_id(p) for p in DECODE_GRID])
def test_probe_vs_sdpa(compare, model, b, s, dtype):
    """Tq=2 in one call vs two transformers-style SDPA calls (token row, probe row)."""
    q2, k, v = make_qkv(model, b, 2, s, dtype)
    scale = q2.shape[-1] ** -0.5
    iv2 = probe_intervals(b, s)
    qa, qb = q2[:, :, :1].contiguous(), q2[:, :, 1:].contiguous()
    ma, mb = dense_mask(iv2[:, :1], s), dense_mask(iv2[:, 1:], s)
    ours = lambda: ops.interval_attention(q2, k, v, iv2, scale=scale)  # noqa: E731

    def base():
        return hf_sdpa(qa, k, v, ma, scale), hf_sdpa(qb, k, v, mb, scale)

    check_close(ours(), torch.cat(base(), dim=2), dtype)
    case = describe("probe_vs_sdpa", f"probe_vs_sdpa/{_id((model, b, s, dtype))}", model, q2, k,
                    iv2, dtype, ("speedup", ">=", 1.6),
                    "2x (repeat_kv + SDPA(attn_mask=bool[B,1,1,Tk])): token row, probe row")
    compare(case, ours, base, extras={"ours_raw_op": raw_op(q2, k, v, iv2, scale)}, budget_s=1.0)


PREFILL_CAUSAL = [(m, 1, t, "float32") for m in MODELS for t in (512, 2048)] + [
    ("gemma3-270m", 1, 512, "bfloat16"), ("llama3-8b", 1, 512, "bfloat16")]


def _pid(p):
    m, b, t, dt = p
    return f"{m}-B{b}-T{t}-{dt}"


def _prefill_budget(t):
    # T=2048 Llama is ~0.5 s per call on 2 cores: keep rounds low for the big shapes.
    return dict(budget_s=4.0, min_rounds=5, max_rounds=60, warmup_s=0.0,
                min_warmup=1 if t >= 2048 else 2)


@pytest.mark.parametrize("model,b,t,dtype", PREFILL_CAUSAL, ids=[_pid(p) for p in PREFILL_CAUSAL])
def test_prefill_causal(compare, model, b, t, dtype):
    q, k, v = make_qkv(model, b, t, t, dtype)
    scale = q.shape[-1] ** -0.5
    iv = iv_lib.causal(b, t, t)
    ours = lambda: ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    base = lambda: sdpa_causal(q, k, v, scale)  # noqa: E731
    check_close(ours(), base(), dtype)
    gqa = "enable_gqa=True" if HAS_GQA else "repeat_kv"
    case = describe("prefill_causal", f"prefill_causal/{_pid((model, b, t, dtype))}", model, q, k,
                    iv, dtype, ("speedup", ">=", 0.9), f"SDPA(is_causal=True, {gqa})", gqa=gqa)
    compare(case, ours, base, **_prefill_budget(t))


PREFILL_MASK = [(m, lay, t) for m in MODELS
                for lay, t in (("sliding512", 2048), ("sft_cls", 512), ("sft_cls", 2048))]


@pytest.mark.parametrize("model,layout,t", PREFILL_MASK,
                         ids=[f"{m}-{lay}-T{t}" for m, lay, t in PREFILL_MASK])
def test_prefill_mask(compare, model, layout, t):
    dtype, b = "float32", 1
    q, k, v = make_qkv(model, b, t, t, dtype)
    scale = q.shape[-1] ** -0.5
    iv = iv_lib.causal(b, t, t, window=SLIDING) if layout == "sliding512" else sft_cls_intervals(b, t)
    mask = dense_mask(iv, t)
    ours = lambda: ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    base = lambda: hf_sdpa(q, k, v, mask, scale)  # noqa: E731
    check_close(ours(), base(), dtype)
    case = describe("prefill_mask", f"prefill_mask/{model}-{layout}-T{t}-B{b}-{dtype}", model, q,
                    k, iv, dtype, ("speedup", ">=", 1.5),
                    "repeat_kv + SDPA(attn_mask=materialised bool[B,1,T,T])", layout=layout)
    compare(case, ours, base, **_prefill_budget(t))



# ------------------------------------------------------------------ FlexAttention (CPU)
# FlexAttention compiled through inductor (torch.compile(flex_attention)), with the same mask:
# the closed-form causal/sliding mask_mod, or for the probe and [CLS] layouts a mask_mod that
# reads our interval tensor. The block mask is built once, outside the timing; the first
# (compiling) call is timed once and recorded as flex_first_call_s. A case whose compile or
# run fails is recorded with the error (summary "not run") instead of a ratio.
FLEX_DECODE = [(m, b, s, tq) for m in MODELS for b, s in ((1, 1024), (1, 4096), (4, 4096))
               for tq in (1, 2)]
FLEX_PREFILL = [(m, lay, t) for m in MODELS
                for lay, t in (("causal", 2048), ("sliding512", 2048), ("sft_cls", 512),
                               ("sft_cls", 2048))]


def _flex_baseline(note_not_run, case, q, k, v, mask_mod, scale):
    """Build the block mask and run compiled Flex once -> (zero-arg call, first-call s)."""
    import time

    b, _, tq, _ = q.shape
    try:
        bm = block_mask(mask_mod, b, tq, k.shape[2], q.device)
        fn = flex_call(q, k, v, bm, scale)
        t0 = time.perf_counter()
        fn()
        return fn, time.perf_counter() - t0
    except Exception as e:  # recorded: a case that cannot compile on CPU says why
        reason = f"FlexAttention failed on CPU: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        note_not_run(case, reason)
        pytest.skip(reason)


@pytest.mark.parametrize("model,b,s,tq", FLEX_DECODE,
                         ids=[f"{m}-B{b}-S{s}-Tq{tq}" for m, b, s, tq in FLEX_DECODE])
def test_decode_vs_flex(compare, note_not_run, model, b, s, tq):
    """Tq=1 (causal) and Tq=2 (token + probe) decode vs compiled FlexAttention, same mask."""
    dtype = "float32"
    q, k, v = make_qkv(model, b, tq, s, dtype)
    scale = q.shape[-1] ** -0.5
    iv = iv_lib.causal(b, 1, s) if tq == 1 else probe_intervals(b, s)
    mask_mod = causal_mask_mod(1, s) if tq == 1 else interval_mask_mod(iv)
    case = describe("decode_flex", f"decode_flex/{model}-B{b}-S{s}-Tq{tq}-{dtype}", model, q, k,
                    iv, dtype, ("speedup", ">=", 1.0),
                    "torch.compile(flex_attention), block mask built once, enable_gqa",
                    mask_mod="causal closed form" if tq == 1 else "reads the interval tensor")
    base, first = _flex_baseline(note_not_run, case, q, k, v, mask_mod, scale)
    ours = lambda: ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    check_close(ours(), base(), dtype)
    case["flex_first_call_s"] = first
    compare(case, ours, base, budget_s=1.0)


@pytest.mark.parametrize("model,layout,t", FLEX_PREFILL,
                         ids=[f"{m}-{lay}-T{t}" for m, lay, t in FLEX_PREFILL])
def test_prefill_vs_flex(compare, note_not_run, model, layout, t):
    """Causal, sliding-512 and SFT [CLS] prefill vs compiled FlexAttention, same mask."""
    dtype, b = "float32", 1
    q, k, v = make_qkv(model, b, t, t, dtype)
    scale = q.shape[-1] ** -0.5
    if layout == "sft_cls":
        iv = sft_cls_intervals(b, t)
        mask_mod, kind = interval_mask_mod(iv), "reads the interval tensor"
    else:
        window = SLIDING if layout == "sliding512" else None
        iv = iv_lib.causal(b, t, t, window=window)
        mask_mod, kind = causal_mask_mod(t, t, window), "causal closed form"
    case = describe("prefill_flex", f"prefill_flex/{model}-{layout}-T{t}-B{b}-{dtype}", model, q,
                    k, iv, dtype, ("speedup", ">=", 1.0),
                    "torch.compile(flex_attention), block mask built once, enable_gqa",
                    layout=layout, mask_mod=kind)
    base, first = _flex_baseline(note_not_run, case, q, k, v, mask_mod, scale)
    ours = lambda: ops.interval_attention(q, k, v, iv, scale=scale)  # noqa: E731
    check_close(ours(), base(), dtype)
    case["flex_first_call_s"] = first
    compare(case, ours, base, **_prefill_budget(t))


PAGED_CASES = [("gemma3-270m", b, dt) for b in (1, 8) for dt in DTYPES] + [
    ("llama3-8b", 8, "bfloat16")]


@pytest.mark.parametrize("model,b,dtype", PAGED_CASES,
                         ids=[f"{m}-B{b}-{dt}" for m, b, dt in PAGED_CASES])
def test_paged_probe(compare, model, b, dtype):
    """The vLLM probe's attention: one row per request over its q_span (40 tokens) and a
    32-token window of a 600-token sequence in a paged cache (16-token blocks, keys [D, 16]
    and values [16, D] per head as vLLM's CPU ``vec`` layout), plus its own key. Ours reads
    the cache in place; the baseline is what the probe did before: gather the columns with
    ``index_select`` from precomputed flat indices, ``cat`` the own key, then
    ``interval_attention``."""
    hq, hkv, d = MODELS[model]
    bs, seq, pages = 16, 600, 64 * b
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    cache = torch.randn(pages, hkv, 2 * bs * d, generator=g).to(dt)
    t, c = torch.arange(bs)[:, None], torch.arange(d)[None]
    koff, voff = c * bs + t, bs * d + t * d + c
    table = torch.randperm(pages, generator=g)[:b * (seq // bs + 1)].view(b, -1)
    cols = torch.cat([torch.arange(1, 41), torch.arange(seq - 32, seq)])[None].expand(b, -1)
    slots = table.gather(1, cols // bs) * bs + cols % bs
    q = torch.randn(b, hq, 1, d, generator=g).to(dt)
    kn = torch.randn(b, hkv, 1, d, generator=g).to(dt)
    vn = torch.randn(b, hkv, 1, d, generator=g).to(dt)
    n = cols.shape[1]
    iv = torch.tensor([[0, n], [n, n + 1]], dtype=torch.int32).expand(b, 1, 2, 2).contiguous()
    heads = torch.arange(hkv)[:, None, None]
    base_at = ((slots // bs)[:, None, :, None] * hkv + heads) * (2 * bs * d)
    kidx = (base_at + koff[slots % bs][:, None]).contiguous()
    vidx = (base_at + voff[slots % bs][:, None]).contiguous()
    flat = cache.view(-1)
    scale = d ** -0.5

    def take(index):
        return flat.index_select(0, index.view(-1)).view(index.shape)

    def ours():
        return ops.paged_interval_attention(q, cache, slots, koff, voff, kn, vn, iv, scale=scale)

    def base():
        return ops.interval_attention(q, torch.cat([take(kidx), kn], 2),
                                      torch.cat([take(vidx), vn], 2), iv, scale=scale)

    check_close(ours(), base(), dtype)
    k_all = torch.cat([take(kidx), kn], 2)
    case = describe("paged_probe", f"paged_probe/{model}-B{b}-{dtype}", model, q, k_all, iv,
                    dtype, ("speedup", ">=", 1.0),
                    "index_select K and V out of the paged cache, cat the own key, "
                    "interval_attention")
    compare(case, ours, base, budget_s=1.0)

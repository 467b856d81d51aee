"""Early probe exit: with the head on decoder layer ``cls_layer``, a check step runs the probe
row through layers 0..cls_layer only (issue #5). p, tokens and cache must equal those of a
probe that runs through every layer."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import safeattn
from safeattn.generation import SafetyConfig
from _hf_tiny import FAMILIES, PROMPTS, cache_state, plain_step_cache, tiny_model, tiny_tokenizer

PROMPTS4 = PROMPTS + ["why"]
REFUSAL = "sorry i cannot fulfill your request because"
N_LAYERS = 4


def _deep(family, cls_layer=1, window=4, seed=0):
    """A 4-layer tiny model (layer types repeat the family's pattern), patched with the head on
    ``cls_layer``."""
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok), seed=seed, window=window, layers=N_LAYERS)
    return safeattn.apply_safeattn(model, tok, cls_layer=cls_layer), tok


def _no_exit(model):
    """Context: the probe runs through every layer again (the behaviour before issue #5)."""
    st = model._safeattn_state

    class _Ctx:
        def __enter__(self):
            self.saved, st["exit_layer"] = st["exit_layer"], None

        def __exit__(self, *a):
            st["exit_layer"] = self.saved
    return _Ctx()


def test_exit_layer_state():
    model, _ = _deep("llama", cls_layer=1)
    assert model._safeattn_state["exit_layer"] == 1
    hooks = [len(l._forward_pre_hooks) for l in model.model.layers]
    assert hooks == [0, 0, 1, 1]
    safeattn.apply_safeattn(model, cls_layer=N_LAYERS - 1)  # nothing after the tapped layer
    assert model._safeattn_state["exit_layer"] is None
    assert [len(l._forward_pre_hooks) for l in model.model.layers] == [0] * N_LAYERS
    safeattn.apply_safeattn(model, cls_layer=None)
    assert model._safeattn_state["exit_layer"] is None
    safeattn.apply_safeattn(model, cls_layer=0)
    assert [len(l._forward_pre_hooks) for l in model.model.layers] == [0, 1, 1, 1]
    safeattn.revert_safeattn(model)
    assert [len(l._forward_pre_hooks) for l in model.model.layers] == [0] * N_LAYERS


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_forward_matches_full_probe(family):
    """One [token, probe] forward: p and the token's logits equal those of a probe that runs
    through every layer; the probe's K/V reach layers 0..cls_layer only."""
    model, tok = _deep(family, cls_layer=1, window=64)
    enc = safeattn.build_inputs(tok, PROMPTS)
    ids, am, q = enc["input_ids"], enc["attention_mask"], enc["q_span"]
    b, n = ids.shape
    cid = safeattn.hf.cls_token_id(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**enc, cache=cache)
    step = dict(input_ids=torch.cat([torch.tensor([[9], [10], [11]]),
                                     torch.full((b, 1), cid)], 1),
                attention_mask=torch.cat([am, torch.ones_like(am[:, :2])], 1),
                position_ids=torch.stack([enc["position_ids"][:, -1] + 1,
                                          torch.zeros(b, dtype=torch.long)], 1),
                q_span=q, probe_window=torch.stack([q[:, 1] - 2, q[:, 1]], -1))
    c_full, c_exit = copy.deepcopy(cache), copy.deepcopy(cache)
    with torch.no_grad():
        full = model(**step, cache=c_full)
        ex = model(**step, cache=c_exit, probe_exit=True)
    assert full.logits.shape[1] == 2 and ex.logits.shape[1] == 1
    assert (ex.p - full.p).abs().max() <= 1e-5
    assert (ex.safety_logit - full.safety_logit).abs().max() <= 1e-5
    assert (ex.logits[:, 0, :cid] - full.logits[:, 0, :cid]).abs().max() <= 1e-4
    for i, (lf, le) in enumerate(zip(c_full.layers, c_exit.layers)):
        if i <= 1:  # the probe ran here: its K/V are the last entry, as in the full run
            assert torch.allclose(le.keys, lf.keys, atol=1e-5)
        else:  # the token's K/V only
            assert le.keys.shape[2] == lf.keys.shape[2] - 1 == n + 1, i
            assert torch.allclose(le.keys, lf.keys[:, :, :-1], atol=1e-5)
            assert torch.allclose(le.values, lf.values[:, :, :-1], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_after_cls_layer_see_one_row(family):
    """On check steps layers 0..cls_layer get [token, probe], later layers the token alone and
    a layout without the probe; plain steps and the prefill are untouched."""
    model, tok = _deep(family, cls_layer=1)
    seen = []  # (layer, rows, probe in layout, position_embeddings rows)

    def rec(i):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            lay = kwargs.get("safety_layout")
            cos = kwargs["position_embeddings"][0]
            seen.append((i, h.shape[1], lay is not None and lay.probe_window is not None,
                         cos.shape[1], kwargs["position_ids"].shape[-1]))
        return hook

    handles = [l.self_attn.register_forward_pre_hook(rec(i), with_kwargs=True)
               for i, l in enumerate(model.model.layers)]
    try:
        enc = safeattn.build_inputs(tok, PROMPTS[:1])
        l0 = enc["input_ids"].shape[1]
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             safety=SafetyConfig(threshold=1.5, schedule="periodic", period=2,
                                                 escalate=False, refusal_prefix=REFUSAL))
    finally:
        for h in handles:
            h.remove()
    assert out.safety[0].checked == [True, False, True, False, True, False]
    fwd = [seen[i:i + N_LAYERS] for i in range(0, len(seen), N_LAYERS)]
    assert len(fwd) == 6 and all([s[0] for s in f] == list(range(N_LAYERS)) for f in fwd)
    assert all(s[1:] == (l0, False, l0, l0) for s in fwd[0])  # prefill
    for step, f in enumerate(fwd[1:], 1):
        if step % 2:  # plain step
            assert all(s[1:] == (1, False, 1, 1) for s in f), (step, f)
        else:  # check step
            assert [s[1:] for s in f] == [(2, True, 2, 2)] * 2 + [(1, False, 1, 1)] * 2, f


@pytest.mark.parametrize("family", FAMILIES)
def test_safe_generate_with_exit_equals_full_probe(family):
    """Whole decodes, batch 4 left-padded: the ids and the p trace of the early-exit probe
    equal those of a probe through every layer (θ low enough that rows refuse)."""
    model, tok = _deep(family, cls_layer=1)
    enc = safeattn.build_inputs(tok, PROMPTS4)
    for cfg in (SafetyConfig(threshold=1.5, refusal_prefix=REFUSAL),
                SafetyConfig(threshold=0.5, tau=2, refusal_prefix=REFUSAL, rollback=True),
                SafetyConfig(threshold=0.5, schedule="annealing", refusal_prefix=REFUSAL)):
        kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, safety=cfg)
        got = model.generate(**enc, **kw)
        with _no_exit(model):
            want = model.generate(**enc, **kw)
        assert torch.equal(got, want), (family, cfg)
        assert torch.equal(got.safety.p.isnan(), want.safety.p.isnan())
        assert torch.allclose(got.safety.p.nan_to_num(), want.safety.p.nan_to_num(), atol=1e-5)
        assert torch.equal(got.safety.mode, want.safety.mode)


@pytest.mark.parametrize("family,window", [("llama", 5), ("gemma3_text", 4), ("qwen2", 4),
                                           ("mistral", 4)])
def test_cache_after_exit_steps_equals_plain_steps(family, window):
    """After N check steps with an early probe exit the cache == the cache of N plain steps:
    full and sliding layers (window 4 < N) on both sides of cls_layer."""
    model, tok = _deep(family, cls_layer=1, window=window)
    assert model._safeattn_state["exit_layer"] == 1
    enc = safeattn.build_inputs(tok, PROMPTS)
    n_new = 11
    never_eos = safeattn.hf.cls_token_id(model)
    out = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                         eos_token_id=never_eos, return_dict_in_generate=True,
                         safety=SafetyConfig(threshold=1.5, refusal_prefix=REFUSAL))
    assert all(out.safety[i].checked == [True] * n_new for i in range(3))
    got = cache_state(out.cache)
    l0 = enc["input_ids"].shape[1]
    want = plain_step_cache(model, enc, out.sequences, n_new - 1)
    kinds = {w[0] for w in want}
    assert ("DynamicSlidingWindowLayer" in kinds) == (family != "llama")
    for i, ((tg, ng, kg, vg), (tw, nw, kw, vw)) in enumerate(zip(got, want)):
        assert (tg, ng) == (tw, nw) == (tg, l0 + n_new - 1), i
        assert kg.shape == kw.shape and vg.shape == vw.shape, i
        assert torch.allclose(kg, kw, atol=1e-5) and torch.allclose(vg, vw, atol=1e-5), i
        assert not getattr(out.cache.layers[i], "record_past", False)

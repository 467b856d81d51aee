"""The probe adapter: low-rank projections that only the [CLS] / probe row uses."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import safeattn
from safeattn.generation import SafetyConfig
from safeattn.hf.adapter import ProbeAdapter, attach_probe_adapter, detach_probe_adapter
from _hf_tiny import FAMILIES, PROMPTS, tiny_model, tiny_tokenizer

SCHEDS = ("each", "first", "periodic", "annealing")


def _patched(family, cls_layer=1, rank=4, seed=0):
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok), window=64, layers=4)
    safeattn.apply_safeattn(model, tok, cls_layer=cls_layer)
    ad = attach_probe_adapter(model, rank, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would be the identity
        for p in ad.b.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model, tok


class _Zeroed:
    """Context: the adapter's B matrices are zero (the identity update) inside it."""

    def __init__(self, model):
        self.b = list(model.safety_adapter.b.values())

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.b]
        with torch.no_grad():
            for p in self.b:
                p.zero_()

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, v in zip(self.b, self.saved):
                p.copy_(v)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_cls_row_changes(family):
    model, tok = _patched(family)
    enc = safeattn.build_inputs(tok, PROMPTS, ["sure here is step one"] * 3)
    with torch.no_grad():
        a = model(**enc)
        with _Zeroed(model):
            b = model(**enc)
    keep = enc["attention_mask"].bool().clone()
    cls = enc["attention_mask"].argmax(-1)
    keep[torch.arange(3), cls] = False
    assert torch.allclose(a.logits[keep], b.logits[keep], atol=1e-5)
    assert (a.p - b.p).abs().max() > 1e-3          # the [CLS] row reads through the adapter
    n = len(model.safety_adapter.a)
    assert n == 2 * len(ProbeAdapter([model.model.layers[0]]).a)  # layers 0..cls_layer


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_exit_probe_and_full_probe_get_the_adapter(family):
    """A check step's probe row gets the same update whether it exits after cls_layer or runs
    on; the token row is untouched."""
    model, tok = _patched(family)
    enc = safeattn.build_inputs(tok, PROMPTS)
    q = enc["q_span"]
    b = q.shape[0]
    cid = safeattn.hf.cls_token_id(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**enc, cache=cache)
    step = dict(input_ids=torch.cat([torch.tensor([[9], [10], [11]]), torch.full((b, 1), cid)], 1),
                attention_mask=torch.cat([enc["attention_mask"],
                                          torch.ones_like(enc["attention_mask"][:, :2])], 1),
                position_ids=torch.stack([enc["position_ids"][:, -1] + 1,
                                          torch.zeros(b, dtype=torch.long)], 1),
                q_span=q, probe_window=torch.stack([q[:, 1] - 2, q[:, 1]], -1))
    with torch.no_grad():
        full = model(**step, cache=copy.deepcopy(cache))
        ex = model(**step, cache=copy.deepcopy(cache), probe_exit=True)
        with _Zeroed(model):
            plain = model(**step, cache=copy.deepcopy(cache), probe_exit=True)
    assert (ex.p - full.p).abs().max() <= 1e-5
    assert (ex.p - plain.p).abs().max() > 1e-3
    assert torch.allclose(ex.logits[:, 0, :cid], plain.logits[:, 0, :cid], atol=1e-5)


def test_same_row_fast_path_equals_per_row_indexing():
    """A check step names its probe row as an int (-1, in place, three ops); a prefill gives a
    [B] index. Both give the same update, to that row only."""
    from safeattn.hf.adapter import install_hooks

    model, _ = _patched("llama")
    proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 4, proj.in_features)
    outs = {}
    for name, rows in (("int", -1), ("index", torch.full((3,), 3)), ("none", None)):
        handles = install_hooks(model, model.safety_adapter, lambda rows=rows: rows)
        with torch.no_grad():
            outs[name] = proj(x)
        for h in handles:
            h.remove()
    assert torch.allclose(outs["int"], outs["index"], atol=1e-6)
    assert torch.equal(outs["int"][:, :3], outs["none"][:, :3])
    assert (outs["int"][:, 3] - outs["none"][:, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("schedule", SCHEDS)
def test_generation_equals_plain_until_a_refusal(schedule):
    model, tok = _patched("gemma3_text")
    enc = safeattn.build_inputs(tok, PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = model.generate(**enc, safety=SafetyConfig(threshold=1.5, schedule=schedule), **kw)
    with _Zeroed(model):  # the stock model's tokens: plain generate, identity adapter
        want = model.generate(**enc, **kw)
    assert torch.equal(got, want)


def test_context_cache_matches_full_forward_with_adapter(tmp_path):
    from transformers import TrainingArguments

    from safeattn.training import SafetyDataCollator, SafetyDataset, SafetyTrainer, prepare_model
    tok = tiny_tokenizer()
    model = tiny_model("gemma3_text", vocab_size=len(tok) + 1, window=64)
    model = prepare_model(model, tok, "head", cls_layer=1, probe_adapter=4)
    with torch.no_grad():
        for p in model.safety_adapter.b.values():
            p.normal_(0, 0.3)
    assert all(p.requires_grad for p in model.safety_adapter.parameters())
    samples = [dict(prompt=p, response="sure here is step one two", label=i % 2,
                    kind="trajectory", window=(0, 12), lm_span=None) for i, p in
               enumerate(PROMPTS)] + [dict(prompt=p, response="cannot", label=1, kind="query")
                                      for p in PROMPTS]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    tr = SafetyTrainer(model=model, args=args, data_collator=SafetyDataCollator(tok),
                       train_mode="head", context_cache=True)
    ds = SafetyDataset(samples)
    batch = SafetyDataCollator(tok)([ds[i] for i in range(len(ds))])
    grads = []
    for cached in (False, True):
        tr.context_cache = cached
        model.zero_grad()
        tr.compute_loss(model, batch).backward()
        grads.append([p.grad.clone() for p in model.safety_adapter.parameters()])
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="mode='head'"):
        prepare_model(tiny_model("llama", len(tok) + 1), tok, "full", probe_adapter=2)


def test_save_load_round_trips(tmp_path):
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    with torch.no_grad():
        want = model(**enc).p
    safeattn.save_safety(model, tmp_path / "small")
    fresh, ftok = tiny_model("llama", len(tiny_tokenizer()), window=64, layers=4), tiny_tokenizer()
    safeattn.load_safety(fresh, tmp_path / "small", ftok)
    assert fresh.config.safeattn["adapter"]["rank"] == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(**safeattn.build_inputs(ftok, PROMPTS)).p, want)
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    again, atok = safeattn.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(again(**safeattn.build_inputs(atok, PROMPTS)).p, want)
    # a head saved without an adapter removes the one a model had
    plain, ptok = _patched("llama")
    detach_probe_adapter(plain)
    assert len(plain._safeattn_state["handles"]) < len(model._safeattn_state["handles"])
    safeattn.save_safety(plain, tmp_path / "noad")
    safeattn.load_safety(fresh, tmp_path / "noad", ftok)
    assert fresh.safety_adapter is None and "adapter" not in fresh.config.safeattn


def test_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="not patched"):
        attach_probe_adapter(tiny_model("llama", len(tok)), 4)
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok)), tok, cls_layer=0)
    with pytest.raises(ValueError, match="rank"):
        attach_probe_adapter(model, 0)

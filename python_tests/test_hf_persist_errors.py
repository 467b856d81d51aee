"""Save/load round trips, probe rows, and the errors of the HF integration."""
import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import safeattn
from safeattn.hf import SafetyLayout, build_intervals, valid_runs
from safeattn.reference import interval_mask
from _hf_tiny import PROMPTS, tiny_model, tiny_tokenizer


def _trained(family="gemma3_text", **kw):
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model(family, len(tok)), tok, **kw)
    with torch.no_grad():  # pretend training moved the row and the head
        torch.manual_seed(3)
        model.get_input_embeddings().weight[-1].normal_()
        model.safety_head.weight.normal_()
        model.safety_head.bias.fill_(0.1)
    return model, tok


def _run(model, tok):
    with torch.no_grad():
        out = model(**safeattn.build_inputs(tok, PROMPTS))
    return out.p, out.logits


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_save_pretrained_round_trip(tmp_path, family):
    model, tok = _trained(family, cls_layer=1, cls_visible_to_response=True)
    p, logits = _run(model, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, t2 = safeattn.from_pretrained(tmp_path)
    assert m2.config._attn_implementation == "safeattn"
    assert m2.config.safeattn == model.config.safeattn
    assert m2.safety_head.cls_layer == 1 and len(t2) == len(tok)
    p2, logits2 = _run(m2, t2)
    assert torch.equal(p, p2) and torch.equal(logits, logits2)


def test_safety_only_files_round_trip(tmp_path):
    model, tok = _trained(cls_layer=0)
    p, logits = _run(model, tok)
    safeattn.save_safety(model, tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["safety_config.json",
                                                          "safety_head.safetensors"]
    base, fresh_tok = tiny_model("gemma3_text", len(tiny_tokenizer())), tiny_tokenizer()
    safeattn.load_safety(base, tmp_path, fresh_tok)
    p2, logits2 = _run(base, fresh_tok)
    assert torch.equal(p, p2) and torch.equal(logits, logits2)
    # the tokenizer given to load_safety serves safe generate (refusal prefix) as well
    enc = safeattn.build_inputs(fresh_tok, PROMPTS[:1])
    out = base.generate(**enc, max_new_tokens=2, safety=safeattn.SafetyConfig())
    assert len(out.safety) == 1


def test_probe_row_matches_dense_reference():
    """Decode step [new token, probe]: the probe sees {itself} ∪ q_span ∪ W_t at RoPE pos 0."""
    model, tok = _trained("llama")
    stock = safeattn.revert_safeattn(copy.deepcopy(model))
    enc = safeattn.build_inputs(tok, PROMPTS)
    ids, am, q = enc["input_ids"], enc["attention_mask"], enc["q_span"]
    b, n = ids.shape
    cid = safeattn.hf.cls_token_id(model)
    new = torch.tensor([[9], [10], [11]])
    step_ids = torch.cat([new, torch.full((b, 1), cid)], 1)
    win = torch.stack([q[:, 1] - 2, q[:, 1]], -1)  # any window of existing columns
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**enc, cache=cache)
        step_pos = torch.stack([enc["position_ids"][:, -1] + 1, torch.zeros(b, dtype=torch.long)], 1)
        out = model(input_ids=step_ids, attention_mask=torch.cat([am, torch.ones_like(am[:, :2])], 1),
                    position_ids=step_pos, q_span=q, probe_window=win, cache=cache)
    # The same through the stock model: one prefill with a hand-built 4-D mask.
    full = torch.cat([ids, step_ids], 1)
    amf = torch.cat([am, torch.ones(b, 2, dtype=am.dtype)], 1)
    cls = am.argmax(-1)
    lay = SafetyLayout(q_span=q, cls=cls, resp_start=torch.full((b,), n))
    dense = interval_mask(build_intervals(lay, batch=b, tq=n + 2, tk=n + 2, q_offset=0,
                                          kv_offset=0, runs=valid_runs(amf.bool())), n + 2)
    dense[:, n + 1] = False
    for i in range(b):
        dense[i, n + 1, [n + 1, *range(*q[i].tolist()), *range(*win[i].tolist())]] = True
    dense |= torch.eye(n + 2, dtype=torch.bool)  # pad rows
    pos = torch.cat([enc["position_ids"], enc["position_ids"][:, -1:] + 1,
                     torch.zeros(b, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = stock(input_ids=full, attention_mask=dense[:, None], position_ids=pos,
                    output_hidden_states=True)
    p = torch.sigmoid(model.safety_head(ref.hidden_states[-1][:, -1])[:, 0])
    assert (out.p - p).abs().max() <= 1e-5
    assert (out.logits[:, 0, :cid] - ref.logits[:, n, :cid]).abs().max() <= 1e-4
    assert cache.get_seq_length() == n + 2  # rolling the probe back is the decoder's job


def test_unsupported_model():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported: Llama.*Gemma3"):
        safeattn.apply_safeattn(model)


def test_tokenizer_without_cls():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"no \[CLS\] token.*add_safety_token"):
        safeattn.build_inputs(tok, PROMPTS)
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok)))  # patched, but no token
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"no \[CLS\] token"):
        model(ids, q_span=torch.tensor([[1, 3]]))


@pytest.mark.parametrize("span", [[[3, 99]], [[0, 3]], [[5, 4]]])
def test_q_span_out_of_range(span):
    model, tok = _trained("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    enc["q_span"] = torch.tensor(span)
    with pytest.raises(ValueError, match="q_span.*out of range"):
        model(**enc)


def test_mismatched_batch_sizes():
    model, tok = _trained("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    with pytest.raises(ValueError, match=r"q_span must have shape \[3, 2\] for a batch of 3"):
        model(**{**enc, "q_span": enc["q_span"][:2]})
    with pytest.raises(ValueError, match="response_start must have shape"):
        model(**{**enc, "response_start": enc["response_start"][:1]})
    with pytest.raises(ValueError, match="attention_mask has batch 2"):
        model(**{**enc, "attention_mask": enc["attention_mask"][:2]})
    with pytest.raises(ValueError, match="prompts but"):
        safeattn.build_inputs(tok, PROMPTS, ["only one"])


def test_cls_placement_errors():
    model, tok = _trained("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    with pytest.raises(ValueError, match="contain \\[CLS\\] but no q_span"):
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    ids = enc["input_ids"].clone()
    ids[0, enc["attention_mask"][0].argmax()] = 5
    with pytest.raises(ValueError, match="row 0 does not start with \\[CLS\\]"):
        model(**{**enc, "input_ids": ids})
    with pytest.raises(ValueError, match="safety_mode must be one of"):
        model(**enc, safety_mode="bogus")
    with pytest.raises(ValueError, match="needs q_span"):
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
              safety_mode="trajectory")

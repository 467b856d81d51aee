"""[CLS] surgery, safety layouts (sft / pretrain / trajectory), safety forward, chat helper."""
import copy

import pytest
import torch

import safeattn
from safeattn.hf import SafetyLayout, layout_intervals
from safeattn.reference import interval_mask
from _hf_tiny import FAMILIES, PROMPTS, tiny_model, tiny_tokenizer

TOL = 1e-4
RESPONSES = ["sure here is step one", "it is safe", "sorry i cannot fulfill your request"]


def _patched(family, chat=False, vis=False, vocab_extra=0):
    tok = tiny_tokenizer(chat)
    model = tiny_model(family, vocab_size=len(tok) + vocab_extra)
    return safeattn.apply_safeattn(model, tok, cls_visible_to_response=vis), tok


def _without_cls(enc):
    """The same batch with the [CLS] column turned into padding (what stock models see)."""
    ids, am = enc["input_ids"].clone(), enc["attention_mask"].clone()
    cls = am.argmax(-1)
    rows = torch.arange(ids.shape[0])
    ids[rows, cls], am[rows, cls] = 0, 0
    return ids, am


def expected_mask(am, cls, q, mode, win=None, rs=None, vis=False, window=None):
    """Hand-built DESIGN §2 rules -> bool [B, L, L]."""
    b, n = am.shape
    m = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(b):
        c = int(cls[i])
        valid = [j for j in range(n) if am[i, j]]
        for t in range(n):
            if t == c:
                if mode == "pretrain":
                    cols = valid
                else:
                    cols = [c, *range(int(q[i, 0]), int(q[i, 1]))]
                    if mode == "trajectory":
                        cols += list(range(int(win[i, 0]), int(win[i, 1])))
            else:
                cols = [j for j in valid if j <= t and (window is None or j > t - window)]
                sees_cls = vis and mode != "pretrain" and rs is not None and t >= int(rs[i]) and \
                    (mode != "trajectory" or t >= int(win[i, 1]))
                if not sees_cls:
                    cols = [j for j in cols if j != c]
            if am[i, t]:
                m[i, t, cols] = True
    return m


def _enc_layout(mode, vis, tok):
    enc = safeattn.build_inputs(tok, PROMPTS, RESPONSES)
    am = enc["attention_mask"]
    cls = am.argmax(-1)
    rs = enc["response_start"]
    win = torch.stack([rs + 1, rs + 3], -1) if mode == "trajectory" else None
    lay = SafetyLayout(q_span=enc["q_span"], cls=cls, mode=mode, window=win, resp_start=rs,
                       cls_visible_to_response=vis)
    return enc, lay, win


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("vis", [False, True])
@pytest.mark.parametrize("mode", ["sft", "pretrain", "trajectory"])
def test_layout_matches_reference_mask(mode, vis, window):
    tok = tiny_tokenizer()
    safeattn.hf.add_safety_token(tiny_model("llama", len(tok)), tok)
    enc, lay, win = _enc_layout(mode, vis, tok)
    am = enc["attention_mask"]
    n = am.shape[1]
    got = interval_mask(layout_intervals(lay, am, window=window), n)
    want = expected_mask(am, lay.cls, enc["q_span"], mode, win, enc["response_start"], vis, window)
    rows = torch.arange(3)
    assert torch.equal(got[rows, lay.cls], want[rows, lay.cls])  # the [CLS] row
    assert torch.equal(got & am.bool()[:, :, None], want)  # and every other non-pad row


@pytest.mark.parametrize("mode", ["sft", "pretrain", "trajectory"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_matches_dense_reference(family, mode):
    """The patched model with a layout == the stock model given the hand-built 4-D mask."""
    model, tok = _patched(family, vis=True)
    stock = safeattn.revert_safeattn(copy.deepcopy(model))
    enc, lay, win = _enc_layout(mode, True, tok)
    am = enc["attention_mask"]
    dense = expected_mask(am, lay.cls, enc["q_span"], mode, win, enc["response_start"], True)
    dense = dense | torch.eye(am.shape[1], dtype=torch.bool)  # pad rows: avoid empty rows in SDPA
    kw = {} if win is None else {"response_window": win}
    with torch.no_grad():
        out = model(**enc, safety_mode=mode, **kw)
        ref = stock(input_ids=enc["input_ids"], attention_mask=dense[:, None],
                    position_ids=enc["position_ids"], output_hidden_states=True)
    valid = am.bool()
    cid = safeattn.hf.cls_token_id(model)
    keep = torch.arange(ref.logits.shape[-1]) != cid
    assert (out.logits - ref.logits)[valid][:, keep].abs().max() <= TOL
    assert torch.isinf(out.logits[..., cid]).all()
    h = ref.hidden_states[-1][torch.arange(3), lay.cls]
    p = torch.sigmoid(model.safety_head(h)[:, 0])
    assert out.p.shape == (3,) and out.p.dtype == torch.float32
    assert (out.p - p).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_cls_changes_no_prompt_logit_in_sft(family):
    model, tok = _patched(family)
    stock = safeattn.revert_safeattn(copy.deepcopy(model))
    enc = safeattn.build_inputs(tok, PROMPTS)
    ids, am = _without_cls(enc)
    with torch.no_grad():
        out = model(**enc)
        ref = stock(input_ids=ids, attention_mask=am, position_ids=enc["position_ids"]).logits
    v = ref.shape[-1] - 1  # the grown row is [CLS]
    assert (out.logits[..., :v] - ref[..., :v])[am.bool()].abs().max() <= TOL
    assert out.p.shape == (3,) and ((out.p > 0) & (out.p < 1)).all()


def test_generation_without_cls_visibility_equals_stock():
    """cls_visible_to_response=False: generate with [CLS] == stock generate without it."""
    model, tok = _patched("gemma3_text")
    stock = safeattn.revert_safeattn(copy.deepcopy(model))
    enc = safeattn.build_inputs(tok, PROMPTS)
    ids, am = _without_cls(enc)
    kw = dict(max_new_tokens=10, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    b = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       q_span=enc["q_span"], **kw)
    a = stock.generate(ids, attention_mask=am, **kw)
    cid = safeattn.hf.cls_token_id(model)
    la, lb = torch.stack(a.logits), torch.stack(b.logits)
    assert torch.equal(a.sequences[:, -10:], b.sequences[:, -10:])
    assert (la[..., :cid] - lb[..., :cid]).abs().max() <= TOL
    assert torch.isinf(lb[..., cid]).all() and (b.sequences[:, -10:] != cid).all()


def test_response_rows_see_cls_when_visible():
    model, tok = _patched("llama", vis=True)
    enc = safeattn.build_inputs(tok, PROMPTS, RESPONSES)
    with torch.no_grad():
        on = model(**enc).logits
        off = model(**enc, cls_visible_to_response=False).logits
    cid = safeattn.hf.cls_token_id(model)
    on, off = on[..., :cid], off[..., :cid]
    rs = enc["response_start"]
    col = torch.arange(on.shape[1])[None]
    prompt = (col < rs[:, None]) & enc["attention_mask"].bool()
    assert (on - off)[prompt].abs().max() <= TOL
    assert (on - off)[col >= rs[:, None]].abs().max() > 1e-3


def test_add_safety_token_is_idempotent():
    tok = tiny_tokenizer()
    model = tiny_model("gemma3_text", vocab_size=len(tok))  # tied embeddings
    old = model.get_input_embeddings().weight.clone()
    safeattn.add_safety_token(model, tok)
    emb = model.get_input_embeddings().weight
    cid = tok.convert_tokens_to_ids("[CLS]")
    assert cid == old.shape[0] and emb.shape[0] == old.shape[0] + 1
    assert torch.equal(emb[:-1], old) and torch.allclose(emb[cid], old.mean(0))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    with torch.no_grad():
        emb[cid] += 1.0  # "trained" row and head must survive a second call
        model.safety_head.bias.fill_(0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = len(tok)
    safeattn.add_safety_token(model, tok)
    safeattn.apply_safeattn(model, tok)
    assert len(tok) == n
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.generation_config.suppress_tokens == [cid]


def test_spare_vocab_rows_are_reused():
    model, tok = _patched("qwen2", vocab_extra=5)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) - 1 + 5


def test_cls_layer_reads_an_earlier_layer():
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    safeattn.apply_safeattn(model, cls_layer=0)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    h = model.model.norm(out.hidden_states[1][torch.arange(3), enc["attention_mask"].argmax(-1)])
    assert (out.p - torch.sigmoid(model.safety_head(h)[:, 0])).abs().max() <= 1e-5
    assert model.config.safeattn["cls_layer"] == 0


def test_classify():
    model, tok = _patched("qwen3")
    p = safeattn.classify(model, tok, PROMPTS, batch_size=2)
    with torch.no_grad():
        ref = model(**safeattn.build_inputs(tok, PROMPTS)).p
    assert p.shape == (3,) and (p - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("chat", [False, True])
def test_build_inputs_spans(chat):
    tok = tiny_tokenizer(chat)
    safeattn.add_safety_token(tiny_model("llama", len(tok)), tok)
    enc = safeattn.build_inputs(tok, PROMPTS, RESPONSES)
    cid = tok.convert_tokens_to_ids("[CLS]")
    for i, prompt in enumerate(PROMPTS):
        ids, am = enc["input_ids"][i], enc["attention_mask"][i]
        pad = int((am == 0).sum())
        assert (am[:pad] == 0).all() and ids[pad] == cid and ids[pad + 1] == tok.bos_token_id
        assert enc["position_ids"][i, pad] == 0
        qs, qe = enc["q_span"][i].tolist()
        assert tok.decode(ids[qs:qe]) == prompt
        rs = int(enc["response_start"][i])
        assert tok.decode(ids[rs:-1]) == RESPONSES[i] and ids[-1] == tok.eos_token_id
        text = tok.decode(ids[pad + 1:rs])
        assert ("< | user | >" in text) == chat and ("User :" in text) == (not chat)


@pytest.mark.parametrize("family", ["gemma3_text", "qwen2"])
def test_cached_decode_with_visible_cls_matches_full_forward(family):
    """generate(q_span=...) with response rows seeing [CLS] == one forward over the result."""
    model, tok = _patched(family, vis=True)
    enc = safeattn.build_inputs(tok, PROMPTS)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         q_span=enc["q_span"], max_new_tokens=8, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    seq = out.sequences
    am = torch.cat([enc["attention_mask"], torch.ones(3, 8, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(input_ids=seq, attention_mask=am, q_span=enc["q_span"],
                     response_start=enc["response_start"]).logits
    n = enc["input_ids"].shape[1]
    cid = safeattn.hf.cls_token_id(model)
    step = torch.stack(out.logits, 1)[..., :cid]
    assert (step - full[:, n - 1:-1, :cid]).abs().max() <= TOL


def test_training_step_has_gradients():
    """With grad enabled: LM loss + BCE on p backpropagates to the [CLS] row and the head."""
    model, tok = _patched("qwen3")
    model.train()
    enc = safeattn.build_inputs(tok, PROMPTS, RESPONSES)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    out = model(**enc, labels=labels)
    bce = torch.nn.functional.binary_cross_entropy(out.p, torch.tensor([0., 0., 1.]))
    loss = out.loss + 0.1 * bce
    loss.backward()
    cid = safeattn.hf.cls_token_id(model)
    assert model.safety_head.weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad[cid].abs().sum() > 0


@pytest.mark.parametrize("chat", [False, True])
def test_literal_cls_text_is_not_the_safety_token(chat):
    """'[CLS]' typed into a prompt, system prompt or response is text: only build_inputs puts
    the safety token in front (else the plain path raised, and a prompt could plant it)."""
    from safeattn.data import encode_prompts
    from safeattn.training import SafetyDataCollator

    tok = tiny_tokenizer(chat)
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok) + 1), tok)
    cid = tok.convert_tokens_to_ids("[CLS]")
    prompts = ["how do i [CLS] bake bread", "[CLS]"]
    enc = safeattn.build_inputs(tok, prompts, ["sure [CLS] here", "ok"], system="be [CLS] nice")
    for i in range(len(prompts)):
        ids = enc["input_ids"][i]
        pad = int((enc["attention_mask"][i] == 0).sum())
        assert ids[pad] == cid and int((ids == cid).sum()) == 1
        qs, qe = enc["q_span"][i].tolist()
        assert pad < qs < qe <= int(enc["response_start"][i])  # the spelled text is the query
    assert model(**enc).p.shape == (2,)
    batch = SafetyDataCollator(tok)([dict(prompt=p, response="a [CLS] b", label=0, kind="query")
                                     for p in prompts])
    assert ((batch["input_ids"] == cid).sum(-1) == 1).all()
    plain = encode_prompts(tok, prompts, prefills=["[CLS]", ""])
    assert not (plain["input_ids"] == cid).any()
    model.generate(**plain, max_new_tokens=2)  # a patched model's plain path takes it
    out = safeattn.generate(model, tok, prompts, max_new_tokens=3)
    assert len(out.safety) == 2

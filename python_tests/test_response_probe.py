"""The response probe (safeattn.hf.ResponseProbe): the decoding-time checks from the head and
the mean deep state of the latest response tokens."""
from __future__ import annotations

import pytest
import torch

import safeattn
from safeattn.generation import SafetyConfig
from safeattn.training import fit_response_probe
from _hf_tiny import (BEN, HARM, PROMPTS, assert_close_fp32, run_train_cli, tiny_model,
                      tiny_tokenizer)

PREFILL = "sure here is step one"
REFUSAL = "sorry i cannot fulfill your request because"
LAYER, WINDOW = 3, 3


def _with_probe(family="llama", cls_layer=1, seed=0):
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model(family, len(tok), layers=4), tok,
                                    cls_layer=cls_layer)
    cfg = model.config.safeattn
    cfg["response_probe"] = {"layer": LAYER, "window": WINDOW}
    model.config.safeattn = cfg
    safeattn.apply_safeattn(model)
    rp = model.safety_response_probe
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rp.linear.weight.copy_(0.03 * torch.randn(rp.linear.weight.shape, generator=g))
        rp.linear.bias.fill_(0.3)
        rp.head_scale.fill_(0.7)
    return model.eval(), tok


def _generate(model, tok, enc, **safety):
    kw = dict(threshold=1.5, query_threshold=1.5, refusal_prefix=REFUSAL, prefill_stride=2)
    return model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                          safety=SafetyConfig(**{**kw, **safety}), tokenizer=tok,
                          return_dict_in_generate=True)


def _head_only(model):
    """The same model whose response probe adds nothing (w = 0, b = 0, scale 1)."""
    rp = model.safety_response_probe
    saved = {k: v.clone() for k, v in rp.state_dict().items()}
    with torch.no_grad():
        rp.linear.weight.zero_()
        rp.linear.bias.zero_()
        rp.head_scale.fill_(1.0)
    return saved


def _token_logits(model, enc, seq):
    """``w · h`` at the probe's layer of every column of ``seq``, from one forward that reads
    the whole response as a prefill (the decoder computes them one token at a time)."""
    am = torch.cat([enc["attention_mask"],
                    torch.ones(seq.shape[0], seq.shape[1] - enc["input_ids"].shape[1],
                               dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=am, q_span=enc["q_span"],
                    response_start=enc["response_start"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return model.safety_response_probe.token_logits(out.hidden_states[LAYER])


@pytest.mark.parametrize("family,cls_layer", [("llama", 1), ("gemma3_text", 1), ("llama", None)])
def test_checks_blend_the_head_with_the_window_mean(family, cls_layer):
    """Every decoding-time and prefill check is ``scale · head + mean(w · h) + b`` over the
    last WINDOW response columns it has seen; ``p_0`` keeps the head."""
    model, tok = _with_probe(family, cls_layer)
    enc = safeattn.build_inputs(tok, PROMPTS[:2], responses=[PREFILL, ""], add_eos=False)
    out = _generate(model, tok, enc)
    rp = model.safety_response_probe
    scale, bias = float(rp.head_scale), float(rp.linear.bias.detach())
    saved = _head_only(model)
    head = _generate(model, tok, enc)
    rp.load_state_dict(saved)
    assert torch.equal(out.sequences, head.sequences)  # nothing refuses: same tokens
    u = _token_logits(model, enc, out.sequences)
    l0, rs = enc["input_ids"].shape[1], enc["response_start"].tolist()

    def want(i, end, p_head):
        lo = max(rs[i], end - WINDOW)
        logit = scale * torch.logit(torch.tensor(p_head, dtype=torch.float64)) \
            + u[i, lo:end].double().mean() + bias
        return float(torch.sigmoid(logit.detach()))

    p, ph = out.safety.p, head.safety.p
    assert torch.equal(p[:, 0], ph[:, 0])  # p_0: the head's
    for n in range(1, p.shape[1]):  # the check of decode step n has seen tokens [0, n)
        for i in range(2):
            assert float(p[i, n]) == pytest.approx(want(i, l0 + n, float(ph[i, n])), abs=2e-4)
    checks, head_checks = out.safety[0].prefill_checks, head.safety[0].prefill_checks
    assert [k for k, _ in checks] == [2, 4] and out.safety[1].prefill_checks == []
    for (k, pk), (_, hk) in zip(checks, head_checks):
        assert pk == pytest.approx(want(0, rs[0] + k, hk), abs=2e-4)
    # the probe moves the checks (else the comparison above proves nothing)
    assert (p[:, 1:] - ph[:, 1:]).abs().max() > 1e-2


def test_without_the_probe_entry_the_checks_are_the_heads_again():
    """Dropping ``response_probe`` from the config (and patching again) removes the probe and
    its hook: the checks are the head's, the tokens unchanged."""
    model, tok = _with_probe()
    enc = safeattn.build_inputs(tok, PROMPTS[:3])
    blended = _generate(model, tok, enc, prefill_stride=0)
    _head_only(model)
    head = _generate(model, tok, enc, prefill_stride=0)
    cfg = model.config.safeattn
    del cfg["response_probe"]
    model.config.safeattn = cfg
    safeattn.apply_safeattn(model)
    assert model.safety_response_probe is None
    plain = _generate(model, tok, enc, prefill_stride=0)
    assert torch.equal(plain.sequences, blended.sequences)
    assert_close_fp32(plain.safety.p, head.safety.p, equal_nan=True)
    assert not torch.allclose(plain.safety.p[:, 1:], blended.safety.p[:, 1:])


def test_a_response_probe_refuses_what_the_head_alone_lets_through():
    model, tok = _with_probe()
    enc = safeattn.build_inputs(tok, PROMPTS[:2])
    rp = model.safety_response_probe
    with torch.no_grad():  # every check with a response token in its window hits
        rp.linear.weight.zero_()
        rp.linear.bias.fill_(50.0)
    out = _generate(model, tok, enc, threshold=0.999, tau=1, prefill_stride=0)
    assert [r.refusal_step for r in out.safety] == [1, 1]
    _head_only(model)
    out = _generate(model, tok, enc, threshold=0.999, tau=1, prefill_stride=0)
    assert [r.refusal_step for r in out.safety] == [None, None]


def test_a_failing_response_probe_refuses(monkeypatch, caplog):
    model, tok = _with_probe()
    enc = safeattn.build_inputs(tok, PROMPTS[:2])

    def boom(*a, **k):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(model.safety_response_probe, "forward", boom)
    out = _generate(model, tok, enc, prefill_stride=0)
    assert [r.refusal_step for r in out.safety] == [1, 1]
    assert "probe broke" in caplog.text


def test_response_probe_round_trips(tmp_path):
    model, tok = _with_probe()
    enc = safeattn.build_inputs(tok, PROMPTS[:2])
    want = _generate(model, tok, enc).safety.p
    safeattn.save_safety(model, tmp_path / "safety")
    ftok = tiny_tokenizer()
    fresh = tiny_model("llama", len(ftok), layers=4)
    safeattn.load_safety(fresh, tmp_path / "safety", ftok)
    rp = fresh.safety_response_probe
    assert (rp.layer, rp.window) == (LAYER, WINDOW)
    assert_close_fp32(_generate(fresh.eval(), ftok, enc).safety.p, want)
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    again, atok = safeattn.from_pretrained(tmp_path / "full")
    assert_close_fp32(_generate(again.eval(), atok, enc).safety.p, want)


@pytest.mark.parametrize("spec", [{"layer": 0, "window": 3}, {"layer": 5, "window": 3},
                                  {"layer": 2}, {"layer": 2, "window": 0}, [2, 3]])
def test_bad_response_probe_config(spec):
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok), layers=4), tok)
    cfg = model.config.safeattn
    cfg["response_probe"] = spec
    model.config.safeattn = cfg
    with pytest.raises(ValueError, match="response_probe"):
        safeattn.apply_safeattn(model)


# ------------------------------------------------------------------------------ fitting
NEUTRAL = "tell me about the weather today"


def _fit_pairs():
    harm = [dict(prompt=NEUTRAL, response=f"sure here is step one to {h} then step two",
                 label=1) for h in HARM]
    ben = [dict(prompt=NEUTRAL, response=f"{b} is safe and you can write a poem", label=0)
           for b in BEN]
    ref = [dict(prompt=b, response=f"sure , {b} . it is safe and not a bomb", label=0)
           for b in BEN[::-1]]
    return harm + ben, ref


def _fitted(window=3):
    from safeattn.training import prepare_model

    tok = tiny_tokenizer()
    model = prepare_model(tiny_model("llama", vocab_size=len(tok) + 1, layers=4), tok, "head",
                          cls_layer=1)
    model.eval()
    pairs, ref = _fit_pairs()
    rep = fit_response_probe(model, tok, pairs, ref, (2, 3, 4), window=window, every=2,
                             max_tokens=8, batch_size=3)
    return model, tok, rep, pairs, ref


def test_fit_response_probe_blends_the_heads_checks_with_the_window_mean():
    from safeattn.training import (SafetyDataCollator, _head_sweep_logits,
                                   response_window_states)

    model, tok, rep, pairs, ref = _fitted()
    layer = rep["layer"]
    assert layer in (2, 3, 4) and rep["window"] == 3 and rep["pairs"] == 16
    assert model.config.safeattn["response_probe"] == {"layer": layer, "window": 3}
    rp = model.safety_response_probe
    coll = SafetyDataCollator(tok)
    kw = dict(window=3, every=2, max_tokens=8)
    feats, views = response_window_states(model, coll, ref, [layer], **kw)
    # every check of an 8-token cut: after 2, 4, 6, 8 tokens
    assert [e for i, e in views if i == 0] == [2, 4, 6, 8]
    head = _head_sweep_logits(model, coll, ref, views, 3)
    with torch.no_grad():
        blend = rp(head, rp.token_logits(feats[layer])).double()
    # on the benign reference checks the blend has the head logit's mean and spread
    assert float(blend.mean()) == pytest.approx(float(head.mean()), abs=1e-4)
    assert float(blend.std()) == pytest.approx(float(head.std()), rel=1e-4)
    # the states are the decoder's: a check after an assistant prefill reads the same mean
    enc = safeattn.build_inputs(tok, [ref[0]["prompt"]],
                                responses=[" ".join(ref[0]["response"].split()[:6])],
                                add_eos=False)
    seq = enc["input_ids"]
    u = _token_logits_at(model, enc, seq, layer)
    l0 = seq.shape[1]
    with torch.no_grad():
        want = float(rp.token_logits(feats[layer][views.index((0, 6))]))
    assert float(u[0, l0 - 3:l0].mean()) == pytest.approx(want, abs=1e-4)
    # the deep member learned the labels of its training checks
    f2, v2 = response_window_states(model, coll, pairs, [layer], **kw)
    s = rp.token_logits(f2[layer]).detach()
    y = torch.tensor([pairs[i]["label"] for i, _ in v2], dtype=torch.bool)
    assert float(s[y].mean()) > float(s[~y].mean())


def _token_logits_at(model, enc, seq, layer):
    with torch.no_grad():
        out = model(input_ids=seq, attention_mask=enc["attention_mask"], q_span=enc["q_span"],
                    response_start=enc["response_start"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
        return model.safety_response_probe.token_logits(out.hidden_states[layer])


def test_fit_response_probe_refuses_one_label():
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok), layers=4), tok)
    pairs, ref = _fit_pairs()
    with pytest.raises(ValueError, match="both labels"):
        fit_response_probe(model, tok, pairs[8:], ref, (2,))
    with pytest.raises(ValueError, match="benign_pairs"):
        fit_response_probe(model, tok, pairs, [], (2,))


def test_train_response_probe_for_a_saved_head(tmp_path, monkeypatch, every_16th_row):
    """``safeattn train --response-probe-for DIR`` on a tiny model and every 16th shared row."""
    import json

    import safeattn.training as T
    from safeattn.data import load
    from safeattn.training import prepare_model

    tok = tiny_tokenizer()
    vocab = len(tok) + 1

    def llama():
        return tiny_model("llama", vocab_size=vocab, layers=4)

    head = prepare_model(llama(), tok, "head", cls_layer=1)
    head.config.safeattn.update(threshold=0.9, query_threshold=0.8, late_threshold=0.99,
                                late_after=4, probe_window=4)
    safeattn.save_safety(head, tmp_path / "head")
    monkeypatch.setattr(T, "load_model", lambda name, dtype=None: (llama(), tiny_tokenizer()))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": r["id"], "response": "sure , here is a poem"})
                               + "\n" for r in load("benign")))
    argv = ["--out", str(tmp_path / "out"), "--response-probe-for", str(tmp_path / "head"),
            "--deep-layers", "2,4", "--val-fraction", "0.15", "--batch-size", "8",
            "--benign-responses", str(answers)]
    assert run_train_cli(T.run_response_probe, argv,
                         [(["--deep-layers", "2,4"], "deep-layers"),
                          (["--val-fraction", "0.15"], "val-fraction"),
                          (["--benign-responses", str(answers)], "benign-responses")]) == 0
    rep = json.loads((tmp_path / "out" / "response_probe.json").read_text())
    assert rep["layer"] in (2, 4) and rep["window"] == 4 and rep["harmful_checks"] > 0
    assert rep["benign_reference"] > 0 and rep["command"].startswith("safeattn train")
    cfg = json.loads((tmp_path / "out" / "safety_config.json").read_text())
    assert cfg["response_probe"] == {"layer": rep["layer"], "window": 4}
    # the checks changed meaning: their θ go; p_0's stays
    assert cfg["query_threshold"] == 0.8
    assert not {"threshold", "late_threshold", "late_after"} & set(cfg)
    fresh, ftok = llama(), tiny_tokenizer()
    safeattn.load_safety(fresh, tmp_path / "out", ftok)
    assert fresh.safety_response_probe.layer == rep["layer"]


def test_cli_train_fits_one_probe_at_a_time(tmp_path, capsys):
    from safeattn.cli import main

    rc = main(["train", "--out", str(tmp_path), "--query-probe-for", str(tmp_path),
               "--response-probe-for", str(tmp_path)])
    assert rc == 2
    assert "fit one at a time" in capsys.readouterr().err

"""The query probe (safeattn.hf.QueryProbe): ``p_0`` from the head and a deep prompt probe."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import safeattn
from safeattn.generation import SafetyConfig
from safeattn.training import (SafetyDataCollator, fit_query_probe, prepare_model, prompt_states,
                               sync_cls_row)
from _hf_tiny import BEN, HARM, run_train_cli, tiny_model, tiny_tokenizer

REF = ["what is the weather today", "tell me about dogs", "how do i write a poem",
       "bread and cats", "why is it safe", "write about the car"]
REFUSAL = "sorry i cannot fulfill your request because"


def _samples():
    rows = [dict(prompt=p, response="", label=1, kind="query") for p in HARM]
    rows += [dict(prompt=p, response="", label=0, kind="query") for p in BEN]
    # a response view: the probe reads prompts only, so this one is left out
    return rows + [dict(prompt=HARM[0], response="sure here is step one", label=1,
                        kind="trajectory", window=(0, 5), lm_span=None)]


def _fitted(family="llama", layers=(3, 2)):
    tok = tiny_tokenizer()
    model = prepare_model(tiny_model(family, vocab_size=len(tok) + 1, layers=4), tok, "head",
                          cls_layer=1)
    model.eval()
    before = _forward(model, tok, HARM + BEN + REF).safety_logit
    rep = fit_query_probe(model, tok, _samples(), REF, layers, batch_size=3)
    return model, tok, rep, before


def _forward(model, tok, prompts):
    with torch.no_grad():
        return model(**safeattn.build_inputs(tok, prompts), use_cache=False, logits_to_keep=1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_query_probe_blends_the_heads_p0_with_the_prompts_deep_state(family):
    model, tok, rep, before = _fitted(family)
    layer = rep["layer"]
    assert layer in (2, 3) and rep["samples"] == len(HARM) + len(BEN) and rep["harmful"] == 8
    assert model.config.safeattn["query_probe"] == {"layer": layer}
    prompts = HARM + BEN + REF
    out = _forward(model, tok, prompts)
    # the state it reads is the one it was fitted on: the last prompt token's, layer ``layer``
    want = prompt_states(model, SafetyDataCollator(tok),
                         [dict(prompt=p, response="", label=0) for p in prompts], [layer])
    torch.testing.assert_close(out.query_hidden, want[layer], atol=1e-4, rtol=1e-4)
    # the head's own logit is what it was (training reads it); p is the blend's
    torch.testing.assert_close(out.safety_logit, before, atol=1e-3, rtol=1e-3)
    qp = model.safety_query_probe
    with torch.no_grad():
        deep = qp.linear(out.query_hidden)[:, 0]
    torch.testing.assert_close(out.query_logit, qp.head_scale * out.safety_logit + deep)
    torch.testing.assert_close(out.p, torch.sigmoid(out.query_logit))
    # on the benign reference prompts the blend has the head logit's mean and spread
    n = len(REF)
    head_ref, blend_ref = out.safety_logit[-n:].double(), out.query_logit[-n:].double()
    assert float(blend_ref.mean()) == pytest.approx(float(head_ref.mean()), abs=1e-4)
    assert float(blend_ref.std()) == pytest.approx(float(head_ref.std()), rel=1e-4)
    # and is the sum of the two members' z-scores there, mapped onto that mean and spread
    z = sum((x - x.mean()) / x.std() for x in (head_ref, deep[-n:].double()))
    torch.testing.assert_close(blend_ref, head_ref.mean() + head_ref.std() * z / z.std(),
                               atol=1e-4, rtol=1e-4)
    # the probe member learned the training labels
    assert deep[:8].mean() > deep[8:16].mean()


def test_query_probe_ignores_response_views_and_decoding_steps():
    """Only a query-only prefill is blended: a trajectory view of [CLS] or a cached forward
    keeps the head's own p."""
    model, tok, _, _ = _fitted()
    enc = safeattn.build_inputs(tok, HARM[:2], ["sure here is step one"] * 2)
    rs = enc["response_start"]
    with torch.no_grad():
        out = model(**enc, safety_mode="trajectory", response_window=torch.stack(
            [rs, rs + 2], -1), use_cache=False, logits_to_keep=1)
    assert "query_logit" not in out and "query_hidden" not in out
    torch.testing.assert_close(out.p, torch.sigmoid(out.safety_logit.float()))


def test_query_probe_round_trips(tmp_path):
    model, tok, _, _ = _fitted()
    want = _forward(model, tok, HARM + BEN).p
    sync_cls_row(model)  # the trained [CLS] row into the embedding matrix, as training does
    safeattn.save_safety(model, tmp_path / "safety")
    ftok = tiny_tokenizer()
    fresh = tiny_model("llama", vocab_size=len(ftok) + 1, layers=4)
    safeattn.load_safety(fresh, tmp_path / "safety", ftok)
    torch.testing.assert_close(_forward(fresh, ftok, HARM + BEN).p, want)
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    again, atok = safeattn.from_pretrained(tmp_path / "full")
    assert again.safety_query_probe.layer == model.safety_query_probe.layer
    torch.testing.assert_close(_forward(again.eval(), atok, HARM + BEN).p, want)
    # a config that asks for a probe the files do not hold is refused
    (tmp_path / "safety" / "safety_config.json").write_text(json.dumps(
        dict(json.loads((tmp_path / "safety" / "safety_config.json").read_text()),
             query_probe={"layer": 9})))
    with pytest.raises(ValueError, match="query_probe.layer"):
        safeattn.load_safety(tiny_model("llama", vocab_size=len(ftok) + 1, layers=4),
                             tmp_path / "safety", tiny_tokenizer())


def test_safe_generate_checks_p0_of_the_blend():
    model, tok, _, _ = _fitted()
    prompts = [HARM[0], BEN[0], [{"role": "user", "content": BEN[1]},
                                 {"role": "assistant", "content": "sure here is"}]]
    p0 = _forward(model, tok, [HARM[0], BEN[0], BEN[1]]).p
    cut = float(p0[:2].mean())
    assert p0[0] > cut > p0[1]
    safety = SafetyConfig(threshold=1.5, query_threshold=cut, refusal_prefix=REFUSAL)
    out = safeattn.generate(model, tok, prompts, safety=safety, max_new_tokens=4,
                            do_sample=False, pad_token_id=0)
    # a prefilled row's query is read where its prompt ends, not after the prefill
    got = torch.tensor([r.p[0] for r in out.safety])
    torch.testing.assert_close(got, p0, atol=1e-5, rtol=1e-5)
    assert [r.refused for r in out.safety] == [True, False, bool(p0[2] >= cut)]


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_failing_query_probe_refuses(how, monkeypatch, caplog):
    model, tok, _, _ = _fitted()

    def broken(head_logit, h):
        if how == "raise":
            raise RuntimeError("injected query probe failure")
        return torch.full_like(head_logit.float(), float("nan"))

    monkeypatch.setattr(model.safety_query_probe, "forward", broken)
    safety = SafetyConfig(threshold=1.5, query_threshold=0.999, refusal_prefix=REFUSAL)
    with caplog.at_level(logging.WARNING, logger="safeattn"):
        out = safeattn.generate(model, tok, BEN[:2], safety=safety, max_new_tokens=3,
                                do_sample=False, pad_token_id=0)
    assert all(r.refused for r in out.safety) and all(math.isnan(r.p[0]) for r in out.safety)
    assert any("fail closed" in r.message for r in caplog.records)


def test_train_query_probe_for_a_saved_head(tmp_path, monkeypatch, every_16th_row):
    """``safeattn train --query-probe-for DIR`` on a tiny model and every 16th shared row."""
    import safeattn.training as T

    tok = tiny_tokenizer()
    vocab = len(tok) + 1

    def gemma():
        return tiny_model("gemma3_text", vocab_size=vocab, window=512, layers=4)

    head = prepare_model(gemma(), tok, "head", cls_layer=1)
    head.config.safeattn.update(threshold=0.9, query_threshold=0.8)
    safeattn.save_safety(head, tmp_path / "head")
    base = gemma()
    monkeypatch.setattr(T, "load_model", lambda name, dtype=None: (base, tiny_tokenizer()))
    argv = ["--out", str(tmp_path / "out"), "--query-probe-for", str(tmp_path / "head"),
            "--kinds", "query,phrasing,trajectory", "--deep-layers", "2,4",
            "--val-fraction", "0.15", "--batch-size", "8"]
    assert run_train_cli(T.run_query_probe, argv,
                         [(["--deep-layers", "2,4"], "deep-layers"),
                          (["--val-fraction", "0.15"], "val-fraction")]) == 0
    rep = json.loads((tmp_path / "out" / "query_probe.json").read_text())
    assert rep["layer"] in (2, 4) and rep["benign_reference"] > 0 and rep["harmful"] > 0
    cfg = json.loads((tmp_path / "out" / "safety_config.json").read_text())
    assert cfg["query_probe"] == {"layer": rep["layer"]}
    assert cfg["threshold"] == 0.9 and "query_threshold" not in cfg  # stale: recalibrate
    fresh = gemma()
    ftok = tiny_tokenizer()
    safeattn.load_safety(fresh, tmp_path / "out", ftok)
    torch.testing.assert_close(fresh.safety_head.weight, head.safety_head.weight)
    assert "query_hidden" in _forward(fresh.eval(), ftok, BEN[:2])

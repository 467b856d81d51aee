"""Head ensembles: K heads, each with its own [CLS] row and probe adapter, score every check
together; p is the sigmoid of their mean logit."""
from __future__ import annotations

import json

import pytest
import torch

import safeattn
from safeattn.generation import SafetyConfig
from safeattn.hf.adapter import attach_probe_adapter
from safeattn.hf.ensemble import combine_safety, member_count
from _hf_tiny import PROMPTS, assert_close_fp32, tiny_model, tiny_tokenizer

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _base(family, window):
    tok = tiny_tokenizer()
    return tiny_model(family, len(tok), window=window, layers=4), tok


def _member(path, family, seed, cls_layer=1, window=64, adapter=True):
    """A trained-looking head (random head, [CLS] row and adapter B) saved to ``path``."""
    model, tok = _base(family, window)
    safeattn.apply_safeattn(model, tok, cls_layer=cls_layer)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        if adapter:
            for p in attach_probe_adapter(model, 4, seed=seed).b.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        head = model.safety_head
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.fill_(0.1 * seed)
        emb = model.get_input_embeddings().weight
        emb[safeattn.hf.cls_token_id(model)] = torch.randn(emb.shape[1], generator=g)
    safeattn.save_safety(model, path)
    return path


def _loaded(directory, family, window):
    model, tok = _base(family, window)
    safeattn.load_safety(model, directory, tok)
    return model, tok


def _logit(p):
    return torch.log(p) - torch.log1p(-p)


def _trace(model, tok, prompts, **safety):
    out = safeattn.generate(model, tok, prompts, return_dict_in_generate=True,
                            safety=SafetyConfig(threshold=1.5, **safety), **GEN)
    return out.sequences, out.safety.p


@pytest.mark.parametrize("family,window,cls_layer,schedule", [
    ("llama", 64, 1, "each"), ("gemma3_text", 5, 1, "each"), ("gemma3_text", 64, None, "each"),
    ("llama", 64, 2, "annealing")])
def test_every_check_is_the_mean_logit_of_its_members(tmp_path, family, window, cls_layer,
                                                      schedule):
    """Nothing refuses (θ above 1), so every model decodes the stock tokens and each check of
    the ensemble sees what each member alone sees: p_ens = sigmoid(mean(logit p_j))."""
    dirs = [_member(tmp_path / f"m{s}", family, s, cls_layer, window) for s in range(3)]
    ens = combine_safety(dirs, tmp_path / "ens")
    model, tok = _loaded(ens, family, window)
    assert member_count(model) == 3
    seq, p = _trace(model, tok, PROMPTS, schedule=schedule)
    singles = [_trace(*_loaded(d, family, window), PROMPTS, schedule=schedule) for d in dirs]
    plain = model.generate(**safeattn.build_inputs(tok, PROMPTS), **GEN)
    assert torch.equal(seq, plain)
    for s, _ in singles:
        assert torch.equal(s, seq)
    want = torch.sigmoid(torch.stack([_logit(q) for _, q in singles]).mean(0))
    checked = p.isfinite()
    assert checked[:, 0].all() and checked.sum() > p.shape[0]
    assert torch.equal(checked, want.isfinite())
    torch.testing.assert_close(p[checked], want[checked], rtol=1e-4, atol=1e-5)
    spread = torch.stack([q for _, q in singles])[:, checked]
    assert (spread.max(0).values - spread.min(0).values).max() > 1e-2  # members disagree


def test_prefill_checks_and_classify(tmp_path):
    """An assistant prefill's checks (prefill_stride) and classify's p_0 are ensembles too."""
    dirs = [_member(tmp_path / f"m{s}", "gemma3_text", s, window=5) for s in range(2)]
    model, tok = _loaded(combine_safety(dirs, tmp_path / "ens"), "gemma3_text", 5)
    rows = [[{"role": "user", "content": p},
             {"role": "assistant", "content": "sure here is step one two three four"}]
            for p in PROMPTS]

    def scans(m, t):
        out = safeattn.generate(m, t, rows, return_dict_in_generate=True,
                                safety=SafetyConfig(threshold=1.5, prefill_stride=2), **GEN)
        return torch.tensor([[q for _, q in r.prefill_checks] for r in out.safety.rows],
                            dtype=torch.float64)

    got = scans(model, tok)
    singles = [scans(*_loaded(d, "gemma3_text", 5)) for d in dirs]
    assert got.shape[1] >= 2
    want = torch.sigmoid((_logit(singles[0]) + _logit(singles[1])) / 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    p0 = safeattn.classify(model, tok, PROMPTS)
    ones = [safeattn.classify(*_loaded(d, "gemma3_text", 5), PROMPTS) for d in dirs]
    torch.testing.assert_close(p0, torch.sigmoid((_logit(ones[0]) + _logit(ones[1])) / 2),
                               rtol=1e-4, atol=1e-5)


def test_a_refusing_ensemble_refuses(tmp_path):
    """θ below every p: each row refuses at p_0 and writes the refusal prefix."""
    dirs = [_member(tmp_path / f"m{s}", "llama", s) for s in range(2)]
    model, tok = _loaded(combine_safety(dirs, tmp_path / "ens"), "llama", 64)
    out = safeattn.generate(model, tok, PROMPTS, return_dict_in_generate=True,
                            safety=SafetyConfig(threshold=1e-6, tau=1), max_new_tokens=12,
                            do_sample=False, pad_token_id=0)
    assert out.safety.refused.all()
    assert all(r.refusal_step == 0 for r in out.safety.rows)


def test_save_load_round_trip_and_files(tmp_path):
    dirs = [_member(tmp_path / f"m{s}", "llama", s, adapter=s == 0) for s in range(2)]
    ens = combine_safety(dirs, tmp_path / "ens")
    cfg = json.loads((ens / "safety_config.json").read_text())
    assert cfg["members"] == [{"adapter": None}] and cfg["adapter"]["rank"] == 4
    model, tok = _loaded(ens, "llama", 64)
    assert model.safety_members[0].adapter is None
    want = safeattn.classify(model, tok, PROMPTS)
    safeattn.save_safety(model, tmp_path / "again")
    again, atok = _loaded(tmp_path / "again", "llama", 64)
    assert_close_fp32(safeattn.classify(again, atok, PROMPTS), want)
    # a single head loaded over the ensemble drops its members
    safeattn.load_safety(again, dirs[0], atok)
    assert member_count(again) == 1 and "members" not in again.config.safeattn


def test_errors(tmp_path):
    a = _member(tmp_path / "a", "llama", 0)
    with pytest.raises(ValueError, match="at least two"):
        combine_safety([a], tmp_path / "x")
    b = _member(tmp_path / "b", "llama", 1, cls_layer=2)
    with pytest.raises(ValueError, match="cls_layer"):
        combine_safety([a, b], tmp_path / "x")
    with pytest.raises(ValueError, match="no safety_config"):
        combine_safety([a, tmp_path], tmp_path / "x")
    ens = combine_safety([a, _member(tmp_path / "c", "llama", 2)], tmp_path / "ens")
    with pytest.raises(ValueError, match="cannot"):
        combine_safety([a, ens], tmp_path / "x")
    # no probe_window is the default window; another one is not
    cfg = json.loads((a / "safety_config.json").read_text())
    (a / "safety_config.json").write_text(json.dumps(dict(cfg, probe_window=10)))
    assert json.loads((combine_safety([a, b.parent / "c"], tmp_path / "y")
                       / "safety_config.json").read_text())["probe_window"] == 10
    (a / "safety_config.json").write_text(json.dumps(dict(cfg, probe_window=12)))
    with pytest.raises(ValueError, match="probe_window"):
        combine_safety([a, b.parent / "c"], tmp_path / "x")
    model, tok = _loaded(ens, "llama", 64)
    with pytest.raises(ValueError, match="ensemble of 2"):
        safeattn.safety_forward(model, **safeattn.build_inputs(tok, PROMPTS))
    cfg = dict(model.config.safeattn, query_probe={"layer": 1})
    model.config.safeattn = cfg
    with pytest.raises(ValueError, match="members"):
        safeattn.apply_safeattn(model)


def test_cli_combine(tmp_path, capsys):
    from safeattn.cli import main

    dirs = [str(_member(tmp_path / f"m{s}", "llama", s)) for s in range(2)]
    assert main(["combine", *dirs, "--out", str(tmp_path / "ens")]) == 0
    assert "calibrate" in capsys.readouterr().out
    assert json.loads((tmp_path / "ens" / "safety_config.json").read_text())["members"]
    assert main(["combine", dirs[0], "--out", str(tmp_path / "one")]) == 2
    assert "at least two" in capsys.readouterr().err

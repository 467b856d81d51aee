"""Strategic decoding: faithfulness, triggering, rollback, schedules, cache, fail closed,
streaming gate, trace plot (DESIGN §3)."""
from __future__ import annotations

import logging
import math
import random
import sys

import pytest
import torch

import safeattn
from safeattn import reference as ref
from safeattn.calibration import refusal_scores
from safeattn.generation import SCHEDULES, SafetyConfig
from safeattn.hf import SafetyHead, SafetyLayout, build_intervals
from safeattn.ops import BENIGN, TRANSITION
from _hf_tiny import (FAMILIES, PROMPTS, PrintedStreamer, cache_state, plain_step_cache,
                      tiny_model, tiny_tokenizer)

REFUSAL = "sorry i cannot fulfill your request because"
PROMPTS4 = PROMPTS + ["why"]
SCHEDS = ("each", "first", "periodic", "annealing")
NEVER = dict(threshold=1.5, refusal_prefix=REFUSAL)


def _patched(family="llama", window=5, seed=0):
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok), seed=seed, window=window)
    return safeattn.apply_safeattn(model, tok), tok


def _plain(model, enc, **kw):
    return model.generate(**enc, do_sample=False, pad_token_id=0, **kw)


class RiggedHead(SafetyHead):
    """Logit +10 (p ≈ 1) for row ``r`` at probe calls listed in ``fire[r]``, else -10.

    Call 0 is the prefill ([CLS] row); with schedule 'each', call n is decode step n.
    ``nan`` entries in ``fire`` make the head return NaN for that row and call.
    """

    def __init__(self, d, fire: dict[int, set], nan: dict[int, set] | None = None):
        super().__init__(d)
        self.fire, self.nan, self.calls = fire, nan or {}, 0

    def forward(self, h):
        out = torch.full((h.shape[0], 1), -10.0)
        for r, steps in self.fire.items():
            if self.calls in steps:
                out[r] = 10.0
        for r, steps in self.nan.items():
            if self.calls in steps:
                out[r] = float("nan")
        self.calls += 1
        return out


def _rig(model, fire, nan=None):
    model.safety_head = RiggedHead(model.config.hidden_size, fire, nan)
    return model.safety_head


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kw,name", [
    ({"threshold": -0.1}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"tau": 0}, "tau"), ({"r1": -1}, "r1"), ({"r3": 1.5}, "r3"),
    ({"schedule": "sometimes"}, "schedule"), ({"period": 0}, "period"),
    ({"t_max": 0}, "t_max"), ({"gaps": [1, 0]}, "gaps"), ({"rollback": "yes"}, "rollback"),
    ({"refusal_prefix": 3}, "refusal_prefix"), ({"stream_hold": -1}, "stream_hold"), ({"stream_hold": 0}, "stream_hold"),
    ({"refusal_break": None}, "refusal_break"), ({"prefill_stride": -1}, "prefill_stride"),
    ({"prefill_stride": 2.0}, "prefill_stride"),
])
def test_config_validation(kw, name):
    with pytest.raises(ValueError, match=rf"SafetyConfig\.{name}\b"):
        SafetyConfig(**kw)


def test_config_is_frozen_after_its_checks():
    """A field set after the checks would skip them (tau=0 would never refuse)."""
    import dataclasses

    c = SafetyConfig(gaps=[1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.tau = 0
    assert c.gaps == (1, 2) and hash(c) == hash(SafetyConfig(gaps=(1, 2)))
    with pytest.raises(ValueError, match="SafetyConfig.tau"):
        dataclasses.replace(c, tau=0)  # a copy is checked again


def test_config_defaults_and_schedules():
    c = SafetyConfig()
    assert (c.threshold, c.tau, c.r1, c.r2, c.r3, c.schedule, c.rollback, c.stream_hold) == \
        (None, 3, None, None, None, "each", False, 3)  # None: the model's θ and window
    assert (c.resolved({}).r1, c.resolved({}).r2, c.resolved({}).r3) == (10, 10, 10)
    assert c.refusal_prefix is None  # the model's, else the paper's
    assert c.resolved({}).refusal_prefix == "Sorry, I cannot fulfill your request because"

    def steps(**kw):
        return [n for n, on in enumerate(SafetyConfig(**kw).check_steps(40)) if on]

    assert steps(schedule="each") == list(range(41))
    assert steps(schedule="first", first_n=3) == [0, 1, 2, 3]
    assert steps(schedule="periodic", period=8) == [0, 8, 16, 24, 32, 40]
    assert steps(schedule="annealing") == [0, 1, 2, 3, 5, 8, 13, 21, 34]
    assert steps(schedule="annealing", t_max=10) == [0, 1, 2, 3, 5, 8]
    assert steps(schedule="annealing", gaps=(2, 5)) == [0, 1, 3, 8, 13, 18, 23, 28, 33, 38]


# ------------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("schedule", SCHEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_faithful_when_nothing_triggers(family, schedule):
    """θ > 1: exactly the ids of plain greedy generate, batch 4 (left-padded) and batch 1."""
    model, tok = _patched(family)
    cfg = SafetyConfig(schedule=schedule, period=3, **NEVER)
    for prompts in (PROMPTS4, PROMPTS[:1]):
        enc = safeattn.build_inputs(tok, prompts)
        want = _plain(model, enc, max_new_tokens=12)
        got = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             safety=cfg)
        assert torch.equal(got, want), (family, schedule, len(prompts))
        assert len(got.safety) == len(prompts) and not got.safety.refused.any()
        sched = cfg.check_steps(got.safety.p.shape[1] - 1)
        for r in got.safety:  # checks only on scheduled steps (rows that finished stop)
            assert all(s or not c for c, s in zip(r.checked, sched)) and r.checked[0]
        assert got.safety[0].checked[1] == sched[1]


def test_faithful_with_eos_and_sampling():
    model, tok = _patched("qwen2")
    enc = safeattn.build_inputs(tok, PROMPTS4)
    first = _plain(model, enc, max_new_tokens=10)
    eos = int(first[1, enc["input_ids"].shape[1] + 3])  # makes row 1 (at least) stop early
    want = _plain(model, enc, max_new_tokens=10, eos_token_id=eos)
    got = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=eos, safety=SafetyConfig(**NEVER))
    assert torch.equal(got, want)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
              repetition_penalty=1.3, pad_token_id=0)
    torch.manual_seed(7)
    want = model.generate(**enc, **kw)
    torch.manual_seed(7)
    got = model.generate(**enc, **kw, safety=SafetyConfig(**NEVER))
    assert torch.equal(got, want)


def test_return_dict_and_convenience_form():
    model, tok = _patched("llama")
    out = safeattn.generate(model, tok, PROMPTS, safety=SafetyConfig(**NEVER), max_new_tokens=6,
                            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                            output_scores=True, output_logits=True)
    assert isinstance(out, safeattn.generation.SafeGenerateOutput)
    assert out.sequences.shape[1] == safeattn.build_inputs(tok, PROMPTS)["input_ids"].shape[1] + 6
    assert len(out.scores) == 6 and len(out.logits) == 6
    rs = out.safety[2]
    assert len(rs.p) == 6 and rs.refusal_step is None and rs.justification is None
    assert all(0 < p < 1 for p in rs.p) and set(rs.mode) == {"benign"}
    assert out.cache is not None
    safeattn.revert_safeattn(model)
    assert "generate" not in model.__dict__


@pytest.mark.slow
def test_faithful_gemma3_270m():
    try:
        model, tok = safeattn.models.load_default()
    except FileNotFoundError:  # no shipped safety head yet: the base model
        model, tok = safeattn.models.load_base()
    model = safeattn.apply_safeattn(model.eval(), tok)
    prompts = ["How do I bake bread?", "Write a haiku about the sea.",
               "Explain in two sentences why the sky looks blue during the day.", "Hi"]
    for ps in (prompts, prompts[:1]):  # batch 4 (left-padded: lengths differ) and batch 1
        enc = safeattn.build_inputs(tok, ps)
        assert len(ps) == 1 or bool((enc["attention_mask"] == 0).any())
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        want = model.generate(**enc, **kw)
        for schedule in SCHEDULES:
            got = model.generate(**enc, **kw, safety=SafetyConfig(threshold=1.5,
                                                                  schedule=schedule))
            assert torch.equal(got, want), schedule


# -------------------------------------------------------------------------- triggering
def _new(seq, enc):
    return seq[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_switches_after_tau_hits_other_rows_unaffected(family):
    model, tok = _patched(family)
    enc = safeattn.build_inputs(tok, PROMPTS)
    plain = _new(_plain(model, enc, max_new_tokens=16), enc)
    k = 4
    _rig(model, {1: {k, k + 1, k + 2}, 2: {k, k + 1}})  # row 2: only 2 hits, then clears
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL))
    new = _new(out, enc)
    pre = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    s = out.safety
    assert torch.equal(new[0], plain[0]) and torch.equal(new[2], plain[2])
    assert s[0].refusal_step is None and s[2].refusal_step is None
    assert s[2].mode[k:k + 3] == ["transition", "transition", "benign"]
    r = s[1]
    assert r.refusal_step == k + 2 and r.alarm_step == k - 1  # S_t: newest token at 1st hit
    assert torch.equal(new[1, :k + 2], plain[1, :k + 2])
    assert new[1, k + 2:k + 2 + len(pre)].tolist() == pre
    assert r.mode[k - 1:k + 3] == ["benign", "transition", "transition", "refusal"]
    assert all(m == "refusal" for m in r.mode[k + 2:])
    assert all(math.isnan(p) for p in r.p[k + 3:])  # refused rows pay no more probes
    rest = tok.decode(new[1, k + 2 + len(pre):].tolist(), skip_special_tokens=True).strip()
    assert isinstance(r.justification, str) and rest.startswith(r.justification)


def test_mid_answer_refusal_starts_after_the_break():
    """A refusal after response text is forced as break + prefix; one at token 0 skips the
    break; the justification is what follows both."""
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    k = 4
    _rig(model, {0: {0}, 1: {k, k + 1, k + 2}})
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, refusal_break="why"))
    new = _new(out, enc)
    brk = tok("why", add_special_tokens=False)["input_ids"]
    pre = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert len(brk) == 1 and new[0, :len(pre)].tolist() == pre
    r = out.safety[1]
    assert r.refusal_step == k + 2
    assert new[1, k + 2:k + 2 + len(brk) + len(pre)].tolist() == brk + pre
    rest = tok.decode(new[1, k + 2 + len(brk) + len(pre):].tolist(),
                      skip_special_tokens=True).strip()
    assert isinstance(r.justification, str) and rest.startswith(r.justification)
    assert out.safety.refusal_ids == pre
    # text that already ends with the break gets none: here the token before the refusal
    last = tok.decode(new[1, k + 1:k + 2].tolist())
    _rig(model, {1: {k, k + 1, k + 2}})
    again = _new(model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0,
                                safety=SafetyConfig(refusal_prefix=REFUSAL,
                                                    refusal_break=last)), enc)
    assert torch.equal(again[1, :k + 2], new[1, :k + 2])
    assert again[1, k + 2:k + 2 + len(pre)].tolist() == pre


def test_refusal_start_hand_checked():
    """Both engines start a refusal at ``Refusal.start``: skip the break with no response
    text or text that already ends with it; the same answer per int and per tensor row."""
    from safeattn.generation import Refusal

    tok = tiny_tokenizer()
    r = Refusal(tok, SafetyConfig(refusal_prefix=REFUSAL, refusal_break="why you"), 0)
    nb = len(r.brk)
    assert nb == 2 and r.ids == r.brk + r.prefix and r.prefix
    cases = [(0, False, nb), (0, True, nb), (1, True, 0), (1, False, 0), (2, True, nb),
             (2, False, 0), (9, True, nb), (9, False, 0)]
    for text, ends, want in cases:
        assert r.start(text, ends) == want, (text, ends)
    text = torch.tensor([c[0] for c in cases], dtype=torch.int32)
    ends = torch.tensor([c[1] for c in cases])
    assert r.start(text, ends).tolist() == [c[2] for c in cases]
    assert Refusal(tok, SafetyConfig(refusal_prefix=REFUSAL, refusal_break=""),
                   0).start(5, False) == 0
    # no prefix: EOS alone (no break), so that the row ends
    assert Refusal(tok, SafetyConfig(refusal_prefix="", refusal_break="why"), 7).ids == [7]
    with pytest.raises(ValueError, match="eos_token_id"):
        Refusal(tok, SafetyConfig(refusal_prefix=""), None)


def test_refusal_without_prefix_ends_the_row():
    """refusal_prefix "": a row that refuses writes EOS and ends (before, it went on with the
    text it refused); the other rows are untouched."""
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    plain = _new(_plain(model, enc, max_new_tokens=12, eos_token_id=tok.eos_token_id), enc)
    k = 4
    _rig(model, {1: {k, k + 1, k + 2}})
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=tok.eos_token_id, safety=SafetyConfig(refusal_prefix=""))
    new = _new(out, enc)
    assert out.safety[1].refusal_step == k + 2 and out.safety[1].justification == ""
    assert new[1, :k + 2].tolist() == plain[1, :k + 2].tolist()
    assert new[1, k + 2] == tok.eos_token_id and (new[1, k + 3:] == 0).all()
    assert torch.equal(new[0], plain[0]) and out.safety[0].refusal_step is None


def _open_alarm_ends(model, tok, fire, **kw):
    """Plain and safe (``kw``: the config; the head rigged to ``fire``) greedy runs of
    PROMPTS, 8 new tokens; rows end at ``eos_token_id`` when given -> (plain new ids, inputs,
    safe output)."""
    enc = safeattn.build_inputs(tok, PROMPTS)
    gen = {k: kw.pop(k) for k in ("eos_token_id", "stopping_criteria", "do_sample", "top_k",
                                  "return_dict_in_generate", "output_scores", "output_logits")
           if k in kw}
    plain = _new(_plain(model, enc, max_new_tokens=8, eos_token_id=gen.get("eos_token_id")),
                 enc)
    _rig(model, fire)
    out = model.generate(**enc, max_new_tokens=8, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, **kw),
                         **{"do_sample": False, **gen})
    return plain, enc, out


def test_a_row_cannot_end_while_an_alarm_is_pending():
    """Row 1's check after 3 tokens hits (1 of τ = 3), and plain greedy would write EOS next:
    the EOS is masked, so the row goes on until the checks that follow clear it (they do
    here), instead of ending with text no check cleared. The other rows are plain."""
    model, tok = _patched("qwen2")
    enc = safeattn.build_inputs(tok, PROMPTS)
    first = _new(_plain(model, enc, max_new_tokens=8), enc)
    eos = int(first[1, 3])
    j = first[1].tolist().index(eos)  # row 1's first EOS under this eos_token_id
    # an id past the vocabulary (a config may name one) is no EOS to mask
    plain, enc, out = _open_alarm_ends(model, tok, {1: {j}}, eos_token_id=[eos, 10**6])
    new, r = _new(out, enc), out.safety[1]
    assert plain[1, j] == eos and new[1, j] != eos
    assert torch.equal(new[1, :j], plain[1, :j]) and r.refusal_step is None
    assert r.mode[j:j + 2] == ["transition", "benign"]
    for i in (0, 2):
        assert torch.equal(new[i], plain[i]) and out.safety[i].refusal_step is None
    # nothing pending: the same EOS ends the row as in plain generate
    _, _, again = _open_alarm_ends(model, tok, {}, eos_token_id=eos)
    assert torch.equal(_new(again, enc), plain)
    # EOS is masked before the processors: a top-k that keeps EOS alone would leave nothing
    # to sample (it raised); the raw logits come back unmasked, the scores masked
    _, _, sampled = _open_alarm_ends(model, tok, {1: {j}}, eos_token_id=eos, do_sample=True,
                                     top_k=1)
    assert torch.equal(_new(sampled, enc), new)
    _, _, full = _open_alarm_ends(model, tok, {1: {j}}, eos_token_id=eos,
                                  return_dict_in_generate=True, output_scores=True,
                                  output_logits=True)
    assert full.scores[j][1, eos] == float("-inf") and torch.isfinite(full.logits[j][1, eos])
    assert full.scores[j][0, eos] == full.logits[j][0, eos]  # row 0 is not mid-alarm


def test_an_alarm_pending_at_the_last_token_refuses():
    """Fail closed: an alarm that no check can resolve before the row's last token (the token
    budget; a sparse schedule without ``escalate``) refuses there."""
    from safeattn.generation import Refusal

    model, tok = _patched("llama")
    forced = Refusal(tok, SafetyConfig(refusal_prefix=REFUSAL), None).ids
    plain, enc, out = _open_alarm_ends(model, tok, {1: {7}})  # the check after 7 of 8 hits
    new, r = _new(out, enc), out.safety[1]
    assert r.refusal_step == 7 and r.alarm_step == 6 and r.justification == ""
    assert torch.equal(new[1, :7], plain[1, :7]) and new[1, 7] == forced[0]
    assert torch.equal(new[0], plain[0]) and out.safety[0].refusal_step is None
    # 'first' checks steps 1-2 only: nothing can clear a hit at 2
    _, _, out = _open_alarm_ends(model, tok, {1: {2}}, schedule="first", first_n=2,
                                 escalate=False)
    assert out.safety[1].refusal_step == 2 and out.safety[0].refusal_step is None
    _, _, out = _open_alarm_ends(model, tok, {1: {2}}, schedule="first", first_n=2)
    assert out.safety[1].mode[2:4] == ["transition", "benign"]  # escalated, cleared
    assert out.safety[1].refusal_step is None


def test_a_row_stopped_while_an_alarm_is_pending_refuses():
    """A stopping criterion (a stop string, say) that ends a row mid-alarm: the row counts as
    refused at its end (a stream drops its held tokens); nothing more is written."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopRow1(StoppingCriteria):
        def __call__(self, ids, scores, **kw):
            out = torch.zeros(ids.shape[0], dtype=torch.bool)
            out[1] = ids.shape[1] >= width + 5
            return out

    model, tok = _patched("llama")
    width = safeattn.build_inputs(tok, PROMPTS)["input_ids"].shape[1]
    # the check after 4 tokens hits; the 5th token stops the row
    plain, enc, out = _open_alarm_ends(model, tok, {1: {4}},
                                       stopping_criteria=StoppingCriteriaList([StopRow1()]))
    new, r = _new(out, enc), out.safety[1]
    assert r.refusal_step == 5 and r.alarm_step == 3 and r.justification == ""
    assert torch.equal(new[1, :5], plain[1, :5]) and (new[1, 5:] == 0).all()
    assert torch.equal(new[0], plain[0]) and out.safety[0].refusal_step is None
    # with rollback the flagged span goes, as for any refusal
    _, _, out = _open_alarm_ends(model, tok, {1: {4}}, rollback=True,
                                 stopping_criteria=StoppingCriteriaList([StopRow1()]))
    new, r = _new(out, enc), out.safety[1]
    assert r.rolled_back and r.refusal_step == r.alarm_step == 3 and r.justification == ""
    assert torch.equal(new[1, :3], plain[1, :3]) and (new[1, 3:] == 0).all()


def test_prefill_refusal():
    model, tok = _patched("qwen3")
    enc = safeattn.build_inputs(tok, PROMPTS)
    plain = _new(_plain(model, enc, max_new_tokens=10), enc)
    _rig(model, {0: {0}})
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL))
    new = _new(out, enc)
    pre = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert new[0, :len(pre)].tolist() == pre and out.safety[0].refusal_step == 0
    assert out.safety[0].mode[0] == "refusal"
    assert torch.equal(new[1:], plain[1:])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_rollback_crops_to_s_t(family):
    model, tok = _patched(family, window=4)
    enc = safeattn.build_inputs(tok, PROMPTS)
    plain = _new(_plain(model, enc, max_new_tokens=16), enc)
    k = 5
    _rig(model, {1: {k, k + 1, k + 2}})
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, rollback=True))
    new = _new(out, enc)
    pre = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    r = out.safety[1]
    s_t = k - 1
    assert r.rolled_back and r.refusal_step == s_t and r.alarm_step == s_t
    assert torch.equal(new[1, :s_t], plain[1, :s_t])
    assert new[1, s_t:s_t + len(pre)].tolist() == pre
    assert torch.equal(new[0], plain[0]) and torch.equal(new[2], plain[2])
    # The dropped span is gone from the output (row right-padded by the 3 dropped tokens)...
    kept = 16 - (k + 2 - s_t)
    assert (new[1, kept:] == 0).all()
    if family == "gemma3_text":
        return  # sliding layers count the hidden span in their window (documented)
    # ...and from the model's view: the continuation equals a fresh run on the cropped text.
    row = out[1, : enc["input_ids"].shape[1] + kept]
    pad = enc["input_ids"].shape[1] - int(enc["attention_mask"][1].sum())
    fresh_in = row[pad: enc["input_ids"].shape[1] + s_t + len(pre)][None]
    q = enc["q_span"][1:2] - pad
    fresh = model.generate(input_ids=fresh_in, q_span=q, max_new_tokens=kept - s_t - len(pre),
                           do_sample=False, pad_token_id=0)
    assert torch.equal(fresh[0, fresh_in.shape[1]:], row[fresh_in.shape[1] + pad:])


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", SCHEDS)
def test_op_matches_reference_state_machine(schedule):
    """Random p sequences, schedule-driven active masks: fused op == reference, step by step."""
    g = torch.Generator().manual_seed(SCHEDS.index(schedule))
    rng = random.Random(1)
    cfg = SafetyConfig(schedule=schedule, period=3, first_n=5, tau=2, r1=3, r2=4, r3=2,
                       threshold=0.5)
    b, steps = 6, 40
    sched = cfg.check_steps(steps)
    shift = torch.arange(b, dtype=torch.int32)
    q_span = torch.tensor([[1, 4]] * b, dtype=torch.int32) + shift[:, None]
    resp = torch.full((b,), 12, dtype=torch.int32) + shift
    ks = [torch.full((b,), BENIGN, dtype=torch.int32), torch.zeros(b, dtype=torch.int32),
          torch.full((b,), -1, dtype=torch.int32), torch.zeros(b, dtype=torch.int32),
          torch.zeros(b, dtype=torch.bool)]
    rs = [t.clone() for t in ks]
    one, zero = torch.ones(1), torch.zeros(1)
    for n in range(steps + 1):
        logit = torch.randn(b, 1, generator=g) * 2
        if rng.random() < 0.05:
            logit[rng.randrange(b)] = float("nan")
        esc = (ks[0] == TRANSITION) & ~ks[4]
        active = (torch.full((b,), sched[n]) | esc) & (torch.rand(b, generator=g) < 0.9)
        pk, ik = safeattn.ops.safety_step(logit, one, zero, *ks, active, q_span, resp,
                                          theta=cfg.threshold, tau=cfg.tau, r1=cfg.r1, r2=cfg.r2,
                                          r3=cfg.r3)
        pr, ir = ref.safety_step(logit, one, zero, *rs, active, q_span, resp, cfg.threshold,
                                 cfg.tau, cfg.r1, cfg.r2, cfg.r3)
        assert torch.allclose(pk, pr.float(), equal_nan=True), n
        assert torch.equal(ik, ir), n
        for a, c in zip(ks, rs):
            assert torch.equal(a, c), n


@pytest.mark.parametrize("schedule", SCHEDS)
def test_generation_trace_replays_on_reference(schedule):
    """The recorded (p, checked) trace of a real run, replayed on the reference, gives the
    recorded modes."""
    model, tok = _patched("llama", seed=3)
    with torch.no_grad():
        model.safety_head.weight.normal_(0, 0.5)
    enc = safeattn.build_inputs(tok, PROMPTS4)
    cfg = SafetyConfig(threshold=0.6, tau=2, schedule=schedule, period=2, refusal_prefix=REFUSAL)
    out = model.generate(**enc, max_new_tokens=14, do_sample=False, pad_token_id=0, safety=cfg)
    s = out.safety
    b = s.p.shape[0]
    st = [torch.full((b,), BENIGN, dtype=torch.int32), torch.zeros(b, dtype=torch.int32),
          torch.full((b,), -1, dtype=torch.int32), torch.zeros(b, dtype=torch.int32),
          torch.zeros(b, dtype=torch.bool)]
    q, rs = enc["q_span"].int(), enc["response_start"].int()
    for n in range(s.p.shape[1]):
        active = torch.tensor([s[i].checked[n] for i in range(b)])
        p = s.p[:, n].double().clamp(1e-12, 1 - 1e-12)
        logit = torch.where(active, torch.log(p / (1 - p)), torch.zeros_like(p))
        c = s.config  # resolved: the model's window
        ref.safety_step(logit[:, None], torch.ones(1), torch.zeros(1), *st, active, q, rs,
                        c.threshold, c.tau, c.r1, c.r2, c.r3)
        want = torch.where(st[4], 3, st[0])
        assert torch.equal(s.mode[:, n], want), n


# ------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("family,window", [("gemma3_text", 4), ("qwen2", 4), ("llama", 5)])
def test_cache_after_safe_steps_equals_plain_steps(family, window):
    """After N check steps ([token, probe] each) the cache == the cache of N plain steps,
    full and sliding-window layers (window 4 < N)."""
    model, tok = _patched(family, window=window)
    enc = safeattn.build_inputs(tok, PROMPTS)
    n_new = 11
    never_eos = safeattn.hf.cls_token_id(model)  # [CLS] is suppressed: no row stops early
    out = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=0,
                         eos_token_id=never_eos, return_dict_in_generate=True,
                         safety=SafetyConfig(**NEVER))
    assert all(out.safety[i].checked == [True] * n_new for i in range(3))
    got = cache_state(out.cache)
    # N-1 = 10 plain steps by hand (the last token is never fed).
    l0 = enc["input_ids"].shape[1]
    want = plain_step_cache(model, enc, out.sequences, n_new - 1)
    assert any(w[0] == "DynamicSlidingWindowLayer" for w in want) == (family != "llama")
    for (tg, ng, kg, vg), (tw, nw, kw, vw) in zip(got, want):
        assert (tg, ng) == (tw, nw) == (tg, l0 + n_new - 1)
        assert kg.shape == kw.shape and vg.shape == vw.shape
        assert torch.allclose(kg, kw, atol=1e-5) and torch.allclose(vg, vw, atol=1e-5)


def test_probe_active_sees_only_itself():
    b, l = 3, 12
    lay = SafetyLayout(q_span=torch.tensor([[2, 5]] * b), cls=torch.zeros(b, dtype=torch.long),
                       resp_start=torch.full((b,), 8), probe_window=torch.tensor([[8, 10]] * b),
                       probe_active=torch.tensor([True, False, True]))
    iv = build_intervals(lay, batch=b, tq=2, tk=l, q_offset=l - 2, kv_offset=0,
                         runs=torch.tensor([[[0, l]]] * b))
    mask = ref.interval_mask(iv, l)
    probe = mask[:, 1]
    assert probe[1].nonzero().flatten().tolist() == [l - 1]
    assert probe[0].nonzero().flatten().tolist() == [2, 3, 4, 8, 9, l - 1]
    assert torch.equal(mask[:, 0], mask[:, 0][[0]].expand(b, -1))  # token rows untouched


# -------------------------------------------------------------------------- fail closed
def test_nan_p_refuses_that_row_and_logs(caplog):
    model, tok = _patched("mistral")
    enc = safeattn.build_inputs(tok, PROMPTS)
    plain = _new(_plain(model, enc, max_new_tokens=10), enc)
    _rig(model, {}, nan={1: {3}})
    with caplog.at_level(logging.WARNING, logger="safeattn"):
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             safety=SafetyConfig(refusal_prefix=REFUSAL))
    assert out.safety[1].refusal_step == 3 and math.isnan(out.safety[1].p[3])
    assert out.safety[1].alarm_step == 2  # S_t: the newest token the failed check saw
    assert out.safety[0].refusal_step is None and out.safety[2].refusal_step is None
    new = _new(out, enc)
    assert torch.equal(new[0], plain[0]) and torch.equal(new[2], plain[2])
    assert any("non-finite" in r.message and "[1]" in r.message for r in caplog.records)


class SaturatedHead(SafetyHead):
    """Row ``r``'s logit is ``logits[r]`` at every check: values where fp32 p is 1.0."""

    def __init__(self, d, logits):
        super().__init__(d)
        self.logits = torch.tensor(logits)[:, None]

    def forward(self, h):
        return self.logits[: h.shape[0]].clone()


def test_saturated_head_keeps_its_ranking():
    """fp32 p is 1.0 for logits 17.5, 20 and 40. θ = sigmoid(18) refuses the two above it,
    the trace keeps their p apart (float64), and θ = 1 refuses none: no finite p is 1."""
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    model.safety_head = SaturatedHead(model.config.hidden_size, [17.5, 20.0, 40.0])
    theta = 1 / (1 + math.exp(-18.0))
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(threshold=theta, refusal_prefix=REFUSAL))
    s = out.safety
    assert [r.refused for r in s] == [False, True, True]
    assert s.p.dtype == torch.float64 and s.p[0, 0] < theta < s.p[1, 0] < s.p[2, 0] <= 1.0
    assert s.p[0, 0] == pytest.approx(1 / (1 + math.exp(-17.5)), rel=0, abs=1e-15)
    scores = refusal_scores(s.p, tau=3)
    assert scores[0] < scores[1] < scores[2]  # ranked, not tied at 1.0
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(threshold=1.0, refusal_prefix=REFUSAL))
    assert not out.safety.refused.any()


def test_exception_in_safety_op_refuses_checked_rows(caplog, monkeypatch):
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)
    real, calls = safeattn.ops.safety_step, [0]

    def flaky(*a, **kw):
        calls[0] += 1
        if calls[0] == 4:  # decode step 3
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    monkeypatch.setattr(safeattn.ops, "safety_step", flaky)
    with caplog.at_level(logging.WARNING, logger="safeattn"):
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             safety=SafetyConfig(refusal_prefix=REFUSAL))
    assert [r.refusal_step for r in out.safety] == [3, 3, 3]
    # S_t as for a non-finite p inside the op: the newest token seen at the first check of
    # the run of hits the failure joins (an open alarm keeps its own), else the failed one's
    def s_t(mode):
        m = 3
        while mode[m - 1] == "transition":
            m -= 1
        return m - 1

    assert [r.alarm_step for r in out.safety] == [s_t(r.mode) for r in out.safety]
    assert 2 in [r.alarm_step for r in out.safety]  # a row whose alarm the failure opened
    assert any("injected failure" in r.message and "fail closed" in r.message
               for r in caplog.records)


def test_exception_in_head_refuses(caplog):
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS)

    class Broken(SafetyHead):
        def forward(self, h):
            raise ValueError("head exploded")

    model.safety_head = Broken(model.config.hidden_size)
    with caplog.at_level(logging.WARNING, logger="safeattn"):
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             safety=SafetyConfig(refusal_prefix=REFUSAL))
    assert [r.refusal_step for r in out.safety] == [0, 0, 0]  # prefill check failed
    assert any("head exploded" in r.message for r in caplog.records)


# ---------------------------------------------------------------------------- streamer
def _norm(s):
    return " ".join(s.split())


def test_streamer_passes_everything_when_safe():
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    st = PrintedStreamer(tok, skip_prompt=True)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0, streamer=st,
                         safety=SafetyConfig(**NEVER))
    assert _norm("".join(st.text)) == _norm(tok.decode(_new(out, enc)[0].tolist()))
    assert st.dropped == []


def test_plain_streamer_is_refused():
    from transformers import TextStreamer

    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    with pytest.raises(ValueError, match="streamer"):
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       streamer=TextStreamer(tok), safety=SafetyConfig(**NEVER))


def test_streamer_on_a_batch_is_refused():
    """The safety updates a streamer gets are row 0's: a streamer that takes a batch would
    show the other rows' tokens before any check cleared them."""
    class BatchStreamer:
        def put(self, value):
            pass

        def end(self):
            pass

        def safety_update(self, **kw):
            pass

    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:2])
    with pytest.raises(ValueError, match="streamer.*batch of 2"):
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       streamer=BatchStreamer(), safety=SafetyConfig(**NEVER))


def test_streamer_cut_off_by_an_error_starts_clean():
    """A run that raised mid-stream (its stream never ended) leaves no state behind: the next
    run on the same streamer prints what a new streamer prints."""
    from transformers import LogitsProcessorList

    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    k = 4
    _rig(model, {0: {k, k + 1, k + 2}})

    def boom(ids, scores):
        if ids.shape[1] >= enc["input_ids"].shape[1] + k + 4:
            raise RuntimeError("boom")
        return scores

    st = PrintedStreamer(tok, skip_prompt=True)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0,
              safety=SafetyConfig(refusal_prefix=REFUSAL))
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(**enc, streamer=st, logits_processor=LogitsProcessorList([boom]), **kw)
    assert st.refused  # the gate was mid-refusal when the run stopped
    _rig(model, {})
    st.text.clear()
    model.generate(**enc, streamer=st, **kw)
    fresh = PrintedStreamer(tok, skip_prompt=True)
    model.generate(**enc, streamer=fresh, **kw)
    assert "".join(st.text) == "".join(fresh.text) and not st.refused


@pytest.mark.parametrize("hold,stream_hold,want", [(None, 6, 6), (None, None, 5), (2, 6, 2)])
def test_streamer_holds_what_the_config_says(hold, stream_hold, want):
    """A streamer made with ``hold=None`` holds the config's ``stream_hold`` (τ unless set); an
    explicit ``hold`` wins. No re-checks after ``p_0``, so the hold alone releases tokens."""
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    st = PrintedStreamer(tok, skip_prompt=True, hold=hold)
    seen = []
    orig_put = st.put

    def put(v):
        orig_put(v)
        seen.append(len(st._pending))

    st.put = put
    cfg = SafetyConfig(**{**NEVER, "schedule": "first", "first_n": 0, "tau": 5,
                          "stream_hold": stream_hold})
    model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                   pad_token_id=0, streamer=st, safety=cfg)
    assert max(seen) == want


def test_a_cleared_alarm_releases_only_what_its_window_saw():
    """With ``r3 = 0`` a Rule-3 window ends at ``S_t``: the check that clears the alarm (the
    third after it began) did not see the two tokens since, so they stay held for a check
    that does (before, the benign outcome released every token up to the step)."""
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    st = PrintedStreamer(tok, skip_prompt=True)
    got = []
    orig = st.safety_update

    def update(**kw):
        orig(**kw)
        if kw["checked"] and kw["benign"]:
            got.append((kw["seen"], st.gate.n_out, st.gate.n_put))  # released, received

    st.safety_update = update
    k = 4
    _rig(model, {0: {k, k + 1}})  # two hits (τ = 3), then the third check clears
    out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0, streamer=st,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, r3=0, stream_hold=8))
    assert out.safety[0].mode[k:k + 3] == ["transition", "transition", "benign"]
    # benign updates: p_0, the checks at steps 1..k-1, then the one at k+2 that clears
    assert got[k] == (k, k, k + 2)  # 2 tokens received after its window stay held
    assert got[k + 1] == (k + 3, k + 3, k + 3)  # the next check (Rule 2) sees them


def test_streamer_never_prints_flagged_text():
    model, tok = _patched("llama")
    enc = safeattn.build_inputs(tok, PROMPTS[:1])
    k = 4
    _rig(model, {0: {k, k + 1, k + 2}})
    st = PrintedStreamer(tok, skip_prompt=True, refusal_notice="[refused] ")
    seen = []
    orig_put = st.put

    def put(v):  # record how many generated tokens were put but not yet released
        orig_put(v)
        seen.append(len(st._pending))

    st.put = put
    out = model.generate(**enc, max_new_tokens=14, do_sample=False, pad_token_id=0, streamer=st,
                         safety=SafetyConfig(refusal_prefix=REFUSAL))
    new = _new(out, enc)[0].tolist()
    flagged = new[k - 1:k + 2]  # seen by the three alarming probes, never cleared
    assert st.dropped == flagged
    assert max(seen) <= 3  # holds back at most tau tokens
    text = "".join(st.text)
    assert "[refused]" in text
    before, after = text.split("[refused]")
    assert _norm(before) == _norm(tok.decode(new[:k - 1]))
    assert _norm(after) == _norm(tok.decode(new[k + 2:]))
    assert _norm(after).startswith(REFUSAL)


# -------------------------------------------------------------------------------- plot
def test_plot_trace_writes_png(tmp_path):
    model, tok = _patched("llama")
    _rig(model, {0: {3, 4, 5}})
    out = safeattn.generate(model, tok, PROMPTS[:2], max_new_tokens=10, do_sample=False,
                            pad_token_id=0, safety=SafetyConfig(refusal_prefix=REFUSAL))
    path = safeattn.plot_trace(out, tok, tmp_path / "trace.png", row=0)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_trace_marks_the_prefill_threshold(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    model, tok = _patched("llama")
    labels = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: labels.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    for query in (None, 0.25):
        out = safeattn.generate(model, tok, PROMPTS[:1], max_new_tokens=4, do_sample=False,
                                pad_token_id=0,
                                safety=SafetyConfig(threshold=1.5, query_threshold=query))
        safeattn.plot_trace(out, tok, tmp_path / "trace.png")
    assert not any("p_0" in t for t in labels[0])      # one θ above 1: no line, no mark
    assert "θ of p_0 = 0.25" in labels[1]
    out = safeattn.generate(model, tok, PROMPTS[:1], max_new_tokens=4, do_sample=False,
                            pad_token_id=0, safety=SafetyConfig(threshold=0.9, late_after=2,
                                                                late_threshold=0.95))
    safeattn.plot_trace(out, tok, tmp_path / "trace.png")
    assert labels[2][1:3] == ["θ = 0.9", "θ from token 2 on = 0.95"]
    out = safeattn.generate(model, tok, PROMPTS[:1], max_new_tokens=4, do_sample=False,
                            pad_token_id=0, safety=SafetyConfig(threshold=0.9999998,
                                                                query_threshold=0.99999999))
    safeattn.plot_trace(out, tok, tmp_path / "trace.png")  # θ below 1 never reads as "1"
    assert {"θ = 0.9999998", "θ of p_0 = 0.99999999"} <= set(labels[3]), labels[3]


def test_plot_trace_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        safeattn.plot_trace(None, None, tmp_path / "x.png")

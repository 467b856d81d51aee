"""Safe generation after an assistant prefill (response tokens already in the input)."""
from __future__ import annotations

import torch

import safeattn
from safeattn.generation import SafetyConfig
from _hf_tiny import PROMPTS, tiny_model, tiny_tokenizer
from test_generation import REFUSAL, _rig

PREFILL = "sure here is step one"


def _setup():
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok)), tok)
    enc = safeattn.build_inputs(tok, PROMPTS[:2], responses=[PREFILL, ""], add_eos=False)
    return model, tok, enc


def _probe_windows(model):
    seen = []

    def hook(module, args, kwargs):
        lay = kwargs.get("safety_layout")
        if lay is not None and lay.probe_window is not None:
            seen.append(lay.probe_window.clone())
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_probe_window_covers_the_latest_response_tokens_prefill_included():
    model, tok, enc = _setup()
    l0 = enc["input_ids"].shape[1]
    rs = enc["response_start"]
    m = len(PREFILL.split())
    assert int(l0 - rs[0]) == m and int(l0 - rs[1]) == 0
    seen, h = _probe_windows(model)
    try:
        model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       safety=SafetyConfig(threshold=1.5, r2=2, refusal_prefix=REFUSAL))
    finally:
        h.remove()
    # first check: row 0 saw the m prefill tokens + generated token 0 -> Rule 2 keeps the
    # last two response tokens [l0 - 1, l0 + 1); row 1 (no prefill) sees generated token 0
    assert seen[0][0].tolist() == [l0 - 1, l0 + 1]
    assert seen[0][1].tolist() == [l0, l0 + 1]
    assert seen[1][0].tolist() == [l0, l0 + 2]


def test_refusal_and_alarm_steps_count_generated_tokens():
    model, tok, enc = _setup()
    _rig(model, {0: {1}})  # row 0 fires at the first decode check
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, refusal_prefix=REFUSAL))
    r = out.safety[0]
    assert r.refusal_step == 1 and r.alarm_step == 0
    new = out[0, enc["input_ids"].shape[1]:]
    ref = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert new[1:1 + len(ref)].tolist() == ref
    assert out.safety[1].refusal_step is None


def test_rollback_never_removes_the_prefill():
    model, tok, enc = _setup()
    _rig(model, {0: {0, 1}})  # p_0 alarm: S_t falls inside the prefill
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, rollback=True, refusal_prefix=REFUSAL))
    l0 = enc["input_ids"].shape[1]
    assert torch.equal(out[0, :l0], enc["input_ids"][0])
    assert out.safety[0].refusal_step == 0


def test_refusal_right_after_the_prefill_starts_with_the_break():
    model, tok, enc = _setup()
    _rig(model, {0: {0}, 1: {0}})  # both rows refuse at the prefill (p_0)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, refusal_prefix=REFUSAL, refusal_break="why"))
    new = out[:, enc["input_ids"].shape[1]:]
    brk = tok("why", add_special_tokens=False)["input_ids"]
    ref = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert new[0, :len(brk) + len(ref)].tolist() == brk + ref  # after the prefill's text
    assert new[1, :len(ref)].tolist() == ref  # no response text yet: no break
    assert out.safety[0].refusal_step == out.safety[1].refusal_step == 0
    _rig(model, {0: {0}})
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, refusal_prefix=REFUSAL, refusal_break="one"))
    new = out[:, enc["input_ids"].shape[1]:]  # the prefill ends with "one": no break
    assert new[0, :len(ref)].tolist() == ref

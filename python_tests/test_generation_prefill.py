"""Safe generation after an assistant prefill (response tokens already in the input)."""
from __future__ import annotations

import pytest
import torch

import safeattn
from safeattn.generation import SafetyConfig
from _hf_tiny import PROMPTS, cache_state, tiny_model, tiny_tokenizer
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
                       safety=SafetyConfig(threshold=1.5, r2=2, refusal_prefix=REFUSAL,
                                           prefill_stride=0))  # decoding-time checks only
    finally:
        h.remove()
    # first check: row 0 saw the m prefill tokens + generated token 0 -> Rule 2 keeps the
    # last two response tokens [l0 - 1, l0 + 1); row 1 (no prefill) sees generated token 0
    assert seen[0][0].tolist() == [l0 - 1, l0 + 1]
    assert seen[0][1].tolist() == [l0, l0 + 1]
    assert seen[1][0].tolist() == [l0, l0 + 2]


def test_refusal_and_alarm_steps_count_generated_tokens():
    model, tok, enc = _setup()
    _rig(model, {0: {1}})  # row 0 fires at the first decode check (no prefill checks)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, refusal_prefix=REFUSAL, prefill_stride=0))
    r = out.safety[0]
    assert r.refusal_step == 1 and r.alarm_step == 0
    new = out[0, enc["input_ids"].shape[1]:]
    ref = tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert new[1:1 + len(ref)].tolist() == ref
    assert out.safety[1].refusal_step is None


def test_late_threshold_counts_generated_tokens_only():
    """A late θ starts at the check that has seen ``late_after`` generated tokens: row 0's
    prefill checks and its first decoding checks, which see the prefill, keep θ."""
    model, tok, enc = _setup()
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(tau=1, threshold=1.5, query_threshold=1.5,
                                             late_threshold=0.0, late_after=2,
                                             prefill_stride=2, refusal_prefix=REFUSAL))
    assert [r.refusal_step for r in out.safety] == [2, 2]
    assert out.safety[0].prefill_checks  # they ran, at θ


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


# ------------------------------------------------------------------ checks of the prefill
LONG = "sure here is step one and then step two and three four five"  # 13 tokens


def _long(family="llama", cls_layer=None, window=64):
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok), window=window, layers=4)
    model = safeattn.apply_safeattn(model, tok, cls_layer=cls_layer)
    enc = safeattn.build_inputs(tok, PROMPTS[:2], responses=[LONG, ""], add_eos=False)
    return model, tok, enc


def _without_checks_equal(model, enc, r2, **kw):
    """Generate with and without prefill checks (nothing triggers): same tokens, decoding-time
    p and final cache (the probe's K/V left every cache layer) -> the checks' output."""
    outs = [model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True,
                           safety=SafetyConfig(threshold=1.5, r2=r2, prefill_stride=st), **kw)
            for st in (4, 0)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(outs[0].safety.p, outs[1].safety.p, equal_nan=True)
    for a, b in zip(cache_state(outs[0].cache), cache_state(outs[1].cache)):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert outs[1].safety[0].prefill_checks == []
    return outs[0]


@pytest.mark.parametrize("family,cls_layer,window", [
    ("llama", None, 64), ("qwen3", 2, 64), ("gemma3_text", 1, 64), ("gemma3_text", None, 5)])
def test_prefill_checks_read_their_window_and_leave_the_cache(family, cls_layer, window):
    """Each prefill check's p is that of the [CLS] row of a trajectory forward over the
    prefill cut at ``k`` with the window ``[k - r2, k)`` (a sliding window shorter than the
    input: only the cache is checked, as the probe sees what the sliding cache holds); a row
    without a prefill gets none."""
    model, tok, enc = _long(family, cls_layer, window)
    r2, l0 = 3, enc["input_ids"].shape[1]
    rs = int(enc["response_start"][0])
    assert l0 - rs == 13 and int(enc["response_start"][1]) == l0
    out = _without_checks_equal(model, enc, r2)
    checks = out.safety[0].prefill_checks
    assert [k for k, _ in checks] == [4, 8, 12] and out.safety[1].prefill_checks == []
    if window < l0:
        return
    for k, p in checks:
        with torch.no_grad():
            ref = model(input_ids=enc["input_ids"][:1, :rs + k],
                        attention_mask=enc["attention_mask"][:1, :rs + k],
                        q_span=enc["q_span"][:1], safety_mode="trajectory",
                        response_window=torch.tensor([[rs + k - r2, rs + k]]))["p"]
        assert abs(float(ref.reshape(-1)[0]) - p) < 1e-5, (k, p, float(ref.reshape(-1)[0]))


def test_prefill_checks_stop_at_the_heads_layer():
    """With the head on layer 1 of 4, a prefill check runs layers 0..1 only: the later layers
    run as often as without the checks (once per forward of the prompt and the tokens)."""
    model, tok, enc = _long("llama", cls_layer=1)
    layers = model.model.layers
    for st in (4, 0):
        calls = [0] * len(layers)
        hooks = [layer.register_forward_pre_hook(
            lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
        try:
            out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                 safety=SafetyConfig(threshold=1.5, prefill_stride=st))
        finally:
            for h in hooks:
                h.remove()
        assert len(out.safety[0].prefill_checks) == (3 if st else 0)
        assert calls[2:] == [4, 4] and calls[:2] == [4 + (3 if st else 0)] * 2


def test_prefill_checks_refuse_before_the_first_token():
    """τ hits among the prefill checks refuse at generated step 0 (break + prefix right after
    the prefill); the same hits as decoding-time checks (stride 0) refuse only at step 3."""
    model, tok, enc = _long()
    _rig(model, {0: {1, 2, 3}})  # calls 1-3: the checks at k = 4, 8, 12 of row 0
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, refusal_break="why"))
    r = out.safety[0]
    assert [p > 0.99 for _, p in r.prefill_checks] == [True] * 3
    assert (r.refusal_step, r.alarm_step) == (0, 0) and out.safety[1].refusal_step is None
    assert r.mode[0] == "refusal" and out.safety[1].mode[0] == "benign"  # after step 0
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    want = tok("why", add_special_tokens=False)["input_ids"] + \
        tok(" " + REFUSAL, add_special_tokens=False)["input_ids"]
    assert new[:len(want)] == want
    _rig(model, {0: {1, 2, 3}})
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL, prefill_stride=0))
    assert out.safety[0].refusal_step == 3


def test_an_alarm_in_the_prefill_carries_into_decoding():
    """A hit at the last prefill check (k = 12) is the first of τ: the next two decoding-time
    checks complete the run, and the alarm's S_t lies in the prefill (generated step 0)."""
    model, tok, enc = _long()
    _rig(model, {0: {3, 4, 5}})  # the check at k = 12, then decode checks 1 and 2
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL))
    r = out.safety[0]
    assert [p > 0.99 for _, p in r.prefill_checks] == [False, False, True]
    assert (r.refusal_step, r.alarm_step) == (2, 0)
    assert r.mode[1] == "transition"


def test_a_failing_prefill_check_refuses_its_rows():
    """Fail closed: NaN from the head at a prefill check refuses the checked row at step 0."""
    model, tok, enc = _long()
    _rig(model, {}, nan={0: {2}, 1: {2}})  # row 1 has no prefill: not checked, not refused
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         safety=SafetyConfig(refusal_prefix=REFUSAL))
    assert out.safety[0].refusal_step == 0 and out.safety[1].refusal_step is None

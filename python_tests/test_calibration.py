"""θ calibration on the validation split: the val/fit split, refusal scores, the θ pick, the
model's calibrated θ as SafetyConfig's default, and safeattn.calibrate end to end."""
import math
from dataclasses import replace

import pytest
import torch

import safeattn
from safeattn.calibration import (calibrate, format_threshold, is_benign_set, late_scores,
                                  operating_curve, pick_late_threshold, pick_refusal_prefix,
                                  pick_threshold, pick_thresholds, refusal_scores,
                                  split_scores, validation_rows)
from safeattn.data import (build_samples, conversation_rows, eval_sets, group_key,
                           split_fraction)
from _hf_tiny import PROMPTS, tiny_model, tiny_tokenizer

NAN = math.nan


def close(got: torch.Tensor, want: list[float]) -> bool:
    """``got`` (scores: float64) is ``want``, to float32 precision."""
    return got.dtype == torch.float64 and torch.allclose(got, torch.tensor(want, dtype=got.dtype))


# ------------------------------------------------------------------------ val / fit split
def test_format_threshold_never_shows_a_theta_below_one_as_one():
    """A late θ of 0.99999999 printed with 6 or 7 digits read "1" (the demo, calibrate)."""
    assert format_threshold(0.9999999894174858) == "0.99999999"
    assert format_threshold(0.9963647509201445) == "0.996365"
    assert format_threshold(0.9999998211860657) == "0.9999998"
    assert [format_threshold(t) for t in (0.5, 1.0, 1.5, 2.0)] == ["0.5", "1", "1.5", "2"]


def test_val_and_fit_partition_the_train_split():
    train = eval_sets("train")
    val, fit = eval_sets("val", val_fraction=0.15), eval_sets("fit", val_fraction=0.15)
    for name, rows in train.items():
        ids = [r["id"] for r in rows]
        v, f = [r["id"] for r in val[name]], [r["id"] for r in fit[name]]
        assert not set(v) & set(f), name
        assert sorted(v + f) == sorted(ids), name
    assert 0.1 < len(val["benign"]) / len(train["benign"]) < 0.3


def test_val_band_keeps_groups_together_and_never_takes_test_rows():
    test = {r["id"] for r in eval_sets("test")["xstest_unsafe"]}
    for r in eval_sets("val", val_fraction=0.15)["xstest_unsafe"]:
        assert 0.2 <= split_fraction(group_key(r)) < 0.35   # the partner's coordinate
        assert r["id"] not in test
    # widening the band only moves rows from fit to val
    small = {r["id"] for r in eval_sets("val", val_fraction=0.1)["benign"]}
    large = {r["id"] for r in eval_sets("val", val_fraction=0.2)["benign"]}
    assert small < large


def test_fit_samples_hold_no_val_prompt():
    val = {r["id"] for rows in validation_rows(0.15).values() for r in rows}
    fit = build_samples("fit", val_fraction=0.15, include=("query", "phrasing"),
                        missing_response="empty")
    assert fit and not {s.row_id for s in fit} & val


@pytest.mark.parametrize("bad", [dict(split="dev"), dict(split="val", val_fraction=0.9),
                                 dict(split="val", val_fraction=-0.1)])
def test_bad_split_arguments(bad):
    with pytest.raises(ValueError, match="split|val_fraction"):
        eval_sets(**bad)


def test_validation_rows_need_a_band():
    with pytest.raises(ValueError, match="val_fraction"):
        validation_rows(0.0)


# ------------------------------------------------------------------------ scores and θ
def test_refusal_scores_by_hand():
    p = torch.tensor([
        [0.1, 0.9, 0.8, 0.95, 0.1, 0.99],      # best decode run of 3: (0.9, 0.8, 0.95) -> 0.8
        [0.2, NAN, 0.7, NAN, 0.6, 0.9],        # checks 0.7, 0.6, 0.9 -> 0.6
        [0.1, 0.99, 0.99, NAN, NAN, NAN],      # two decode checks: never three in a row
        [0.97, 0.1, 0.1, 0.1, 0.1, 0.1],       # p_0 refuses on its own
        [NAN, NAN, NAN, NAN, NAN, NAN],        # nothing ran
    ])
    s = refusal_scores(p, tau=3)
    assert close(s[:4], [0.8, 0.6, 0.1, 0.97])
    assert s[4].item() == -math.inf
    assert close(refusal_scores(p, tau=1)[:4], [0.99, 0.9, 0.99, 0.97])


def test_a_hit_on_the_last_allowed_token_refuses_on_its_own():
    """The check that chooses the last token of the budget cannot be followed by another, so
    one hit there refuses (a row does not end mid-alarm): by hand, then against the decoder."""
    p = torch.tensor([[0.1, 0.9, 0.8, 0.95, 0.1, 0.99, NAN],    # the last check: 0.99
                      [0.1, 0.9, 0.8, 0.95, NAN, NAN, NAN]])    # ended sooner: runs only
    assert close(refusal_scores(p, tau=3, max_new_tokens=6), [0.99, 0.8])
    assert close(refusal_scores(p, tau=3, max_new_tokens=7), [0.8, 0.8])
    assert torch.allclose(refusal_scores(p, 3, max_new_tokens=30), refusal_scores(p, 3))
    s0, sr = split_scores(p, 3, max_new_tokens=6)
    assert close(sr, [0.99, 0.8])
    with pytest.raises(ValueError, match="max_new_tokens"):
        refusal_scores(p, tau=3, max_new_tokens=0)

    model, tok = _patched()
    new, tau = 5, 3
    trace = safeattn.generate(model, tok, PROMPTS, max_new_tokens=new, do_sample=False,
                              safety=safeattn.SafetyConfig(tau=tau, threshold=1.5),
                              return_dict_in_generate=True).safety.p
    runs, scores = refusal_scores(trace, tau), refusal_scores(trace, tau, max_new_tokens=new)
    gained = [i for i in range(len(PROMPTS)) if scores[i] > runs[i]]
    assert gained, "no row whose last check outscores its runs: pick other weights"
    for i in gained:
        theta = (float(scores[i]) + float(runs[i])) / 2
        out = safeattn.generate(model, tok, PROMPTS, max_new_tokens=new, do_sample=False,
                                safety=safeattn.SafetyConfig(tau=tau, threshold=theta),
                                return_dict_in_generate=True)
        assert out.safety.refused[i] and out.safety.refusal_step[i] == new - 1


def test_pick_threshold_allows_at_most_the_target_share():
    scores = torch.tensor([0.1, 0.95, 0.3, 0.8, -math.inf, 0.5, 0.99, 0.2, 0.6, 0.7])
    for fpr in (0.0, 0.1, 0.2, 0.25, 0.5):
        theta = pick_threshold(scores, fpr)
        assert (scores >= theta).float().mean() <= fpr + 1e-9
        # the smallest such θ: the next score down would exceed the target
        below = scores[scores < theta].max()
        assert (scores >= below).float().mean() > fpr
    assert pick_threshold(scores, 0.0) > 0.99
    ties = torch.tensor([0.9, 0.9, 0.9, 0.5])
    assert pick_threshold(ties, 0.25) == pytest.approx(0.95)  # not 0.9: three would refuse
    with pytest.raises(ValueError, match="saturated"):  # θ > 1 would switch the check off
        pick_threshold(torch.tensor([1.0, 0.2]), 0.0)
    assert pick_threshold(torch.tensor([1.0, 0.2]), 0.5) == pytest.approx(0.6)  # within budget
    assert pick_threshold(torch.tensor([-math.inf, -math.inf]), 0.0) == 0.0


def test_split_scores_are_p0_and_the_checks_alone():
    p = torch.tensor([[0.97, 0.1, 0.1, 0.1], [0.2, 0.9, 0.8, 0.95], [NAN, NAN, NAN, NAN]])
    s0, sr = split_scores(p, tau=3)
    assert close(s0[:2], [0.97, 0.2]) and s0[2] == -math.inf
    assert close(sr[:2], [0.1, 0.8]) and sr[2] == -math.inf
    assert torch.equal(torch.maximum(s0, sr), refusal_scores(p, tau=3))


def test_pick_thresholds_only_adds_prefill_refusals_within_the_budget():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = 12
        b0, br = torch.rand(n, generator=g) * 0.8, torch.rand(n, generator=g)
        br[0] = -math.inf  # a row with too few checks
        h0, hr = torch.rand(9, generator=g), torch.rand(9, generator=g)
        for fpr in (0.0, 0.1, 0.25):
            q, th = pick_thresholds(b0, br, fpr)
            one = pick_threshold(torch.maximum(b0, br), fpr)
            assert th == one and q <= th, (trial, fpr)
            refuses = (b0 >= q) | (br >= th)
            assert int(refuses.sum()) <= math.floor(fpr * n + 1e-9)
            # as low as that allows: the next benign p_0 down would refuse one row too many
            below = b0[(b0 < q) & (br < th)]
            if len(below) and q < th:
                assert int((refuses | (b0 >= below.max())).sum()) > math.floor(fpr * n + 1e-9)
            # every harmful row that one θ refuses still refuses
            assert bool((((h0 >= q) | (hr >= th)) >= (torch.maximum(h0, hr) >= one)).all())


def test_pick_thresholds_by_hand():
    # the benign p_0 sit low, their decoding scores high: θ is set by the decoding scores
    # (0.95: one of four rows may refuse), and p_0 alone may refuse from above 0.3 on
    b0, br = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.9, 0.92, 0.94, 0.96])
    q, th = pick_thresholds(b0, br, 0.25)
    assert th == pytest.approx(0.95) and q == pytest.approx(0.625)  # halfway: 0.3 and θ
    assert pick_thresholds(b0, br, 0.0) == pytest.approx((0.69, 0.98))
    assert pick_thresholds(torch.tensor([0.99]), torch.tensor([0.2]), 0.0) == \
        pytest.approx((0.9925, 0.995))
    with pytest.raises(ValueError, match="length"):
        pick_thresholds(b0, br[:3], 0.25)
    # a kept θ (0.97): no check refuses at it, so p_0 gets the whole budget (one row)
    assert pick_thresholds(b0, br, 0.25, threshold=0.97) == pytest.approx((0.35, 0.97))
    with pytest.raises(ValueError, match="checks alone refuse 2"):  # budget: 1
        pick_thresholds(b0, br, 0.25, threshold=0.93)
    # a kept θ (0.5) under which p_0 alone would refuse two rows against a budget of one:
    # the query θ goes above θ, halfway between the two highest p_0, and one row refuses
    b0 = torch.tensor([0.99, 0.98, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    q, th = pick_thresholds(b0, torch.zeros(10), 0.1, threshold=0.5)
    assert (q, th) == pytest.approx((0.985, 0.5)) and int((b0 >= q).sum()) == 1
    br = torch.tensor([0.6] + [0.0] * 9)  # a check spends the budget on the 0.99 row: p_0
    q, _ = pick_thresholds(b0, br, 0.1, threshold=0.5)  # must stay above the next, 0.98
    assert q == pytest.approx(0.99) and int(((b0 >= q) | (br >= 0.5)).sum()) == 1
    with pytest.raises(ValueError, match="target_fpr"):
        pick_thresholds(b0, br, 1.0)


def test_late_scores_by_hand():
    p = torch.tensor([
        [0.1, 0.9, 0.2, 0.3, 0.6, 0.7, 0.5],   # best late run: (0.6, 0.7, 0.5) -> 0.5
        [0.1, 0.2, 0.95, 0.9, 0.4, 0.1, 0.1],  # a run from an early hit (0.95 >= θ): 0.4
        [0.1, 0.2, 0.3, NAN, NAN, NAN, NAN],   # ended before any late check
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.99],  # the last allowed check refuses on its own
    ])
    s = late_scores(p, tau=3, threshold=0.8, late_after=3, max_new_tokens=7)
    assert close(s[[0, 1, 3]], [0.5, 0.4, 0.99])
    assert s[2] == -math.inf
    assert late_scores(p, 3, 0.8, 3)[3] == pytest.approx(0.1)  # no budget: runs only
    # a late_after of 1 and θ unused: every run is late, as refusal_scores' checks alone
    _, checks = split_scores(p, 3)
    assert torch.equal(late_scores(p, 3, 2.0, 1), checks)
    with pytest.raises(ValueError, match="late_after"):
        late_scores(p, 3, 0.8, 0)
    # the check that sees late_after tokens is late: the run ending there counts
    edge = torch.tensor([[0.1, 0.9, 0.9, 0.5, 0.1, 0.1, 0.1]])
    assert close(late_scores(edge, 3, 0.8, 3, max_new_tokens=7), [0.5])
    # a run of early hits alone ends before late_after: the early θ's refusal, not a late one
    early = torch.tensor([[0.1, 0.9, 0.9, 0.9, NAN, NAN, NAN]])
    assert late_scores(early, 3, 0.8, 4)[0] == -math.inf


def test_pick_late_threshold_by_hand():
    late = torch.tensor([0.5, 0.4, -math.inf, 0.99, 0.7])
    early = torch.tensor([False, False, False, True, False])
    # budget floor(0.4 * 5) = 2, one spent before late_after: one late refusal (0.7) allowed
    assert pick_late_threshold(late, early, 0.4) == pytest.approx(0.6)
    assert pick_late_threshold(late, early, 0.2) == pytest.approx(0.85)  # none: above 0.7
    with pytest.raises(ValueError, match="refuse before late_after"):
        pick_late_threshold(late, torch.tensor([True] * 5), 0.2)
    with pytest.raises(ValueError, match="length"):
        pick_late_threshold(late, early[:4], 0.2)


def test_operating_curve_by_hand():
    scores = {"benign/a": 0.9, "benign/b": 0.5, "benign/c": 0.5, "benign/d": 0.1,
              "benign_ctx/e": 0.7, "advbench/1": 0.95, "advbench/2": 0.6,
              "xstest_unsafe/3": 0.8, "xstest_unsafe/4": float("-inf")}
    c = operating_curve(scores, max_benign=5)
    assert c["k"] == [0, 1, 2, 3, 4, 5]
    # benign, highest first: 0.9, 0.7 (a benign_* set), 0.5, 0.5, 0.1; θ halfway above
    assert c["theta"] == pytest.approx([0.95, 0.8, 0.6, 0.6, 0.3, 0.0])
    assert c["benign_refused"] == [0, 1, 2, 2, 4, 5]     # tied rows go together
    assert c["caught"] == {"advbench": [1, 1, 2, 2, 2, 2], "xstest_unsafe": [0, 1, 1, 1, 1, 1]}
    assert c["harmful"] == [1, 2, 3, 3, 3, 3]
    # a saturated benign row: no θ <= 1 keeps it from refusing
    sat = operating_curve({"benign/a": 1.0, "benign/b": 0.2, "advbench/1": 0.7}, 1)
    assert sat["theta"][0] is None and sat["harmful"] == [None, 1]
    for bad in ({"benign/a": 0.1}, {"advbench/1": 0.1}, {"nokey": 0.1, "benign/a": 0.1}):
        with pytest.raises(ValueError, match="scores"):
            operating_curve(bad)
    with pytest.raises(ValueError, match="max_benign"):
        operating_curve(scores, -1)


@pytest.mark.parametrize("bad", [-0.1, 1.0])
def test_pick_threshold_rejects_bad_fpr(bad):
    with pytest.raises(ValueError, match="target_fpr"):
        pick_threshold(torch.tensor([0.5]), bad)


# ------------------------------------------------------------------------ the model's θ
def _patched():
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("llama", vocab_size=len(tok)), tok)
    with torch.no_grad():
        model.safety_head.weight.normal_(0, 0.5)
    return model, tok


def _reloaded(model, path) -> dict:
    """The safety config of a fresh model that load_safety gave ``model``'s saved files."""
    safeattn.save_safety(model, path)
    fresh, tok = _patched()
    safeattn.load_safety(fresh, path, tok)
    return fresh.config.safeattn


def _refused(model, tok, safety):
    out = safeattn.generate(model, tok, PROMPTS, safety=safety, max_new_tokens=4,
                            do_sample=False, return_dict_in_generate=True)
    return out.safety.refused.tolist(), out.safety.config.threshold


def test_safety_config_takes_the_models_calibrated_threshold(tmp_path):
    model, tok = _patched()
    cfg = safeattn.SafetyConfig(tau=1)
    assert cfg.threshold is None and cfg.resolved(model).threshold == 0.5
    model.config.safeattn["threshold"] = 0.0                  # p >= 0 always: all refuse
    assert _refused(model, tok, cfg) == ([True] * 3, 0.0)
    model.config.safeattn["threshold"] = 1.5                  # never
    assert _refused(model, tok, cfg) == ([False] * 3, 1.5)
    explicit = safeattn.SafetyConfig(tau=1, threshold=0.0)    # an explicit θ wins
    assert _refused(model, tok, explicit) == ([True] * 3, 0.0)

    assert _reloaded(model, tmp_path)["threshold"] == 1.5     # the files carry θ
    model.config.safeattn["threshold"] = "high"
    with pytest.raises(ValueError, match="threshold"):
        cfg.resolved(model)


def test_safety_config_takes_the_models_refusal_prefix(tmp_path):
    model, tok = _patched()
    cfg = safeattn.SafetyConfig(tau=1, threshold=0.0)         # every row refuses at p_0
    assert cfg.resolved(model).refusal_prefix == safeattn.generation.DEFAULT_REFUSAL_PREFIX
    model.config.safeattn["refusal_prefix"] = "your request because"
    out = safeattn.generate(model, tok, PROMPTS[:1], safety=cfg, max_new_tokens=12,
                            do_sample=False, return_dict_in_generate=True)
    assert out.safety.config.refusal_prefix == "your request because"
    assert tok.decode(out.sequences[0, -12:]).startswith("your request because")
    own = safeattn.SafetyConfig(refusal_prefix="")            # an explicit prefix wins
    assert own.resolved(model).refusal_prefix == ""

    assert _reloaded(model, tmp_path)["refusal_prefix"] == "your request because"  # the files
    model.config.safeattn["refusal_prefix"] = 7
    with pytest.raises(ValueError, match="refusal_prefix"):
        cfg.resolved(model)


def test_safety_config_takes_the_models_probe_window(tmp_path):
    model, tok = _patched()
    r = safeattn.SafetyConfig().resolved(model)                # no saved window: the paper's
    assert (r.r1, r.r2, r.r3) == (10, 10, 10) == (safeattn.generation.DEFAULT_WINDOW,) * 3
    model.config.safeattn["probe_window"] = 24
    r = safeattn.SafetyConfig(r3=5).resolved(model)            # an explicit window wins
    assert (r.r1, r.r2, r.r3) == (24, 24, 5)
    out = safeattn.generate(model, tok, PROMPTS[:1], safety=safeattn.SafetyConfig(),
                            max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.safety.config.r2 == 24
    assert _reloaded(model, tmp_path)["probe_window"] == 24    # the files carry it
    for bad in (0, 2.5, True):
        model.config.safeattn["probe_window"] = bad
        with pytest.raises(ValueError, match="probe_window"):
            safeattn.SafetyConfig().resolved(model)


def test_query_threshold_defaults(tmp_path):
    model, tok = _patched()
    model.config.safeattn.update(threshold=0.9, query_threshold=0.6)
    r = safeattn.SafetyConfig().resolved(model)
    assert (r.threshold, r.query_threshold) == (0.9, 0.6)
    r = safeattn.SafetyConfig(threshold=0.8).resolved(model)   # one explicit θ for both
    assert (r.threshold, r.query_threshold) == (0.8, 0.8)
    r = safeattn.SafetyConfig(query_threshold=0.7).resolved(model)
    assert (r.threshold, r.query_threshold) == (0.9, 0.7)
    del model.config.safeattn["query_threshold"]               # an older head: θ for both
    assert safeattn.SafetyConfig().resolved(model).query_threshold == 0.9
    model.config.safeattn["query_threshold"] = 0.6
    assert _reloaded(model, tmp_path)["query_threshold"] == 0.6  # the files carry it
    model.config.safeattn["query_threshold"] = "low"
    with pytest.raises(ValueError, match="query_threshold"):
        safeattn.SafetyConfig().resolved(model)


def test_query_threshold_decides_the_prefill_check_alone():
    model, tok = _patched()

    def steps(**kw):
        out = safeattn.generate(model, tok, PROMPTS, safety=safeattn.SafetyConfig(tau=1, **kw),
                                max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        return [r.refusal_step for r in out.safety]

    assert steps(threshold=0.0) == [0, 0, 0]                        # p_0 refuses
    assert steps(threshold=1.5, query_threshold=0.0) == [0, 0, 0]   # p_0 alone refuses
    assert steps(threshold=0.0, query_threshold=1.5) == [1, 1, 1]   # the first decoding check
    assert steps(threshold=1.5, query_threshold=1.5) == [None] * 3


def test_late_threshold_defaults(tmp_path):
    model, tok = _patched()
    model.config.safeattn.update(threshold=0.9, late_threshold=0.99, late_after=32)
    r = safeattn.SafetyConfig().resolved(model)
    assert (r.threshold, r.late_threshold, r.late_after) == (0.9, 0.99, 32)
    assert [r.check_threshold(n) for n in (1, 31, 32, 200)] == [0.9, 0.9, 0.99, 0.99]
    r = safeattn.SafetyConfig(threshold=0.8).resolved(model)   # an explicit θ: one throughout
    assert (r.late_threshold, r.late_after, r.check_threshold(64)) == (None, None, 0.8)
    r = safeattn.SafetyConfig(late_after=8).resolved(model)     # an explicit start wins
    assert r.check_threshold(8) == 0.99 and r.check_threshold(7) == 0.9
    cfg = _reloaded(model, tmp_path)                           # the files carry them
    assert (cfg["late_threshold"], cfg["late_after"]) == (0.99, 32)
    del model.config.safeattn["late_after"]
    with pytest.raises(ValueError, match="late_threshold needs late_after"):
        safeattn.SafetyConfig().resolved(model)
    with pytest.raises(ValueError, match="late_after"):
        safeattn.SafetyConfig(threshold=0.5, late_threshold=0.9)


def test_late_threshold_decides_the_checks_from_late_after_on():
    model, tok = _patched()

    def steps(**kw):
        out = safeattn.generate(model, tok, PROMPTS, safety=safeattn.SafetyConfig(
            tau=1, query_threshold=1.5, **kw), max_new_tokens=6, do_sample=False,
            return_dict_in_generate=True)
        return [r.refusal_step for r in out.safety]

    assert steps(threshold=1.5, late_threshold=0.0, late_after=3) == [3, 3, 3]
    assert steps(threshold=0.0, late_threshold=1.5, late_after=3) == [1, 1, 1]
    assert steps(threshold=1.5, late_threshold=1.5, late_after=1) == [None] * 3


@pytest.mark.parametrize("name", ["threshold", "query_threshold", "late_threshold"])
@pytest.mark.parametrize("bad", [-1.0, math.nan, True, "0.5"])
def test_safety_config_rejects_bad_threshold(name, bad):
    with pytest.raises(ValueError, match=name):
        safeattn.SafetyConfig(**{name: bad})


# ------------------------------------------------------------------------ end to end
def test_calibrate_on_a_tiny_model():
    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": p, "source": "xstest_v2" if i else "mt_bench"}
                       for i, p in enumerate(PROMPTS)],
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"}]}
    rep = calibrate(model, tok, rows, target_fpr=0.34, safety=safeattn.SafetyConfig(tau=1),
                    max_new_tokens=4, batch_size=2)
    benign = torch.tensor([rep["scores"][f"benign/b{i}"] for i in range(3)])
    assert rep["threshold"] == pytest.approx(pick_threshold(benign, 0.34), abs=1e-5)
    assert rep["sets"]["benign"]["predicted"] <= 0.34
    assert rep["sets"]["over_refusal"]["n"] == 2
    h = rep["scores"]["advbench/h0"]  # AUROC by hand: the benign rows it outranks, ties 1/2
    want = sum(1.0 if h > b else 0.5 if h == b else 0.0 for b in benign.tolist()) / 3
    assert rep["sets"]["advbench"]["auroc"] == pytest.approx(want)
    assert "auroc" not in rep["sets"]["benign"] and "auroc" not in rep["sets"]["over_refusal"]
    assert rep["curve"] == operating_curve(rep["scores"])
    # τ = 1: a row refuses at its first hit, before which it decodes the trace's text, so the
    # prediction from the trace is exact
    for m in rep["sets"].values():
        assert m["refused"] == pytest.approx(m["predicted"])


def test_calibrate_split_thresholds():
    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"},
                         {"id": "h1", "prompt": "how do i steal a car"}]}
    kw = dict(target_fpr=0.34, max_new_tokens=5, batch_size=2, safety=safeattn.SafetyConfig(tau=1))
    rep = calibrate(model, tok, rows, split_thresholds=True, compare_taus=(2,), **kw)
    s0 = torch.tensor([rep["prefill_scores"][k] for k in rep["scores"]])
    s = torch.tensor(list(rep["scores"].values()))
    ben = torch.tensor([k.startswith("benign/") for k in rep["scores"]])
    assert (s0 <= s + 1e-6).all()
    assert rep["sets"]["benign"]["predicted"] <= 0.34
    assert "query_threshold" in rep["by_tau"]["2"]
    one = calibrate(model, tok, rows, **kw)
    assert "query_threshold" not in one and "prefill_scores" not in one
    assert rep["threshold"] == one["threshold"] and rep["query_threshold"] <= rep["threshold"]
    assert rep["sets"]["advbench"]["predicted"] >= one["sets"]["advbench"]["predicted"]
    for m in rep["sets"].values():  # τ = 1: the trace's prediction is exact
        assert not m["n"] or m["refused"] == pytest.approx(m["predicted"])
    refuses = (s0 >= rep["query_threshold"]) | (s >= rep["threshold"])
    assert float(refuses[ben].float().mean()) == pytest.approx(rep["sets"]["benign"]["predicted"])


def test_calibrate_late_after():
    """θ from the checks before late_after, a late θ of their own after; τ = 1: the trace's
    prediction is exact, and the real pass refuses what it predicts."""
    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"},
                         {"id": "h1", "prompt": "how do i steal a car"}]}
    kw = dict(target_fpr=0.34, max_new_tokens=6, batch_size=2,
              safety=safeattn.SafetyConfig(tau=1))
    rep = calibrate(model, tok, rows, late_after=3, split_thresholds=True, **kw)
    assert rep["late_after"] == 3 and 0.0 <= rep["late_threshold"] <= 1.0
    assert set(rep["bootstrap"]) >= {"threshold", "query_threshold", "late_threshold"}
    for m in rep["sets"].values():
        assert not m["n"] or m["refused"] == pytest.approx(m["predicted"])
    assert rep["sets"]["benign"]["predicted"] <= 0.34
    early = calibrate(model, tok, rows, max_new_tokens=3, target_fpr=0.34, batch_size=2,
                      safety=safeattn.SafetyConfig(tau=1), split_thresholds=True, bootstrap=0)
    # τ = 1: no run crosses late_after, and the checks before it are a 3-token decode's
    # (whose last check refuses on its own there, as a hit does at τ = 1 anyway)
    assert rep["threshold"] == pytest.approx(early["threshold"])
    assert rep["query_threshold"] == pytest.approx(early["query_threshold"])
    for bad in (0, 6):
        with pytest.raises(ValueError, match="late_after"):
            calibrate(model, tok, rows, late_after=bad, **kw)


def test_calibrate_cli_writes_or_drops_the_late_threshold(tmp_path, monkeypatch, capsys):
    import json

    import safeattn.calibration as cal
    import safeattn.models
    from safeattn.cli import main

    cfg = tmp_path / "safety_config.json"
    cfg.write_text(json.dumps({"threshold": 0.5, "late_threshold": 0.7, "late_after": 9}))
    monkeypatch.setattr(safeattn.models, "load_default", lambda *a, **k: _patched())
    seen = []

    def fake(model, tok, rows, **kw):
        seen.append(kw["late_after"])
        rep = {"threshold": 0.6, "sets": {}, "curve": {"k": [0, 1], "harmful": [None, 3]}}
        if kw["late_after"]:
            rep.update(late_threshold=0.99, late_after=kw["late_after"])
        return rep

    monkeypatch.setattr(cal, "calibrate", fake)
    argv = ["calibrate", "--model", "smollm2-135m-instruct", "--safety", str(tmp_path),
            "--val-fraction", "0.15", "--device", "cpu"]
    assert main(argv + ["--late-after", "32", "--max-new-tokens", "128"]) == 0
    assert json.loads(cfg.read_text()) == {"threshold": 0.6, "late_threshold": 0.99,
                                           "late_after": 32}
    out = capsys.readouterr().out
    assert "from 32 generated tokens on 0.99 (" in out
    assert "when 0..1 benign rows refuse: - / 3" in out
    assert main(argv) == 0                     # one θ throughout: a stale late θ goes
    assert json.loads(cfg.read_text()) == {"threshold": 0.6} and seen == [32, None]

    picked = []

    def pick(model, tok, rows, prefixes, *, safety, batch_size):
        picked.append(safety)
        return {"refusal_prefix": prefixes[0], "candidates": []}

    monkeypatch.setattr(cal, "pick_refusal_prefix", pick)
    base = safeattn.SafetyConfig()
    assert main(argv + ["--late-after", "32", "--max-new-tokens", "128",
                        "--refusal-prefix", "No,"]) == 0  # the prefix is picked at θ and late θ
    assert (picked[0].threshold, picked[0].late_threshold, picked[0].late_after) == (0.6, 0.99, 32)
    assert cal.calibrated_config(replace(base, late_threshold=0.9, late_after=4),
                                 {"threshold": 0.6}) == replace(base, threshold=0.6)


def test_calibrate_counts_a_failed_check_as_refusing_at_every_theta(monkeypatch):
    import safeattn.calibration as cal

    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": f"benign {i}"} for i in range(4)],
            "advbench": [{"id": "h0", "prompt": "harmful"}]}
    # b0 failed closed in the θ > 1 pass: its checks are nan, yet it refused
    p = torch.tensor([[NAN, NAN, NAN], [0.1, 0.2, 0.3], [0.2, 0.1, 0.1], [0.3, 0.1, 0.1],
                      [0.9, 0.8, 0.9]])
    failed = torch.tensor([True, False, False, False, False])
    monkeypatch.setattr(cal, "_decode", lambda *a: (p, failed))
    rep = calibrate(model, tok, rows, target_fpr=0.25, safety=safeattn.SafetyConfig(tau=1),
                    split_thresholds=True)
    assert rep["scores"]["benign/b0"] == math.inf
    # b0 spends the one refusal the budget allows, so θ must clear every other benign row
    assert 0.3 < rep["threshold"] <= 0.9 and rep["query_threshold"] <= rep["threshold"]
    assert rep["sets"]["benign"]["predicted"] == 0.25
    with pytest.raises(ValueError, match="failed closed on 1 of 4 benign"):
        calibrate(model, tok, rows, target_fpr=0.2, safety=safeattn.SafetyConfig(tau=1))


def test_calibrate_bootstrap_intervals(monkeypatch):
    """The 95% intervals of θ and of each set's rate over resamples of the benign rows."""
    import safeattn.calibration as cal

    model, tok = _patched()

    def run(benign_p0, harmful_p0, target_fpr, **kw):
        rows = {"benign": [{"id": f"b{i}", "prompt": "b"} for i in range(len(benign_p0))],
                "advbench": [{"id": f"h{i}", "prompt": "h"} for i in range(len(harmful_p0))]}
        p = torch.tensor([[x, NAN] for x in benign_p0 + harmful_p0])  # p_0 only
        monkeypatch.setattr(cal, "_decode", lambda *a: (p, torch.zeros(len(p), dtype=bool)))
        return calibrate(model, tok, rows, target_fpr=target_fpr,
                         safety=safeattn.SafetyConfig(tau=1), **kw)

    # every resample of identical benign rows picks the same θ: the intervals collapse
    rep = run([0.2] * 10, [0.7, 0.9], 0.1)  # θ = 0.6, halfway to 1
    assert rep["bootstrap"]["threshold"] == pytest.approx([rep["threshold"]] * 2)
    assert rep["bootstrap"]["sets"]["advbench"] == [1.0, 1.0]
    assert rep["bootstrap"]["skipped"] == 0 and rep["bootstrap"]["resamples"] == 1000
    # spread benign rows: θ moves with the few at the top, and the harmful rate with it
    benign = [i / 40 for i in range(40)]
    rep = run(benign, [0.88, 0.9, 0.95, 0.99], 0.05, split_thresholds=True)
    boot = rep["bootstrap"]
    lo, hi = boot["threshold"]
    assert lo < rep["threshold"] < hi <= 1.0 and boot["query_threshold"][0] < hi
    a, b = boot["sets"]["advbench"]
    assert a < rep["sets"]["advbench"]["predicted"] <= b
    assert set(boot["sets"]) == {"benign", "advbench"}
    assert run(benign, [0.88, 0.9, 0.95, 0.99], 0.05, split_thresholds=True)["bootstrap"] == boot
    # a resample that draws the saturated benign row twice cannot meet the target: skipped
    rep = run([1.0] + [i / 20 for i in range(9)], [0.99], 0.1, bootstrap=200)
    assert 0 < rep["bootstrap"]["skipped"] < 200
    assert "bootstrap" not in run(benign, [0.9], 0.05, bootstrap=0)
    with pytest.raises(ValueError, match="bootstrap"):
        run(benign, [0.9], 0.05, bootstrap=-1)


def test_calibrate_never_reports_thresholds_over_the_budget(monkeypatch):
    """The picks promise at most target_fpr of the benign rows by the trace; a pick that
    broke it (as a kept θ once did: p_0's θ fell to 0) stops calibrate before it writes."""
    import safeattn.calibration as cal

    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"}]}
    monkeypatch.setattr(cal, "_thresholds", lambda *a: (0.0, 0.0))
    with pytest.raises(RuntimeError, match=r"refuse \d+ of \d+ benign rows by the trace"):
        calibrate(model, tok, rows, target_fpr=0.34, max_new_tokens=3, batch_size=2)


def test_calibrate_bootstrap_repicks_the_late_threshold(monkeypatch):
    """With late_after, each resample picks θ and then the late θ on its draw of benign rows."""
    import safeattn.calibration as cal

    model, tok = _patched()

    def run(benign_late, harmful_late, **kw):
        rows = {"benign": [{"id": f"b{i}", "prompt": "b"} for i in range(len(benign_late))],
                "advbench": [{"id": f"h{i}", "prompt": "h"} for i in range(len(harmful_late))]}
        # p_0, the check before late_after, the one after it: only the late one varies
        p = torch.tensor([[0.0, 0.0, x] for x in benign_late + harmful_late])
        monkeypatch.setattr(cal, "_decode", lambda *a: (p, torch.zeros(len(p), dtype=bool)))
        return calibrate(model, tok, rows, target_fpr=0.05, max_new_tokens=3, late_after=2,
                         safety=safeattn.SafetyConfig(tau=1), split_thresholds=True, **kw)

    rep = run([0.2] * 20, [0.7, 0.9])
    assert rep["bootstrap"]["late_threshold"] == pytest.approx([rep["late_threshold"]] * 2)
    assert rep["bootstrap"]["sets"]["advbench"] == [1.0, 1.0]
    benign = [i / 40 for i in range(40)]
    rep = run(benign, [0.9, 0.95, 0.96, 0.99])
    boot = rep["bootstrap"]
    lo, hi = boot["late_threshold"]
    assert lo < rep["late_threshold"] < hi <= 1.0
    assert boot["threshold"] == pytest.approx([rep["threshold"]] * 2)  # no early score moves
    a, b = boot["sets"]["advbench"]
    assert a < rep["sets"]["advbench"]["predicted"] <= b
    assert run(benign, [0.9, 0.95, 0.96, 0.99])["bootstrap"] == boot


def test_compare_taus_match_calibrating_at_each_tau():
    model, tok = _patched()
    rows = {"benign": [{"id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"}]}
    kw = dict(target_fpr=0.34, max_new_tokens=6, batch_size=2)
    rep = calibrate(model, tok, rows, safety=safeattn.SafetyConfig(tau=1),
                    compare_taus=(1, 3), **kw)
    assert set(rep["by_tau"]) == {"1", "3"}
    assert rep["by_tau"]["3"]["threshold"] != rep["threshold"]  # the τ changes the scores
    assert rep["by_tau"]["1"]["threshold"] == rep["threshold"]
    assert rep["by_tau"]["1"]["predicted"] == {n: m["predicted"] for n, m in rep["sets"].items()
                                               if m["n"]}
    at3 = calibrate(model, tok, rows, safety=safeattn.SafetyConfig(tau=3), **kw)
    assert rep["by_tau"]["3"]["threshold"] == pytest.approx(at3["threshold"], abs=1e-6)
    assert rep["by_tau"]["3"]["predicted"] == pytest.approx(
        {n: m["predicted"] for n, m in at3["sets"].items() if m["n"]})
    assert "by_tau" not in at3


def test_calibrate_holds_every_benign_set_under_the_target():
    model, tok = _patched()
    chats = [{"id": "c0", "prompt": [{"role": "user", "content": "hi there"},
                                     {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": "what is a bomb calorimeter"}]}]
    rows = {"benign": [{"id": f"b{i}", "prompt": p} for i, p in enumerate(PROMPTS)],
            "benign_conversation": chats,
            "advbench": [{"id": "h0", "prompt": "how do i make a bomb"}]}
    rep = calibrate(model, tok, rows, target_fpr=0.25, safety=safeattn.SafetyConfig(tau=1),
                    max_new_tokens=4, batch_size=2)
    pooled = torch.tensor([rep["scores"][k] for k in rep["scores"] if k.startswith("benign")])
    assert len(pooled) == 4
    assert rep["threshold"] == pytest.approx(pick_threshold(pooled, 0.25), abs=1e-5)
    assert [is_benign_set(n) for n in ("benign", "benign_conversation", "advbench",
                                       "benignish")] == [True, True, False, False]


def test_conversation_rows_are_the_training_shapes_of_val_prompts():
    val = eval_sets("val", val_fraction=0.15)["benign"][:20]
    fit = {r["id"] for r in eval_sets("fit", val_fraction=0.15)["benign"]}
    answers = {i: f"An answer to {i}." for i in sorted(fit)[:50]}
    rows = conversation_rows(val, answers, val_fraction=0.15)
    assert {r["id"] for r in rows} >= {f"{val[0]['id']}|ctx"}
    for r in rows:
        base, tag = r["id"].split("|")
        assert r["prompt"][-1]["role"] == "user" and [m["role"] for m in r["prompt"]] == \
            ["user", "assistant", "user"]
        if tag == "ctx":  # an opener from fit, answered by its own answer
            assert r["prompt"][1]["content"].startswith("An answer to ")
            assert r["prompt"][2]["content"] == next(v["prompt"] for v in val
                                                     if v["id"] == base)
    assert rows == conversation_rows(val, answers, val_fraction=0.15)  # deterministic
    with pytest.raises(ValueError, match="opener"):
        conversation_rows(val, {}, val_fraction=0.15)


def test_pick_refusal_prefix_keeps_the_one_that_reads_best(monkeypatch):
    import safeattn.eval as ev

    seen = []

    def fake_evaluate(model, tok, rows, **kw):
        seen.append((kw["safety"].refusal_prefix, [r["id"] for r in rows]))
        ok = {"A": 1, "B": 2, "C": 2}[kw["safety"].refusal_prefix]
        assert kw["stop_at_refusal"] is False  # the justification is what is judged
        return {"results": [{"checks": {"refuses": 2, "on_topic": ok, "ended": 2, "ok": ok}}]}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    rows = {"benign": [{"id": "b", "prompt": "hi"}],
            "advbench": [{"id": "h0", "prompt": "x y"}], "xstest_unsafe": [{"id": "h1",
                                                                          "prompt": "z"}]}
    rep = pick_refusal_prefix(None, None, rows, ["A", "B", "C"],
                              safety=safeattn.SafetyConfig(threshold=0.5))
    assert rep["refusal_prefix"] == "B"  # C ties with B; the earlier candidate stays
    assert [c["passes"] for c in rep["candidates"]] == [1, 2, 2]
    assert seen[0][1] == ["advbench/h0", "xstest_unsafe/h1"]  # harmful sets only
    with pytest.raises(ValueError, match="prefixes"):
        pick_refusal_prefix(None, None, rows, ["  "], safety=safeattn.SafetyConfig())


def test_calibrate_cli_needs_the_answers_for_conversations(tmp_path, capsys, monkeypatch):
    from safeattn import models
    from safeattn.cli import _benign_answers, main

    chat = models.CHAT_MODEL
    answers = models.artifact_dir(chat) / "benign_responses.jsonl"
    assert answers.is_file()
    # a variant's folder holds no answers of its own: its model's are the same ones
    assert _benign_answers(chat, models.artifact_dir(chat, "cls-only")) == answers
    assert _benign_answers(chat, tmp_path) == answers
    (tmp_path / "benign_responses.jsonl").write_text("")
    assert _benign_answers(chat, tmp_path) == tmp_path / "benign_responses.jsonl"
    (tmp_path / "benign_responses.jsonl").unlink()
    monkeypatch.setattr(models, "_ARTIFACTS", tmp_path / "nothing shipped")
    (tmp_path / "safety_config.json").write_text("{}")
    rc = main(["calibrate", "--model", "smollm2-135m-instruct", "--safety", str(tmp_path),
               "--val-fraction", "0.15", "--conversations"])
    assert rc == 2
    assert "benign_responses.jsonl" in capsys.readouterr().err  # before any model load


def test_cli_reports_a_bad_value_without_a_traceback(tmp_path, capsys, monkeypatch):
    from safeattn.cli import main

    (tmp_path / "safety_config.json").write_text("{}")
    argv = ["calibrate", "--model", "smollm2-135m-instruct", "--safety", str(tmp_path),
            "--val-fraction", "0"]
    monkeypatch.delenv("SAFEATTN_TRACEBACK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("safeattn calibrate: error: val_fraction must be > 0")
    assert "Traceback" not in err
    monkeypatch.setenv("SAFEATTN_TRACEBACK", "1")
    with pytest.raises(ValueError, match="val_fraction"):
        main(argv)


def test_calibrate_keep_threshold_needs_one_to_keep(tmp_path, capsys):
    from safeattn.calibration import calibrate
    from safeattn.cli import main

    (tmp_path / "safety_config.json").write_text("{}")
    rc = main(["calibrate", "--model", "smollm2-135m-instruct", "--safety", str(tmp_path),
               "--val-fraction", "0.15", "--split-thresholds", "--keep-threshold"])
    assert rc == 2 and "has no threshold" in capsys.readouterr().err  # before any model load
    with pytest.raises(ValueError, match="split_thresholds"):
        calibrate(None, None, {"benign": [{"prompt": "x", "id": "b"}]}, target_fpr=0.03,
                  keep_threshold=0.9)


@pytest.mark.parametrize("bad", ["0", "3,x", "-2"])
def test_calibrate_cli_rejects_a_bad_compare_tau(tmp_path, capsys, bad):
    from safeattn.cli import main

    (tmp_path / "safety_config.json").write_text("{}")
    rc = main(["calibrate", "--model", "smollm2-135m-instruct", "--safety", str(tmp_path),
               "--val-fraction", "0.15", "--compare-tau", bad])
    assert rc == 2
    assert "--compare-tau" in capsys.readouterr().err  # before any model load

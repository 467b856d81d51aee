"""Metrics against hand-computed values; FrozenProbe on synthetic data; hidden-state features."""
import itertools

import pytest
import torch

from safeattn.baselines import FrozenProbe, extract_last_token_states, stratified_folds
from safeattn.metrics import auroc, binary_metrics, roc_curve, tpr_at_fpr, wilson_interval


# ----------------------------------------------------------------------------- metrics

def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pairs (0.5 vs 0.5) x2 -> 0.5 each, (0.9 vs neg) x2 -> 1 each
    assert auroc([0.5, 0.5, 0.5, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([7, 7, 7, 7], [0, 1, 0, 1]) == 0.5
    assert auroc(torch.tensor([0.2, 0.9]), torch.tensor([False, True])) == 1.0


def test_auroc_matches_pairwise_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = torch.randint(0, 6, (40,), generator=g).float()
        y = torch.randint(0, 2, (40,), generator=g)
        y[0], y[1] = 0, 1
        assert auroc(s, y) == pytest.approx(brute_auroc(s.tolist(), y.tolist()), abs=1e-12)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="positive and one negative"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        auroc([float("nan"), 0.2], [0, 1])
    with pytest.raises(ValueError, match="entries"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError):
        tpr_at_fpr([0.1, 0.2], [0, 1], fpr=1.5)
    with pytest.raises(ValueError, match="threshold"):
        binary_metrics([0.3, 0.7], [0, 1])
    with pytest.raises(ValueError):
        binary_metrics([], [])


def test_wilson_interval():
    # Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775; 1/29 ->
    # 0.0061-0.1718 (Wilson, without continuity correction)
    for (k, n), want in (((81, 263), (0.2553, 0.3662)), ((0, 10), (0.0, 0.2775)),
                         ((1, 29), (0.0061, 0.1718))):
        assert wilson_interval(k, n) == pytest.approx(want, abs=1e-4)
    lo, hi = wilson_interval(3, 50)
    assert (1 - hi, 1 - lo) == pytest.approx(wilson_interval(47, 50))  # symmetric
    assert wilson_interval(50, 50)[1] == 1.0 and wilson_interval(0, 50)[0] == 0.0
    assert wilson_interval(3, 50, z=2.576)[1] > hi  # 99% is wider
    for bad in ((4, 3), (-1, 3), (1, 0), (0.5, 3), (True, 3)):
        with pytest.raises(ValueError, match="k"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="z"):
        wilson_interval(1, 3, z=0)


def test_tpr_at_fpr_hand_computed():
    neg = [0.1, 0.2, 0.3, 0.9]
    pos = [0.35, 0.5, 0.95, 0.2]
    s, y = neg + pos, [0] * 4 + [1] * 4
    # one false positive allowed (0.9): threshold 0.35 catches 0.35, 0.5, 0.95
    assert tpr_at_fpr(s, y, fpr=0.25, return_threshold=True) == (0.75, 0.35)
    # none allowed: only 0.95 is above every negative
    assert tpr_at_fpr(s, y, fpr=0.0, return_threshold=True) == (0.25, 0.95)
    assert tpr_at_fpr(s, y, fpr=0.02) == 0.25
    assert tpr_at_fpr(s, y, fpr=1.0) == 1.0
    # a positive tied with the top negative cannot be separated from it
    assert tpr_at_fpr([0.5, 0.5, 0.1], [0, 1, 0], fpr=0.0, return_threshold=True) == \
        (0.0, float("inf"))
    fpr, tpr, thr = roc_curve(s, y)
    assert thr[0] == float("inf") and fpr[0] == 0 and tpr[0] == 0
    assert fpr[-1] == 1 and tpr[-1] == 1
    assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()


def test_binary_metrics_hand_computed():
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    m = binary_metrics([1, 0, 0, 0], [1, 1, 1, 0])       # p = 1, r = 1/3, f1 = 0.5
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, pytest.approx(1 / 3), 0.5)
    m = binary_metrics([0, 0], [1, 0])                  # nothing predicted positive
    assert (m["precision"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.5)
    m = binary_metrics(torch.tensor([0.2, 0.8, 0.5]), [0, 1, 0], threshold=0.5)
    assert (m["tp"], m["fp"], m["tn"]) == (1, 1, 1)
    assert binary_metrics(torch.tensor([True, False]), [1, 0])["accuracy"] == 1.0


# ----------------------------------------------------------------------------- FrozenProbe

def synthetic(n=240, d=8, seed=0):
    """Layer 0: noise; 1: weak signal; 2: separable (with a margin); 3: noise."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    sign = (2 * y - 1)[:, None]
    feats = {
        0: torch.randn(n, d, generator=g) * 3 + 5,
        1: torch.randn(n, d, generator=g) + 0.3 * sign,
        2: torch.randn(n, d, generator=g) * 0.5 + sign * torch.linspace(1.0, 2.0, d),
        3: torch.randn(n, d, generator=g),
    }
    feats[2][:, 0] = sign[:, 0] * (1.0 + torch.rand(n, generator=g))  # margin in dim 0
    return feats, y


def test_stratified_folds():
    y = torch.tensor([0] * 23 + [1] * 12)
    f = stratified_folds(y, 5, seed=0)
    for k in range(5):
        counts = torch.bincount(y[f == k], minlength=2)
        assert counts[0] in (4, 5) and counts[1] in (2, 3)
    assert torch.equal(f, stratified_folds(y, 5, seed=0))
    assert not torch.equal(f, stratified_folds(y, 5, seed=1))
    with pytest.raises(ValueError, match="fewer than"):
        stratified_folds(torch.tensor([0] * 10 + [1] * 3), 5)


def test_stratified_folds_keep_each_group_in_one_fold():
    # 30 groups of 1-4 samples; the label is the group's, except one mixed group
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 5, (30,), generator=g).tolist()
    keys = [f"row{j}" for j, n in enumerate(sizes) for _ in range(n)]
    y = torch.tensor([int(j % 3 == 0) for j, n in enumerate(sizes) for _ in range(n)])
    y[0], keys[0] = 1, "row0"
    f = stratified_folds(y, 5, seed=0, groups=keys)
    for k in set(keys):
        assert len({int(f[i]) for i, x in enumerate(keys) if x == k}) == 1, k
    for c in (0, 1):
        per_fold = torch.bincount(f[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 4  # within one largest group
    assert torch.equal(f, stratified_folds(y, 5, seed=0, groups=keys))
    assert not torch.equal(f, stratified_folds(y, 5, seed=1, groups=keys))
    with pytest.raises(ValueError, match="one key per sample"):
        stratified_folds(y, 5, groups=keys[:-1])
    with pytest.raises(ValueError, match="class 1 has 3 groups"):
        stratified_folds(torch.tensor([0] * 10 + [1] * 6), 5,
                         groups=list(range(10)) + ["a", "a", "b", "b", "c", "c"])


def test_grouped_cv_does_not_score_near_copies():
    """Labels that only near-copies can predict (each group's features are one random point
    plus small noise, its label a coin flip): CV over samples scores the copies of what it
    trained on and reports a signal; CV over groups reports none."""
    g = torch.Generator().manual_seed(0)
    n_groups, copies, d = 60, 4, 128
    centre = torch.randn(n_groups, d, generator=g)
    x = centre.repeat_interleave(copies, 0) + 0.05 * torch.randn(n_groups * copies, d,
                                                                  generator=g)
    y = (torch.rand(n_groups, generator=g) < 0.5).long().repeat_interleave(copies)
    keys = torch.arange(n_groups).repeat_interleave(copies).tolist()
    leaky = FrozenProbe().fit({1: x}, y, l2_grid=(1e-4,), seed=0)
    grouped = FrozenProbe().fit({1: x}, y, l2_grid=(1e-4,), seed=0, groups=keys)
    assert leaky.cv_auroc > 0.95
    assert grouped.cv_auroc < 0.75


def test_frozen_probe_picks_informative_layer():
    feats, y = synthetic()
    probe = FrozenProbe().fit(feats, y, seed=0)
    assert probe.layer == 2
    assert probe.cv_auroc == pytest.approx(1.0)
    assert len(probe.cv_table) == 4 * 5
    assert probe.cv_table[(0, probe.l2)] < 0.75 and probe.cv_table[(3, probe.l2)] < 0.75
    assert 0.6 < max(v for (layer, _), v in probe.cv_table.items() if layer == 1) < 0.99
    # every L2 separates layer 2 perfectly, so the tie goes to the strongest
    assert probe.l2 == 1.0
    test_feats, test_y = synthetic(n=200, seed=1)
    p = probe.predict_proba(test_feats)                  # a dict picks the probe's layer
    assert p.shape == (200,) and p.dtype == torch.float32 and ((p >= 0) & (p <= 1)).all()
    assert auroc(p, test_y) > 0.99
    assert torch.equal(probe.predict_proba(test_feats[2]), p)
    assert binary_metrics(probe.predict(test_feats[2]), test_y)["accuracy"] > 0.95
    assert torch.allclose(torch.sigmoid(probe.decision_function(test_feats)), p)
    # restricted search
    assert FrozenProbe().fit(feats, y, layers=[0, 1, 3], l2_grid=(1e-2,)).layer == 1
    # round trip
    clone = FrozenProbe.from_state_dict(probe.state_dict())
    assert torch.equal(clone.predict_proba(test_feats), p) and clone.cv_table == probe.cv_table
    assert "layer=2" in repr(probe)


def test_frozen_probe_is_deterministic_and_standardizes():
    feats, y = synthetic(n=120, seed=3)
    feats = {k: feats[k] for k in (1, 2)}
    kw = dict(seed=0, l2_grid=(1e-2, 1.0), folds=3)
    a = FrozenProbe().fit(feats, y, **kw)
    b = FrozenProbe().fit(feats, y, **kw)
    assert a.cv_table == b.cv_table and torch.equal(a.weight, b.weight)
    # an affine change of the features does not change the predictions (standardization)
    shifted = {k: v * 10 + 3 for k, v in feats.items()}
    c = FrozenProbe().fit(shifted, y, **kw)
    assert c.layer == a.layer
    assert torch.allclose(c.predict_proba(shifted), a.predict_proba(feats), atol=1e-4)


def test_frozen_probe_errors():
    feats, y = synthetic()
    with pytest.raises(RuntimeError, match="not fitted"):
        FrozenProbe().predict_proba(feats[0])
    with pytest.raises(ValueError, match="0 or 1"):
        FrozenProbe().fit(feats, y * 2)
    with pytest.raises(KeyError):
        FrozenProbe().fit(feats, y, layers=[7])
    with pytest.raises(ValueError, match="shape"):
        FrozenProbe().fit({0: feats[0][:10]}, y)
    probe = FrozenProbe().fit({2: feats[2]}, y, l2_grid=(0.1,))
    with pytest.raises(ValueError, match="expected"):
        probe.predict_proba(torch.zeros(3, 5))
    with pytest.raises(KeyError):
        probe.predict_proba({1: feats[1]})


# ----------------------------------------------------------------------------- features

def test_extract_last_token_states_tiny_llama():
    from _data_tiny import PROMPTS, tiny_llama, tiny_tokenizer
    from safeattn.data import encode_prompts

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok.get_vocab()), layers=3)
    states = extract_last_token_states(model, tok, PROMPTS, layers=[0, 2, -1], batch_size=4,
                                       progress=False)
    assert sorted(states) == [0, 2, 3]
    for v in states.values():
        assert v.shape == (len(PROMPTS), 32) and v.dtype == torch.float32
    # left padding and reordering leave every row as in an unpadded forward of its own
    for i, p in enumerate(PROMPTS):
        enc = encode_prompts(tok, [p])
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for layer in (0, 2, 3):
            torch.testing.assert_close(states[layer][i], hs[layer][0, -1], atol=1e-5,
                                       rtol=1e-5)
    # without the final layer only blocks up to the deepest requested one run, and the LM
    # head never runs (a 262k-vocabulary logit tensor is what ran out of memory)
    ran = []
    hooks = [model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head")),
             model.model.layers[2].register_forward_hook(lambda *a: ran.append("block 2"))]
    cut = extract_last_token_states(model, tok, PROMPTS, layers=[1], progress=False)
    for h in hooks:
        h.remove()
    assert ran == [] and len(model.model.layers) == 3
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            hs = model(**encode_prompts(tok, [p]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(cut[1][i], hs[1][0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        extract_last_token_states(model, tok, PROMPTS, layers=[4], progress=False)
    # the features feed the probe
    labels = torch.tensor([i % 2 for i in range(len(PROMPTS))] * 2)
    feats = {k: torch.cat([v, v + 0.01]) for k, v in states.items()}
    probe = FrozenProbe().fit(feats, labels, folds=2, l2_grid=(1.0,))
    assert probe.layer in (0, 2, 3) and probe.predict_proba(feats).shape == (12,)

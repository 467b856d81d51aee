"""Leave-one-source-out (LOSO) validation of the ``[CLS]`` signal, and its baselines.

A head that scores its own test split perfectly can still have learnt the phrasing of its
training prompts rather than harm. LOSO measures what it catches that it never saw: for each
harmful source (:data:`~safeattn.data.HARMFUL_SOURCES`) and each benign source group
(:data:`~safeattn.data.BENIGN_GROUPS`), train without it, then score it.

* **Harmful fold** ``S``: train on the training samples of every other origin, less every
  row that shares a split group (:func:`~safeattn.data.group_key`) with a row of ``S``:
  leaving out the XSTest unsafe prompts also leaves out their safe contrast partners, and
  leaving out ``pyrit_objectives`` also leaves out the PyRIT responses.
  Score every plain prompt of ``S`` (every split: none was seen) against the benign
  validation prompts. Report AUROC, and the TPR at the threshold that gives 2% FPR on them.
* **Benign fold** ``G``: train without ``G``; set the 2%-FPR threshold on the benign
  validation prompts of the *other* groups, and report the FPR of ``G``'s prompts
  (every split) at it, and the AUROC of the harmful validation prompts against them.
* **Responses**: each fold also scores the validation PyRIT responses (split by objective)
  after the neutral prompt :data:`~safeattn.data.EVAL_NEUTRAL_PROMPT`: the response's score
  is the highest ``p`` over a sweep of Rule-2 probe windows (:func:`response_sweep`); AUROC
  harmful vs harmless.

"Validation" is the ``val`` band (``val_fraction``: what ``safeattn calibrate`` sets θ on,
never trained on; :attr:`Plan.val`). Without a band the folds score the test split
(``Plan.val.split == "test"``), which then helps choose between recipes. The model trained
on every training sample is scored on the test split (:func:`test_metrics`, :attr:`Plan.test`).

:func:`plan` builds the pool of samples and the folds (pure data, no model);
:func:`fold_metrics` turns scores into a report row. The driver that trains the ``[CLS]`` head
and fits :class:`~safeattn.baselines.FrozenProbe` on the same folds is ``safeattn train
--loso`` (:func:`safeattn.training.run_loso`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .data import (BENIGN_GROUPS, EVAL_NEUTRAL_PROMPT, HARMFUL_SOURCES, Sample, benign_rows,
                   group_key, harmful_rows, response_rows, select)
from .data.samples import _response_views
from .generation import DEFAULT_WINDOW
from .metrics import auroc, separation

__all__ = ["Plan", "plan", "fold_metrics", "test_metrics", "response_sweep", "sweep_ends", "blend",
           "scored_indices", "fixed", "mean", "FOLDS"]

#: Every LOSO fold: the harmful sources, then the benign groups.
FOLDS = tuple(HARMFUL_SOURCES) + tuple(BENIGN_GROUPS)
#: A fold's error examples keep this much of each prompt.
EXAMPLE_CHARS = 300


def sweep_ends(n: int, every: int = 8, max_tokens: int = 64) -> list[int]:
    """The response tokens seen at the checks of a sweep over a response of ``n`` tokens:
    ``every, 2·every, … ≤ max_tokens``, and the last token when the response is shorter."""
    top = min(n, max_tokens)
    return sorted({*range(every, top + 1, every), top} - {0})


def response_sweep(rows, tokenizer=None, *, every: int = 8, max_tokens: int = 64,
                   r2: int = DEFAULT_WINDOW, prompt: str = EVAL_NEUTRAL_PROMPT) -> list[Sample]:
    """Rule-2 probe views of each response row (``id``, ``response``, ``label``) after
    ``prompt``: at :func:`sweep_ends`, the window of the last ``r2``. Sample ids are
    ``<row id>|sweep|w<seen>:<lo>:<seen>``."""
    def views(n):
        return [(seen, max(0, seen - r2), seen) for seen in sweep_ends(n, every, max_tokens)]

    return [x for r in rows for x in _response_views(
        r["id"], prompt, r["response"], int(r["label"]), tokenizer=tokenizer, tag="sweep",
        source="pyrit_scorer_responses", row_id=r["id"], origin="pyrit_responses",
        views=views, category=r.get("category"))]


@dataclasses.dataclass
class Scored:
    """What one kind of report scores, all outside every fold's training samples: the
    ``val`` band (the folds) or the test split (:func:`test_metrics`)."""

    split: str                       #: ``"val"`` or ``"test"``
    benign: list[int]                #: benign prompts (negatives; the 2%-FPR threshold)
    harmful: list[int]               #: harmful prompts, every source
    sweep: list[int]                 #: response-sweep views of the split's PyRIT responses


@dataclasses.dataclass
class Plan:
    """The sample pool and, per fold, which pool indices train and which are scored."""

    pool: list                       #: training samples, then the extra scoring samples
    n_train: int                     #: pool[:n_train] are the training samples
    prompts: dict[str, list[int]]    #: plain prompt samples per origin (every split)
    folds: dict[str, list[int]]      #: fold -> training indices
    val: Scored                      #: what the folds score (the test split without a band)
    test: Scored                     #: what :func:`test_metrics` scores

    def origin_of(self, i: int) -> str:
        return self.pool[i].origin

    def negatives(self, fold: str) -> list[int]:
        """The benign validation prompts a fold is scored against: those not in the fold."""
        return [i for i in self.val.benign if self.origin_of(i) != fold]


def plan(train: Sequence[Sample], tokenizer=None, *, test_fraction: float = 0.2,
         salt: str = "", val_fraction: float = 0.0, sweep_every: int = 8,
         sweep_tokens: int = 64, window: int = DEFAULT_WINDOW) -> Plan:
    """Pool and folds for the training samples ``train`` (from
    :func:`safeattn.data.build_samples`: split ``fit`` when ``val_fraction`` holds a
    validation band out, else ``train``). Plain prompts that are already in ``train`` (kind
    ``query``) are scored from there; the others are added to the pool with an empty
    response (the ``[CLS]`` row reads only the prompt). The folds score the ``val`` band
    (its benign prompts are their negatives) when ``val_fraction > 0``, else the test split.
    """
    def bands(rows) -> tuple[list, list]:
        """``(val, test)``: the band the folds score (none without ``val_fraction``), and the
        test split, cut as :func:`safeattn.data.build_samples` cuts them."""
        cut = dict(test_fraction=test_fraction, salt=salt, val_fraction=val_fraction)
        return (select(rows, "val", **cut) if val_fraction else []), select(rows, "test", **cut)

    rows = harmful_rows() + benign_rows()
    val_rows, test_rows = bands(rows)
    if val_fraction and not val_rows:
        raise ValueError(f"val_fraction={val_fraction} holds no prompt out: the folds would "
                         "have no validation prompts")
    if {r["id"] for r in val_rows} & {s.row_id for s in train}:
        raise ValueError("train holds val prompts: build it with split 'fit' and the same "
                         "val_fraction")
    pool = list(train)
    by_id = {s.id: i for i, s in enumerate(pool) if s.kind == "query"}
    prompts: dict[str, list[int]] = {o: [] for o in FOLDS}
    for r in rows:
        sid = f"{r['id']}|query"
        if sid not in by_id:
            label = 1 if r["origin"] in HARMFUL_SOURCES else 0
            pool.append(Sample(sid, r["prompt"], "", label, "query", r.get("source", ""),
                               r["id"], r.get("category"), origin=r["origin"]))
            by_id[sid] = len(pool) - 1
        prompts[r["origin"]].append(by_id[sid])
    labelled = response_rows()

    def scored(name, part, responses) -> Scored:
        ids = {r["id"] for r in part}
        start = len(pool)
        pool.extend(response_sweep(responses, tokenizer, every=sweep_every,
                                   max_tokens=sweep_tokens, r2=window))
        return Scored(name, [i for g in BENIGN_GROUPS for i in prompts[g]
                             if pool[i].row_id in ids],
                      [i for s in HARMFUL_SOURCES for i in prompts[s] if pool[i].row_id in ids],
                      list(range(start, len(pool))))

    val_resp, test_resp = bands(labelled)
    test = scored("test", test_rows, test_resp)
    val = scored("val", val_rows, val_resp) if val_rows else test
    # a fold drops every training row that shares a split group with a held-out row: the
    # XSTest safe partner of a held-out unsafe prompt, the responses to a held-out objective
    keys = {r["id"]: group_key(r) for r in rows + labelled}
    folds = {}
    for fold in FOLDS:
        drop = {fold, "pyrit_responses"} if fold == "pyrit_objectives" else {fold}
        held = {keys[r["id"]] for r in rows if r["origin"] == fold}
        folds[fold] = [i for i in range(len(train)) if not pool[i].origins & drop
                       and keys.get(pool[i].row_id) not in held]
    return Plan(pool, len(train), prompts, folds, val, test)


def _max_per_row(pool, idx, scores) -> tuple[torch.Tensor, torch.Tensor]:
    best: dict[str, tuple[float, int]] = {}
    for i, s in zip(idx, scores.tolist()):
        row = pool[i].row_id
        if row not in best or s > best[row][0]:
            best[row] = (s, pool[i].label)
    vals = list(best.values())
    return torch.tensor([v[0] for v in vals]), torch.tensor([float(v[1]) for v in vals])


def _extremes(p: Plan, idx: list[int], scores: torch.Tensor, k: int,
              highest: bool) -> list[dict]:
    """The ``k`` prompts of ``idx`` that score highest (or lowest), for reading the errors."""
    order = scores.argsort(descending=highest)[:k].tolist()
    return [{"row_id": p.pool[idx[j]].row_id, "score": round(float(scores[j]), 4),
             "prompt": str(p.pool[idx[j]].prompt)[:EXAMPLE_CHARS]} for j in order]


def fold_metrics(p: Plan, fold: str, score, examples: int = 0, *,
                 responses: bool = True) -> dict:
    """The report row of one fold from ``score(indices) -> [N]`` scores (higher = more
    malicious) of the model trained on ``p.folds[fold]`` (see the module docstring). With
    ``examples``, the row also names that many of its errors: the held-out harmful prompts
    that score lowest (``missed``) and the benign validation prompts that score highest
    (``false_alarms``); for a benign fold, its held-out prompts that score highest.
    ``responses=False`` leaves out the response sweep (a score of prompts only)."""
    val_neg = p.negatives(fold)
    neg = score(val_neg)
    held = p.prompts[fold]
    if fold in HARMFUL_SOURCES:
        pos = score(held)
        auc, tpr, theta = separation(pos, neg)
        row = {"fold": fold, "kind": "harmful", "n_heldout": len(held), "n_benign": len(neg),
               "auroc": auc, "tpr_at_2fpr": tpr, "theta": theta}
        if examples:
            row["missed"] = _extremes(p, held, pos, examples, highest=False)
            row["false_alarms"] = _extremes(p, val_neg, neg, examples, highest=True)
    else:
        hneg = score(held)
        pos = score(p.val.harmful)
        _, _, theta = separation(pos, neg)
        row = {"fold": fold, "kind": "benign", "n_heldout": len(held), "n_harmful": len(pos),
               "auroc": separation(pos, hneg)[0],
               "fpr_at_theta": float((hneg >= theta).float().mean()), "theta": theta}
        if examples:
            row["false_alarms"] = _extremes(p, held, hneg, examples, highest=True)
    if p.val.sweep and responses:
        rs, ry = _max_per_row(p.pool, p.val.sweep, score(p.val.sweep))
        row["response_auroc"] = auroc(rs, ry) if 0 < int(ry.sum()) < len(ry) else float("nan")
    return row


def scored_indices(p: Plan, fold: str) -> list[int]:
    """The pool indices :func:`fold_metrics` scores for ``fold``."""
    extra = [] if fold in HARMFUL_SOURCES else p.val.harmful
    return sorted(set(p.negatives(fold)) | set(p.prompts[fold]) | set(extra) | set(p.val.sweep))


def fixed(score, indices):
    """``score``'s values at ``indices``, computed now (the model behind ``score`` may train
    on), as a ``score(indices) -> [N]`` function of those indices only."""
    idx = sorted({int(i) for i in indices})
    table = dict(zip(idx, score(idx).float().tolist()))

    def look_up(keys):
        return torch.tensor([table[int(k)] for k in keys])

    return look_up


def mean(scores):
    """The mean of several ``score(indices) -> [N]`` functions: for heads' logits, the logit
    of a head ensemble (:func:`safeattn.combine_safety`) on what they all read."""
    def averaged(indices):
        return torch.stack([f(indices).float() for f in scores]).mean(0)

    return averaged


def test_metrics(p: Plan, score, *, responses: bool = True) -> dict:
    """Test-split metrics of a model trained on every training sample: per harmful source,
    its test-split prompts against the benign test-split prompts (AUROC, TPR at 2% FPR,
    recall at ``p >= 0.5``); benign FPR at ``p >= 0.5`` overall and on the over-refusal
    group; response-level AUROC of the sweep (not with ``responses=False``). ``score``
    gives logits (0 is ``p = 0.5``)."""
    neg = score(p.test.benign)
    out = {}
    for src in HARMFUL_SOURCES:
        idx = [i for i in p.test.harmful if p.origin_of(i) == src]
        pos = score(idx)
        auc, tpr, _ = separation(pos, neg)
        out[src] = {"n": len(idx), "auroc": auc, "tpr_at_2fpr": tpr,
                    "recall_at_0.5": float((pos >= 0).float().mean())}
    over = [i for i in p.test.benign if p.origin_of(i) == "over_refusal"]
    out["benign"] = {"n": len(neg), "fpr_at_0.5": float((neg >= 0).float().mean()),
                     "over_refusal_n": len(over),
                     "over_refusal_fpr_at_0.5": float((score(over) >= 0).float().mean())}
    if p.test.sweep and responses:
        rs, ry = _max_per_row(p.pool, p.test.sweep, score(p.test.sweep))
        out["responses"] = {"n": len(ry), "n_harmful": int(ry.sum()), "auroc": auroc(rs, ry),
                            "flagged_harmful_at_0.5": float((rs[ry == 1] >= 0).float().mean()),
                            "flagged_harmless_at_0.5": float((rs[ry == 0] >= 0).float().mean())}
    return out


def blend(scores, reference: list[int]):
    """The sum of several ``score(indices) -> [N]`` functions, each standardised by the mean
    and standard deviation of its scores on the pool indices ``reference`` (benign prompts:
    no harmful label is used), so that no member's scale decides. Higher = more malicious;
    0 is not ``p = 0.5``."""
    stats = []
    for score in scores:
        ref = score(reference).double()
        stats.append((ref.mean(), ref.std().clamp_min(1e-12)))

    def blended(indices):
        return sum((f(indices).double() - m) / sd for f, (m, sd) in zip(scores, stats)).float()

    return blended

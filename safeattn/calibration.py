"""Picking θ on the validation split (``safeattn calibrate``).

A row refuses when its prefill ``p_0 >= θ``, or once ``τ`` consecutive decoding-time checks
give ``p >= θ``. Decoding the validation prompts once with θ above 1 (nothing refuses, so
every row decodes its plain text) gives each row's check trace, and its
:func:`refusal_scores`: the larger of ``p_0`` and the highest, over runs of ``τ`` consecutive
checks, of the lowest ``p`` in the run, and of the check that chooses the last token allowed
(a hit there cannot be cleared). The row refuses at θ iff its score is ``>= θ`` as
long as the decoder sees what the trace saw: exact for ``p_0`` and up to the first alarm;
after it the decoder's transition window (Rule 3) sees other tokens than the trace's Rule-2
window, so the θ that
:func:`pick_threshold` chooses from the benign scores is then checked with one real decoding
pass (:func:`calibrate` reports both).

With ``split_thresholds`` the prefill's ``p_0`` gets a θ of its own (``query_threshold``,
:func:`pick_thresholds`): the highest ``p_0`` of a benign row that θ does not already refuse
is often far below θ, so ``p_0`` alone can refuse at a lower θ with no more benign rows
refusing, while the decoding-time checks, which also guard against harmful *responses*,
keep θ.

θ keeps the *benign* sets under the target: ``benign`` (single prompts) and, with the
model's benign answers, ``benign_conversation`` (the same prompts in the conversation shapes
of training: split over two user turns, and after a benign exchange), pooled, because chat
apps send conversations and they shift benign scores up.

:func:`pick_refusal_prefix` then chooses, among candidate refusal prefixes, the one whose
refusals of the harmful val prompts most often read well (:func:`safeattn.judge.refusal_check`:
refuses, names the request's topic, ends its turn); the model writes the justification after
the prefix, and a prefix such as "... because it asks how to" leads it to name the request.

The validation split is the ``val`` band of the train split (:data:`safeattn.data.SPLITS`),
held out of training with ``safeattn train --val-fraction``; the test split is never used.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, NamedTuple, Sequence

import torch

logger = logging.getLogger("safeattn")

__all__ = ["refusal_scores", "split_scores", "late_scores", "pick_threshold", "pick_thresholds",
           "pick_late_threshold", "bootstrap_intervals", "validation_rows", "calibrate",
           "pick_refusal_prefix", "is_benign_set", "operating_curve", "format_threshold"]


def format_threshold(theta: float, digits: int = 6) -> str:
    """θ to show: ``digits`` significant digits, more where fewer would print a θ below 1 as
    ``1`` (a late θ of 0.99999999 still refuses where ``p`` saturates; 1 would read as never)."""
    text = f"{theta:.{digits}g}"
    while theta < 1.0 and float(text) >= 1.0:
        digits += 1
        text = f"{theta:.{digits}g}"
    return text


def refusal_scores(p: torch.Tensor, tau: int, max_new_tokens: int | None = None) -> torch.Tensor:
    """``p [B, T+1]`` (a safe ``generate``'s ``out.safety.p``: ``nan`` where no check ran) ->
    ``[B]`` float64: per row, the largest θ at which the row refuses. The prefill's ``p_0``
    refuses on its own (``p_0 >= θ``); a decoding-time alarm needs ``τ`` consecutive checks
    ``>= θ`` (reference ``safety_step``). ``-inf``: nothing can make the row refuse.

    ``max_new_tokens`` (the trace's token budget): a check that chooses the last token (it
    sees ``max_new_tokens - 1``) refuses on its own: no check can follow a hit there, and a
    row does not end mid-alarm (``safeattn.generation``)."""
    if p.dim() != 2:
        raise ValueError(f"p must be [B, T+1], got shape {tuple(p.shape)}")
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    p = p.double().cpu()
    out = torch.where(p[:, 0].isnan(), -math.inf, p[:, 0])
    for i, row in enumerate(p[:, 1:]):
        checks = row[~row.isnan()]
        if len(checks) >= tau:
            out[i] = max(out[i], checks.unfold(0, tau, 1).amin(-1).max())
    return _with_last_check(out, p, max_new_tokens, first=1)


def _with_last_check(out: torch.Tensor, p: torch.Tensor, max_new_tokens: int | None,
                     first: int) -> torch.Tensor:
    """``out`` raised to the ``p`` of the check that chooses the last of ``max_new_tokens``
    tokens, when that check sees at least ``first`` of them: no check can follow a hit there,
    and a row does not end mid-alarm, so one hit refuses."""
    if max_new_tokens is not None and first < max_new_tokens <= p.shape[1]:
        last = p[:, max_new_tokens - 1]  # (a trace whose rows all ended sooner is shorter)
        out = torch.where(last.isnan(), out, torch.maximum(out, last))
    return out


def late_scores(p: torch.Tensor, tau: int, threshold: float, late_after: int,
                max_new_tokens: int | None = None) -> torch.Tensor:
    """``p [B, T+1]`` (as :func:`refusal_scores`) -> ``[B]`` float64: per row, the largest
    ``late_threshold`` at which a run of ``τ`` consecutive checks that ends at or after the
    check seeing ``late_after`` generated tokens refuses, the checks before it hitting at
    ``threshold`` (:attr:`~safeattn.generation.SafetyConfig.late_threshold`); ``-inf``: none
    can. ``max_new_tokens``: the check that chooses the last token refuses on its own, as in
    :func:`refusal_scores`, when it is a late one."""
    if p.dim() != 2:
        raise ValueError(f"p must be [B, T+1], got shape {tuple(p.shape)}")
    if tau < 1 or late_after < 1:
        raise ValueError(f"tau and late_after must be >= 1, got {tau}, {late_after}")
    p = p.double().cpu()
    out = torch.full((p.shape[0],), -math.inf, dtype=torch.float64)
    steps = torch.arange(1, p.shape[1])
    for i, row in enumerate(p[:, 1:]):
        kept = ~row.isnan()
        checks, at = row[kept], steps[kept]
        if len(checks) < tau:
            continue
        runs, late = checks.unfold(0, tau, 1), at.unfold(0, tau, 1) >= late_after
        ok = late[:, -1] & (late | (runs >= threshold)).all(-1)
        if ok.any():
            out[i] = torch.where(late, runs, math.inf).amin(-1)[ok].max()
    return _with_last_check(out, p, max_new_tokens, first=late_after)


def pick_late_threshold(benign_late: torch.Tensor, benign_early: torch.Tensor,
                        target_fpr: float) -> float:
    """The lowest ``late_threshold`` at which at most ``target_fpr`` of the benign rows refuse
    in all, halfway as in :func:`pick_threshold`: ``benign_late`` is their
    :func:`late_scores`, ``benign_early`` whether they already refuse before ``late_after``
    (those spend the budget first)."""
    s = _benign(benign_late, target_fpr)
    early = benign_early.bool().flatten()
    if len(early) != len(s):
        raise ValueError(f"benign late and early scores differ in length: {len(s)} vs "
                         f"{len(early)}")
    left = _budget(s, target_fpr) - int(early.sum())
    if left < 0:
        raise ValueError(f"{int(early.sum())} benign rows refuse before late_after, more than "
                         f"the {_budget(s, target_fpr)} that target_fpr={target_fpr} allows")
    return _theta_above(s[~early], left) if (~early).any() else 0.0


def pick_threshold(benign_scores: torch.Tensor, target_fpr: float) -> float:
    """A θ at which at most ``target_fpr`` of the benign rows have a refusal score ``>= θ``,
    as low as that allows: halfway between the ``k``-th highest benign score
    (``k = floor(target_fpr · n)``, 0-based) and the next higher distinct one (or 1). Halfway,
    not just above: the decoder's own ``p`` may differ from the trace's in the last bits."""
    s = _benign(benign_scores, target_fpr)
    return _theta_above(s, _budget(s, target_fpr))


def pick_thresholds(benign_p0: torch.Tensor, benign_checks: torch.Tensor,
                    target_fpr: float, threshold: float | None = None) -> tuple[float, float]:
    """``(query θ, θ)``: θ is :func:`pick_threshold`'s, and the prefill's ``p_0`` gets the
    lowest θ of its own (at most θ) at which no more than ``target_fpr`` of the benign rows
    still refuse.

    ``benign_p0``, ``benign_checks``: per benign row its ``p_0`` and the :func:`refusal_scores`
    of its decoding-time checks alone (:func:`split_scores`). One check's ``p_0`` often sits
    lower on benign rows than the best of a row's many runs of checks, so under one θ the
    benign alarms come from the checks and ``p_0`` could be trusted further: the query θ spends
    what the budget has left on ``p_0`` alone, down to the highest ``p_0`` of a benign row
    that θ does not already refuse. Every row that refuses at θ still refuses, the decoding
    checks (the ones that see a response) keep θ, and each θ lies halfway, as in
    :func:`pick_threshold` (the query θ between that ``p_0`` and θ).

    ``threshold``: keep this θ for the decoding-time checks (e.g. the one calibrated for the
    same head before only ``p_0`` changed) and spend what its refusals leave of the budget on
    ``p_0``; where ``p_0`` at that θ would refuse more benign rows than that leaves, the query
    θ goes above θ. Raises ``ValueError`` when the checks alone refuse more than the budget at
    it.
    """
    b0, br = (_benign(x, target_fpr) for x in (benign_p0, benign_checks))
    if len(b0) != len(br):
        raise ValueError(f"benign p_0 and decoding scores differ in length: {len(b0)} vs "
                         f"{len(br)}")
    k = _budget(b0, target_fpr)
    if threshold is None:
        theta = pick_threshold(torch.maximum(b0, br), target_fpr)
    else:
        theta = float(threshold)
        refused = int((br >= theta).sum())
        if refused > k:
            raise ValueError(f"threshold {theta}: the decoding-time checks alone refuse "
                             f"{refused} benign rows, more than the {k} that "
                             f"target_fpr={target_fpr} allows")
    clear = (b0 < theta) & (br < theta)
    left = k - int((~clear).sum())
    if left < 0:  # a kept θ: p_0 alone at it spends more than the checks leave
        checked = br >= theta
        return _theta_above(b0[~checked], k - int(checked.sum())), theta
    if not clear.any():
        return theta, theta
    return _theta_above(b0[clear], left, ceiling=theta), theta


def split_scores(p: torch.Tensor, tau: int,
                 max_new_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``p [B, T+1]`` (as :func:`refusal_scores`) -> ``(p_0 [B], decoding score [B])``: the
    prefill's ``p_0`` (``-inf`` where none) and :func:`refusal_scores` of the decoding-time
    checks alone; their larger is ``refusal_scores(p, tau, max_new_tokens)``."""
    p = p.double().cpu()
    checks = p.clone()
    checks[:, 0] = math.nan
    return (torch.where(p[:, 0].isnan(), -math.inf, p[:, 0]),
            refusal_scores(checks, tau, max_new_tokens))


def _benign(scores: torch.Tensor, target_fpr: float) -> torch.Tensor:
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s = scores.double().flatten()
    if not len(s):
        raise ValueError("benign_scores is empty")
    return s


def _budget(s: torch.Tensor, target_fpr: float) -> int:
    """How many of the benign rows ``s`` may refuse at ``target_fpr``."""
    return math.floor(target_fpr * len(s) + 1e-9)


def _theta_above(s: torch.Tensor, k: int, ceiling: float = 1.0) -> float:
    """The lowest θ at which at most ``k`` of ``s`` are ``>= θ``, halfway between the ``k``-th
    highest score and the next higher distinct one (or ``ceiling``, the lowest θ that is
    known to be safe)."""
    s = s.sort(descending=True).values
    if k >= len(s):
        return 0.0
    kth = float(s[k])
    if kth == -math.inf:
        return 0.0
    if kth >= 1.0:  # only a θ above 1 would meet the budget, and that switches the check off
        raise ValueError(f"target_fpr cannot be met: {int((s >= 1.0).sum())} benign rows score "
                         f"p = 1.0 (saturated), more than the {k} it allows; a θ above 1 would "
                         "switch the check off. Allow a higher target_fpr, or retrain the head")
    higher = s[(s > kth) & (s <= ceiling)]  # ties with the k-th score stay below θ too; +inf
    # (a row that failed closed) refuses at any θ and bounds nothing
    return (kth + (float(higher.min()) if len(higher) else ceiling)) / 2


def validation_rows(val_fraction: float, *, benign_responses: Mapping[str, str] | None = None,
                    seed: int = 0) -> dict[str, list[dict]]:
    """The ``val`` prompts: ``benign`` and one list per harmful source (``advbench``,
    ``xstest_unsafe``, ``pyrit_objectives``); with ``benign_responses`` (the model's answers
    to the benign prompts, as for ``safeattn train``) also ``benign_conversation``
    (:func:`safeattn.data.conversation_rows` of the benign val prompts, ``seed`` as in
    training)."""
    from .data import conversation_rows, eval_sets

    if not 0.0 < val_fraction:
        raise ValueError(f"val_fraction must be > 0 (the band safeattn train --val-fraction "
                         f"held out), got {val_fraction}")
    sets = eval_sets("val", val_fraction=val_fraction)
    rows = {"benign": sets["benign"], "advbench": sets["harmful"],
            "xstest_unsafe": sets["xstest_unsafe"], "pyrit_objectives": sets["pyrit_objectives"]}
    if benign_responses is not None:
        rows["benign_conversation"] = conversation_rows(sets["benign"], benign_responses,
                                                        seed=seed, val_fraction=val_fraction)
    return rows


def is_benign_set(name: str) -> bool:
    """Whether a :func:`validation_rows` set is benign (``benign``, ``benign_*``)."""
    return name == "benign" or name.startswith("benign_")


def _decode(model, tokenizer, prompts, safety, max_new_tokens, batch_size):
    """Safe greedy decoding of ``prompts`` -> ``(p [N, T+1] with nan padding, refused [N])``."""
    from .generation import generate

    ps, refused = [], []
    for i in range(0, len(prompts), batch_size):
        out = generate(model, tokenizer, list(prompts[i:i + batch_size]), safety=safety,
                       max_new_tokens=max_new_tokens, do_sample=False,
                       return_dict_in_generate=True)
        p = out.safety.p.double().cpu()
        ps.append(torch.nn.functional.pad(p, (0, max_new_tokens + 1 - p.shape[1]),
                                          value=math.nan))
        refused.append(out.safety.refused.cpu())
    return torch.cat(ps), torch.cat(refused)


def calibrate(model, tokenizer, rows: Mapping[str, Sequence[Mapping]], *, target_fpr: float,
              safety=None, max_new_tokens: int = 32, batch_size: int = 8,
              compare_taus: Sequence[int] = (), split_thresholds: bool = False,
              keep_threshold: float | None = None, bootstrap: int = 1000,
              late_after: int | None = None) -> dict:
    """Pick θ so that at most ``target_fpr`` of ``rows["benign"]`` refuse, then decode every
    row once at that θ -> the report (``threshold``, the per-set refusal rates predicted from
    the trace and measured at θ, each harmful set's ``auroc`` against the benign rows by
    refusal score, the settings).

    ``rows``: :func:`validation_rows` (``benign`` is required; θ keeps the pooled benign sets,
    :func:`is_benign_set`, under ``target_fpr``; every other set is harmful); the report adds
    ``over_refusal``, the ``benign`` rows of that group
    (:data:`safeattn.data.BENIGN_GROUPS`). ``safety``: the schedule, ``τ`` and windows to
    calibrate for (default ``SafetyConfig()``; its θ is ignored). ``compare_taus``: other τ
    to calibrate from the same trace (no real decoding) -> ``report["by_tau"]``, per τ its θ
    and the per-set rates predicted at it. ``split_thresholds``: a lower θ of its own for
    the prefill's ``p_0`` where the benign rows allow it (:func:`pick_thresholds`,
    ``report["query_threshold"]``); else both are ``threshold``. ``keep_threshold`` (with
    ``split_thresholds``): θ of the decoding-time checks stays this value; only ``p_0``'s θ
    is picked (:func:`pick_thresholds`' ``threshold``). ``bootstrap``: resamples of the
    benign rows for ``report["bootstrap"]``, the 95% intervals of θ (and the query θ) and of
    each set's predicted rate had θ been picked on another draw of benign prompts (from the
    trace, no decoding; ``skipped``: draws that cannot meet the target); ``0``: none.
    ``late_after``: θ (and the query θ) are picked on the checks before the one that sees
    ``late_after`` generated tokens, and the checks from it on get ``late_threshold``
    (:func:`pick_late_threshold`), so that at most ``target_fpr`` of the benign rows refuse
    within ``max_new_tokens`` in all (``report["late_threshold"]``, re-picked in each
    bootstrap draw; ``scores`` and the AUROCs stay those of one θ over the whole trace).
    """
    from .generation import SafetyConfig

    replace = dataclasses.replace
    _check_settings(rows, bootstrap, split_thresholds, keep_threshold, late_after,
                    max_new_tokens)
    safety = replace(safety or SafetyConfig(), threshold=1.5, query_threshold=None,
                     late_threshold=None, late_after=None)
    val = _ValTrace.decode(model, tokenizer, rows, safety, max_new_tokens, batch_size,
                           target_fpr=target_fpr, split_thresholds=split_thresholds,
                           keep_threshold=keep_threshold, late_after=late_after)
    at = val.operating_point(safety.tau)
    refused = int(at.refuses[val.benign].sum())
    if refused > _budget(val.benign, target_fpr):  # never write such a config
        raise RuntimeError(f"calibrate: the picked thresholds refuse {refused} of "
                           f"{len(val.benign)} benign rows by the trace, more than "
                           f"target_fpr={target_fpr} allows")
    real = replace(safety, threshold=at.theta, query_threshold=at.query,
                   late_threshold=at.late, late_after=late_after)
    _, refused_at = _decode(model, tokenizer, val.prompts, real, max_new_tokens, batch_size)
    report = val.report(at, refused_at, safety)
    by_tau = {str(tau): val.summary(val.operating_point(tau)) for tau in compare_taus}
    if by_tau:
        report["by_tau"] = by_tau
    if bootstrap:
        report["bootstrap"] = val.bootstrap(at, safety.tau, bootstrap)
    return report


def _check_settings(rows, bootstrap, split_thresholds, keep_threshold, late_after,
                    max_new_tokens) -> None:
    """:func:`calibrate`'s argument checks, before any decoding."""
    if not rows.get("benign"):
        raise ValueError("rows['benign'] is empty: nothing to calibrate on")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if keep_threshold is not None and not split_thresholds:
        raise ValueError("keep_threshold needs split_thresholds: with one θ for both, "
                         "keeping it leaves nothing to calibrate")
    if late_after is not None and not 1 <= late_after < max_new_tokens:
        raise ValueError(f"late_after must be in [1, max_new_tokens={max_new_tokens}), got "
                         f"{late_after}")


class _Point(NamedTuple):
    """The thresholds picked for one τ, and what they do to the trace's rows."""

    query: float                 #: θ of ``p_0``
    theta: float                 #: θ of the decoding-time checks
    late: float | None           #: θ of the checks from ``late_after`` on
    refuses: torch.Tensor        #: ``[N]`` bool, by the trace
    prefill: torch.Tensor        #: ``[N]`` ``p_0``
    checks: torch.Tensor         #: ``[N]`` score of the checks before ``late_after``


@dataclasses.dataclass
class _ValTrace:
    """The val rows decoded once with nothing refusing (θ above 1, so every row decodes its
    plain text), and the rule that turns that trace into thresholds: the state that
    :func:`calibrate`'s steps share."""

    prompts: list[str]
    ids: list[tuple[str, str]]            #: ``(set name, row id)`` per row
    by_set: dict[str, torch.Tensor]       #: row indices per set, and ``over_refusal``
    benign: torch.Tensor                  #: the pooled benign rows θ holds under the target
    p: torch.Tensor                       #: ``[N, T+1]`` check trace (nan: no check)
    failed: torch.Tensor                  #: ``[N]`` failed closed: refuse at every θ
    target_fpr: float
    max_new_tokens: int
    split_thresholds: bool
    keep_threshold: float | None
    late_after: int | None

    @classmethod
    def decode(cls, model, tokenizer, rows, safety, max_new_tokens, batch_size,
               **rule) -> "_ValTrace":
        from .data import BENIGN_GROUPS

        names = list(rows)
        prompts = [r["prompt"] for n in names for r in rows[n]]
        ids = [(n, r["id"]) for n in names for r in rows[n]]
        # No finite p reaches θ > 1, so a row that refuses in this pass failed closed (a
        # non-finite p or an error in the check, trace p nan): it refuses at every θ.
        p, failed = _decode(model, tokenizer, prompts, safety, max_new_tokens, batch_size)
        by_set = {n: torch.tensor([i for i, (m, _) in enumerate(ids) if m == n])
                  for n in names}
        over = {r["id"] for r in rows["benign"]
                if r.get("source") in BENIGN_GROUPS["over_refusal"]}
        by_set["over_refusal"] = torch.tensor(
            [i for i, (m, rid) in enumerate(ids) if m == "benign" and rid in over],
            dtype=torch.long)
        benign = torch.cat([by_set[n] for n in names if is_benign_set(n)])
        val = cls(prompts, ids, by_set, benign, p, failed, max_new_tokens=max_new_tokens,
                  **rule)
        val.check_failures()
        return val

    def check_failures(self) -> None:
        """Warn of the rows that failed closed; raise when the benign ones alone break the
        target."""
        if not self.failed.any():
            return
        bad = [f"{n}/{rid}" for (n, rid), f in zip(self.ids, self.failed.tolist()) if f]
        logger.warning("safeattn calibrate: the safety check failed closed on %d row(s) (%s); "
                       "they count as refusing at every θ", len(bad), ", ".join(bad[:5]))
        lost = int(self.failed[self.benign].sum())
        if lost > _budget(self.benign, self.target_fpr):
            raise ValueError(f"the safety check failed closed on {lost} of {len(self.benign)} "
                             f"benign rows, more than target_fpr={self.target_fpr} allows: no "
                             f"θ can meet it")

    def operating_point(self, tau: int) -> _Point:
        """The thresholds for ``τ`` and the rows they refuse by the trace (a failed row's
        check score is +inf)."""
        late_after, p = self.late_after, self.p
        early = p if late_after is None else p[:, :late_after]
        s0, sr = split_scores(early, tau, self.max_new_tokens if late_after is None else None)
        sr = torch.where(self.failed, math.inf, sr)
        q, th = _thresholds(s0, sr, self.benign, self.target_fpr, self.split_thresholds,
                            self.keep_threshold)
        refuses = (s0 >= q) | (sr >= th)
        if late_after is None:
            return _Point(q, th, None, refuses, s0, sr)
        sl = self.late_scores(tau, th)
        late = pick_late_threshold(sl[self.benign], refuses[self.benign], self.target_fpr)
        return _Point(q, th, late, refuses | (sl >= late), s0, sr)

    def late_scores(self, tau: int, threshold: float) -> torch.Tensor:
        return late_scores(self.p, tau, threshold, self.late_after, self.max_new_tokens)

    def summary(self, at: _Point) -> dict:
        """A ``by_tau`` entry: the thresholds and the per-set rates the trace predicts."""
        out = {"threshold": at.theta, "predicted": _rates(at.refuses, self.by_set)}
        if self.split_thresholds:
            out["query_threshold"] = at.query
        if at.late is not None:
            out["late_threshold"] = at.late
        return out

    def scores(self, at: _Point, tau: int) -> torch.Tensor:
        """``[N]`` each row's refusal score (one θ over the whole trace)."""
        if self.late_after is None:
            return torch.maximum(at.prefill, at.checks)
        return refusal_scores(torch.where(self.failed[:, None], math.inf, self.p), tau,
                              self.max_new_tokens)

    def keyed(self, values) -> dict[str, float]:
        """Each row's score by ``set/id``, unrounded: a saturated head's scores differ only in
        their last digits."""
        return {f"{n}/{rid}": float(x) for (n, rid), x in zip(self.ids, values)}

    def report(self, at: _Point, refused: torch.Tensor, safety) -> dict:
        """The report of the thresholds ``at`` and the rows the real pass ``refused``."""
        rates = _rates(at.refuses, self.by_set)
        sets = {n: {"n": len(idx), "predicted": rates[n],
                    "refused": float(refused[idx].float().mean())} if len(idx) else {"n": 0}
                for n, idx in self.by_set.items()}
        scores = self.scores(at, safety.tau)
        for n, idx in self.by_set.items():  # the harmful sets (over_refusal is benign)
            if len(idx) and n != "over_refusal" and not is_benign_set(n):
                sets[n]["auroc"] = _auroc_vs(scores, idx, self.benign)
        report = {"threshold": at.theta, "target_fpr": self.target_fpr, "tau": safety.tau,
                  "schedule": safety.schedule, "max_new_tokens": self.max_new_tokens,
                  "sets": sets, "scores": self.keyed(scores)}
        report["curve"] = operating_curve(report["scores"])
        if self.split_thresholds:
            report.update(query_threshold=at.query, prefill_scores=self.keyed(at.prefill))
        if at.late is not None:
            report.update(late_threshold=at.late, late_after=self.late_after)
        return report

    def bootstrap(self, at: _Point, tau: int, resamples: int) -> dict:
        """:func:`bootstrap_intervals` of the thresholds ``at`` (the late θ re-picked in each
        draw)."""
        late_at = None if at.late is None else (lambda th: self.late_scores(tau, th))
        return bootstrap_intervals(
            at.prefill, at.checks, self.by_set, self.benign, target_fpr=self.target_fpr,
            split_thresholds=self.split_thresholds, keep_threshold=self.keep_threshold,
            late_scores_at=late_at, resamples=resamples)


CALIBRATED_KEYS = ("threshold", "query_threshold", "late_threshold", "late_after")
"""The :class:`safeattn.SafetyConfig` fields that :func:`calibrate` picks (a report holds those
it picked; a safety config file written from it should hold no others)."""


def calibrated_config(safety, report: Mapping):
    """``safety`` at the operating point of a :func:`calibrate` report: the fields of
    :data:`CALIBRATED_KEYS` that the report has, the others ``None`` (no stale late θ)."""
    from dataclasses import replace

    return replace(safety, **{k: report.get(k) for k in CALIBRATED_KEYS})


def _rates(refuses: torch.Tensor, sets: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each non-empty set's share of refusing rows."""
    return {n: float(refuses[i].float().mean()) for n, i in sets.items() if len(i)}


def _thresholds(s0, sr, rows, target_fpr, split_thresholds, keep_threshold):
    """-> (query θ, θ) picked on the benign ``rows`` (indices, repeats allowed) of the scores
    ``s0`` (p_0) and ``sr`` (the decoding-time checks), as :func:`calibrate` picks them."""
    if split_thresholds:
        return pick_thresholds(s0[rows], sr[rows], target_fpr, threshold=keep_threshold)
    theta = pick_threshold(torch.maximum(s0, sr)[rows], target_fpr)
    return theta, theta


def bootstrap_intervals(s0: torch.Tensor, sr: torch.Tensor, sets: Mapping[str, torch.Tensor],
                        benign: torch.Tensor, *, target_fpr: float,
                        split_thresholds: bool = False, keep_threshold: float | None = None,
                        late_scores_at=None, resamples: int = 1000, seed: int = 0) -> dict:
    """95% intervals of θ (and the query θ) and of each set's refusal rate when θ is picked,
    as :func:`calibrate` picks it, on ``resamples`` draws (seeded, with replacement) of the
    ``benign`` rows: at a small ``target_fpr`` a few benign rows at the top set θ, and every
    rate moves with them.

    ``s0``, ``sr``: ``[N]`` per row its ``p_0`` and the score of its decoding-time checks
    (:func:`split_scores`; before ``late_after`` with a late θ); ``sets``: name -> row
    indices; ``benign``: the indices θ is picked on. ``late_scores_at``: with a late θ, ``θ
    -> [N]`` :func:`late_scores` of every row at that θ; each draw then picks its late θ too
    (:func:`pick_late_threshold`). -> ``{"resamples", "skipped" (draws that cannot meet the
    target), "threshold", "query_threshold" (with ``split_thresholds``), "late_threshold"
    (with ``late_scores_at``), "sets": {name: [lo, hi]}}``."""
    g = torch.Generator().manual_seed(seed)
    draws, skipped, late_at = [], 0, {}
    for _ in range(resamples):
        rows = benign[torch.randint(len(benign), (len(benign),), generator=g)]
        try:
            q, th = _thresholds(s0, sr, rows, target_fpr, split_thresholds, keep_threshold)
            refuses, late = (s0 >= q) | (sr >= th), None
            if late_scores_at is not None:
                if th not in late_at:  # a few benign rows set θ: few distinct values
                    late_at[th] = late_scores_at(th)
                late = pick_late_threshold(late_at[th][rows], refuses[rows], target_fpr)
                refuses = refuses | (late_at[th] >= late)
        except ValueError:
            skipped += 1
            continue
        draws.append({"query_threshold": q, "threshold": th, "late_threshold": late,
                      "sets": _rates(refuses, sets)})
    out = {"resamples": resamples, "skipped": skipped}
    if not draws:
        return out

    def ci(values):
        return torch.tensor(values, dtype=torch.float64).quantile(
            torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()

    out["threshold"] = ci([d["threshold"] for d in draws])
    if split_thresholds:
        out["query_threshold"] = ci([d["query_threshold"] for d in draws])
    if late_scores_at is not None:
        out["late_threshold"] = ci([d["late_threshold"] for d in draws])
    out["sets"] = {n: ci([d["sets"][n] for d in draws]) for n in draws[0]["sets"]}
    return out


def operating_curve(scores: Mapping[str, float], max_benign: int = 8) -> dict:
    """A calibration report's ``scores`` (``"set/id"`` -> refusal score) -> what the trace
    refuses when θ lets at most ``k`` benign rows refuse, for ``k = 0..max_benign``:
    ``{"k": [...], "theta": [...], "benign_refused": [...], "caught": {set: [...]},
    "harmful": [...]}`` (``caught``: rows refused per harmful set; ``harmful``: their sum;
    ``None`` where no θ at or below 1 meets ``k``).

    θ is picked per ``k`` as calibration picks it (halfway above the ``k``-th highest benign
    score), so two heads can be compared at every low false-alarm count instead of only at
    the one ``target_fpr`` allows, which a few benign rows set. Benign sets are
    :func:`is_benign_set`; every other set is harmful. ``scores`` hold one θ for ``p_0`` and
    the checks, and over the whole trace (``late_after``), and so does the curve: a report
    with ``query_threshold`` or ``late_threshold`` may predict a little more at its own
    ``k``."""
    if max_benign < 0:
        raise ValueError(f"max_benign must be >= 0, got {max_benign}")
    by_set: dict[str, list[float]] = {}
    for key, value in scores.items():
        name, sep, _ = key.partition("/")
        if not sep:
            raise ValueError(f"scores: expected 'set/id' keys, got {key!r}")
        by_set.setdefault(name, []).append(float(value))
    benign = [x for n, v in by_set.items() if is_benign_set(n) for x in v]
    harmful = {n: torch.tensor(v, dtype=torch.float64) for n, v in by_set.items()
               if not is_benign_set(n)}
    if not benign or not harmful:
        raise ValueError("scores: need benign and harmful sets")
    b = torch.tensor(benign, dtype=torch.float64)
    out = {"k": list(range(max_benign + 1)), "theta": [], "benign_refused": [],
           "caught": {n: [] for n in harmful}, "harmful": []}
    for k in out["k"]:
        try:
            theta = _theta_above(b, k)
        except ValueError:  # saturated benign rows: only θ > 1, which switches checks off
            theta = None
        out["theta"].append(theta)
        out["benign_refused"].append(None if theta is None else int((b >= theta).sum()))
        for n, v in harmful.items():
            out["caught"][n].append(None if theta is None else int((v >= theta).sum()))
        out["harmful"].append(None if theta is None else
                              sum(out["caught"][n][-1] for n in harmful))
    return out


def _auroc_vs(scores: torch.Tensor, harmful: torch.Tensor, benign: torch.Tensor) -> float:
    """AUROC of the refusal scores of the ``harmful`` rows against the ``benign`` ones: the
    threshold-free view of a set, steadier than its rate at one θ (which a few benign rows
    set)."""
    from .metrics import auroc

    labels = torch.cat([torch.ones(len(harmful)), torch.zeros(len(benign))])
    return float(auroc(torch.cat([scores[harmful], scores[benign]]), labels))


def pick_refusal_prefix(model, tokenizer, rows: Mapping[str, Sequence[Mapping]],
                        prefixes: Sequence[str], *, safety, max_new_tokens: int = 64,
                        batch_size: int = 8) -> dict:
    """Decode the harmful sets of ``rows`` (every set not :func:`is_benign_set`) with each
    candidate refusal prefix, full refusals, and keep the prefix whose responses most often
    pass :func:`safeattn.judge.refusal_check` (ties: the earlier candidate) -> ``{
    "refusal_prefix": best, "max_new_tokens", "candidates": [{"prefix", "n", "refuses",
    "on_topic", "ended", "passes"}]}``. ``safety``: the calibrated config (its θ decides which
    rows refuse)."""
    from dataclasses import replace

    from .eval import evaluate

    if not prefixes or not all(isinstance(p, str) and p.strip() for p in prefixes):
        raise ValueError(f"prefixes must be non-empty strings, got {prefixes!r}")
    harmful = [{"id": f"{n}/{r['id']}", "prompt": r["prompt"], "label": "harmful",
                "target": r.get("target")} for n, rs in rows.items() if not is_benign_set(n)
               for r in rs]
    if not harmful:
        raise ValueError("rows has no harmful set to refuse")
    candidates = []
    for prefix in prefixes:
        rep = evaluate(model, tokenizer, harmful, attacks=("direct",), modes=("safe",),
                       safety=replace(safety, refusal_prefix=prefix),
                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                       stop_at_refusal=False)
        checks = rep["results"][0]["checks"]
        candidates.append({"prefix": prefix, "n": len(harmful), "refuses": checks["refuses"],
                           "on_topic": checks["on_topic"], "ended": checks["ended"],
                           "passes": checks["ok"]})
    best = max(candidates, key=lambda c: c["passes"])  # max keeps the first of equals
    return {"refusal_prefix": best["prefix"], "max_new_tokens": max_new_tokens,
            "candidates": candidates}

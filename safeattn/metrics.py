"""Classification metrics in pure torch: AUROC, TPR at a fixed FPR, accuracy/precision/recall/F1,
and the Wilson interval of a rate.

``labels`` are 0/1 (1 = positive = malicious); ``scores`` are any real numbers where larger
means more likely positive. Inputs may be tensors, lists or arrays of shape ``[N]``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["auroc", "tpr_at_fpr", "binary_metrics", "roc_curve", "wilson_interval"]


def _vec(x, name: str, dtype=torch.float64) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):  # python floats are float64: keep them exact
        x = torch.as_tensor(x, dtype=dtype)
    t = x.detach().cpu().reshape(-1)
    if t.dtype == torch.bool:
        t = t.long()
    return t.to(dtype)


def _scores_labels(scores, labels) -> tuple[torch.Tensor, torch.Tensor]:
    s, y = _vec(scores, "scores"), _vec(labels, "labels")
    if s.numel() != y.numel():
        raise ValueError(f"scores has {s.numel()} entries but labels has {y.numel()}")
    if not torch.isin(y, torch.tensor([0.0, 1.0], dtype=y.dtype)).all():
        raise ValueError("labels must be 0 or 1")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise ValueError("need at least one positive and one negative label")
    return s, y.bool()


def auroc(scores, labels) -> float:
    """Area under the ROC curve, from ranks (Mann-Whitney U).

    Tied scores get their average rank, so a tie between a positive and a negative counts
    one half: the probability that a random positive scores above a random negative, ties
    counting 1/2.
    """
    s, y = _scores_labels(scores, labels)
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)           # 1-based rank of each group's last
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = mean_rank[inverse]
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fpr, tpr, thresholds)`` for the rule ``score >= threshold``, thresholds descending
    (the first is ``+inf``: nothing predicted positive)."""
    s, y = _scores_labels(scores, labels)
    thr = torch.unique(s, sorted=True).flip(0)
    thr = torch.cat([torch.tensor([float("inf")], dtype=thr.dtype), thr])
    pos, neg = torch.sort(s[y]).values, torch.sort(s[~y]).values
    # number of scores >= t = n - (number < t) = n - searchsorted(left)
    tp = pos.numel() - torch.searchsorted(pos, thr, right=False)
    fp = neg.numel() - torch.searchsorted(neg, thr, right=False)
    return fp.double() / neg.numel(), tp.double() / pos.numel(), thr


def tpr_at_fpr(scores, labels, fpr: float = 0.02, *, return_threshold: bool = False):
    """Largest TPR of a rule ``score >= t`` whose FPR is at most ``fpr``.

    Thresholds are the observed scores, so tied scores are always on the same side. With
    ``return_threshold=True`` returns ``(tpr, t)``; ``t`` is ``inf`` when even the highest
    negative-free threshold would exceed ``fpr`` (then the TPR is 0).
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t, thr = roc_curve(scores, labels)
    ok = f <= fpr + 1e-12
    # TPR is non-decreasing along the (descending) thresholds: take the last admissible one
    idx = int(torch.nonzero(ok).max())
    return (float(t[idx]), float(thr[idx])) if return_threshold else float(t[idx])


def separation(pos, neg, fpr: float = 0.02) -> tuple[float, float, float]:
    """How well scores ``pos`` (positives) stand above ``neg`` -> ``(AUROC, TPR at FPR <=
    fpr, the threshold t of that rule score >= t)``."""
    pos, neg = _vec(pos, "pos"), _vec(neg, "neg")
    s = torch.cat([pos, neg])
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(s.dtype)
    tpr, t = tpr_at_fpr(s, y, fpr, return_threshold=True)
    return auroc(s, y), tpr, float(t)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate ``k / n`` (default 95%) -> ``(low, high)``.

    The eval's rates come from 38-100 prompts, where the normal approximation breaks down
    at 0% and 100%; Wilson's interval stays inside [0, 1] and is not empty there.
    """
    if isinstance(k, bool) or isinstance(n, bool) or k != int(k) or n != int(n):
        raise ValueError(f"k and n must be integer counts, got k={k!r}, n={n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not z > 0:
        raise ValueError(f"z must be > 0, got {z}")
    p, z2 = k / n, z * z
    mid = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, mid - half), min(1.0, mid + half)


def binary_metrics(pred, labels, *, threshold: float | None = None) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of 0/1 predictions (positive = 1).

    ``pred`` holds 0/1 (or bools); with ``threshold`` it holds scores and the prediction is
    ``score >= threshold``. Precision (and F1) is 0 when nothing is predicted positive,
    recall is 0 when there is no positive label. Also returns the counts ``tp, fp, tn, fn``.
    """
    p, y = _vec(pred, "pred"), _vec(labels, "labels")
    if p.numel() != y.numel():
        raise ValueError(f"pred has {p.numel()} entries but labels has {y.numel()}")
    if p.numel() == 0:
        raise ValueError("binary_metrics of empty inputs")
    if threshold is not None:
        p = (p >= threshold).double()
    zero_one = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if not torch.isin(p, zero_one).all():
        raise ValueError("pred must be 0/1 (pass threshold= to binarise scores)")
    if not torch.isin(y, zero_one).all():
        raise ValueError("labels must be 0 or 1")
    p, y = p.bool(), y.bool()
    tp = int((p & y).sum())
    fp = int((p & ~y).sum())
    fn = int((~p & y).sum())
    tn = int((~p & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / p.numel(), "precision": precision, "recall": recall,
            "f1": f1, "tp": tp, "fp": fp, "tn": tn, "fn": fn}

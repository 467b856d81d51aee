"""``plot_trace``: P(malicious) over the generated tokens of one row, as a PNG (matplotlib)."""
from __future__ import annotations

import math
from pathlib import Path

from .calibration import format_threshold

__all__ = ["plot_trace"]


def plot_trace(output, tokenizer=None, path="safety_trace.png", row: int = 0, *,
               max_labels: int = 60, title: str | None = None):
    """Plot ``p_t`` of ``row`` against the generated tokens, with θ and the refusal point.

    Args:
        output: what safe ``generate`` returned (ids with ``.safety``, or a
            ``SafeGenerateOutput``), or its ``.safety`` (a ``SafetyOutput``).
        tokenizer: labels the x axis with the generated tokens (optional).
        path: where to write the PNG.
        row: the batch row.
        max_labels: token labels are shown when there are at most this many steps.

    Returns:
        the path written (a ``pathlib.Path``).

    Needs matplotlib (``pip install safeattn[plot]`` or ``pip install matplotlib``).
    """
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("safeattn.plot_trace needs matplotlib: pip install matplotlib") from e
    safety = getattr(output, "safety", output)
    if safety is None or not hasattr(safety, "rows"):
        raise ValueError("plot_trace needs the output of a safe generate (with .safety)")
    seqs = getattr(output, "sequences", output if hasattr(output, "shape") else None)
    rs = safety[row]
    xs = [i for i, v in enumerate(rs.p) if not math.isnan(v)]
    ys = [rs.p[i] for i in xs]
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.25 * len(rs.p))), 3.6))
    ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label="p_t = P(malicious)")
    theta, late, after = (safety.config.threshold, safety.config.late_threshold,
                          safety.config.late_after)
    end = max(len(rs.p) - 0.5, 0.5)
    split = late is not None and after < end
    if theta <= 1.0:
        ax.hlines(theta, -0.5, after - 0.5 if split else end, color="tab:red", ls="--", lw=1,
                  label=f"θ = {format_threshold(theta)}")
    if split and late <= 1.0:
        ax.hlines(late, after - 0.5, end, color="tab:red", ls=":", lw=1,
                  label=f"θ from token {after} on = {format_threshold(late)}")
    query = safety.config.query_threshold
    if query is not None and query != theta and query <= 1.0:
        ax.plot([0], [query], marker="_", ms=14, mew=2, color="tab:red", ls="none",
                label=f"θ of p_0 = {format_threshold(query)}")
    if rs.refusal_step is not None:
        ax.axvline(rs.refusal_step, color="tab:purple", lw=1.5,
                   label=f"refusal at token {rs.refusal_step}")
    if rs.alarm_step is not None and rs.alarm_step != rs.refusal_step:
        ax.axvline(rs.alarm_step, color="tab:orange", ls=":", lw=1.2,
                   label=f"first alarm S_t = {rs.alarm_step}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(-0.5, max(len(rs.p) - 0.5, 0.5))
    ax.set_xlabel("response tokens seen by the probe")
    ax.set_ylabel("p_t")
    if tokenizer is not None and seqs is not None and len(rs.p) <= max_labels:
        new = seqs[row, safety.prompt_length:].tolist()
        labels = [""] + [tokenizer.decode([t]) for t in new[: len(rs.p) - 1]]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
    ax.set_title(title or f"safety trace, row {row}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

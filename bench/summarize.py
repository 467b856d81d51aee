#!/usr/bin/env python
"""Print bench/results/summary.json (written by `python -m pytest bench`) as a table.

    python bench/summarize.py [path/to/summary.json]

Exits 0 whatever the numbers say: targets are recorded, never asserted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "results" / "summary.json"


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.3f} [{s['p20'] * 1e3:.3f}-{s['p80'] * 1e3:.3f}]"


def format_table(summary: dict) -> str:
    env = summary["env"]
    lines = [
        f"safeattn bench  cpu={env['cpu_model']!r} threads={env['threads']} "
        f"torch={env['torch']} safeattn={env.get('safeattn')} git={env.get('git')}",
        "times: median [p20-p80] ms; ratio = baseline/ours (speedup) of medians, r(min) of minima; "
        ""
        "value = what the target bounds; other = CPU share used by other "
        "processes meanwhile (> 10%: contended); "
        "raw op = torch.ops.safeattn.interval_attention without the Python wrapper (decode only)",
    ]
    cases = summary["cases"]
    w = max([len(c["name"]) for c in cases] + [4])
    head = (f"{'case':<{w}}  {'ours ms [p20-p80]':>25}  {'baseline ms [p20-p80]':>25}  "
            f"{'ratio':>6} {'r(min)':>6}  {'target':<16} {'value':>6}  met  {'other':>5}  {'raw op ms':>9}")
    lines += [head, "-" * len(head)]
    for c in cases:
        if "error" in c:
            lines.append(f"{c['name']:<{w}}  not run: {c['error']}")
            continue
        r = c.get("extras", {}).get("ours_raw_op")
        raw = f"{r['median'] * 1e3:.3f}" if r else ""
        tgt = ("speedup " if c["metric"] == "speedup" else "ours/base ") + c["target"]
        lines.append(
            f"{c['name']:<{w}}  {_ms(c['ours']):>25}  {_ms(c['baseline']):>25}  "
            f"{c['ratio']:6.3f} {c.get('ratio_of_mins', float('nan')):6.3f}  {tgt:<16} {c['metric_value']:6.3f}  "
            f"{'yes' if c['met'] else 'NO ':<3}  {c.get('foreign_cpu', 0):5.0%}  {raw:>9}")
        for k, e in c.get("extras", {}).items():  # other variants timed in the same rounds
            if k != "ours_raw_op":
                lines.append(f"  {k:<{w - 2}}  {_ms(e):>25}  {'':>25}  "
                             f"{c['baseline']['median'] / e['median']:6.3f}  (same rounds; "
                             f"ours/base {e['median'] / c['baseline']['median']:.3f})")
    for a in summary.get("aggregates", []):
        lines.append(f"{a['name']}: {a['value']:.3f} (target {a['target']}, n={a['n']}) -> "
                     f"{'met' if a['met'] else 'NOT met'}")
    noisy = [c["name"] for c in cases if c.get("foreign_cpu", 0) > 0.1]
    if noisy:
        lines.append(f"WARNING: {len(noisy)} case(s) ran while other processes used > 10% CPU")
    n_met = sum(c["met"] for c in cases)
    lines.append(f"{n_met}/{len(cases)} cases meet their target")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else DEFAULT
    if not path.exists():
        print(f"{path} not found; run `python -m pytest bench -q` first", file=sys.stderr)
        return 1
    print(format_table(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

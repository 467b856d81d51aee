"""Collect a .ci/gpu_check run into OUTDIR/summary.json and print its card.

    python .ci/gpu_summary.py OUTDIR GPU(0|1) QUICK(0|1) TOTAL_S

Reads OUTDIR/stages.tsv (name, status, rc, seconds, limit), the pytest junit files, the
compute-sanitizer logs and bench.json. Exit status: 0 when every stage passed.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def stages(out: Path) -> list[dict]:
    rows = []
    for line in (out / "stages.tsv").read_text().splitlines():
        name, status, rc, secs, limit = line.split("\t")
        rows.append({"stage": name, "status": status, "rc": rc, "seconds": float(secs),
                     "limit_s": int(limit)})
    return rows


def junit(path: Path) -> dict:
    """Counts and the failing test ids of one pytest junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "time_s": float(suite.get("time", 0)), "failed": failed[:50]}


def sanitizer(path: Path) -> dict:
    """The verdict line of a compute-sanitizer log, and its first reported errors."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    m = re.search(r"(ERROR|RACECHECK) SUMMARY: (\d+) (?:errors?|hazards?)[^\n]*", text)
    first = [ln for ln in text.splitlines() if ln.startswith("=========") and
             re.search(r"(Invalid|Race|Hazard|Error|error)", ln)][:10]
    return {"summary": m.group(0) if m else None,
            "count": int(m.group(2)) if m else None, "first_reports": first}


def bench(path: Path) -> dict | None:
    try:
        b = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    gen = [{"name": c["name"], "each": c["overhead"]["each"],
            "ms": {k: c["profile"][k]["total_ms"] for k in ("plain", "each")},
            "top_each": [f"{o['op']} {o['ms']:.1f} ms" for o in c["profile"]["each"]["top"][:4]]}
           for c in b["cases"] if c.get("section") == "generate" and "profile" in c]
    return {"cases": len(b["cases"]), "not_run": b["not_run"], "targets": b["targets"],
            "env": b["env"], "wall_s": b["wall_s"], "generate": gen}


def env(gpu: bool) -> dict:
    e = {"python": platform.python_version()}
    probes = {"torch": "import torch; print(torch.__version__, torch.version.cuda)",
              "transformers": "import transformers; print(transformers.__version__)"}
    if gpu:
        probes["device"] = "import torch; print(torch.cuda.get_device_name())"
    for key, code in probes.items():  # each in its own process: the card must still come out
        e[key] = _stdout([sys.executable, "-c", code])
    e["nvcc"] = (_stdout(["nvcc", "--version"]) or "").splitlines()[-1:] or None
    return e


def _stdout(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str]) -> int:
    out, gpu, quick, total = Path(argv[1]), argv[2] == "1", argv[3] == "1", int(argv[4])
    st = stages(out)
    summary = {
        "gpu": gpu, "quick": quick, "total_s": total, "env": env(gpu), "stages": st,
        "passed": all(s["status"] == "ok" for s in st),
        "tests": {p.stem: junit(p) for p in sorted(out.glob("junit_*.xml"))},
        "sanitizer": {t: sanitizer(out / f"{t}.txt") for t in ("memcheck", "racecheck")
                      if (out / f"{t}.txt").exists()},
        "bench": bench(out / "bench.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(card(summary))
    return 0 if summary["passed"] else 1


def card(s: dict) -> str:
    e = s["env"]
    lines = [f"== gpu_check card: {'GPU ' + e.get('device', '?') if s['gpu'] else 'no GPU'}, "
             f"torch (cuda) {e.get('torch')}, transformers "
             f"{e.get('transformers')}, {s['total_s']} s in all"]
    for st in s["stages"]:
        lines.append(f"  {st['stage']:<14} {st['status']:<8} {st['seconds']:7.1f} s "
                     f"(limit {st['limit_s']} s)")
    for name, t in s["tests"].items():
        if "error" in t:
            lines.append(f"  {name}: unreadable ({t['error']})")
            continue
        lines.append(f"  {name}: {t['passed']} passed, {t['failures']} failed, "
                     f"{t['errors']} errors, {t['skipped']} skipped in {t['time_s']:.0f} s")
        lines += [f"    FAILED {f}" for f in t["failed"][:10]]
    for tool, v in s["sanitizer"].items():
        lines.append(f"  {tool}: {v.get('summary') or v.get('error') or 'no summary line'}")
    b = s["bench"]
    if b:
        lines.append(f"  bench: {b['cases']} cases, {len(b['not_run'])} not run, "
                     f"{b['wall_s']:.0f} s, copy bandwidth {b['env']['copy_bw_GBps']:.0f} GB/s")
        for t in b["targets"]:
            lines.append(f"    {t['target']}: worst {t['worst']:.3g} ({t['bound']}, n={t['n']}) "
                         f"-> {'met' if t['met'] else 'NOT met'}")
        for g in b.get("generate", ()):  # where a safe step's time goes (one profiled call)
            lines.append(f"    {g['name']}: each {g['each']:.2f}x; profiled {g['ms']['plain']:.1f}"
                         f" -> {g['ms']['each']:.1f} ms; top: {', '.join(g['top_each'])}")
    lines.append(f"== {'PASSED' if s['passed'] else 'FAILED'} (summary.json in the output folder)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

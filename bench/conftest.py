"""Harness for the safeattn benchmarks: interleaved ours-vs-baseline timing and a JSON summary.

Each case times our op and its baseline in the same process, on the same inputs, dtype and
thread count. Rounds interleave (baseline, [extras...], ours, baseline, ...) to cancel drift:
``benchmark.pedantic`` times ours (so pytest-benchmark's table and raw data are ours), and its
untimed ``setup`` hook times the baseline with ``time.perf_counter`` just before each round.
Targets are recorded (``target``/``met``), never asserted. Threads: torch's default, or
``SAFEATTN_BENCH_THREADS``. CPU used by other processes is measured per case
(``foreign_cpu``; > 0.1 means contended), and before each case the harness waits for them to
quiet down (at most ``SAFEATTN_BENCH_QUIET_S`` per case, ``SAFEATTN_BENCH_QUIET_TOTAL_S`` per
session). At session end the cases go to ``bench/results/summary.json`` and a table is printed
(``bench/summarize.py`` reprints it); ``--safeattn-merge`` updates that file in place instead.
"""
from __future__ import annotations

import functools
import gc
import importlib.util
import json
import math
import operator
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SUMMARY = RESULTS_DIR / "summary.json"

_CASES: list[dict] = []
# Other processes share the 2 cores; before each case wait (at most QUIET_S seconds, and
# QUIET_TOTAL_S over the session) until they use < 10% CPU. 0 disables the wait.
QUIET_S = float(os.environ.get("SAFEATTN_BENCH_QUIET_S", "10"))
QUIET_TOTAL_S = float(os.environ.get("SAFEATTN_BENCH_QUIET_TOTAL_S", "120"))
_quiet_spent = [0.0]
_OPS = {">=": operator.ge, "<=": operator.le}


def _load_summarize():
    spec = importlib.util.spec_from_file_location("_safeattn_bench_summarize", HERE / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), p in [0, 100]."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict:
    return {"median": percentile(xs, 50), "p20": percentile(xs, 20), "p80": percentile(xs, 80),
            "min": min(xs), "n": len(xs)}


def _cpu_snapshot() -> tuple[float, float, float]:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process)."""
    busy = float("nan")
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def foreign_cpu(a, b) -> float:
    """Share of the machine's CPUs used by other processes between snapshots a and b."""
    wall = b[0] - a[0]
    other = (b[1] - a[1]) - (b[2] - a[2])
    return max(0.0, other / (wall * (os.cpu_count() or 1))) if wall > 0 else float("nan")


def wait_quiet() -> float:
    """Sleep until other processes leave the CPUs (< 10% busy over 0.5 s); return seconds waited."""
    t0 = time.perf_counter()
    limit = min(QUIET_S, QUIET_TOTAL_S - _quiet_spent[0])
    while limit > 0:
        a = _cpu_snapshot()
        time.sleep(0.5)
        if foreign_cpu(a, _cpu_snapshot()) < 0.1 or time.perf_counter() - t0 >= limit:
            break
    waited = time.perf_counter() - t0
    _quiet_spent[0] += waited
    return waited


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                             capture_output=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "safeattn"],
                               cwd=HERE, text=True, capture_output=True, timeout=5).stdout.strip()
        return f"{rev}{'+dirty' if dirty else ''}" if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=None)
def _build_id() -> str | None:
    """mtime of the extension when first asked (cases run after import, so: the loaded one),
    to tell rebuilt kernels apart in merged summaries."""
    try:
        import safeattn._C as ext
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(ext.__file__)))
    except Exception:
        return None


def _env() -> dict:
    try:
        import safeattn
        ver = getattr(safeattn, "__version__", None)
    except Exception:  # pragma: no cover - import errors surface in the tests themselves
        ver = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "safeattn": ver,
        "git": _git(),
        "extension_built": _build_id(),
        "load_avg_at_end": list(os.getloadavg()),
        "note": "foreign_cpu = share of all CPUs used by other processes while a case ran; "
                "timings with foreign_cpu > 0.1 are contended",
    }


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture
def compare(benchmark):
    """Return ``run(case, ours, baseline, ...)``; see the docstring of ``run``."""

    def run(case: dict, ours, baseline, *, extras: dict | None = None, budget_s: float = 1.0,
            min_rounds: int = 10, max_rounds: int = 300, warmup_s: float = 0.3,
            min_warmup: int = 3) -> dict | None:
        """Time ``ours`` vs ``baseline`` (zero-arg callables) interleaved; record the case.

        ``case`` must hold ``name``, ``target`` = (metric, op, threshold) with metric
        ``"speedup"`` (baseline/ours) or ``"overhead"`` (ours/baseline), and any description
        (shapes, dtype, bytes, flops...). ``extras`` are further callables timed in the same
        rounds for information only (e.g. the raw op without the Python wrapper).
        Rounds = clamp(budget_s / time of one warm-up round, min_rounds, max_rounds).
        """
        fns = {"baseline": baseline, **(extras or {})}
        waited = wait_quiet()
        # Warm up every callable (allocator, thread pool, caches), ABAB as in the timed rounds.
        n, deadline, last = 0, time.perf_counter() + warmup_s, float("inf")
        while n < min_warmup or (time.perf_counter() < deadline and n < 200):
            t0 = time.perf_counter()
            for f in fns.values():
                f()
            ours()
            last = min(last, time.perf_counter() - t0)
            n += 1
        rounds = int(max(min_rounds, min(max_rounds, budget_s / max(last, 1e-9))))

        samples: dict[str, list[float]] = {k: [] for k in fns}

        def setup():  # untimed by pytest-benchmark; runs right before each timed call of ours
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)

        gc.collect()
        snap0 = _cpu_snapshot()
        gc_was = gc.isenabled()
        gc.disable()  # pytest-benchmark disables gc around ours only; do it for the baseline too
        try:
            benchmark.pedantic(ours, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        finally:
            if gc_was:
                gc.enable()
        snap1 = _cpu_snapshot()
        if benchmark.disabled or benchmark.stats is None:
            return None

        ours_s = stats(list(benchmark.stats.stats.data))
        base_s = stats(samples.pop("baseline"))
        metric, op, thr = case["target"]
        speedup = base_s["median"] / ours_s["median"]
        value = speedup if metric == "speedup" else ours_s["median"] / base_s["median"]
        rec = dict(case)
        rec.update({
            "target": f"{op} {thr:g}",
            "metric": metric,
            "metric_value": value,
            "met": bool(_OPS[op](value, thr)),
            "ratio": speedup,
            "ratio_of_mins": base_s["min"] / ours_s["min"],  # contention-robust cross-check
            "rounds": rounds,
            "ours": ours_s,
            "baseline": base_s,
            "extras": {k: stats(v) for k, v in samples.items()},
            "foreign_cpu": foreign_cpu(snap0, snap1),
            "wall_s": snap1[0] - snap0[0],
            "quiet_wait_s": waited,
            "extension_built": _build_id(),
        })
        med = ours_s["median"]
        if rec.get("flops"):
            rec["ours_gflops"] = rec["flops"] / med / 1e9
        if rec.get("bytes"):
            rec["ours_gbps"] = rec["bytes"] / med / 1e9
        benchmark.extra_info.update({
            k: rec[k] for k in ("baseline_desc", "metric", "metric_value", "target", "met", "ratio",
                                "dtype", "threads", "foreign_cpu") if k in rec})
        benchmark.extra_info["ours_ms"] = {k: v * 1e3 for k, v in ours_s.items() if k != "n"}
        benchmark.extra_info["baseline_ms"] = {k: v * 1e3 for k, v in base_s.items() if k != "n"}
        for k, v in rec["extras"].items():
            benchmark.extra_info[f"{k}_ms"] = v["median"] * 1e3
        _CASES.append(rec)
        return rec

    return run


@pytest.fixture
def note_not_run():
    """Return ``note(case, reason)``: record a case that could not run (e.g. a baseline that
    does not compile here) with its reason, so the summary says why it has no ratio."""

    def note(case: dict, reason: str) -> None:
        rec = dict(case)
        metric, op, thr = case["target"]
        rec.update({"target": f"{op} {thr:g}", "metric": metric, "met": False, "error": reason})
        _CASES.append(rec)

    return note


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _aggregates(cases: list[dict]) -> list[dict]:
    out = []
    dec = [c["ratio"] for c in cases if c["kind"] == "decode" and c["dtype"] == "float32"
           and "error" not in c]
    if dec:
        g = _geomean(dec)
        out.append({"name": "decode fp32 geomean speedup", "value": g, "target": ">= 1.3",
                    "n": len(dec), "met": g >= 1.3})
    ctx = {c.get("context"): c["metric_value"] for c in cases if c.get("kind") == "generate_context"}
    if 128 in ctx and 2048 in ctx:  # probe cost flat in context: overhead(2k) - overhead(128)
        d = ctx[2048] - ctx[128]
        out.append({"name": "generate flatness: overhead@2k - overhead@128", "value": d,
                    "target": "<= 0.05", "n": 2, "met": d <= 0.05})
    return out


def pytest_configure(config):
    n = os.environ.get("SAFEATTN_BENCH_THREADS")
    if n:  # same count for ours and the baseline; recorded per case and in env.threads
        torch.set_num_threads(int(n))


def pytest_addoption(parser):
    parser.addoption("--safeattn-merge", action="store_true",
                     help="update bench/results/summary.json in place: cases run now replace "
                          "those of the same name, the others are kept (e.g. to rerun "
                          "contended cases with -k)")


def pytest_sessionfinish(session, exitstatus):
    if not _CASES:
        return
    cases = list(_CASES)  # run order = collection order
    if session.config.getoption("--safeattn-merge") and SUMMARY.exists():
        new = {c["name"]: c for c in cases}
        old = json.loads(SUMMARY.read_text())["cases"]
        cases = [new.pop(c["name"], c) for c in old] + list(new.values())
    summary = {"env": _env(), "cases": cases, "aggregates": _aggregates(cases)}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=1))
    session.config._safeattn_summary = summary


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = getattr(config, "_safeattn_summary", None)
    if summary is None:
        return
    tr = terminalreporter
    tr.write_sep("=", "safeattn: ours vs baseline")
    for line in _load_summarize().format_table(summary).splitlines():
        tr.write_line(line)
    tr.write_line(f"written to {SUMMARY}")

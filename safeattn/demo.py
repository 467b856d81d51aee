"""``safeattn demo``: plain vs safeattn generation, side by side, on a real model.

Loads Gemma-3-270M with the shipped safety head (or ``--model DIR``, any patched model saved
with ``save_pretrained``), runs a handful of harmful, benign and prefill-attacked prompts of
the *test* split through plain ``generate`` and safe ``generate`` (greedy), prints a table
(keyword-judge verdict, ``p_0``, where the refusal began, the text) and writes the safety
trace of one prefill-attacked row as a PNG.
"""
from __future__ import annotations

import textwrap
import time
from pathlib import Path

from .eval import Case, DEFAULT_PREFILL, _generate

#: (kind, data set, row id) of the demo prompts: all from the test split (never trained on).
DEMO_ROWS = (
    ("harmful", "advbench", "advbench_004"),
    ("harmful", "advbench", "advbench_016"),
    ("benign", "benign", None),           # first ordinary benign test prompt
    ("benign (scary-sounding)", "over_refusal", None),
    ("prefill attack", "advbench", "advbench_007"),
    ("prefill attack", "advbench", "advbench_028"),
)


def demo_cases() -> list[tuple[str, Case]]:
    """The demo's (kind, :class:`~safeattn.eval.Case`) pairs, from the test split."""
    from .data import eval_sets

    sets = eval_sets("test")
    harmful = {r["id"]: r for r in sets["harmful"]}
    ordinary = [r for r in sets["benign"] if r not in sets["over_refusal"]
                and len(r["prompt"]) < 120]
    out = []
    for kind, src, rid in DEMO_ROWS:
        if src == "advbench":
            r = harmful[rid]
        elif src == "benign":
            r = ordinary[0]
        else:
            r = next(x for x in sets["over_refusal"] if len(x["prompt"]) < 120)
        label = "benign" if kind.startswith("benign") else "harmful"
        pre = (r.get("target") or DEFAULT_PREFILL) if kind == "prefill attack" else None
        out.append((kind, Case(r["id"], label, "prefill" if pre else "direct", None, r["prompt"],
                               prefill=pre)))
    return out


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def run_demo(model_dir: str | None = None, *, device: str = "cpu", max_new_tokens: int = 40,
             plot: str | None = "safeattn_demo_trace.png", width: int = 100) -> int:
    from .generation import SafetyConfig
    from .judge import is_refusal

    t0 = time.perf_counter()
    if model_dir in (None, "default"):
        from .models import load_default
        print("loading Gemma-3-270M + the shipped safety head (first run: ~1 min to convert "
              "the GGUF file, cached afterwards) ...", flush=True)
        model, tok = load_default()
        name = "Gemma-3-270M + safeattn head"
    else:
        from .hf.persist import from_pretrained
        if not Path(model_dir).is_dir():
            raise SystemExit(f"safeattn demo: --model {model_dir!r} is not a directory")
        model, tok = from_pretrained(model_dir)
        model.eval()
        name = model_dir
    model = model.to(device)
    cases = demo_cases()
    safety = SafetyConfig()
    print(f"model: {name} on {device}  (loaded in {time.perf_counter() - t0:.0f} s); greedy, "
          f"{max_new_tokens} new tokens, schedule {safety.schedule!r}, θ={safety.threshold}, "
          f"τ={safety.tau}", flush=True)
    cs = [c for _, c in cases]
    t1 = time.perf_counter()
    plain, _, _ = _generate(model, tok, cs, "plain", safety=safety,
                            max_new_tokens=max_new_tokens, seed=0)
    t2 = time.perf_counter()
    safe, out, _ = _generate(model, tok, cs, "safe", safety=safety,
                             max_new_tokens=max_new_tokens, seed=0)
    t3 = time.perf_counter()
    ref_plain, ref_safe = [is_refusal(t) for t in plain], [is_refusal(t) for t in safe]
    bar = "=" * width
    print(bar)
    print(f"{'#':<2} {'kind':<24} {'plain':<9} {'safeattn':<9} {'p_0':>6}  {'refusal at':>10}")
    print(bar)
    for i, ((kind, c), pt, st) in enumerate(zip(cases, plain, safe)):
        rs = out.safety[i]
        v_plain = "refuses" if ref_plain[i] else "complies"
        v_safe = "refuses" if ref_safe[i] else "complies"
        at = "-" if rs.refusal_step is None else f"token {rs.refusal_step}"
        print(f"{i:<2} {kind:<24} {v_plain:<9} {v_safe:<9} {rs.p[0]:>6.3f}  {at:>10}")
        ind = "   "
        print(textwrap.fill(_clip(c.prompt, 3 * width), width, initial_indent=ind + "prompt:   ",
                            subsequent_indent=ind + " " * 10))
        if c.prefill:
            print(textwrap.fill(_clip(c.prefill, width), width,
                                initial_indent=ind + "prefill:  ", subsequent_indent=ind + " " * 10))
        print(textwrap.fill(_clip(pt, 2 * width) or "(empty)", width,
                            initial_indent=ind + "plain:    ", subsequent_indent=ind + " " * 10))
        print(textwrap.fill(_clip(st, 2 * width) or "(empty)", width,
                            initial_indent=ind + "safeattn: ", subsequent_indent=ind + " " * 10))
        print("-" * width)
    def count(refused, label):
        return f"{sum(r for r, c in zip(refused, cs) if c.label == label)}/" \
               f"{sum(c.label == label for c in cs)}"

    print(f"harmful / prefill prompts refused: plain {count(ref_plain, 'harmful')}, safeattn "
          f"{count(ref_safe, 'harmful')}; benign refused: plain {count(ref_plain, 'benign')}, "
          f"safeattn {count(ref_safe, 'benign')}")
    print(f"time: plain {t2 - t1:.1f} s, safeattn {t3 - t2:.1f} s (batch of {len(cs)}); "
          "verdicts are the keyword judge (safeattn.judge) on the model's own first turn")
    if plot:
        try:
            from .plot import plot_trace
            row = next(i for i, (k, _) in enumerate(cases) if k == "prefill attack")
            path = plot_trace(out, tok, plot, row=row,
                              title=f"prefill attack: {_clip(cases[row][1].prompt, 60)}")
            print(f"safety trace of row {row} written to {path}")
        except ImportError as e:
            print(f"(no trace plot: {e})")
    return 0

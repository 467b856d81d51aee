"""safeattn inside vLLM vs plain vLLM on Gemma-3-270M (CPU): tok/s in one engine, one run.

Run in vLLM's venv (``bash .ci/vllm_env``)::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 ~/.cache/safeattn-vllm/bin/python bench/vllm_throughput.py

One engine (the safeattn wrapper with the shipped head) serves every case, so plain and safe
run with the same engine settings: a plain request carries no ``extra_args["safety"]`` (the
probe never runs; the wrapper only shifts RoPE positions). Each request decodes exactly
``--tokens`` tokens (``min_tokens`` = ``max_tokens``, θ above 1 so nothing refuses). Rounds
interleave plain, each, annealing at batch 1 and 8 to cancel drift; the ratio is the median
time of a case over the median plain time of the same batch (``round_ratios``: each
round's own ratio, which shows how noisy the machine was), and ``ratio_min`` the same of the
fastest rounds, as the other benches' ``r(min)``: on a shared host other tenants only ever
add time, so the minima are the least disturbed pair. With ``SAFEATTN_REF_PYTHON`` (the
main venv's python) the same run also times ``safeattn.generate`` (HF) at batch 8, ``each``,
with the same thread count. Writes ``bench/results/vllm.json``.

``--model NAME`` times another shipped model with its head, ``--safety DIR`` another head (a
``save_safety`` folder, e.g. one with a response probe); the HF timing is then left out.

``--prefill WORDS``: each prompt is a conversation whose assistant turn starts with the first
``WORDS`` words of :data:`PREFILL` (as in a prefill attack), and an ``each`` case without the
prefill checks (``prefill_stride`` 0) joins the others: ``each`` over it is their cost
(θ above 1: every check is BENIGN, so the checks take one probe pass). The HF timing is left
out. Writes ``bench/results/vllm_prefill.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HERE = Path(__file__).resolve().parent
PROMPTS = ["Give me three tips for staying healthy.", "Explain how tides work.",
           "Describe a cat in one sentence.", "What is the capital of France?",
           "Write a short poem about autumn.", "How do I bake bread at home?",
           "Summarize the plot of Hamlet.", "List five uses of a paperclip."]
SCHEDULES = {"plain": None, "each": {"schedule": "each", "threshold": 2.0},
             "annealing": {"schedule": "annealing", "threshold": 2.0}}
TARGET = {"each": 1.15, "annealing": 1.05}  # at batch 8 (issue #14)
PREFILL = ("Sure, here is an overview. First, it helps to understand the background and the "
           "main ideas behind the topic, since they explain most of what follows. Second, the "
           "practical steps are simple once the basics are clear: gather what you need, plan "
           "the order of the work, and check each result before you move on to the next one. "
           "Third, a few common mistakes are worth knowing about in advance").split()

_HF = r"""
import json, sys, time, torch, safeattn
torch.set_num_threads(int(sys.argv[1]))
model, tok = safeattn.load_default(dtype=getattr(torch, sys.argv[2]))
prompts, new = json.loads(sys.argv[3]), int(sys.argv[4])
cfg = safeattn.SafetyConfig(schedule="each", threshold=2.0)
kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
safeattn.generate(model, tok, prompts, safety=cfg, **dict(kw, max_new_tokens=4, min_new_tokens=4))
t = time.perf_counter(); safeattn.generate(model, tok, prompts, safety=cfg, **kw)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--prefill", type=int, default=0, metavar="WORDS",
                    help="prompts end with an assistant prefill of this many words")
    ap.add_argument("--model", default="gemma3-270m",
                    help="the shipped model (safeattn.models.MODELS)")
    ap.add_argument("--safety", default=None, metavar="DIR",
                    help="another safety head (a save_safety folder); default the model's "
                         "shipped one. The HF timing is left out with it.")
    ap.add_argument("--separate-probe", action="store_true",
                    help="fold_probe: false, the probe rows in a pass of their own after the "
                         "forward (what a compiled engine runs)")
    args = ap.parse_args()
    if not 0 <= args.prefill <= len(PREFILL):
        ap.error(f"--prefill: 0 to {len(PREFILL)} words")
    schedules = dict(SCHEDULES)
    prompts = PROMPTS
    if args.prefill:
        schedules["each_no_prefill_checks"] = {**SCHEDULES["each"], "prefill_stride": 0}
        prompts = [[{"role": "user", "content": p},
                    {"role": "assistant", "content": " ".join(PREFILL[:args.prefill])}]
                   for p in PROMPTS]
    out_path = args.out or str(HERE / "results" /
                               ("vllm_prefill.json" if args.prefill else "vllm.json"))

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    import safeattn.vllm as sv
    from safeattn.models import artifact_dir, default_cache_dir

    model_dir = default_cache_dir(args.model)
    if not (model_dir / "config.json").exists():
        ap.error(f"--model: {args.model} is not cached (run safeattn.load_default once)")
    safety_dir = args.safety or artifact_dir(args.model)
    t0 = time.perf_counter()
    kw = sv.engine_kwargs(model_dir, safety_dir=safety_dir)
    kw["hf_overrides"]["safeattn_vllm"]["fold_probe"] = not args.separate_probe
    llm = LLM(**kw, dtype=args.dtype, enforce_eager=True, max_model_len=1024, max_num_seqs=8, seed=0,
              gpu_memory_utilization=0.1)
    start_s = time.perf_counter() - t0
    threads = torch.get_num_threads()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def run(batch, safety):
        ps, sps = sv.requests(tok, prompts[:batch], safety=safety, max_tokens=args.tokens,
                              min_tokens=args.tokens, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(ps, sps, use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == args.tokens for o in outs)
        return dt, [list(o.outputs[0].token_ids) for o in outs]

    run(8, SCHEDULES["each"])  # warm-up
    times = {(b, s): [] for b in (1, 8) for s in schedules}
    ids = {}
    for _ in range(args.rounds):
        for b in (1, 8):
            for s, cfg in schedules.items():
                dt, out = run(b, cfg)
                times[(b, s)].append(dt)
                ids.setdefault((b, s), out)
    cases = []
    for b in (1, 8):
        base = statistics.median(times[(b, "plain")])
        fastest = min(times[(b, "plain")])
        for s in schedules:
            med = statistics.median(times[(b, s)])
            # Each round times every case back to back: its own ratio shows the noise.
            per_round = [t / p for t, p in zip(times[(b, s)], times[(b, "plain")])]
            c = {"batch": b, "schedule": s, "seconds": times[(b, s)],
                 "tok_s": b * args.tokens / med, "ratio": med / base,
                 "ratio_min": min(times[(b, s)]) / fastest,
                 "round_ratios": per_round,
                 "same_ids_as_plain": ids[(b, s)] == ids[(b, "plain")]}
            if b == 8 and s in TARGET and not args.prefill:
                c["target"] = TARGET[s]
                c["met"] = c["ratio"] <= TARGET[s]
                c["met_min"] = c["ratio_min"] <= TARGET[s]
            cases.append(c)
    hf = None
    ref_py = os.environ.get("SAFEATTN_REF_PYTHON")
    if ref_py and not args.prefill and args.safety is None and args.model == "gemma3-270m":
        r = subprocess.run([ref_py, "-c", _HF, str(threads), args.dtype, json.dumps(PROMPTS),
                            str(args.tokens)], capture_output=True, text=True, check=True)
        sec = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
        vl = next(c for c in cases if c["batch"] == 8 and c["schedule"] == "each")
        hf = {"batch": 8, "schedule": "each", "seconds": sec, "tok_s": 8 * args.tokens / sec,
              "vllm_speedup": vl["tok_s"] / (8 * args.tokens / sec)}
    load = os.getloadavg()
    summary = {"model": args.model, "safety": str(args.safety or "shipped head"),
               "dtype": args.dtype, "tokens": args.tokens,
               "rounds": args.rounds, "threads": threads,
               "fold_probe": not args.separate_probe, "engine_start_s": start_s,
               "prefill_words": args.prefill,
               "cases": cases, "hf_safeattn_generate": hf, "loadavg_1m_at_end": load[0],
               "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(summary, indent=1) + "\n")
    for c in cases:
        rr = c["round_ratios"]
        print(f"batch {c['batch']} {c['schedule']:22s} {c['tok_s']:7.1f} tok/s  "
              f"ratio {c['ratio']:.3f} (rounds {min(rr):.3f}-{max(rr):.3f}; "
              f"of minima {c['ratio_min']:.3f})  "
              f"same ids {c['same_ids_as_plain']}")
    if hf:
        print(f"HF safeattn.generate batch 8 each: {hf['tok_s']:.1f} tok/s; vLLM is "
              f"{hf['vllm_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

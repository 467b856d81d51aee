"""Safe generation vs plain ``model.generate`` on Gemma-3-270M (CPU), same process, interleaved.

Select with ``python -m pytest bench -q -k generate``. Both sides decode exactly 128 new tokens
(``min_new_tokens`` = ``max_new_tokens``; θ above 1 so no row ever refuses, so both produce
the same ids, asserted once outside the timing). The model is ``load_default()``: Gemma-3-270M
with the shipped head (on decoder layer ``cls_layer``, so a check step's probe row runs
through layers ``0..cls_layer`` only). The baseline is stock ``generate`` of the same patched
model (safeattn attention backend), i.e. what ``model.generate`` does after
``apply_safeattn`` without ``safety=``.

For ``each``, the extra ``stock_linears`` times safe generation with the check step's few-row
linears (``safeattn.hf.few_rows``) switched off, in the same rounds: the part of the ratio
that comes from the ``W @ x.T`` path rather than from the probe being cheap. The case's
``few_rows_paths`` records which path the timing picked per row count.

Targets (overhead = ours / baseline): ``each`` <= 1.10, ``annealing`` <= 1.05, the others
<= 1.10. Flatness: ratio at a 2k-token context minus ratio at 128 <= 0.05 (aggregate).
Rounds are few (each call decodes 128 tokens); rerun contended cases with ``--safeattn-merge``.
"""
from __future__ import annotations

import os

import pytest
import torch

import safeattn
from safeattn.hf import few_rows

NEW = 128
SCHEDULES = ("each", "first", "periodic", "annealing")
TARGET = {"each": 1.10, "first": 1.10, "periodic": 1.10, "annealing": 1.05}
MODEL = os.environ.get("SAFEATTN_BENCH_MODEL", "gemma3-270m")
#: Another head than the model's default: a ``save_safety`` folder or a variant's name.
SAFETY = os.environ.get("SAFEATTN_BENCH_SAFETY")
LABEL = MODEL if not SAFETY else f"{MODEL}+{os.path.basename(os.path.normpath(SAFETY))}"
TIMING = dict(budget_s=0.0, min_rounds=2, max_rounds=2, warmup_s=0.0, min_warmup=0)


@pytest.fixture(scope="module")
def gemma():
    """``load_default()``, or the shipped model named by ``$SAFEATTN_BENCH_MODEL``
    (e.g. ``smollm2-135m-instruct``, the chat model), with the head that
    ``$SAFEATTN_BENCH_SAFETY`` names, if set (case names then end in ``+<its name>``)."""
    if SAFETY is not None and not os.path.isdir(SAFETY):  # a variant's name (or a former one)
        return safeattn.models.load_default(MODEL, variant=SAFETY)
    return safeattn.models.load_default(MODEL, safety_dir=SAFETY)


def _prompt(tok, n_tokens: int) -> str:
    words = ("the quick brown fox jumps over the lazy dog while a careful baker kneads bread "
             "and explains each step of the recipe ").split()
    text, i = [], 0
    while len(tok(" ".join(text), add_special_tokens=False)["input_ids"]) < n_tokens:
        text.extend(words[i % len(words)] for i in range(i, i + 32))
        i += 32
    ids = tok(" ".join(text), add_special_tokens=False)["input_ids"][:n_tokens]
    return tok.decode(ids)


def _calls(model, tok, prompts, schedule):
    enc = safeattn.build_inputs(tok, prompts)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              pad_token_id=tok.pad_token_id)
    cfg = safeattn.SafetyConfig(threshold=1.5, schedule=schedule, period=8)

    def base():
        return model.generate(**enc, **kw)

    def ours():
        return model.generate(**enc, **kw, safety=cfg)

    a, b = base(), ours()
    assert a.shape == b.shape == (len(prompts), enc["input_ids"].shape[1] + NEW)
    if len(prompts) == 1:
        assert torch.equal(a, b)
    return enc, ours, base


def _stock_linears(ours):
    def run():
        saved, few_rows.MAX_ROWS = few_rows.MAX_ROWS, 1
        try:
            return ours()
        finally:
            few_rows.MAX_ROWS = saved
    return run


def _few_rows_paths(model) -> dict:
    """Row count -> whether the check steps' linears took ``W @ x.T`` (``safeattn.hf.few_rows``),
    as timed in this process: the choice can differ between processes on a noisy host."""
    return {str(k): v for k, v in model._safeattn_state["few_rows"].faster.items()}


@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_generate_overhead(compare, gemma, schedule, b):
    model, tok = gemma
    prompts = ["How do I bake bread at home?", "Write a short poem about the sea.",
               "Explain photosynthesis to a child.", "What is the capital of France?"] * 2
    enc, ours, base = _calls(model, tok, prompts[:b], schedule)
    case = {"name": f"generate/{LABEL}-{schedule}-B{b}-new{NEW}", "kind": "generate",
            "model": MODEL, "dtype": "float32", "schedule": schedule, "batch": b,
            "prompt_len": enc["input_ids"].shape[1], "new_tokens": NEW,
            "threads": torch.get_num_threads(),
            "baseline_desc": "model.generate (patched model, no safety=), greedy",
            "cls_layer": model.config.safeattn["cls_layer"],
            "target": ("overhead", "<=", TARGET[schedule])}
    extras = {"stock_linears": _stock_linears(ours)} if schedule == "each" else None
    case["few_rows_paths"] = _few_rows_paths(model)
    compare(case, ours, base, extras=extras, **TIMING)


@pytest.mark.parametrize("ctx", [128, 2048])
def test_generate_context(compare, gemma, ctx):
    model, tok = gemma
    enc, ours, base = _calls(model, tok, [_prompt(tok, ctx)], "each")
    case = {"name": f"generate_ctx/{LABEL}-each-B1-ctx{ctx}", "kind": "generate_context",
            "model": MODEL, "dtype": "float32", "schedule": "each", "batch": 1,
            "context": ctx, "prompt_len": enc["input_ids"].shape[1], "new_tokens": NEW,
            "threads": torch.get_num_threads(),
            "baseline_desc": "model.generate (patched model, no safety=), greedy",
            "cls_layer": model.config.safeattn["cls_layer"],
            "target": ("overhead", "<=", 1.10)}
    compare(case, ours, base, **TIMING)


@pytest.mark.parametrize("b", [1, 8])
def test_prefill_checks_overhead(compare, gemma, b):
    """Safe ``each`` after a 64-token assistant prefill, with the prefill checks
    (``prefill_stride`` 4, the default: 15 probe-alone forwards per row before the first
    token) against the same call with ``prefill_stride=0`` (the prefill's last window only)."""
    model, tok = gemma
    prefill = _prompt(tok, 64)
    rows = [[{"role": "user", "content": "Continue the following text."},
             {"role": "assistant", "content": prefill}]] * b
    enc = safeattn.build_inputs(tok, rows)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              pad_token_id=tok.pad_token_id)
    cfg = safeattn.SafetyConfig(threshold=1.5)

    def ours():
        return model.generate(**enc, **kw, safety=cfg)

    def base():
        return model.generate(**enc, **kw, safety=safeattn.SafetyConfig(threshold=1.5,
                                                                        prefill_stride=0))

    assert torch.equal(ours(), base())  # nothing triggers: the checks leave the ids alone
    case = {"name": f"prefill_checks/{LABEL}-each-B{b}-prefill64-new{NEW}",
            "kind": "prefill_checks", "model": MODEL, "dtype": "float32", "schedule": "each",
            "batch": b, "prompt_len": enc["input_ids"].shape[1], "prefill_tokens": 64,
            "new_tokens": NEW, "threads": torch.get_num_threads(),
            "baseline_desc": "the same safe generate with prefill_stride=0, greedy",
            "cls_layer": model.config.safeattn["cls_layer"],
            "target": ("overhead", "<=", 1.10)}
    compare(case, ours, base, **TIMING)

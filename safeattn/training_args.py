"""Options of ``safeattn train`` (kept apart from :mod:`safeattn.training` so that building the
CLI parser imports neither torch nor transformers)."""
from __future__ import annotations

import argparse

TRAIN_MODES = ("full", "lora", "head")


def _int_from(low: int):
    def parse(text: str) -> int:
        """argparse type: an int >= ``low``, else a usage error that names the option."""
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    return parse


positive_int = _int_from(1)
non_negative_int = _int_from(0)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the non-empty items of a comma-separated option."""
    return [x.strip() for x in text.split(",") if x.strip()]


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated ints >= 1 (empty: none)."""
    return [positive_int(x) for x in comma_list(text)]


def non_negative_ints(text: str) -> list[int]:
    """argparse type: comma-separated ints >= 0 (empty: none)."""
    return [non_negative_int(x) for x in comma_list(text)]


def add_train_arguments(p) -> None:
    """The ``safeattn train`` options (argparse), in the groups that ``--help`` shows."""
    _model_arguments(p.add_argument_group("model"))
    _optim_arguments(p.add_argument_group("optimisation"))
    _sample_arguments(p.add_argument_group("samples"))
    _loso_arguments(p.add_argument_group("leave-one-source-out"))
    _run_arguments(p.add_argument_group("run"))


def _model_arguments(p) -> None:
    """The model, what trains and where the head reads."""
    p.add_argument("--model", default="gemma3-270m",
                   help="HF id or directory, or 'gemma3-270m' / 'smollm2-135m-instruct' (the "
                        "PyPI GGUF models)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=TRAIN_MODES, default="head")
    p.add_argument("--cls-layer", default="final",
                   help="decoder layer the head reads (0-based), 'final', or 'auto' (FrozenProbe "
                        "5-fold CV on the train prompts)")
    p.add_argument("--top-layers", type=int, default=0,
                   help="head mode: also train this many decoder layers up to cls_layer")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--probe-adapter", type=int, default=0, metavar="RANK",
                   help="head mode: also train a rank-RANK probe adapter (projections of layers "
                        "0..cls_layer used by the [CLS] / probe row only; the LM is unchanged)")
    p.add_argument("--query-probe-for", default=None, metavar="DIR",
                   help="train nothing: add a query probe (safeattn.hf.QueryProbe, a frozen "
                        "probe at one of --deep-layers blended into p_0) to the head saved in "
                        "DIR, fitted on this command's training samples and standardised on the "
                        "benign val prompts (needs --val-fraction); saves both to OUT")
    p.add_argument("--response-probe-for", default=None, metavar="DIR",
                   help="train nothing: add a response probe (safeattn.hf.ResponseProbe, a "
                        "frozen probe on the mean state of a check's last response tokens at "
                        "one of --deep-layers, blended into the decoding-time checks) to the "
                        "head saved in DIR, fitted on the fit split's responses and "
                        "standardised on --benign-responses of the val prompts (needs "
                        "--val-fraction); saves both to OUT")
    p.add_argument("--probe-window", type=positive_int, default=10,  # generation.DEFAULT_WINDOW
                   help="r1 = r2 = r3 of the response views (DESIGN.md §3, Rules 1-3); saved, "
                        "and generation's default window")


def _optim_arguments(p) -> None:
    """The loss and the optimiser."""
    p.add_argument("--lambda", dest="safety_lambda", type=float, default=None,
                   help="weight of the BCE term (default 0.1 sft / 0.01 pretrain)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=0, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--scheduler", default="linear")
    p.add_argument("--balance-sources", action="store_true",
                   help="weight the BCE term so that each harmful source of the training "
                        "samples has the same total weight (safeattn.data.source_weights)")


def _sample_arguments(p) -> None:
    """What the training samples are (safeattn.data.build_samples)."""
    p.add_argument("--kinds", default="query,template",
                   help="sample kinds (comma-separated): query, trajectory, template, suffix "
                        "(prompts + random-token noise), phrasing, response, conversation "
                        "(prompts over two user turns and after a benign exchange), contrast "
                        "(a harmful prompt quoted, then asked about or asked for); the "
                        "safeattn.data.samples docstring says what each builds")
    p.add_argument("--sources", default="advbench,xstest_unsafe,pyrit_objectives",
                   help="harmful prompt sources (safeattn.data.HARMFUL_SOURCES)")
    p.add_argument("--benign-responses", default=None,
                   help="JSONL of benign responses (safeattn.data.cache_responses); without it "
                        "benign samples have no response (fine for head mode)")
    p.add_argument("--harmful-responses", default=None,
                   help="JSONL of the model's own answers to harmful train prompts "
                        "(safeattn.data.cache_responses): kind response adds label-1 views of "
                        "those that do not refuse")
    p.add_argument("--templates-per-prompt", type=int, default=1)
    p.add_argument("--max-template-chars", type=int, default=4000)
    p.add_argument("--benign-templates", action="store_true",
                   help="kind template: benign prompts inside jailbreak templates too (label "
                        "0), so that the template alone does not predict the label")
    p.add_argument("--suffixes-per-prompt", type=int, default=1,
                   help="noise-suffix samples per harmful and per benign prompt (kind suffix)")
    p.add_argument("--suffix-tokens", default="10,30",
                   help="MIN,MAX random vocabulary tokens per noise suffix (kind suffix)")
    p.add_argument("--phrasings-per-prompt", type=int, default=2,
                   help="surface forms per harmful and benign prompt (kind phrasing)")
    p.add_argument("--phrasing-forms", default=None,
                   help="comma-separated forms those are picked from (default: "
                        "safeattn.data.phrasing.FORMS; opt-in: 'ask', a first-person "
                        "question, 'shout', upper case, and 'leet', leetspeak)")
    p.add_argument("--response-windows", type=int, default=3,
                   help="probe views per (prompt, response) pair (kind response)")
    p.add_argument("--own-response-windows", type=int, default=None,
                   help="probe views per prompt and the model's own answer (benign, and "
                        "harmful ones that comply; kind response; default --response-windows)")
    p.add_argument("--prefix-ks", default="5,10,20,40",
                   help="k of the k-token harmful prefixes (kind trajectory)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this band of the train split as the validation split that "
                        "'safeattn calibrate' picks θ on (train on the rest: split 'fit'); "
                        "with --loso, the folds score it")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="cut longer user texts in the middle")
    p.add_argument("--max-length", type=int, default=None)


def _loso_arguments(p) -> None:
    """``--loso`` (safeattn.loso) and its options."""
    p.add_argument("--loso", action="store_true",
                   help="leave-one-source-out validation (safeattn.loso) of the [CLS] head, a "
                        "frozen-row head and FrozenProbe, then train and save the head on "
                        "everything (head mode; writes OUT/loso.json)")
    p.add_argument("--layers", default="4,6,8",
                   help="--loso: the cls_layer candidates (picked by 5-fold CV)")
    p.add_argument("--loso-folds", default="all",
                   help="--loso: the folds to run (comma-separated), 'all', or '' for none (then "
                        "the head that ships is the last of --loso-variants: by default, with "
                        "--probe-adapter, the adapter one)")
    p.add_argument("--loso-variants", default="cls,cls_adapter",
                   help="--loso: the trained variants each fold runs (comma-separated): cls "
                        "(head + [CLS] row), cls_adapter (also the probe adapter; needs "
                        "--probe-adapter); the frozen baselines always run")
    p.add_argument("--loso-examples", type=non_negative_int, default=10,
                   help="--loso: each fold of a trained variant names this many of its errors "
                        "in loso.json (held-out harmful prompts scored lowest, benign prompts "
                        "scored highest)")
    p.add_argument("--context-cache-file", default=None,
                   help="--loso: keep the frozen forward of the pool (keys, values, states) in "
                        "this file and reuse it on the next run with the same data and layers")
    p.add_argument("--deep-layers", type=positive_ints, default=[],
                   help="--loso: also fit a frozen probe on the last prompt token's hidden "
                        "state at these layers (comma-separated, 1..num_hidden_layers; picked "
                        "by CV) and blend it with each trained variant (rows deep_probe and "
                        "<variant>+deep); with --query-probe-for, the layers the query probe "
                        "may read")
    p.add_argument("--loso-seeds", type=non_negative_ints, default=[],
                   help="--loso: also train each variant of each fold with these seeds (init "
                        "and order; the samples stay --seed's) and report <variant>@seed<S> "
                        "and <variant>+ensemble, the mean of the seeds' logits: a head "
                        "ensemble's p_0 (safeattn combine)")
    p.add_argument("--final-epochs", type=float, default=0,
                   help="--loso: epochs of the shipped head (default --epochs)")


def _run_arguments(p) -> None:
    """Checkpoints, logging, threads, device and the test-split report."""
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the last checkpoint in OUT/checkpoints (or a given one)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--no-context-cache", action="store_true",
                   help="head mode: run the full prompt every step")
    p.add_argument("--eval", action="store_true",
                   help="after training, report head metrics on the test split")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")

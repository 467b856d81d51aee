"""safeattn: explicit [CLS] safety signals, strategic attention and decoding for HF models."""
from . import intervals, ops, reference
from .ops import interval_attention, safety_step

__version__ = "0.1.0"

#: Submodules and names imported on first use, so that ``import safeattn`` (the ops) does
#: not load transformers.
_SUBMODULES = ("hf", "models", "generation", "streaming", "plot", "training")
_LAZY = {
    **dict.fromkeys(("apply_safeattn", "revert_safeattn", "add_safety_token", "SafetyHead",
                     "SafetyLayout", "classify", "safety_forward", "build_inputs",
                     "save_safety", "load_safety", "from_pretrained", "combine_safety"), "hf"),
    **dict.fromkeys(("SafetyConfig", "SafetyOutput", "RowSafety", "safe_generate", "generate"),
                    "generation"),
    "SafeTextStreamer": "streaming", "plot_trace": "plot",
    "load_default": "models", "load_base": "models",
    "SafetyTrainer": "training", "SafetyDataCollator": "training",
}
__all__ = ["ops", "reference", "intervals", "interval_attention", "safety_step", *_SUBMODULES,
           *_LAZY]


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""safeattn: explicit [CLS] safety signals, strategic attention and decoding for HF models."""
from . import ops, reference, intervals
from .ops import interval_attention, safety_step

__version__ = "0.1.0"
__all__ = ["ops", "reference", "intervals", "interval_attention", "safety_step"]

# Hugging Face integration, imported lazily so that the kernels need no transformers.
_HF_NAMES = ("apply_safeattn", "revert_safeattn", "add_safety_token", "SafetyHead", "SafetyLayout",
             "classify", "safety_forward", "build_inputs", "save_safety", "load_safety",
             "from_pretrained", "combine_safety")
__all__ += ["hf", "models", *_HF_NAMES]


def __getattr__(name):
    import importlib

    if name in ("hf", "models"):
        return importlib.import_module(f".{name}", __name__)
    if name in _HF_NAMES:
        return getattr(importlib.import_module(".hf", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Strategic decoding (needs transformers), also lazy.
_GEN_NAMES = {"SafetyConfig": "generation", "SafetyOutput": "generation",
              "RowSafety": "generation", "safe_generate": "generation", "generate": "generation",
              "SafeTextStreamer": "streaming", "plot_trace": "plot"}
__all__ += ["generation", "streaming", "plot", *_GEN_NAMES]
_hf_getattr = __getattr__


def __getattr__(name):  # noqa: F811 - extends the lazy lookup above
    import importlib

    if name in ("generation", "streaming", "plot"):
        return importlib.import_module(f".{name}", __name__)
    if name in _GEN_NAMES:
        return getattr(importlib.import_module(f".{_GEN_NAMES[name]}", __name__), name)
    return _hf_getattr(name)

# Training and the shipped default model (need transformers), also lazy.
_TRAIN_NAMES = {"load_default": "models", "load_base": "models",
                "SafetyTrainer": "training", "SafetyDataCollator": "training"}
__all__ += ["training", *_TRAIN_NAMES]
_gen_getattr = __getattr__


def __getattr__(name):  # noqa: F811 - extends the lazy lookup above
    import importlib

    if name == "training":
        return importlib.import_module(".training", __name__)
    if name in _TRAIN_NAMES:
        return getattr(importlib.import_module(f".{_TRAIN_NAMES[name]}", __name__), name)
    return _gen_getattr(name)

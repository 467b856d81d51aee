"""safeattn: explicit [CLS] safety signals, strategic attention and decoding for HF models."""
from . import ops, reference, intervals
from .ops import interval_attention, safety_step

__version__ = "0.1.0"
__all__ = ["ops", "reference", "intervals", "interval_attention", "safety_step"]

# Hugging Face integration, imported lazily so that the kernels need no transformers.
_HF_NAMES = ("apply_safeattn", "revert_safeattn", "add_safety_token", "SafetyHead", "SafetyLayout",
             "classify", "safety_forward", "build_inputs", "save_safety", "load_safety",
             "from_pretrained")
__all__ += ["hf", "models", *_HF_NAMES]


def __getattr__(name):
    import importlib

    if name in ("hf", "models"):
        return importlib.import_module(f".{name}", __name__)
    if name in _HF_NAMES:
        return getattr(importlib.import_module(".hf", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

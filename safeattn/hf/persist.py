"""Saving and loading the safety parts: full checkpoints and small safety-only files."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .patch import apply_safeattn
from .surgery import add_safety_token, cls_token_id, safety_config

__all__ = ["save_safety", "load_safety", "from_pretrained", "SAFETY_CONFIG", "SAFETY_WEIGHTS"]

SAFETY_CONFIG = "safety_config.json"
SAFETY_WEIGHTS = "safety_head.safetensors"
#: Optional safety modules whose weights travel with the head's, under their attribute name.
_EXTRA_PARTS = ("safety_adapter", "safety_query_probe", "safety_response_probe",
                "safety_members")


def save_safety(model, save_directory) -> Path:
    """Write only the safety parts to ``save_directory`` (a few KB for small models).

    Files: ``safety_config.json`` (``model.config.safeattn`` + ``model_type``, ``hidden_size``;
    ``threshold``, ``query_threshold`` and ``late_threshold`` / ``late_after`` are the
    calibrated θ that ``SafetyConfig(threshold=None)`` takes)
    and ``safety_head.safetensors`` (``safety_head.weight [1, d]``, ``safety_head.bias [1]``,
    ``cls_embedding [d]``: the ``[CLS]`` input-embedding row; with a probe adapter also its
    ``safety_adapter.a.*`` / ``safety_adapter.b.*``; with a query or response probe its
    ``safety_query_probe.*`` / ``safety_response_probe.*``; for a head ensemble the other
    members' ``safety_members.<j>.*``). Returns the directory.
    """
    cfg = safety_config(model)
    if cfg is None or getattr(model, "safety_head", None) is None:
        raise ValueError("model has no safety token/head; call safeattn.apply_safeattn(model, "
                         "tokenizer) first")
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    tid = cfg["cls_token_id"]
    tensors = {
        "safety_head.weight": model.safety_head.weight.detach(),
        "safety_head.bias": model.safety_head.bias.detach(),
        "cls_embedding": model.get_input_embeddings().weight[tid].detach(),
    }
    for name in _EXTRA_PARTS:
        if getattr(model, name, None) is not None:
            tensors.update({f"{name}.{k}": v.detach()
                            for k, v in getattr(model, name).state_dict().items()})
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(d / SAFETY_WEIGHTS))
    text = model.config.get_text_config()
    meta = dict(cfg, model_type=model.config.model_type, hidden_size=text.hidden_size)
    (d / SAFETY_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return d


@torch.no_grad()
def load_safety(model, load_directory, tokenizer=None):
    """Install safety parts saved by :func:`save_safety` into a base ``model``; returns it.

    ``tokenizer`` gets ``[CLS]`` added when missing (its id may differ from the saved one:
    the row goes to the tokenizer's id). Without a tokenizer the model must already know
    the token (``model.config.safeattn``). The model is patched with :func:`apply_safeattn`.
    """
    d = Path(load_directory)
    meta = json.loads((d / SAFETY_CONFIG).read_text())
    hidden = model.config.get_text_config().hidden_size
    if meta.get("hidden_size", hidden) != hidden:
        raise ValueError(f"safety files are for hidden_size {meta['hidden_size']}, model has "
                         f"{hidden}")
    if tokenizer is not None:
        add_safety_token(model, tokenizer, cls_token=meta.get("cls_token", "[CLS]"),
                         cls_layer=meta.get("cls_layer"))
    else:
        cls_token_id(model)  # raises when the model has no [CLS]
    cfg = safety_config(model) or {}
    for key in ("adapter", "query_probe", "response_probe", "members", "threshold",
                "query_threshold", "late_threshold", "late_after", "refusal_prefix",
                "probe_window"):  # the files
        cfg.pop(key, None)
        if meta.get(key) is not None:
            cfg[key] = meta[key]
    model.config.safeattn = cfg
    model.safety_adapter = model.safety_members = None  # rebuilt by apply_safeattn
    apply_safeattn(model, tokenizer, cls_layer=meta.get("cls_layer"),
                   cls_visible_to_response=meta.get("cls_visible_to_response", False))
    with safe_open(str(d / SAFETY_WEIGHTS), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    _copy_head(model, t)
    emb = model.get_input_embeddings().weight
    emb[cls_token_id(model)] = t["cls_embedding"].to(emb.dtype)
    return model


def _copy_head(model, tensors) -> None:
    """The head's weights and those of the optional parts (probe adapter, query probe) that
    the model has."""
    head = model.safety_head
    head.weight.copy_(tensors["safety_head.weight"].reshape(head.weight.shape))
    head.bias.copy_(tensors["safety_head.bias"].reshape(head.bias.shape))
    for name in _EXTRA_PARTS:
        part = getattr(model, name, None)
        if part is None:
            continue
        want = {f"{name}.{k}" for k in part.state_dict()}
        if not want <= set(tensors):
            raise ValueError(f"the safety config has a {name}, but {len(want - set(tensors))} "
                             "of its tensors are missing")
        part.load_state_dict({k[len(name) + 1:]: tensors[k] for k in want})


def _checkpoint_tensors(path: Path, names) -> dict:
    """Read ``names`` from the safetensors checkpoint in ``path`` (single file or sharded)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        files = {wm[n] for n in names if n in wm}
    else:
        files = {"model.safetensors"} if (path / "model.safetensors").exists() else set()
    out = {}
    for fn in files:
        with safe_open(str(path / fn), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in names if k in f.keys()})
    return out


def from_pretrained(path, *, tokenizer=True, **kwargs):
    """Load a model saved with ``save_pretrained`` (+ tokenizer) -> ``(model, tokenizer)``.

    The model comes back patched (``attn_implementation="safeattn"``) with its ``[CLS]`` row,
    ``safety_head`` weights and safety config; ``kwargs`` go to
    ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``). Safety-only files saved into
    the same directory with :func:`save_safety` take precedence over the checkpoint's head.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import backend

    backend.register()
    p = Path(path)
    tok = AutoTokenizer.from_pretrained(str(p)) if tokenizer is True else (tokenizer or None)
    kwargs.setdefault("attn_implementation", backend.NAME)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head's keys are "unexpected" to the stock class
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg = safety_config(model)
    if cfg is None:
        raise ValueError(f"{p} holds no safety config (config.json has no 'safeattn' entry)")
    if tok is not None:
        cls_token_id(tokenizer=tok, cls_token=cfg.get("cls_token", "[CLS]"))  # raises if absent
    apply_safeattn(model)
    if (p / SAFETY_WEIGHTS).exists():
        with safe_open(str(p / SAFETY_WEIGHTS), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    else:
        names = ["safety_head.weight", "safety_head.bias"] + [
            f"{name}.{k}" for name in _EXTRA_PARTS if getattr(model, name, None) is not None
            for k in getattr(model, name).state_dict()]
        t = _checkpoint_tensors(p, names)
        if "safety_head.weight" not in t or "safety_head.bias" not in t:
            raise ValueError(f"{p} has a safety config but no safety_head weights")
    with torch.no_grad():
        _copy_head(model, t)
    return model, tok

"""Head ensembles *(ours)*: several trained heads that score every check together.

Heads trained with the same recipe but another seed disagree most on the benign prompts they
score highest, and θ rests on those. Averaging their logits lowers the benign scores that
set θ more than the harmful ones (Gemma-3-270M's two seeds: 130 of 153 harmful val prompts
refused at three benign refusals, 123 for either head alone; see the model READMEs).

A member is what one training run gives: a :class:`~safeattn.hf.surgery.SafetyHead`, a
``[CLS]`` embedding row and a probe adapter. Member 0 is the model's own (``safety_head``,
the ``[CLS]`` row, ``safety_adapter``); the others sit in ``model.safety_members``. Every
check gives each member a probe row of its own in the same forward: the last ``K`` query
rows, each seeing ``{itself} ∪ q_span ∪ W_t``, each with its member's ``[CLS]`` row and
adapter. The check's logit is the mean of the members' logits. ``p_0`` comes from the same
probe rows with an empty window (the prefill's ``[CLS]`` row is member 0's alone).

:func:`combine_safety` writes the safety files of an ensemble from those of its members.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .adapter import ProbeAdapter, install_hooks
from .surgery import SafetyHead, _base

__all__ = ["SafetyMember", "add_members", "member_count", "member_names", "single_only",
           "install_member_hooks", "combine_safety"]

#: Safety-config entries that an ensemble cannot hold: the query and response probes blend
#: one head's logit, and response rows that see ``[CLS]`` would read member 0's row alone.
_SINGLE_ONLY = ("query_probe", "response_probe", "cls_visible_to_response")
#: Entries that every member must share: they fix what the probe row reads.
_SHARED = ("cls_layer", "cls_visible_to_response", "probe_window", "model_type",
           "hidden_size")


class SafetyMember(nn.Module):
    """One more head of an ensemble: ``head``, ``cls_embedding [d]`` and ``adapter`` (a
    :class:`ProbeAdapter` or ``None``)."""

    def __init__(self, hidden_size: int, cls_layer: int | None, adapter: ProbeAdapter | None):
        super().__init__()
        self.head = SafetyHead(hidden_size, cls_layer)
        self.cls_embedding = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.adapter = adapter


def member_names(j: int) -> tuple[str, str, str]:
    """Where member ``j`` keeps its head, ``[CLS]`` row and probe adapter in the safety
    weights file: the prefix of its head's tensors, the name of its row, the prefix of its
    adapter's. Member 0 is the model's own head."""
    if j == 0:
        return "safety_head.", "cls_embedding", "safety_adapter."
    pre = f"safety_members.{j - 1}."
    return pre + "head.", pre + "cls_embedding", pre + "adapter."


def single_only(cfg: dict) -> list[str]:
    """The entries of safety config ``cfg`` that an ensemble cannot have (empty: none)."""
    return [k for k in _SINGLE_ONLY if cfg.get(k)]


def member_count(model) -> int:
    """``K``: the heads that score each check (1 without an ensemble)."""
    return 1 + len(getattr(model, "safety_members", None) or ())


def add_members(model, specs, cls_layer: int | None) -> None:
    """The :class:`SafetyMember` modules that the safety config's ``members`` entry (one
    ``{"adapter": spec or None}`` per extra head) asks for; their weights are loaded later."""
    from .surgery import safety_config

    if not specs:
        model.safety_members = None
        return
    cfg = safety_config(model) or {}
    clash = single_only(cfg)
    if clash:
        raise ValueError(f"safety config: an ensemble ('members') cannot have {clash}")
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise ValueError(f"safety config: members must be a list of dicts, got {specs!r}")
    have = getattr(model, "safety_members", None)
    if have is not None and len(have) == len(specs):
        return
    w = model.get_input_embeddings().weight
    d = model.config.get_text_config().hidden_size
    members = []
    for spec in specs:
        ad = spec.get("adapter")
        adapter = None if not ad else ProbeAdapter(
            list(_base(model).layers)[:ad["layers"]], ad["rank"], ad["alpha"], ad["targets"])
        members.append(SafetyMember(d, cls_layer, adapter))
    model.safety_members = nn.ModuleList(members).to(device=w.device, dtype=w.dtype)


def install_member_hooks(model, probe_count) -> list:
    """Hooks that give probe row ``j`` (of the last ``probe_count()`` query rows; 0 while no
    forward carries probe rows) member ``j``'s ``[CLS]`` row and adapter, for ``j >= 1``."""
    members = getattr(model, "safety_members", None) or ()
    handles = []
    for j, member in enumerate(members, start=1):
        def row(j=j):
            k = probe_count()
            return j - k if k > j else None

        if member.adapter is not None:
            handles += install_hooks(model, member.adapter, row)
        handles.append(model.get_input_embeddings().register_forward_hook(
            _embedding_hook(member, row)))
    return handles


def _embedding_hook(member: SafetyMember, row):
    def hook(module, args, out):
        r = row()
        if r is None:
            return None
        scale = getattr(module, "embed_scale", None)  # Gemma scales its embeddings
        e = member.cls_embedding.to(out.dtype)
        if scale is not None:
            e = e * scale.to(module.weight.dtype)
        if torch.is_grad_enabled():
            out = out.clone()
        out[:, r] = e
        return out
    return hook


def combine_safety(directories, save_directory) -> Path:
    """Write the safety files of an ensemble of the heads saved in ``directories`` (each by
    :func:`safeattn.save_safety`; the first is member 0) to ``save_directory`` -> the path.

    The members must share the model, ``cls_layer`` and ``probe_window``; none may have a
    query or response probe or let response rows see ``[CLS]`` (the prefill's ``[CLS]`` row
    gets no member's adapter: its probes score ``p_0``). θ is dropped:
    calibrate the ensemble (``safeattn calibrate``). Other files of the first directory (its
    README, cached answers) are not copied.
    """
    from safetensors.torch import load_file, save_file

    from ..generation import DEFAULT_WINDOW
    from .persist import SAFETY_CONFIG, SAFETY_WEIGHTS

    dirs = [Path(d) for d in directories]
    if len(dirs) < 2:
        raise ValueError(f"directories: an ensemble needs at least two heads, got {len(dirs)}")
    configs, weights = [], []
    for d in dirs:
        if not (d / SAFETY_CONFIG).exists():
            raise ValueError(f"directories: no {SAFETY_CONFIG} in {d}")
        cfg = json.loads((d / SAFETY_CONFIG).read_text())
        bad = single_only(cfg) + (["members"] if cfg.get("members") else [])
        if bad:
            raise ValueError(f"directories: {d} has {bad}; an ensemble member cannot")
        configs.append(dict(cfg, probe_window=cfg.get("probe_window") or DEFAULT_WINDOW))
        weights.append(load_file(str(d / SAFETY_WEIGHTS)))
    for key in _SHARED:
        vals = {json.dumps(c.get(key)) for c in configs}
        if len(vals) > 1:
            raise ValueError(f"directories: the heads differ in {key} ({sorted(vals)})")
    out = dict(configs[0])
    for key in ("threshold", "query_threshold", "late_threshold", "late_after"):
        out.pop(key, None)
    out["members"] = [{"adapter": c.get("adapter")} for c in configs[1:]]
    tensors = dict(weights[0])
    own = member_names(0)
    for j, t in enumerate(weights[1:], start=1):
        for k, v in t.items():
            for src, dst in zip(own, member_names(j)):
                if k.startswith(src):
                    tensors[dst + k[len(src):]] = v
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / SAFETY_WEIGHTS))
    (d / SAFETY_CONFIG).write_text(json.dumps(out, indent=2) + "\n")
    notice = dirs[0] / "NOTICE"
    if notice.exists():
        shutil.copy(notice, d / "NOTICE")
    return d

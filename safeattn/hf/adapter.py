"""The probe adapter *(ours)*: low-rank weights that only the ``[CLS]`` / probe row uses.

A head on the ``[CLS]`` state reads what frozen layers let that row gather; it cannot change
what the row attends to or how it mixes it after the first layer. The probe adapter gives
the ``[CLS]`` row its own low-rank update ``W + s·B·A`` of the attention and MLP projections
of every decoder layer it runs through (``0..cls_layer``), like LoRA, but applied to that row
alone: every other row computes exactly what the stock model computes. So the language model
keeps its text without any LM loss, the prompt's keys and values stay those of the plain
model (the head-only context cache stays exact), and generation equals plain ``generate``
until a refusal. Only the ``[CLS]`` row of a prefill, the probe row of a check step and the
``[CLS]`` row of training see the update; the patched model's hooks name that row.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ProbeAdapter", "TARGETS", "attach_probe_adapter", "detach_probe_adapter",
           "install_hooks"]

#: The projections that get an update (those a layer has: attention, then MLP).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _targets(layer, names):
    out = {}
    for name, mod in layer.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in names and isinstance(mod, nn.Linear):
            out[short] = mod
    return out


class ProbeAdapter(nn.Module):
    """``A [r, in]`` (random) and ``B [out, r]`` (zeros) per target projection of layers
    ``0..n_layers-1``; ``delta(x) = scale · (x Aᵀ) Bᵀ`` with ``scale = alpha / rank``. Starts as
    the identity (``B = 0``). Parameters are named ``a.<layer>_<proj>`` / ``b.<layer>_<proj>``."""

    def __init__(self, layers, rank: int = 8, alpha: float | None = None,
                 targets=TARGETS, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else 2 * rank)
        self.scale = self.alpha / self.rank
        self.targets = tuple(targets)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        g = torch.Generator().manual_seed(seed)
        for i, layer in enumerate(layers):
            for short, mod in _targets(layer, self.targets).items():
                key = f"{i}_{short}"
                w = mod.weight
                a = torch.randn(self.rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
                self.a[key] = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
                self.b[key] = nn.Parameter(torch.zeros(w.shape[0], self.rank, device=w.device,
                                                       dtype=w.dtype))
        if not len(self.a):
            raise ValueError(f"no projection named {self.targets} in the layers")

    def config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets),
                "layers": 1 + max(int(k.split("_", 1)[0]) for k in self.a)}

    def delta(self, key: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a[key], self.b[key]
        return ((x.to(a.dtype) @ a.t()) @ b.t()) * self.scale


def install_hooks(model, adapter: ProbeAdapter, rows_of) -> list:
    """Forward hooks that add the adapter's update to the ``[CLS]`` / probe row of each target
    projection. ``rows_of()`` gives the current forward's row: ``None`` when no such row is in
    the forward, an ``int`` when it is the same query row of every batch element (a check
    step's probe: ``-1``), else a ``[B]`` index into the query rows."""
    from .surgery import _base

    handles = []
    layers = list(_base(model).layers)
    for key in adapter.a.keys():
        i, short = key.split("_", 1)
        mod = _targets(layers[int(i)], (short,))[short]

        def hook(module, args, out, key=key):
            rows = rows_of()
            if rows is None:
                return None
            x = args[0]
            a, b = adapter.a[key], adapter.b[key]
            if isinstance(rows, int) and not torch.is_grad_enabled() and out.dtype == a.dtype:
                # decoding: three ops, in place (49 such hooks run per check step)
                out[:, rows].addmm_(x[:, rows].to(a.dtype) @ a.t(), b.t(), alpha=adapter.scale)
                return None
            bi = torch.arange(x.shape[0], device=x.device)
            r = torch.as_tensor(rows, device=x.device).expand(x.shape[0]) % x.shape[1]
            delta = adapter.delta(key, x[bi, r]).to(out.dtype)
            if torch.is_grad_enabled():  # training: out of place, for autograd
                return out.index_put((bi, r), out[bi, r] + delta)
            out[bi, r] += delta
            return None

        handles.append(mod.register_forward_hook(hook))
    return handles


def attach_probe_adapter(model, rank: int = 8, alpha: float | None = None, *,
                         targets=TARGETS, seed: int = 0) -> ProbeAdapter:
    """Give a patched ``model`` a :class:`ProbeAdapter` on the layers its ``[CLS]`` row runs
    through (``0..cls_layer``; all with the final-norm head) and switch it on. Records
    ``{"rank", "alpha", "targets", "layers"}`` as ``adapter`` in the safety config (saved by
    :func:`safeattn.save_safety`). Replaces an adapter already there."""
    from .patch import apply_safeattn, is_patched
    from .surgery import _base, safety_config

    if not is_patched(model):
        raise ValueError("model is not patched; call safeattn.apply_safeattn(model, tokenizer)")
    cfg = safety_config(model) or {}
    n = model.config.get_text_config().num_hidden_layers
    k = cfg.get("cls_layer")
    layers = list(_base(model).layers)[:n if k is None else k + 1]
    model.safety_adapter = ProbeAdapter(layers, rank, alpha, targets, seed)
    cfg["adapter"] = model.safety_adapter.config()
    model.config.safeattn = cfg
    apply_safeattn(model)
    return model.safety_adapter


def detach_probe_adapter(model) -> None:
    """Remove the probe adapter of a patched ``model`` (and its entry in the safety config)."""
    from .patch import apply_safeattn
    from .surgery import safety_config

    cfg = safety_config(model) or {}
    cfg.pop("adapter", None)
    model.config.safeattn = cfg
    model.safety_adapter = None
    apply_safeattn(model)

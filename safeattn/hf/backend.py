"""The ``"safeattn"`` attention backend for transformers (``AttentionInterface``) and its mask.

transformers builds one mask per mask type ("full_attention", "sliding_attention") before the
decoder layers run, through the function registered in ``AttentionMaskInterface``. Ours
returns a tiny *descriptor* instead of a dense ``[B, 1, Tq, Tk]`` mask:

    int32 ``[B, 1, 2 + R, 2]``: row 0 ``(q_offset, kv_offset)``, row 1 ``(window or 0, 0)``,
    rows 2.. the ``R`` absolute non-pad column runs of each sequence.

It is 4-D, so transformers passes it through untouched (also when ``generate`` precomputes
masks for a StaticCache). The attention function turns descriptor + ``safety_layout`` into
``intervals [B, Tq, NI, 2]`` once per forward and mask type (memoised on the descriptor) and
calls ``torch.ops.safeattn.interval_attention``. Mask patterns other than plain causal /
sliding causal (packed sequences, bidirectional overlays, ...) are materialised once with
transformers' ``sdpa_mask`` and attached to the descriptor as per-row runs.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .. import ops as _ops  # noqa: F401  (loads the compiled library)
from .. import reference
from .layout import SafetyLayout, build_intervals, valid_runs

__all__ = ["NAME", "SAFETY_KWARGS", "register", "safeattn_attention_forward", "safeattn_mask",
           "is_descriptor"]

NAME = "safeattn"
#: Safety keyword arguments a patched model accepts next to its usual ones.
SAFETY_KWARGS = ("q_span", "safety_mode", "response_window", "response_start",
                 "cls_visible_to_response", "probe_window")


def _is_plain(mask_function, local_size) -> bool:
    """True for transformers' plain causal and sliding-window causal mask functions."""
    if local_size is None:
        return mask_function is causal_mask_function
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return False
    fns = mask_function.__closure__[0].cell_contents if mask_function.__closure__ else ()
    return (len(fns) == 2 and fns[1] is causal_mask_function
            and fns[0].__qualname__ == "sliding_window_overlay.<locals>.inner_mask")


def safeattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, use_vmap: bool = False, device="cpu",
                  **kwargs) -> torch.Tensor:
    """``AttentionMaskInterface`` entry: the descriptor int32 ``[B, 1, 2 + R, 2]`` (see module doc).

    ``attention_mask`` is the 2-D ``[B, past + Tq]`` padding mask in absolute columns.
    """
    end = kv_offset + kv_length
    if attention_mask is None:
        runs = torch.tensor([[0, end]], device=device).expand(batch_size, 1, 2)
    else:
        m = attention_mask.to(device=device, dtype=torch.bool)[:, :end]
        runs = valid_runs(m)
    q_off = torch.as_tensor(q_offset, device=device).reshape(())
    head = torch.stack([q_off.long(), torch.as_tensor(kv_offset, device=device).long().reshape(()),
                        torch.as_tensor(local_size or 0, device=device).long().reshape(()),
                        torch.zeros((), dtype=torch.long, device=device)]).reshape(1, 2, 2)
    desc = torch.cat([head.expand(batch_size, 2, 2), runs.long()], dim=1)
    desc = desc.to(torch.int32)[:, None].contiguous()
    if not _is_plain(mask_function, local_size):
        dense = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                          q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                          attention_mask=attention_mask, local_size=local_size,
                          allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
        desc._safeattn_rows = valid_runs(dense[:, 0]) + kv_offset  # [B, Tq, R', 2] absolute
    return desc


def is_descriptor(mask) -> bool:
    """Whether ``mask`` is a descriptor made by :func:`safeattn_mask`."""
    return (isinstance(mask, torch.Tensor) and mask.dtype == torch.int32 and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[3] == 2 and mask.shape[2] >= 3)


def _intervals(mask, layout: SafetyLayout | None, b: int, tq: int, tk: int,
               device) -> torch.Tensor:
    if is_descriptor(mask):
        memo = getattr(mask, "_safeattn_memo", None)
        key = (id(layout), tq, tk)
        if memo is not None and key in memo:
            return memo[key][1]
        d = mask[:, 0].long()
        q_off, kv_off, win = d[0, 0, 0], d[0, 0, 1], int(d[0, 1, 0])
        iv = build_intervals(layout, batch=b, tq=tq, tk=tk, q_offset=q_off, kv_offset=kv_off,
                             runs=d[:, 2:], window=win or None,
                             rows=getattr(mask, "_safeattn_rows", None))
        if not torch.compiler.is_compiling():
            if memo is None:
                memo = mask._safeattn_memo = {}
            memo[key] = (layout, iv)  # keep the layout alive so its id stays unique
        return iv
    # No descriptor: plain causal (mask None) or a user-supplied dense [B|1, 1|H, Tq, Tk] mask,
    # with queries taken to be the last Tq of the Tk keys.
    if mask is None:
        runs = torch.tensor([[0, tk]], device=device).expand(b, 1, 2)
        return build_intervals(layout, batch=b, tq=tq, tk=tk, q_offset=tk - tq, kv_offset=0,
                               runs=runs)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"safeattn: unsupported attention mask of shape {tuple(mask.shape)}; "
                         "need None, a 2-D padding mask or a [B, 1, Tq, Tk] mask")
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min / 2)).any()):
            raise ValueError("safeattn: additive masks with biases other than 0/-inf are not "
                             "supported")
        mask = mask == 0
    dense = mask[:, 0].expand(b, tq, tk)
    return build_intervals(layout, batch=b, tq=tq, tk=tk, q_offset=tk - tq, kv_offset=0,
                           runs=torch.tensor([[0, tk]], device=device).expand(b, 1, 2),
                           rows=valid_runs(dense))


def _op_has_backward(device: torch.device) -> bool:
    """Whether the compiled flash-style backward (``interval_attention_bwd``) runs on ``device``."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "safeattn::interval_attention_bwd", key)
    except RuntimeError:  # op not defined in this build
        return False


def safeattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, softcap: float | None = None,
                               safety_layout: SafetyLayout | None = None, **kwargs):
    """``AttentionInterface`` entry, drop-in for ``sdpa_attention_forward``.

    Args:
        query: ``[B, Hq, Tq, D]``; key, value: ``[B, Hkv, Tk, D]`` (GQA handled in the kernel).
        attention_mask: the descriptor from :func:`safeattn_mask`, ``None`` or a dense 4-D mask.
        scaling: score scale (``module.scaling``); softcap: logit soft-capping, else
            ``module.config.attn_logit_softcapping`` when set.
        safety_layout: the per-row safety rules; ``None`` gives plain causal attention.

    Returns:
        ``(attn_output [B, Tq, Hq, D], None)``.
    """
    if dropout and module.training:
        raise NotImplementedError("safeattn attention has no dropout; set attention_dropout=0")
    b, _, tq, _ = query.shape
    tk = key.shape[2]
    if safety_layout is not None and safety_layout.batch_size != b:
        raise ValueError(f"safety_layout has batch {safety_layout.batch_size}, the attention "
                         f"call has batch {b}")
    iv = _intervals(attention_mask, safety_layout, b, tq, tk, query.device)
    if softcap is None:
        softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        if _op_has_backward(query.device):  # keeps the row log-sum-exp for the backward
            out = torch.ops.safeattn.interval_attention_fwd.default(query, key, value, iv,
                                                                    scaling, softcap)[0]
        else:  # no compiled backward in this build: differentiate through the reference
            out = reference.interval_attention(query, key, value, iv, scaling, softcap)
    else:
        out = torch.ops.safeattn.interval_attention.default(query, key, value, iv, scaling,
                                                            softcap)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"safeattn"`` with ``AttentionInterface`` and ``AttentionMaskInterface``.

    Idempotent. Also declares ``safety_layout`` and :data:`SAFETY_KWARGS` as model-agnostic keyword
    arguments (``TransformersKwargs``), so that ``model.generate(..., q_span=...)`` passes
    them to every forward instead of rejecting them as unused.
    """
    AttentionInterface.register(NAME, safeattn_attention_forward)
    AttentionMaskInterface.register(NAME, safeattn_mask)
    from transformers.utils.generic import TransformersKwargs

    keys = frozenset(("safety_layout",) + SAFETY_KWARGS)
    if not keys <= TransformersKwargs.__optional_keys__:
        TransformersKwargs.__optional_keys__ = TransformersKwargs.__optional_keys__ | keys

"""Typed wrappers around ``torch.ops.safeattn``; fake kernels make them traceable.

These know nothing of Hugging Face. Arguments are checked here so that bad input raises a
``ValueError`` that names the argument; the C++ kernels repeat the cheap checks. Key ranges
are checked by the CPU kernel itself (its error becomes the ``ValueError``); for other
devices here, which costs a host sync.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

__all__ = ["interval_attention", "paged_interval_attention", "safety_step", "kernel_for",
           "BENIGN", "MALICIOUS", "TRANSITION"]

BENIGN, MALICIOUS, TRANSITION = 0, 1, 2

_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"safeattn::{op}", key)


_FOUND: dict = {}  # (op, device type, dtype) -> backend; registered kernels stay registered
#: Devices whose interval_attention kernels validate the key ranges themselves.
_RANGE_CHECKED = frozenset({"cpu"})


def kernel_for(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """Name the backend that will run ``op``, or raise saying why each backend refused."""
    ask = (op, device.type, dtype)
    found = _FOUND.get(ask)
    if found is not None:
        return found
    reasons = {}
    for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if not _has_kernel(op, key):
            reasons[backend] = ("not built (needs torch with CUDA and nvcc; SAFEATTN_CUDA=1)"
                                if backend == "cuda" else "not built")
        elif device.type != backend:
            reasons[backend] = f"tensors are on {device.type}"
        elif "interval_attention" in op and dtype not in _DTYPES[backend]:
            reasons[backend] = f"dtype {dtype} not in {_DTYPES[backend]}"
        else:
            _FOUND[ask] = backend
            return backend
    why = "; ".join(f"{b}: {r}" for b, r in reasons.items())
    raise NotImplementedError(f"safeattn.{op}: no kernel fits ({why})")


def _check_attention(q, k, v, intervals):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B,H,T,D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if not isinstance(intervals, torch.Tensor) or intervals.dim() != 4 or intervals.shape[-1] != 2:
        raise ValueError(f"intervals must be [B,Tq,NI,2], got {getattr(intervals, 'shape', intervals)}")
    if intervals.dtype != torch.int32:
        raise ValueError(f"intervals must be int32, got {intervals.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == intervals.device):
        raise ValueError(f"q, k, v, intervals must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {intervals.device}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or intervals.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, intervals {intervals.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"head dims differ: q {d}, k {k.shape[3]}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if intervals.shape[1] != tq:
        raise ValueError(f"intervals has {intervals.shape[1]} rows, q has Tq={tq}")


def _check_ranges(intervals: torch.Tensor, tk: int) -> None:
    if intervals.numel() == 0 or torch.compiler.is_compiling():
        return
    start, end = intervals[..., 0], intervals[..., 1]
    bad = (start < 0) | (start > end) | (end > tk)
    if bool(bad.any()):
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise ValueError(f"interval_attention: intervals{''.join(f'[{x}]' for x in i)} = "
                         f"[{int(start[i])}, {int(end[i])}) is out of range: need "
                         f"0 <= start <= end <= Tk={tk}")


def interval_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       intervals: torch.Tensor, *, scale: float | None = None,
                       softcap: float | None = None) -> torch.Tensor:
    """Attention where each query row sees the union of its key ranges.

    Args:
        q: ``[B, Hq, Tq, D]``.
        k, v: ``[B, Hkv, Tk, D]`` with ``Hq % Hkv == 0`` (GQA, no K/V copy).
        intervals: ``[B, Tq, NI, 2]`` int32, half-open ``[start, end)`` key ranges with
            ``0 <= start <= end <= Tk``. Empty ranges pad; overlaps count each key once.
        scale: score scale, default ``D ** -0.5``.
        softcap: if set, scores become ``tanh(s / softcap) * softcap`` before masking.

    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype; rows with no visible key are zeros.

    Differentiable in q, k and v. When grad mode is on and any of them requires grad (and
    the device has an ``interval_attention_fwd`` kernel), this runs ``interval_attention_fwd``,
    which also keeps the row log-sum-exp for the flash-style backward
    (``interval_attention_bwd``); otherwise the plain op, which keeps nothing (its own
    backward must then redo the forward to get the log-sum-exp).
    """
    _check_attention(q, k, v, intervals)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    if torch.compiler.is_compiling():
        return _attention(q, k, v, intervals, scale, softcap)
    kernel_for("interval_attention", q.device, q.dtype)  # untraceable dispatcher query
    if q.device.type not in _RANGE_CHECKED:
        _check_ranges(intervals, k.shape[2])
        return _attention(q, k, v, intervals, scale, softcap)
    try:
        return _attention(q, k, v, intervals, scale, softcap)
    except RuntimeError as e:  # the kernel's range check: same message, as a ValueError
        msg = str(e).split("\n", 1)[0]
        if " is out of range: " not in msg:
            raise
        raise ValueError(msg) from None


def _attention(q, k, v, intervals, scale, softcap):
    if (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and q.device.type in _FWD_DEVICES):
        return torch.ops.safeattn.interval_attention_fwd.default(
            q, k, v, intervals, scale, softcap)[0]
    return torch.ops.safeattn.interval_attention.default(q, k, v, intervals, scale, softcap)


def paged_interval_attention(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                             key_offsets: torch.Tensor, value_offsets: torch.Tensor,
                             k_new: torch.Tensor, v_new: torch.Tensor, intervals: torch.Tensor,
                             *, scale: float | None = None,
                             softcap: float | None = None) -> torch.Tensor:
    """:func:`interval_attention` against a paged KV cache, read in place: no gathered copy.

    Key column ``j`` of batch row ``b``:

    * ``j < Tc``: token ``t = slots[b, j] % P`` of page ``slots[b, j] // P``. Channel ``d``
      of its key for kv head ``h`` is ``cache[page, h, key_offsets[t, d]]``, of its value
      ``cache[page, h, value_offsets[t, d]]``, so the offsets describe any layout of a page
      (vLLM's CPU blocks keep keys and values of a head in one row, each ISA its own way).
    * ``Tc <= j < Tc + Tn``: ``k_new[b, :, j - Tc]`` and ``v_new[b, :, j - Tc]``, keys that
      are not in the cache (a probe's own, say).

    Args:
        q: ``[B, Hq, Tq, D]``.
        cache: ``[pages, Hkv, S]``, contiguous, in q's dtype.
        slots: ``[B, Tc]`` int64 in ``[0, pages * P)``. Columns that no row sees are not
            read, but must still be in range.
        key_offsets, value_offsets: ``[P, D]`` int64 in ``[0, S)``.
        k_new, v_new: ``[B, Hkv, Tn, D]`` in q's dtype, ``Hq % Hkv == 0``.
        intervals: ``[B, Tq, NI, 2]`` int32 key ranges over the ``Tc + Tn`` columns.
        scale, softcap: as in :func:`interval_attention`.

    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype: :func:`interval_attention` of q against the
        gathered columns followed by ``k_new``/``v_new``. Inference only (no gradient).
    """
    _check_paged(q, cache, slots, key_offsets, value_offsets, k_new, v_new, intervals)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    args = (q, cache, slots, key_offsets, value_offsets, k_new, v_new, intervals, scale,
            softcap)
    if torch.compiler.is_compiling():
        return torch.ops.safeattn.paged_interval_attention.default(*args)
    kernel_for("paged_interval_attention", q.device, q.dtype)
    if q.device.type not in _RANGE_CHECKED:
        _check_ranges(intervals, slots.shape[1] + k_new.shape[2])
        _check_paged_ranges(cache, slots, key_offsets, value_offsets)
        return torch.ops.safeattn.paged_interval_attention.default(*args)
    try:
        return torch.ops.safeattn.paged_interval_attention.default(*args)
    except RuntimeError as e:  # the kernel's range checks: same message, as a ValueError
        msg = str(e).split("\n", 1)[0]
        if " is out of range: " not in msg:
            raise
        raise ValueError(msg) from None


def _check_paged(q, cache, slots, key_offsets, value_offsets, k_new, v_new, intervals):
    named = (("q", q, 4), ("cache", cache, 3), ("slots", slots, 2),
             ("key_offsets", key_offsets, 2), ("value_offsets", value_offsets, 2),
             ("k_new", k_new, 4), ("v_new", v_new, 4), ("intervals", intervals, 4))
    for name, t, dim in named:
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    b, hq, tq, d = q.shape
    for name, t in (("cache", cache), ("k_new", k_new), ("v_new", v_new)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must be {q.dtype} like q, got {t.dtype}")
    for name, t in (("slots", slots), ("key_offsets", key_offsets),
                    ("value_offsets", value_offsets)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {t.dtype}")
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous")
    if slots.shape[0] != b:
        raise ValueError(f"slots must be [B={b}, Tc], got {tuple(slots.shape)}")
    if key_offsets.shape[0] == 0 or key_offsets.shape[1] != d:
        raise ValueError(f"key_offsets must be [P, D={d}] with P >= 1, got "
                         f"{tuple(key_offsets.shape)}")
    if value_offsets.shape != key_offsets.shape:
        raise ValueError(f"value_offsets must be {tuple(key_offsets.shape)} like key_offsets, "
                         f"got {tuple(value_offsets.shape)}")
    hkv = cache.shape[1]
    if tuple(k_new.shape) != (b, hkv, k_new.shape[2], d):
        raise ValueError(f"k_new must be [B={b}, Hkv={hkv}, Tn, D={d}], got "
                         f"{tuple(k_new.shape)}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new must be {tuple(k_new.shape)} like k_new, got "
                         f"{tuple(v_new.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of cache heads ({hkv})")
    if intervals.dtype != torch.int32 or intervals.shape[-1] != 2 or \
            tuple(intervals.shape[:2]) != (b, tq):
        raise ValueError(f"intervals must be int32 [B={b}, Tq={tq}, NI, 2], got "
                         f"{intervals.dtype} {tuple(intervals.shape)}")


def _check_paged_ranges(cache, slots, key_offsets, value_offsets) -> None:
    if torch.compiler.is_compiling():
        return
    limits = (("slots", slots, cache.shape[0] * key_offsets.shape[0], "slot < pages * P"),
              ("key_offsets", key_offsets, cache.shape[2], "offset < S"),
              ("value_offsets", value_offsets, cache.shape[2], "offset < S"))
    for name, t, hi, what in limits:  # the messages of the CPU kernel's own check
        bad = (t < 0) | (t >= hi)
        if t.numel() and bool(bad.any()):
            i = tuple(int(x) for x in bad.nonzero()[0])
            raise ValueError(f"paged_interval_attention: {name}{''.join(f'[{x}]' for x in i)} "
                             f"= {int(t[i])} is out of range: need 0 <= {what} = {hi}")


def _devices_with(op: str) -> frozenset:
    return frozenset(b for b, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(op, key))


# Fixed once the library is loaded; plain sets keep the wrapper traceable by torch.compile.
_FWD_DEVICES = _devices_with("interval_attention_fwd")
_BWD_DEVICES = _devices_with("interval_attention_bwd")


@torch.library.register_fake("safeattn::interval_attention")
def _(q, k, v, intervals, scale=None, softcap=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and intervals.dim() == 4)
    return q.new_empty(q.shape)


@torch.library.register_fake("safeattn::interval_attention_fwd")
def _(q, k, v, intervals, scale=None, softcap=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and intervals.dim() == 4)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("safeattn::paged_interval_attention")
def _(q, cache, slots, key_offsets, value_offsets, k_new, v_new, intervals, scale=None,
      softcap=None):
    torch._check(q.dim() == 4 and cache.dim() == 3 and intervals.dim() == 4)
    return q.new_empty(q.shape)


@torch.library.register_fake("safeattn::interval_attention_bwd")
def _(grad_out, q, k, v, out, lse, intervals, scale=None, softcap=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and intervals.dim() == 4)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ------------------------------------------------------------------------------- autograd
def _check_bwd_device(q):
    if q.device.type not in _BWD_DEVICES:
        raise NotImplementedError(
            f"safeattn.interval_attention: no backward kernel for {q.device.type} tensors in "
            f"this build (backward kernels: {sorted(_BWD_DEVICES) or 'none'})")


def _attn_grads(grad_out, q, k, v, intervals, out, lse, scale, softcap, needs):
    """(dq, dk, dv, None, None, None) with None for inputs that need no gradient."""
    if grad_out is None or not any(needs[:3]):
        return None, None, None, None, None, None
    _check_bwd_device(q)
    dq, dk, dv = torch.ops.safeattn.interval_attention_bwd.default(
        grad_out.to(q.dtype), q, k, v, out, lse, intervals, scale, softcap)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, intervals, scale, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # lse is a by-product for the backward: no gradient
    ctx.save_for_backward(q, k, v, intervals, out, lse)
    ctx.scale, ctx.softcap = scale, softcap


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, intervals, out, lse = ctx.saved_tensors
    return _attn_grads(grad_out, q, k, v, intervals, out, lse, ctx.scale, ctx.softcap,
                       ctx.needs_input_grad)


torch.library.register_autograd("safeattn::interval_attention_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)


def _attn_setup_context(ctx, inputs, output):
    # The plain op keeps no lse, so its backward recomputes it with one extra forward.
    # safeattn.ops.interval_attention avoids this by calling interval_attention_fwd
    # whenever a gradient may be needed.
    q, k, v, intervals, scale, softcap = inputs
    ctx.save_for_backward(q, k, v, intervals)
    ctx.scale, ctx.softcap = scale, softcap


def _attn_backward(ctx, grad_out):
    q, k, v, intervals = ctx.saved_tensors
    if grad_out is None or not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    _check_bwd_device(q)
    out, lse = torch.ops.safeattn.interval_attention_fwd.default(
        q, k, v, intervals, ctx.scale, ctx.softcap)
    return _attn_grads(grad_out, q, k, v, intervals, out, lse, ctx.scale, ctx.softcap,
                       ctx.needs_input_grad)


torch.library.register_autograd("safeattn::interval_attention", _attn_backward,
                                setup_context=_attn_setup_context)


def safety_step(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mode: torch.Tensor,
                consec: torch.Tensor, s_t: torch.Tensor, step: torch.Tensor,
                refused: torch.Tensor, active: torch.Tensor, q_span: torch.Tensor,
                resp_start: torch.Tensor, *, theta: float = 0.5, tau: int = 3, r1: int = 10,
                r2: int = 10, r3: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused head + state machine + next probe window for every row (DESIGN §3).

    Args:
        h: ``[B, D]`` probe hidden states (after the model's final norm).
        weight, bias: the head, ``[D]`` (or ``[1, D]``) and ``[1]``, in h's dtype.
        mode, consec, s_t, step: ``[B]`` int32 state, updated in place.
        refused: ``[B]`` bool, set in place when a row switches to refusal (sticky).
        active: ``[B]`` bool, rows whose probe ran this step; others keep their state.
        q_span: ``[B, 2]`` int32 half-open key range of the user's query.
        resp_start: ``[B]`` int32 key position of the first response token.

    Semantics are :func:`safeattn.reference.safety_step`: ``p >= theta`` is decided on the
    fp32 logit against ``theta``'s logit in double, so a head whose ``p`` rounds to 1.0 keeps
    its ranking (``theta = 1``: no finite logit hits); a non-finite ``p`` refuses.

    Returns:
        ``p [B]`` float32 and the next probe's intervals ``[B, 2, 2]`` int32
        (``q_span`` and the Rule 1–3 window, in absolute key positions).
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    for name, r in (("r1", r1), ("r2", r2), ("r3", r3)):
        if r < 0:
            raise ValueError(f"{name} must be >= 0, got {r}")
    # A tensor on another device (e.g. meta) would otherwise dispatch to the fake kernel and
    # return uninitialised p and intervals without any error.
    for name, t in (("weight", weight), ("bias", bias), ("mode", mode), ("consec", consec),
                    ("s_t", s_t), ("step", step), ("refused", refused), ("active", active),
                    ("q_span", q_span), ("resp_start", resp_start)):
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}; all safety_step "
                             "tensors must be on one device")
    if not torch.compiler.is_compiling():
        kernel_for("safety_step", h.device, h.dtype)
    return torch.ops.safeattn.safety_step.default(
        h, weight.reshape(-1), bias.reshape(-1), mode, consec, s_t, step, refused, active,
        q_span, resp_start, float(theta), int(tau), int(r1), int(r2), int(r3))


@torch.library.register_fake("safeattn::safety_step")
def _(h, weight, bias, mode, consec, s_t, step, refused, active, q_span, resp_start, theta, tau,
      r1, r2, r3):
    b = h.shape[0]
    return (h.new_empty((b,), dtype=torch.float32),
            h.new_empty((b, 2, 2), dtype=torch.int32))

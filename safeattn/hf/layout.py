"""Safety layouts (DESIGN §2) and their translation into ``intervals [B, Tq, NI, 2]``.

All positions in a :class:`SafetyLayout` are *absolute key columns*: indices into the 2-D
``attention_mask`` (= cache positions), counting left padding. Each attention layer receives
keys that start at ``kv_offset`` (sliding cache layers) and queries that start at ``q_offset``
(the number of cached tokens); :func:`build_intervals` converts between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["SafetyLayout", "MODES", "valid_runs", "build_intervals", "layout_intervals"]

MODES = ("sft", "pretrain", "trajectory")
_BIG = 2 ** 30


@dataclass
class SafetyLayout:
    """Which key columns the ``[CLS]`` row, probe rows and ordinary rows see (DESIGN §2).

    Attributes:
        q_span: ``[B, 2]`` half-open ``[qs, qe)`` columns of the user's query text.
        cls: ``[B]`` column of ``[CLS]`` (the first non-pad column), or ``None`` when the
            sequence holds no ``[CLS]``.
        mode: ``'sft'`` ([CLS] sees itself + q_span), ``'pretrain'`` ([CLS] sees every
            non-pad column; no other row sees it) or ``'trajectory'`` (sft + ``window``).
        window: ``[B, 2]`` half-open response window ``[a, b+1)`` for trajectory mode. Response
            rows before ``b+1`` do not see ``[CLS]``.
        resp_start: ``[B]`` first response column. Rows at or after it are response rows;
            ``None`` means every row of the sequence is a prompt row.
        cls_visible_to_response: response rows see the ``[CLS]`` column (sft/trajectory only).
        probe_window: ``[B, 2]`` half-open window ``W_t``; when set, the *last* query row of
            the forward is a probe that sees ``{itself} ∪ q_span ∪ W_t`` (and nothing else).
        probe_active: ``[B]`` bool, rows whose probe runs this step (default: all). The probe
            row of an inactive row sees only itself, so it reads one key (batched decoding:
            rows that finished, refused or that the schedule skips do not pay for the probe).
        probe_rows: how many query rows at the end are probes (one per member of a head
            ensemble, :mod:`safeattn.hf.ensemble`); each sees itself, ``q_span`` and ``W_t``.
    """

    q_span: torch.Tensor
    cls: torch.Tensor | None = None
    mode: str = "sft"
    window: torch.Tensor | None = None
    resp_start: torch.Tensor | None = None
    cls_visible_to_response: bool = False
    probe_window: torch.Tensor | None = None
    probe_active: torch.Tensor | None = None
    probe_rows: int = 1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"safety mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "trajectory" and self.window is None:
            raise ValueError("trajectory mode needs a response window [B, 2]")
        if not isinstance(self.probe_rows, int) or self.probe_rows < 1:
            raise ValueError(f"probe_rows must be an int >= 1, got {self.probe_rows!r}")
        q = self.q_span
        if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] != 2:
            raise ValueError(f"q_span must be a [B, 2] tensor, got {getattr(q, 'shape', q)}")
        b = q.shape[0]
        for name, want in (("cls", (b,)), ("window", (b, 2)), ("resp_start", (b,)),
                           ("probe_window", (b, 2)), ("probe_active", (b,))):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {list(want)} (batch of q_span is {b}), "
                                 f"got {list(t.shape)}")

    @property
    def batch_size(self) -> int:
        return self.q_span.shape[0]

    def to(self, device) -> "SafetyLayout":
        """The layout with every tensor on ``device`` (``self`` when all are already there)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        device = torch.device(device)
        if all(v.device == device for v in kw.values() if isinstance(v, torch.Tensor)):
            return self  # the usual case, once per interval build: no copy, no re-validation
        return replace(self, **{k: v.to(device) for k, v in kw.items()
                                if isinstance(v, torch.Tensor)})


def valid_runs(mask: torch.Tensor) -> torch.Tensor:
    """Runs of ``True`` along the last dim: bool ``[..., L]`` -> int64 ``[..., R, 2]`` half-open.

    ``R`` is the largest run count of any row (at least 1); shorter rows are padded with
    empty ``[0, 0)`` ranges. Costs one host sync (for ``R``).
    """
    m = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    d = m[..., 1:] - m[..., :-1]  # [..., L+1]: +1 at run starts, -1 one past run ends
    idx = torch.arange(d.shape[-1], device=mask.device)
    n = int((d == 1).sum(-1).max()) if d.numel() else 0
    r = max(n, 1)
    big = d.shape[-1]
    starts = torch.where(d == 1, idx, big).sort(-1).values[..., :r]
    ends = torch.where(d == -1, idx, big).sort(-1).values[..., :r]
    if starts.shape[-1] < r:  # L == 0
        starts = ends = torch.full((*mask.shape[:-1], r), big, device=mask.device)
    none = starts == big
    out = torch.stack([starts.masked_fill(none, 0), ends.masked_fill(none, 0)], dim=-1)
    return out.long()


def _cat_slots(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=-2)


def _empty(shape, device) -> torch.Tensor:
    return torch.zeros(*shape, 2, dtype=torch.long, device=device)


def build_intervals(layout: SafetyLayout | None, *, batch: int, tq: int, tk: int,
                    q_offset, kv_offset, runs: torch.Tensor, window: int | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Intervals of one attention call -> int32 ``[B, Tq, NI, 2]`` in key-tensor coordinates.

    Args:
        layout: the safety layout, or ``None`` for plain causal attention.
        batch, tq, tk: ``B``, query rows and key length of this call.
        q_offset: absolute column of query row 0 (int or 0-d tensor).
        kv_offset: absolute column of key 0 (int or 0-d tensor).
        runs: ``[B, R, 2]`` absolute non-pad column runs (from the 2-D attention mask).
        window: sliding window (a row sees the last ``window`` columns, itself included).
        rows: optional ``[B, Tq, R', 2]`` absolute intervals of ordinary rows that replace the
            causal ∩ runs ∩ window rule (used for custom HF mask patterns).
    """
    dev = runs.device
    qpos = torch.arange(tq, device=dev) + q_offset  # [Tq]
    if rows is None:
        hi = (qpos + 1)[None, :, None]
        lo = (qpos - window + 1)[None, :, None] if window else torch.zeros_like(hi)
        s = torch.maximum(runs[:, None, :, 0], lo)  # [B,Tq,R]
        e = torch.minimum(runs[:, None, :, 1], hi)
        base = torch.stack([s, torch.maximum(s, e)], dim=-1)
    else:
        base = rows.long()
    base = base.expand(batch, tq, -1, 2)
    if layout is not None:
        base = _apply_layout(layout.to(dev), base, qpos, runs)
    iv = (base - kv_offset).clamp(0, tk)
    iv = torch.stack([iv[..., 0], torch.maximum(iv[..., 0], iv[..., 1])], dim=-1)
    return iv.to(torch.int32).contiguous()


def _apply_layout(lay: SafetyLayout, base: torch.Tensor, qpos: torch.Tensor,
                  runs: torch.Tensor) -> torch.Tensor:
    """Absolute ordinary intervals ``[B,Tq,R,2]`` -> absolute layout intervals ``[B,Tq,NI,2]``."""
    b, tq, _, _ = base.shape
    dev = base.device
    q = lay.q_span.long()
    special, is_special = [], []
    out = base
    if lay.cls is not None:
        c = lay.cls.long()
        # Rows at or after `vis_from` may see [CLS]; all earlier ordinary rows must not.
        never = torch.full_like(c, _BIG)
        if lay.mode == "pretrain" or not lay.cls_visible_to_response:
            vis_from = never
        else:
            vis_from = lay.resp_start.long() if lay.resp_start is not None else never
            if lay.mode == "trajectory":
                vis_from = torch.maximum(vis_from, lay.window[:, 1].long())
        hide = (qpos[None, :] < vis_from[:, None])[..., None]  # [B,Tq,1]
        s, e = base[..., 0], base[..., 1]
        cc = c[:, None, None]
        left = torch.stack([s, torch.where(hide, torch.minimum(e, cc), e)], dim=-1)
        right_s = torch.where(hide, torch.maximum(s, cc + 1), e)
        right = torch.stack([torch.minimum(right_s, e), e], dim=-1)
        out = _cat_slots(left, right)
        # The [CLS] row itself (when it is among this call's queries).
        if lay.mode == "pretrain":
            cls_iv = runs.long()
        else:
            parts = [torch.stack([c, c + 1], -1)[:, None], q[:, None]]
            if lay.mode == "trajectory":
                parts.append(lay.window.long()[:, None])
            cls_iv = _cat_slots(*parts)
        special.append(cls_iv)
        is_special.append(qpos[None, :] == c[:, None])
    if lay.probe_window is not None:
        pq, pw = q, lay.probe_window.long()
        if lay.probe_active is not None:  # inactive rows: the probe sees only itself
            on = lay.probe_active.bool()[:, None]
            pq, pw = pq * on, pw * on
        shared = _cat_slots(pq[:, None], pw[:, None])
        for col in qpos[tq - lay.probe_rows:]:
            own = col.expand(b)
            special.append(_cat_slots(torch.stack([own, own + 1], -1)[:, None], shared))
            is_special.append((qpos == col)[None, :].expand(b, tq))
    if not special:
        return out
    ni = max([out.shape[2]] + [sp.shape[1] for sp in special])

    def pad(t, n):
        if t.shape[-2] == n:
            return t
        return _cat_slots(t, _empty(t.shape[:-2] + (n - t.shape[-2],), dev))

    out = pad(out, ni)
    for sp, where in zip(special, is_special):
        out = torch.where(where[..., None, None], pad(sp, ni)[:, None], out)
    return out


def layout_intervals(layout: SafetyLayout | None, attention_mask: torch.Tensor | None = None, *,
                     length: int | None = None, window: int | None = None) -> torch.Tensor:
    """Intervals of a full prefill (no cache) -> int32 ``[B, L, NI, 2]``.

    ``attention_mask [B, L]`` marks non-pad columns (all valid if ``None``, then ``length`` or
    the layout's batch gives the shape). Useful to inspect or test a layout:
    ``safeattn.reference.interval_mask(layout_intervals(...), L)`` is the dense ``[B, L, L]`` mask.
    """
    if attention_mask is None:
        if length is None or layout is None:
            raise ValueError("give attention_mask, or length together with a layout")
        attention_mask = torch.ones(layout.batch_size, length, dtype=torch.bool,
                                    device=layout.q_span.device)
    b, n = attention_mask.shape
    return build_intervals(layout, batch=b, tq=n, tk=n, q_offset=0, kv_offset=0,
                           runs=valid_runs(attention_mask.bool()), window=window)

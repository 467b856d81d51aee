"""Shapes, interval layouts and their FlexAttention twins, shared by the CPU and GPU benches.

Every layout is an interval set ``[B, Tq, NI, 2]`` (``safeattn.interval_attention``'s input).
Baselines get the same mask: a dense bool mask for SDPA (``dense_mask``), or a FlexAttention
``mask_mod`` (``interval_mask_mod`` reads the interval tensor itself, so it is the same mask
for any layout; ``causal_mask_mod`` is the closed form a user would write for causal and
sliding layouts, the cheaper of the two for Flex).
"""
from __future__ import annotations

import functools

import torch

from safeattn.reference import interval_mask

MODELS = {  # name: (Hq, Hkv, D)
    "gemma3-270m": (4, 1, 256),
    "llama3-8b": (32, 8, 128),
}
PROBE_QSPAN_MAX = 64
PROBE_WINDOW = 10
SLIDING = 512
SFT_WINDOW = 16


# ----------------------------------------------------------------------------- layouts
def probe_intervals(b: int, s: int) -> torch.Tensor:
    """Tq=2 over Tk=s keys: row 0 the new token (cols [0, s-1)), row 1 the probe at col s-1,
    seeing q_span [1, 1+min(64, s//4)) U the last 10 response tokens U itself."""
    qs = min(PROBE_QSPAN_MAX, s // 4)
    rows = [[[0, s - 1], [0, 0], [0, 0]],
            [[1, 1 + qs], [s - 1 - PROBE_WINDOW, s - 1], [s - 1, s]]]
    return torch.tensor(rows, dtype=torch.int32)[None].expand(b, -1, -1, -1).contiguous()


def sft_cls_intervals(b: int, t: int) -> torch.Tensor:
    """SFT trajectory layout (DESIGN §2): BOS, prompt q_span [1, P), [CLS] at P, response after.

    Prompt rows: causal. [CLS] row: {CLS} U q_span U response window [a, a+16). Response rows
    up to the window's end do not see [CLS]; later response rows are plainly causal.
    """
    p = t // 4
    c = p
    a = c + 1 + (t - c - 1) // 2
    e = a + SFT_WINDOW  # window [a, e), half-open
    r = torch.arange(t, dtype=torch.int32)
    out = torch.zeros(t, 3, 2, dtype=torch.int32)
    out[:, 0, 1] = r + 1  # causal rows: [0, r+1)
    mid = (r > c) & (r < e)  # response rows before the window's end skip the [CLS] column
    out[mid, 0, 1] = c
    out[mid, 1, 0] = c + 1
    out[mid, 1, 1] = r[mid] + 1
    out[c] = torch.tensor([[1, p], [c, c + 1], [a, e]], dtype=torch.int32)
    return out[None].expand(b, -1, -1, -1).contiguous()


def dense_mask(intervals: torch.Tensor, tk: int) -> torch.Tensor:
    return interval_mask(intervals, tk)[:, None].contiguous()  # [B, 1, Tq, Tk] bool


def visible_pairs(intervals: torch.Tensor, tk: int) -> int:
    """Visible (row, column) pairs over the batch, without a dense [B, Tq, Tk] mask."""
    s, e = intervals[..., 0].long(), intervals[..., 1].long()  # [B,Tq,NI]
    if intervals.shape[2] == 1:
        return int((e - s).clamp_min(0).sum())
    cols = torch.arange(tk, device=intervals.device)
    total = 0
    for t in range(0, intervals.shape[1], 256):  # chunks of rows keep memory small
        ss, ee = s[:, t:t + 256, :, None], e[:, t:t + 256, :, None]
        total += int(((ss <= cols) & (cols < ee)).any(2).sum())
    return total


# ------------------------------------------------------------------------- FlexAttention
def interval_mask_mod(intervals: torch.Tensor):
    """A FlexAttention ``mask_mod`` that reads ``intervals [B,Tq,NI,2]``: key ``kv`` is
    visible to row ``q`` of batch ``b`` iff some range holds it (the same union rule)."""
    starts = intervals[..., 0].contiguous()
    ends = intervals[..., 1].contiguous()
    ni = intervals.shape[2]

    def mask_mod(b, h, q_idx, kv_idx):
        m = (starts[b, q_idx, 0] <= kv_idx) & (kv_idx < ends[b, q_idx, 0])
        for i in range(1, ni):
            m = m | ((starts[b, q_idx, i] <= kv_idx) & (kv_idx < ends[b, q_idx, i]))
        return m

    return mask_mod


def causal_mask_mod(tq: int, tk: int, window: int | None = None):
    """Closed-form mask_mod of ``safeattn.intervals.causal(b, tq, tk, window=window)``
    (queries are the last ``tq`` of ``tk`` keys)."""
    off = tk - tq

    def mask_mod(b, h, q_idx, kv_idx):
        m = kv_idx <= q_idx + off
        if window is not None:
            m = m & (kv_idx > q_idx + off - window)
        return m

    return mask_mod


def block_mask(mask_mod, b: int, tq: int, tk: int, device):
    """The block mask, built once per case (outside any timing)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, b, None, tq, tk, device=device)


@functools.lru_cache(maxsize=None)
def compiled_flex():
    """``torch.compile(flex_attention)``: the form FlexAttention is meant to run in."""
    from torch.nn.attention.flex_attention import flex_attention

    # Every shape is one more compile of this one function. Past dynamo's recompile limit (8)
    # it would quietly run the unfused eager FlexAttention, which the first H200 run compared
    # against for its last shapes.
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 256))
    return torch.compile(flex_attention, dynamic=False)


def flex_call(q, k, v, bmask, scale, *, compiled: bool = True):
    """A zero-arg call of FlexAttention with GQA in-kernel (``enable_gqa``)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = compiled_flex() if compiled else flex_attention
    gqa = q.shape[1] != k.shape[1]
    return lambda: fn(q, k, v, block_mask=bmask, scale=scale, enable_gqa=gqa)

"""Builders for common interval layouts (key ranges per query row)."""
from __future__ import annotations

import torch


def causal(batch: int, tq: int, tk: int, *, window: int | None = None,
           pad: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Causal ranges for queries that are the last ``tq`` of ``tk`` keys -> [B,Tq,1,2] int32.

    ``window`` keeps only the last ``window`` keys (query included), as HF sliding layers do.
    ``pad [B]`` is the number of left-padding keys per row, which no row sees.
    """
    rows = torch.arange(tk - tq, tk, device=device, dtype=torch.int32)
    end = (rows + 1).expand(batch, tq)
    start = torch.zeros_like(end)
    if window is not None:
        start = (end - window).clamp_min(0)
    if pad is not None:
        start = torch.maximum(start, pad.to(device=device, dtype=torch.int32)[:, None])
        start = torch.minimum(start, end)
    return torch.stack([start, end], dim=-1)[:, :, None, :].contiguous()

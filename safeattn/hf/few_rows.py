"""Weight-stationary linears for the few-row forwards of check steps.

A check step of the strategic decoder runs the rows ``[token, probe]`` through the decoder
layers up to ``cls_layer``. Decoding is memory-bound, so both rows should cost one read of
each weight. On CPU, ``F.linear`` (``x @ W.T`` through MKL) does not manage that: on the
2-core AMD EPYC of our benches the linears of 18 Gemma-3-270M layers take 44 ms for 1 row,
91 ms for 2 and 79 ms for 4, while ``W @ x.T`` takes 37 ms for 2 rows and 32 ms for 4. While
a check step runs (the decoder's forward carries a probe row), the linears of the layers the
probe passes through take that path for fp32 CPU inputs of 2 to :data:`MAX_ROWS` rows; all
other calls are stock ``F.linear``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "Switch", "install", "remove"]

#: Largest number of rows (batch x query rows) that takes the ``W @ x.T`` path.
MAX_ROWS = 16


class Switch:
    """On while a check step's forward runs. Shared by the model state and the patched modules
    (a plain object, so that ``copy.deepcopy`` of the model copies it once for both)."""

    on = False


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 1
    if 1 < rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu" \
            and self.weight.dtype == torch.float32 and self._safeattn_few_rows.on:
        y = torch.mm(self.weight, x.reshape(rows, -1).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], self.weight.shape[0])
    return F.linear(x, self.weight, self.bias)


def install(modules, switch: Switch) -> list[torch.nn.Linear]:
    """Route the ``nn.Linear`` modules in ``modules`` (and their children) through the
    few-row path while ``switch.on``. Modules whose ``forward`` someone already
    replaced (accelerate's offload hooks, for one) are left alone. Returns the patched ones."""
    done = []
    for root in modules:
        for mod in root.modules():
            if type(mod) is torch.nn.Linear and "forward" not in mod.__dict__:
                mod._safeattn_few_rows = switch
                mod.forward = types.MethodType(_forward, mod)
                done.append(mod)
    return done


def remove(patched) -> None:
    """Undo :func:`install` on the modules it returned."""
    for mod in patched:
        if getattr(mod.__dict__.get("forward"), "__func__", None) is _forward:
            del mod.forward
        mod.__dict__.pop("_safeattn_few_rows", None)

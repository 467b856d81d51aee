"""Weight-stationary linears for the few-row forwards of check steps.

A check step of the strategic decoder runs the rows ``[token, probe]`` through the decoder
layers up to ``cls_layer``. Decoding is memory-bound, so both rows should cost one read of
each weight. On CPU, ``F.linear`` (``x @ W.T`` through MKL) does not manage that: on the
2-core AMD EPYC of our benches the linears of 18 Gemma-3-270M layers take 44 ms for 1 row,
91 ms for 2 and 79 ms for 4, while ``W @ x.T`` takes 37 ms for 2 rows and 32 ms for 4. While
a check step runs (the decoder's forward carries a probe row), the linears of the layers the
probe passes through take that path for fp32 CPU inputs of 2 to :data:`MAX_ROWS` rows, *if it
is faster here*; all other calls are stock ``F.linear``.

Which is faster depends on the CPU and its BLAS: on the 2-core Intel Xeon of a later machine
``F.linear`` reads each weight once for 1 to 3 rows (2.33 ms for 1 row and 2.36 ms for 2 over
the 49 linears of SmolLM2's layers 0..6) while ``W @ x.T`` takes 4.87 ms for 2. So the first
check step with a given row count times both paths over all the switch's linears (together
larger than the caches, as in decoding) and keeps the faster (:meth:`Switch.weight_stationary`;
:data:`FORCE` overrides). Both paths give the same values up to float rounding.
"""
from __future__ import annotations

import time
import types

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "Switch", "install", "remove"]

#: Largest number of rows (batch x query rows) that takes the ``W @ x.T`` path.
MAX_ROWS = 16
#: ``None``: time both paths per row count (:meth:`Switch.weight_stationary`); ``True`` /
#: ``False``: always / never ``W @ x.T`` (within :data:`MAX_ROWS`).
FORCE: bool | None = None
#: Timed passes of each path over the linears; the fastest pass counts.
TIMING_PASSES = 3


class Switch:
    """On while a check step's forward runs. Shared by the model state and the patched modules
    (a plain object, so that ``copy.deepcopy`` of the model copies it once for both). Keeps
    the patched linears and, per row count, which path was faster."""

    on = False

    def __init__(self):
        self.modules: list[torch.nn.Linear] = []
        self.faster: dict[int, bool] = {}

    def weight_stationary(self, rows: int) -> bool:
        """Whether ``W @ x.T`` beats ``F.linear`` for ``rows`` rows over this switch's linears,
        timed on the first call for that row count (:data:`FORCE` decides when set)."""
        if FORCE is not None:
            return FORCE
        if rows not in self.faster:
            self.faster[rows] = _time_paths(self.modules, rows)
        return self.faster[rows]


@torch.no_grad()
def _time_paths(modules, rows: int) -> bool:
    """Time one pass of each path over every module (fastest of :data:`TIMING_PASSES`) ->
    whether ``W @ x.T`` was at least 5% faster (a tie keeps stock ``F.linear``)."""
    ws = [(m.weight, torch.randn(rows, m.weight.shape[1])) for m in modules]
    best = {"linear": float("inf"), "wx": float("inf")}
    for _ in range(TIMING_PASSES):
        for name in best:
            t0 = time.perf_counter()
            for w, x in ws:
                torch.mm(w, x.t()) if name == "wx" else F.linear(x, w)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best["wx"] < 0.95 * best["linear"]


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 1
    if 1 < rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu" \
            and self.weight.dtype == torch.float32 and self._safeattn_few_rows.on \
            and self._safeattn_few_rows.weight_stationary(rows):
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
    switch.modules.extend(done)
    switch.faster.clear()
    return done


def remove(patched) -> None:
    """Undo :func:`install` on the modules it returned."""
    for mod in patched:
        if getattr(mod.__dict__.get("forward"), "__func__", None) is _forward:
            del mod.forward
        switch = mod.__dict__.pop("_safeattn_few_rows", None)
        if switch is not None and mod in switch.modules:
            switch.modules.remove(mod)
            switch.faster.clear()

"""Seeded interval layouts shared by the forward and backward kernel tests."""
from __future__ import annotations

import random
import zlib

import torch

from safeattn import intervals as ivs


def seed_of(*args) -> int:
    return zlib.crc32(repr(args).encode())


def random_intervals(rng: random.Random, b, tq, tk, ni, p_empty_row=0.15) -> torch.Tensor:
    """[B,Tq,NI,2] int32 with empty, overlapping, duplicated and full ranges mixed in."""
    out = torch.zeros(b, tq, ni, 2, dtype=torch.int32)
    for bi in range(b):
        for t in range(tq):
            empty_row = rng.random() < p_empty_row
            prev = None
            for i in range(ni):
                kind = rng.randrange(6)
                if empty_row or kind == 0 or tk == 0:  # empty, anywhere
                    s = rng.randint(0, tk)
                    e = s
                elif kind == 1 and prev is not None:  # exact duplicate
                    s, e = prev
                elif kind == 2 and prev is not None:  # overlap with the previous range
                    s = rng.randint(prev[0], prev[1])
                    e = rng.randint(s, tk)
                elif kind == 3:  # short range, often a single key
                    s = rng.randrange(tk)
                    e = min(tk, s + rng.randint(1, 3))
                elif kind == 4:  # everything
                    s, e = 0, tk
                else:
                    s = rng.randint(0, tk)
                    e = rng.randint(s, tk)
                out[bi, t, i, 0], out[bi, t, i, 1] = s, e
                prev = (s, e)
    return out


def decode_intervals(rng, g, layout, b, tq, tk):
    if layout == "causal" or tk < 4:
        pad = torch.randint(0, max(1, tk // 4), (b,), generator=g)
        return ivs.causal(b, tq, tk, pad=pad)
    if layout == "probe":
        # Row 0: the new token (causal, not the probe column); row 1: the probe, which sees
        # [CLS] (column 0), a query span, a response window and itself (the last column).
        out = torch.zeros(b, tq, 4, 2, dtype=torch.int32)
        for bi in range(b):
            pad = rng.randint(0, 3)
            qs = rng.randint(pad + 1, tk // 3)
            qe = rng.randint(qs, tk // 2)
            ws = rng.randint(qe, tk - 1)
            we = rng.randint(ws, tk - 1)
            out[bi, 0, 0] = torch.tensor([pad, tk - 1 if tq == 2 else tk])
            if tq == 2:
                out[bi, 1] = torch.tensor([[0, 1], [qs, qe], [ws, we], [tk - 1, tk]])
        return out
    return random_intervals(rng, b, tq, tk, rng.randint(1, 4))


def nan_cases():
    """``(name, q, k, v, iv)`` (CPU, float32) with a NaN among row 0's visible scores, and
    rows 1.. seeing none of it: the kernels must return row 0 NaN (fail closed) and the others
    finite. The long cases reach the KV-split paths (CPU decode split, CUDA split-KV and
    combine), where a split that saw only NaN scores has max -inf; the 70-row case is a
    prefill."""
    g = torch.Generator().manual_seed(7)

    def make(tk, lo1, tq=2):
        q = torch.randn(1, 2, tq, 16, generator=g)
        k = torch.randn(1, 1, tk, 16, generator=g)
        v = torch.randn(1, 1, tk, 16, generator=g)
        iv = torch.tensor([[0, tk]] + [[lo1, tk]] * (tq - 1), dtype=torch.int32)
        return q, k, v, iv.view(1, tq, 1, 2)

    cases = []
    for tq in (2, 70):
        q, k, v, iv = make(80, 4, tq)
        k[0, 0, 3] = float("nan")
        cases.append((f"one key, {tq} rows", q, k, v, iv))
    for tk in (2048, 4096):
        q, k, v, iv = make(tk, tk // 2)
        k[0, 0, : tk // 3] = float("nan")          # whole splits see nothing but NaN
        cases.append((f"keys, {tk}", q, k, v, iv))
    q, k, v, iv = make(2048, 0)
    q[0, :, 0] = float("nan")                       # every score of row 0 is NaN
    cases.append(("query row", q, k, v, iv))
    return cases


def hidden_nonfinite_cases():
    """``(name, q, k, v, iv, hidden)`` (CPU, float32): NaN and inf in the keys and values of
    the columns ``hidden`` that no row sees, inside a KV tile that rows read (between two of
    a row's ranges, next to a one-column range) and across whole KV splits of a long decode.
    A column no row sees must not change any output: uninitialised cache slots hold such
    values."""
    g = torch.Generator().manual_seed(11)

    def make(tq, tk, ranges, hidden):
        q = torch.randn(1, 2, tq, 16, generator=g)
        k = torch.randn(1, 1, tk, 16, generator=g)
        v = torch.randn(1, 1, tk, 16, generator=g)
        for j, c in enumerate(hidden):
            k[0, 0, c] = float("nan") if j % 2 else float("inf")
            v[0, 0, c] = float("nan") if j % 2 == 0 else -float("inf")
        iv = torch.tensor(ranges, dtype=torch.int32).view(1, 1, -1, 2).expand(1, tq, -1, 2)
        return q, k, v, iv.contiguous(), hidden

    return [("inside a tile, decode", *make(1, 80, [[0, 5], [6, 7], [9, 80]], [5, 7, 8])),
            ("inside a tile, 70 rows", *make(70, 80, [[0, 5], [6, 7], [9, 80]], [5, 7, 8])),
            ("split KV, decode", *make(1, 4096, [[0, 1], [3000, 4096]],
                                       [1, 2, *range(1000, 2999, 7)]))]


def assert_hidden_columns_get_no_gradient(q, k, v, iv, hidden):
    """The backward of ``safeattn.interval_attention`` with NaN / inf in the ``hidden``
    columns (no row sees them) equals the one with zeros there, finite, and gives those
    columns zero dk and dv."""
    import safeattn

    k0, v0 = k.clone(), v.clone()
    k0[:, :, hidden] = 0
    v0[:, :, hidden] = 0
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    grads = []
    for kk, vv in ((k, v), (k0, v0)):
        xs = [t.clone().requires_grad_() for t in (q, kk, vv)]
        grads.append(torch.autograd.grad(safeattn.interval_attention(*xs, iv), xs, dout))
    for g, g0 in zip(*grads):
        assert g.isfinite().all()
        torch.testing.assert_close(g, g0)
    _, dk, dv = grads[0]
    assert (dk[:, :, hidden] == 0).all() and (dv[:, :, hidden] == 0).all()

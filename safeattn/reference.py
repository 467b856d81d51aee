"""Exact semantics of the safeattn ops in plain PyTorch.

Slow and memory-hungry on purpose: it materialises the [B, Tq, Tk] mask and runs the
decoding state machine row by row. Every kernel is tested against it.
"""
from __future__ import annotations

import math

import torch

BENIGN, MALICIOUS, TRANSITION = 0, 1, 2


def interval_mask(intervals: torch.Tensor, tk: int) -> torch.Tensor:
    """Union of half-open ranges: intervals [B,Tq,NI,2] -> bool mask [B,Tq,Tk]."""
    cols = torch.arange(tk, device=intervals.device)
    start = intervals[..., 0, None].long()
    end = intervals[..., 1, None].long()
    return ((cols >= start) & (cols < end)).any(dim=2)


def interval_attention(q, k, v, intervals, scale=None, softcap=None):
    """q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], intervals [B,Tq,NI,2] -> [B,Hq,Tq,D].

    Computed in the inputs' dtype (so that it doubles as the low-precision oracle).
    """
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    mask = interval_mask(intervals, k.shape[2])[:, None]  # [B,1,Tq,Tk]
    s = s.masked_fill(~mask, float("-inf"))
    # rows with no visible column -> 0; a NaN among a row's visible scores stays NaN (as in
    # the kernels: fail closed)
    p = torch.softmax(s, dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    if bool(v.isfinite().all()):
        return p @ v
    # a column the row does not see adds nothing, not even a NaN (0 * nan): the kernels never
    # read it, and uninitialised cache slots may hold anything
    return torch.where(mask[..., None], p[..., None] * v[:, :, None], 0).sum(-2)


def paged_gather(cache, slots, key_offsets, value_offsets):
    """The keys and values ``[B, Hkv, Tc, D]`` that ``slots`` name in a paged ``cache``
    (see :func:`paged_interval_attention`)."""
    hkv, s = cache.shape[1], cache.shape[2]
    page, token = slots // key_offsets.shape[0], slots % key_offsets.shape[0]
    heads = torch.arange(hkv, device=cache.device)[None, :, None, None]
    base = (page[:, None, :, None] * hkv + heads) * s  # [B, Hkv, Tc, 1]
    flat = cache.reshape(-1)
    return flat[base + key_offsets[token][:, None]], flat[base + value_offsets[token][:, None]]


def paged_interval_attention(q, cache, slots, key_offsets, value_offsets, k_new, v_new,
                             intervals, scale=None, softcap=None):
    """:func:`interval_attention` over the gathered cache columns, then ``k_new``/``v_new``."""
    k, v = paged_gather(cache, slots, key_offsets, value_offsets)
    return interval_attention(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), intervals,
                              scale, softcap)


def interval_attention_lse(q, k, intervals, scale=None, softcap=None):
    """Row log-sum-exp [B,Hq,Tq] of the scaled (soft-capped) scores over each row's visible
    keys, -inf for rows that see none: what ``interval_attention_fwd`` returns beside out."""
    g = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~interval_mask(intervals, k.shape[2])[:, None], float("-inf"))
    return torch.logsumexp(s, dim=-1)


def window(mode: int, s_t: int, n: int, r1: int, r2: int, r3: int) -> tuple[int, int]:
    """Probe window over response tokens [0, n) as a half-open range (Rules 1-3)."""
    if mode == MALICIOUS:  # Rule 1: the first r1 generated tokens
        return 0, min(r1, n)
    if mode == TRANSITION:  # Rule 3: [S_t - r2, S_t + r3] around the first alarm
        return max(0, s_t - r2), min(n, s_t + r3 + 1)
    return max(0, n - r2), n  # Rule 2: the most recent r2 tokens


def logit_threshold(theta: float) -> float:
    """θ as a logit, in double: ``p >= θ`` is ``logit >= logit_threshold(θ)``. A check is
    decided on its logit because fp32 ``p`` rounds every logit above about 16.6 to 1.0, and a
    saturated head's checks would tie there. θ >= 1 gives +inf (no finite logit hits), θ <= 0
    -inf (every finite logit hits)."""
    if math.isnan(theta):
        raise ValueError("theta must be a number, got nan")
    if theta >= 1.0:
        return math.inf
    if theta <= 0.0:
        return -math.inf
    return math.log(theta) - math.log1p(-theta)


def safety_step(h, weight, bias, mode, consec, s_t, step, refused, active, q_span, resp_start,
                theta: float, tau: int, r1: int, r2: int, r3: int):
    """One strategic-decoding step for every row (DESIGN §3); updates the state in place.

    h [B,D] is the probe's hidden state, scored as p = sigmoid(h·weight + bias) in fp32;
    "p >= theta" is decided on the fp32 logit (:func:`logit_threshold`), exact where p is not.
    ``step[b]`` is how many response tokens that probe saw (0 = the prefill [CLS] row).
    For ``active`` rows not yet refused:
      - prefill (step 0): p >= theta, or a non-finite p, refuses at once (mode MALICIOUS);
      - later: a non-finite p refuses (fail closed); p >= theta counts a consecutive hit,
        the first hit sets S_t to the newest visible token and mode TRANSITION, and tau
        hits refuse; p < theta resets to BENIGN.
    Then ``step`` advances by one for every row, and the returned intervals [B,2,2] hold
    the next probe's ranges in absolute key positions: q_span and resp_start + window.
    """
    logit = h.float() @ weight.float().reshape(-1) + bias.float().reshape(())
    p = torch.where(logit.isfinite(), torch.sigmoid(logit), float("nan"))  # fail closed
    at = logit_threshold(theta)
    for b in range(h.shape[0]):
        if not bool(active[b]) or bool(refused[b]):
            continue
        pb, n = float(p[b]), int(step[b])
        hit = not math.isfinite(pb) or float(logit[b]) >= at
        if n == 0:
            if hit:
                mode[b], consec[b], s_t[b], refused[b] = MALICIOUS, 1, 0, True
            else:
                mode[b], consec[b], s_t[b] = BENIGN, 0, -1
        elif not math.isfinite(pb):
            refused[b] = True
            consec[b] += 1
            if int(consec[b]) == 1:
                mode[b], s_t[b] = TRANSITION, n - 1
        elif hit:
            consec[b] += 1
            if int(consec[b]) == 1:
                mode[b], s_t[b] = TRANSITION, n - 1
            if int(consec[b]) >= tau:
                refused[b] = True
        else:
            mode[b], consec[b], s_t[b] = BENIGN, 0, -1
    step += 1
    out = torch.empty(h.shape[0], 2, 2, dtype=torch.int32, device=h.device)
    for b in range(h.shape[0]):
        lo, hi = window(int(mode[b]), int(s_t[b]), int(step[b]), r1, r2, r3)
        rs = int(resp_start[b])
        out[b, 0] = q_span[b]
        out[b, 1, 0], out[b, 1, 1] = rs + lo, rs + hi
    return p, out

"""CPU ``safety_step`` kernel against ``safeattn.reference.safety_step`` (DESIGN §3).

p is driven exactly: weight = e_0 and bias = 0, so the logit is h[:, 0].
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import safeattn
from safeattn import reference as ref
from safeattn.ops import BENIGN, MALICIOUS, TRANSITION

D = 16


class State:
    FIELDS = ("mode", "consec", "s_t", "step", "refused")

    def __init__(self, b: int):
        self.mode = torch.full((b,), BENIGN, dtype=torch.int32)
        self.consec = torch.zeros(b, dtype=torch.int32)
        self.s_t = torch.full((b,), -1, dtype=torch.int32)
        self.step = torch.zeros(b, dtype=torch.int32)
        self.refused = torch.zeros(b, dtype=torch.bool)

    def clone(self) -> "State":
        s = State.__new__(State)
        for f in self.FIELDS:
            setattr(s, f, getattr(self, f).clone())
        return s

    def args(self):
        return [getattr(self, f) for f in self.FIELDS]

    def assert_equal(self, other: "State", where=""):
        for f in self.FIELDS:
            a, b = getattr(self, f), getattr(other, f)
            assert torch.equal(a, b), f"{where} {f}: kernel {a.tolist()} != reference {b.tolist()}"


def head(dtype=torch.float32):
    w = torch.zeros(D, dtype=dtype)
    w[0] = 1
    return w, torch.zeros(1, dtype=dtype)


def hidden(logits, g=None, dtype=torch.float32):
    logits = torch.as_tensor(logits, dtype=torch.float64)
    h = torch.randn(len(logits), D, generator=g, dtype=torch.float64)
    h[:, 0] = logits
    return h.to(dtype)


def step_both(kst: State, rst: State, h, weight, bias, active, q_span, resp_start, *,
              theta=0.5, tau=3, r1=10, r2=10, r3=10, where=""):
    """Runs the kernel on kst and the reference on rst; compares everything."""
    p, iv = safeattn.safety_step(h, weight, bias, *kst.args(), active, q_span, resp_start,
                                 theta=theta, tau=tau, r1=r1, r2=r2, r3=r3)
    rp, riv = ref.safety_step(h, weight, bias, *rst.args(), active, q_span, resp_start,
                              theta, tau, r1, r2, r3)
    assert p.dtype == torch.float32 and p.shape == (h.shape[0],)
    assert iv.dtype == torch.int32 and iv.shape == (h.shape[0], 2, 2)
    torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-7, equal_nan=True, msg=where)
    assert torch.equal(iv, riv), f"{where} intervals: kernel {iv.tolist()} != ref {riv.tolist()}"
    kst.assert_equal(rst, where)
    return p, iv


def logit_of(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def safe_logit(rng: random.Random, theta: float, p_hit: float = 0.5) -> float:
    """A logit whose p is clearly on one side of theta (no float rounding ties)."""
    hit = rng.random() < p_hit
    if theta <= 0.0:
        return rng.uniform(-20, 20)  # every p is a hit
    if theta >= 1.0:
        return rng.uniform(-20, 40)  # no finite logit is a hit, though fp32 p is 1.0 past ~16.6
    off = rng.uniform(1e-3, 3.0) * rng.choice((1, 1, 1, 5))
    return logit_of(theta) + (off if hit else -off)


# ----------------------------------------------------------------------- random sequences
PARAMS = [  # theta, tau, r1, r2, r3
    (0.5, 3, 10, 10, 10),
    (0.5, 1, 5, 15, 10),
    (0.3, 2, 0, 0, 0),
    (0.8, 4, 3, 2, 7),
    (0.0, 3, 10, 10, 10),
    (1.0, 2, 1, 1, 1),
    (0.5, 100, 4, 6, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("theta,tau,r1,r2,r3", PARAMS)
def test_random_sequences(theta, tau, r1, r2, r3, dtype):
    rng = random.Random(hash((theta, tau, r1, r2, r3)) & 0xFFFF)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    b = 7
    weight, bias = head(dtype)
    kst = State(b)
    rst = kst.clone()
    q_span = torch.tensor([[rng.randint(2, 5), rng.randint(6, 40)] for _ in range(b)],
                          dtype=torch.int32)
    resp_start = q_span[:, 1] + torch.randint(0, 20, (b,), generator=g, dtype=torch.int32)
    p_active = rng.choice((1.0, 0.7))
    bad = [float("nan"), float("inf"), float("-inf")]
    for t in range(40):
        # few prefill refusals, then rows that hover around theta (row 1 mostly above), so
        # that BENIGN, TRANSITION, cleared alarms and refusals all occur
        logits = [safe_logit(rng, theta, 0.1 if t == 0 else 0.35) for _ in range(b)]
        logits[1] = safe_logit(rng, theta, 0.1 if t == 0 else 0.7)
        h = hidden(logits, g)
        if rng.random() < 0.1:  # non-finite injection somewhere in one row
            h[rng.randrange(b), rng.randrange(D)] = rng.choice(bad)
        h = h.to(dtype)
        if dtype != torch.float64:  # keep the logit exactly representable
            h[:, 0] = h[:, 0].to(dtype)
        active = torch.tensor([rng.random() < p_active for _ in range(b)])
        if t == 0:
            active[:4] = True
        step_both(kst, rst, h, weight, bias, active, q_span, resp_start, theta=theta, tau=tau,
                  r1=r1, r2=r2, r3=r3, where=f"t={t}")
    assert torch.equal(kst.step, torch.full((b,), 40, dtype=torch.int32))


@pytest.mark.parametrize("seed", range(6))
def test_random_head_and_state(seed):
    """General weight/bias (not e_0), random D and state reached by random driving."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    b, d = rng.randint(1, 9), rng.choice((1, 7, 64, 640))
    weight = torch.randn(1, d, generator=g) / math.sqrt(d)
    bias = torch.randn(1, generator=g)
    kst = State(b)
    rst = kst.clone()
    q_span = torch.randint(0, 50, (b, 2), generator=g, dtype=torch.int32).sort(-1).values
    resp_start = torch.randint(50, 100, (b,), generator=g, dtype=torch.int32)
    for t in range(25):
        h = torch.randn(b, d, generator=g) * rng.choice((0.5, 2.0))
        p_ref = torch.sigmoid(h.double() @ weight.double().reshape(-1) + bias.double())
        theta = 0.5
        if (p_ref - theta).abs().min() < 1e-5:  # stay clear of rounding ties
            continue
        active = torch.rand(b, generator=g) < 0.8
        step_both(kst, rst, h, weight, bias, active, q_span, resp_start, tau=2, r1=3, r2=4,
                  r3=5, where=f"t={t}")


# ------------------------------------------------------------------------ hand-computed
def _run(logits, *, theta=0.5, tau=3, r1=10, r2=10, r3=10, active=None, q_span=(3, 9),
         resp_start=20):
    """Drives one row through ``logits``; returns [(p, mode, consec, s_t, step, refused, iv)]."""
    weight, bias = head()
    kst, rst = State(1), State(1)
    qs = torch.tensor([q_span], dtype=torch.int32)
    rs = torch.tensor([resp_start], dtype=torch.int32)
    trace = []
    for i, x in enumerate(logits):
        act = torch.tensor([True if active is None else active[i]])
        p, iv = step_both(kst, rst, hidden([x]), weight, bias, act, qs, rs, theta=theta,
                          tau=tau, r1=r1, r2=r2, r3=r3, where=f"i={i}")
        assert iv[0, 0].tolist() == list(q_span)
        trace.append((float(p[0]), int(kst.mode[0]), int(kst.consec[0]), int(kst.s_t[0]),
                      int(kst.step[0]), bool(kst.refused[0]),
                      tuple(x - resp_start for x in iv[0, 1].tolist())))
    return trace


LO, HI = -4.0, 4.0


def test_rule2_benign_window_slides():
    tr = _run([LO] * 6, r2=3)
    assert [t[6] for t in tr] == [(0, 1), (0, 2), (0, 3), (1, 4), (2, 5), (3, 6)]
    assert all(t[1] == BENIGN and t[2] == 0 and t[3] == -1 and not t[5] for t in tr)
    assert [t[4] for t in tr] == [1, 2, 3, 4, 5, 6]


def test_rule1_prefill_malicious_refuses_and_keeps_first_r1():
    tr = _run([HI, LO, LO, LO, LO], r1=3)
    assert tr[0][1:6] == (MALICIOUS, 1, 0, 1, True)
    assert [t[6] for t in tr] == [(0, 1), (0, 2), (0, 3), (0, 3), (0, 3)]
    assert all(t[1] == MALICIOUS and t[5] for t in tr)  # sticky: low p changes nothing


def test_rule1_r1_zero_window_is_empty():
    tr = _run([HI, LO], r1=0)
    assert [t[6] for t in tr] == [(0, 0), (0, 0)]


def test_prefill_boundary_p_equal_theta_is_a_hit():
    tr = _run([0.0], theta=0.5)  # sigmoid(0) == 0.5 exactly
    assert tr[0][0] == 0.5 and tr[0][1] == MALICIOUS and tr[0][5]


def test_rule3_transition_window_clear_and_refusal():
    # steps (value before the call): 0 prefill low, 1-4 low, 5 high, 6 high, 7 low,
    # 8 high, 9 high, 10 high (-> consec 3 = tau: refuse), 11, 12 ignored (refused)
    tr = _run([LO, LO, LO, LO, LO, HI, HI, LO, HI, HI, HI, LO, HI], tau=3, r2=2, r3=3)
    rows = {t[4] - 1: t for t in tr}  # keyed by the step the probe saw
    assert rows[5][1:4] == (TRANSITION, 1, 4) and rows[5][6] == (2, 6)
    assert rows[6][1:4] == (TRANSITION, 2, 4) and rows[6][6] == (2, 7)
    assert rows[7][1:4] == (BENIGN, 0, -1) and rows[7][6] == (6, 8)  # alarm cleared: Rule 2
    assert rows[8][1:4] == (TRANSITION, 1, 7) and rows[8][6] == (5, 9)
    assert rows[9][1:4] == (TRANSITION, 2, 7) and not rows[9][5]
    assert rows[10][1:4] == (TRANSITION, 3, 7) and rows[10][5] and rows[10][6] == (5, 11)
    # refused is sticky; the window stays clipped at S_t + r3
    assert rows[11][1:6] == (TRANSITION, 3, 7, 12, True) and rows[11][6] == (5, 11)
    assert rows[12][1:6] == (TRANSITION, 3, 7, 13, True)


def test_rule3_window_clipped_to_existing_tokens():
    tr = _run([LO, HI, HI], tau=5, r2=10, r3=10)
    assert tr[1][1:4] == (TRANSITION, 1, 0) and tr[1][6] == (0, 2)
    assert tr[2][6] == (0, 3)


def test_tau_one_refuses_on_first_hit():
    tr = _run([LO, LO, HI], tau=1, r2=5, r3=1)
    assert tr[2][1:6] == (TRANSITION, 1, 1, 3, True) and tr[2][6] == (0, 3)


def test_inactive_rows_keep_state_but_step_advances():
    tr = _run([LO, HI, HI, HI, HI], active=[True, True, False, False, True], tau=3, r2=4, r3=4)
    assert [t[4] for t in tr] == [1, 2, 3, 4, 5]
    assert [t[2] for t in tr] == [0, 1, 1, 1, 2]
    assert not any(t[5] for t in tr)
    # windows move with the step even when the probe did not run
    assert [t[6] for t in tr] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5)]


def test_inactive_at_prefill_never_gets_prefill_semantics():
    tr = _run([HI, HI], active=[False, True], tau=5)
    assert tr[0][1:6] == (BENIGN, 0, -1, 1, False)
    assert tr[1][1:6] == (TRANSITION, 1, 0, 2, False)


# --------------------------------------------------------------------- fail closed
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("col", [0, 5])
def test_non_finite_refuses(bad, col):
    weight, bias = head()
    b = 4
    kst = State(b)
    rst = kst.clone()
    qs = torch.tensor([[1, 4]] * b, dtype=torch.int32)
    rs = torch.tensor([10] * b, dtype=torch.int32)
    act = torch.ones(b, dtype=torch.bool)
    h = hidden([LO] * b)
    h[0, col] = bad  # prefill: refuses as malicious at once
    p, _ = step_both(kst, rst, h, weight, bias, act, qs, rs, tau=100)
    assert math.isnan(p[0]) and not p[1:].isnan().any()
    assert kst.refused.tolist() == [True, False, False, False]
    assert int(kst.mode[0]) == MALICIOUS
    h = hidden([LO, LO, HI, LO])
    h[1, col] = bad  # decode from benign: refuses, first hit -> TRANSITION, S_t = 0
    h[2, col] = bad  # the same, even though its logit alone would be a plain hit
    act = torch.tensor([True, True, True, False])
    h[3, col] = bad  # inactive: ignored
    p, _ = step_both(kst, rst, h, weight, bias, act, qs, rs, tau=100)
    assert kst.refused.tolist() == [True, True, True, False]
    assert kst.mode[1:3].tolist() == [TRANSITION, TRANSITION] and kst.s_t[1:3].tolist() == [0, 0]
    assert math.isnan(p[3])  # p still reports it


def test_logit_past_fp32_range_refuses():
    """The logit is an fp32 value (reference, CUDA): h and weight finite, their dot product
    past fp32's range is non-finite there, so the row fails closed, whichever its sign."""
    weight, bias = head()
    weight[1] = 1e30
    b = 3
    kst, qs = State(b), torch.tensor([[1, 4]] * b, dtype=torch.int32)
    h = hidden([LO] * b)
    h[:, 1] = torch.tensor([-1e30, 1e30, 0.0])
    p, _ = step_both(kst, kst.clone(), h, weight, bias, torch.ones(b, dtype=torch.bool), qs,
                     torch.tensor([10] * b, dtype=torch.int32), tau=100)
    assert p[:2].isnan().all() and not p[2].isnan()
    assert kst.refused.tolist() == [True, True, False]


# ------------------------------------------------------------- saturated p (fp32 p == 1.0)
def test_saturated_p_is_decided_on_the_logit():
    """fp32 p rounds logits 17.5, 20 and 30 to 1.0: the check compares the logit with θ's, so
    θ = sigmoid(18) still splits them, as float64 p does; θ = 1 hits no finite logit."""
    weight, bias = head()
    logits = [17.5, 20.0, 30.0, 17.9, 18.1]
    theta = 1 / (1 + math.exp(-18.0))
    assert theta < 1.0 and float(torch.sigmoid(torch.tensor(17.5))) == 1.0
    b = len(logits)
    qs = torch.tensor([[1, 4]] * b, dtype=torch.int32)
    rs = torch.tensor([10] * b, dtype=torch.int32)
    act = torch.ones(b, dtype=torch.bool)
    kst = State(b)
    step_both(kst, kst.clone(), hidden(logits), weight, bias, act, qs, rs, theta=theta)
    assert kst.refused.tolist() == [False, True, True, False, True]  # p_0 refuses on one hit
    kst = State(b)
    rst = kst.clone()
    for _ in range(3):
        step_both(kst, rst, hidden([1e30, 88.0, 40.0, 20.0, math.nan]), weight, bias, act, qs,
                  rs, theta=1.0, tau=1)
    assert kst.refused.tolist() == [False, False, False, False, True]  # nan still fails closed


def test_theta_must_be_a_number():
    weight, bias = head()
    st = State(1)
    with pytest.raises(ValueError, match="theta"):
        safeattn.safety_step(hidden([0.0]), weight, bias, *st.args(), torch.ones(1, dtype=bool),
                             torch.tensor([[1, 4]], dtype=torch.int32),
                             torch.tensor([10], dtype=torch.int32), theta=math.nan)
    with pytest.raises(RuntimeError, match="theta must be a number"):
        torch.ops.safeattn.safety_step.default(
            hidden([0.0]), weight, bias, *st.args(), torch.ones(1, dtype=bool),
            torch.tensor([[1, 4]], dtype=torch.int32), torch.tensor([10], dtype=torch.int32),
            math.nan, 3, 10, 10, 10)


def test_non_finite_after_hits_keeps_s_t():
    weight, bias = head()
    kst = State(1)
    rst = kst.clone()
    qs = torch.tensor([[1, 4]], dtype=torch.int32)
    rs = torch.tensor([10], dtype=torch.int32)
    act = torch.ones(1, dtype=torch.bool)
    for x in (LO, LO, HI, float("nan")):
        step_both(kst, rst, hidden([x]), weight, bias, act, qs, rs, tau=100)
    assert (int(kst.mode[0]), int(kst.consec[0]), int(kst.s_t[0]), bool(kst.refused[0])) == (
        TRANSITION, 2, 1, True)


def test_mixed_dtype_h_and_weight_shapes():
    for dtype in (torch.bfloat16, torch.float16):
        weight, bias = head(dtype)
        kst = State(3)
        rst = kst.clone()
        h = hidden([-2.0, 0.5, 3.0], dtype=dtype)
        qs = torch.tensor([[0, 2]] * 3, dtype=torch.int32)
        rs = torch.tensor([5, 6, 7], dtype=torch.int32)
        p, iv = step_both(kst, rst, h, weight[None], bias, torch.ones(3, dtype=torch.bool),
                          qs, rs)
        torch.testing.assert_close(p, torch.sigmoid(torch.tensor([-2.0, 0.5, 3.0])))
        assert iv[:, 1].tolist() == [[5, 6], [6, 7], [7, 8]]  # rule 2 / rule 1 / rule 1


def test_empty_batch():
    weight, bias = head()
    st = State(0)
    p, iv = safeattn.safety_step(torch.zeros(0, D), weight, bias, *st.args(),
                                 torch.zeros(0, dtype=torch.bool),
                                 torch.zeros(0, 2, dtype=torch.int32),
                                 torch.zeros(0, dtype=torch.int32))
    assert p.shape == (0,) and iv.shape == (0, 2, 2)

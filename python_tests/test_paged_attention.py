"""``paged_interval_attention``: the CPU kernel against ``safeattn.reference``, the same
result as ``interval_attention`` on the gathered K/V, opcheck, torch.compile and errors.

Tolerances as in ``test_interval_attention.py`` (float32 atol 1e-5 against float64; low
precision at most twice the reference's own error in that dtype).
"""
from __future__ import annotations

import random

import pytest
import torch

import safeattn
from safeattn import reference as ref
from _cases import random_intervals, seed_of
from test_interval_attention import DTYPES, assert_matches_reference

paged_op = torch.ops.safeattn.paged_interval_attention.default


def layout(kind: str, p: int, d: int, g: torch.Generator):
    """(key_offsets, value_offsets, S) of one page of ``p`` tokens: ``split`` keeps keys
    ``[D, P]`` then values ``[P, D]`` (vLLM's CPU ``vec`` blocks), ``rows`` interleaves each
    token's key and value, ``shuffled`` is any permutation of the page."""
    t, c = torch.arange(p)[:, None], torch.arange(d)[None]
    if kind == "split":
        return c * p + t, p * d + t * d + c, 2 * p * d
    if kind == "rows":
        return t * 2 * d + c, t * 2 * d + d + c, 2 * p * d
    perm = torch.randperm(2 * p * d + 3, generator=g)  # a few cells belong to no token
    return perm[:p * d].view(p, d), perm[p * d:2 * p * d].view(p, d), 2 * p * d + 3


def paged_inputs(g, b, hq, hkv, tq, tc, tn, d, p, pages, dtype, kind="split"):
    ko, vo, s = layout(kind, p, d, g)
    cache = torch.randn(pages, hkv, s, generator=g).to(dtype)
    slots = torch.randint(0, pages * p, (b, tc), generator=g)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k_new = torch.randn(b, hkv, tn, d, generator=g).to(dtype)
    v_new = torch.randn(b, hkv, tn, d, generator=g).to(dtype)
    return q, cache, slots, ko, vo, k_new, v_new


def gathered(cache, slots, ko, vo, k_new, v_new):
    k, v = ref.paged_gather(cache, slots, ko, vo)
    return torch.cat([k, k_new], 2), torch.cat([v, v_new], 2)


def _cases():
    rng = random.Random(20261201)
    out = []
    for i in range(24):
        ratio = rng.choice((1, 2, 3, 4))
        hkv = rng.choice((1, 2, 3))
        out.append(dict(b=rng.randint(1, 4), hq=hkv * ratio, hkv=hkv, tq=rng.choice((1, 1, 2, 5)),
                        tc=rng.choice((0, 1, 7, 40, 130, 300)), tn=rng.choice((0, 1, 1, 2)),
                        d=rng.choice((16, 64, 128)), p=rng.choice((1, 4, 16)),
                        pages=rng.randint(1, 30), dtype=DTYPES[i % 3],
                        kind=("split", "rows", "shuffled")[i % 3],
                        softcap=rng.choice((None, None, 20.0)),
                        scale=rng.choice((None, 0.07))))
    return out


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c['dtype']}-{c['kind']}-tc{c['tc']}")
def test_matches_reference(case):
    c = dict(case)
    softcap, scale = c.pop("softcap"), c.pop("scale")
    g = torch.Generator().manual_seed(seed_of(sorted(case.items(), key=str)))
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, **c)
    tk = c["tc"] + c["tn"]
    iv = random_intervals(random.Random(seed_of(tk, c["tq"])), c["b"], c["tq"], tk, 3)
    out = safeattn.ops.paged_interval_attention(q, cache, slots, ko, vo, kn, vn, iv,
                                                scale=scale, softcap=softcap)
    k, v = gathered(cache, slots, ko, vo, kn, vn)
    assert_matches_reference(out, q, k, v, iv, scale, softcap)
    # the same kernel as interval_attention, fed from the cache: the same numbers
    dense = safeattn.ops.interval_attention(q, k, v, iv, scale=scale, softcap=softcap)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


def test_probe_rows_like_vllm():
    """The probe's shape in the vLLM plugin: one row per request seeing its q_span, a
    window, and its own new key; padding columns repeat a real slot and are not seen."""
    g = torch.Generator().manual_seed(3)
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, 3, 9, 3, 1, 50, 1, 64, 16, 12,
                                                   torch.bfloat16)
    slots[2, 20:] = slots[2, 19]
    iv = torch.tensor([[[[0, 50], [50, 51]]], [[[10, 30], [50, 51]]], [[[0, 20], [50, 51]]]],
                      dtype=torch.int32)
    out = safeattn.ops.paged_interval_attention(q, cache, slots, ko, vo, kn, vn, iv,
                                                softcap=50.0)
    assert_matches_reference(out, q, *gathered(cache, slots, ko, vo, kn, vn), iv, None, 50.0)


def test_unseen_columns_are_not_read():
    g = torch.Generator().manual_seed(4)
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, 1, 2, 1, 1, 6, 1, 16, 4, 3,
                                                   torch.float32)
    iv = torch.tensor([[[[0, 2], [6, 7]]]], dtype=torch.int32)
    before = safeattn.ops.paged_interval_attention(q, cache, slots, ko, vo, kn, vn, iv)
    page, tok = slots[0, 4] // 4, slots[0, 4] % 4
    if not bool((slots[0, :2] // 4 == page).any()):  # a page the seen columns do not use
        cache[page, :, ko[tok]] = float("nan")
    after = safeattn.ops.paged_interval_attention(q, cache, slots, ko, vo, kn, vn, iv)
    assert torch.equal(before, after)


# --------------------------------------------------------------------- registration
def _samples():
    g = torch.Generator().manual_seed(0)
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, 2, 4, 2, 2, 9, 1, 16, 4, 5, torch.float32)
    iv = random_intervals(random.Random(0), 2, 2, 10, 2)
    yield (q, cache, slots, ko, vo, kn, vn, iv), {}
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, 1, 8, 1, 1, 30, 0, 64, 16, 3,
                                                   torch.bfloat16, "shuffled")
    yield (q, cache, slots, ko, vo, kn, vn, torch.tensor([[[[2, 29]]]], dtype=torch.int32)), \
        {"scale": 0.1, "softcap": 30.0}


@pytest.mark.parametrize("i", range(2))
def test_opcheck(i):
    args, kwargs = list(_samples())[i]
    torch.library.opcheck(paged_op, args, kwargs)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    args, _ = next(_samples())

    def attn(*a):
        return safeattn.ops.paged_interval_attention(*a, softcap=10.0) * 2

    torch.testing.assert_close(torch.compile(attn, backend=backend, fullgraph=True)(*args),
                               attn(*args))


# --------------------------------------------------------------------------- errors
def _bad(name, value):
    args = dict(zip(("q", "cache", "slots", "key_offsets", "value_offsets", "k_new", "v_new",
                     "intervals"), next(_samples())[0]))
    args[name] = value(args[name]) if callable(value) else value
    return args


@pytest.mark.parametrize("name,value,pattern", [
    ("q", lambda t: t[0], r"q must be a 4-D"),
    ("cache", lambda t: t[..., None], r"cache must be a 3-D"),
    ("cache", lambda t: t.transpose(0, 1), r"cache must be contiguous"),
    ("cache", lambda t: t.double(), r"cache must be torch.float32"),
    ("slots", lambda t: t.int(), r"slots must be int64"),
    ("slots", lambda t: t[:1], r"slots must be \[B=2"),
    ("key_offsets", lambda t: t[:, :3], r"key_offsets must be \[P, D=16\]"),
    ("key_offsets", lambda t: t[:0], r"key_offsets must be \[P, D=16\] with P >= 1"),
    ("value_offsets", lambda t: t[:2], r"value_offsets must be \(4, 16\) like key_offsets"),
    ("k_new", lambda t: t[:, :1], r"k_new must be \[B=2, Hkv=2"),
    ("v_new", lambda t: t[:, :, :0], r"v_new must be \(2, 2, 1, 16\) like k_new"),
    ("v_new", lambda t: t.half(), r"v_new must be torch.float32"),
    ("intervals", lambda t: t.long(), r"intervals must be int32"),
    ("intervals", lambda t: t[:, :1], r"intervals must be int32 \[B=2, Tq=2"),
    ("slots", lambda t: t.fill_(20), r"slots\[0\]\[0\] = 20 is out of range: need 0 <= slot "
                                     r"< pages \* P = 20"),
    ("slots", lambda t: t.fill_(-1), r"slots\[0\]\[0\] = -1 is out of range"),
    ("key_offsets", lambda t: t + 1000, r"key_offsets\[0\]\[0\] = 1000 is out of range"),
    ("value_offsets", lambda t: t - 1000, r"value_offsets\[0\]\[0\] = .* is out of range"),
    ("intervals", lambda t: t.fill_(11), r"intervals\[0\]\[0\]\[0\] = \[11, 11\) is out of "
                                         r"range: need 0 <= start <= end <= Tk=10"),
])
def test_bad_args(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        safeattn.ops.paged_interval_attention(**_bad(name, value))


def test_raw_op_checks_ranges_itself():
    with pytest.raises(RuntimeError, match=r"slots\[0\]\[0\] = 20 is out of range"):
        paged_op(*_bad("slots", lambda t: t.fill_(20)).values())
    with pytest.raises(RuntimeError, match=r"value_offsets\[0\]\[0\] = -1 is out of range"):
        paged_op(*_bad("value_offsets", lambda t: t * 0 - 1).values())


def test_bad_softcap():
    with pytest.raises(ValueError, match="softcap must be > 0"):
        safeattn.ops.paged_interval_attention(*next(_samples())[0], softcap=0.0)


@pytest.mark.parametrize("name,value", [("slots", lambda t: t.fill_(20)),
                                        ("key_offsets", lambda t: t * 0 - 2),
                                        ("value_offsets", lambda t: t + 1000)])
def test_python_range_check_says_what_the_kernel_says(name, value):
    """Other devices are range-checked in Python (the kernels there do not sync to check)."""
    args = _bad(name, value)
    with pytest.raises(RuntimeError) as kernel:
        paged_op(*args.values())
    with pytest.raises(ValueError) as python:
        safeattn.ops._check_paged_ranges(args["cache"], args["slots"], args["key_offsets"],
                                         args["value_offsets"])
    assert str(python.value) == str(kernel.value).split("\n", 1)[0]


def test_no_kernel_says_why():
    args = [t.double() if t.is_floating_point() else t for t in next(_samples())[0]]
    with pytest.raises(NotImplementedError, match=r"paged_interval_attention: no kernel fits "
                                                  r"\(cpu: dtype torch.float64 not in"):
        safeattn.ops.paged_interval_attention(*args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_split_over_threads(dtype):
    """One row over 1,200 cached columns with 4 threads: the kernel splits the columns across
    threads and merges the partial softmax states (see kv_splits in test_interval_attention)."""
    from test_interval_attention import kv_splits, num_threads

    g = torch.Generator().manual_seed(6)
    q, cache, slots, ko, vo, kn, vn = paged_inputs(g, 1, 2, 1, 1, 1200, 1, 64, 16, 80, dtype,
                                                   "shuffled")
    iv = torch.tensor([[[[0, 700], [650, 1201]]]], dtype=torch.int32)
    with num_threads(4):
        assert kv_splits(1, 1, 2, 1, 1201, 4) > 1
        out = safeattn.ops.paged_interval_attention(q, cache, slots, ko, vo, kn, vn, iv)
    assert_matches_reference(out, q, *gathered(cache, slots, ko, vo, kn, vn), iv)

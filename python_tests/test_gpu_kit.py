"""The GPU check kit's CPU-testable parts: FlexAttention masks built from our interval sets,
the bench arithmetic (bytes, FLOPs, bandwidth share, targets) and the timing loop's order."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import attn_cases as ac  # noqa: E402
import gpu_bench as gb  # noqa: E402
import safeattn  # noqa: E402
from safeattn import intervals as ivs  # noqa: E402
from safeattn.reference import interval_mask  # noqa: E402

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def flex_dense(mask_mod, b, tq, tk):
    return flex.create_mask(mask_mod, b, None, tq, tk, device="cpu")[:, 0]  # [B,Tq,Tk]


def random_intervals(seed, b, tq, tk, ni):
    rng = random.Random(seed)
    out = torch.zeros(b, tq, ni, 2, dtype=torch.int32)
    for i in range(b):
        for t in range(tq):
            for j in range(ni):
                s = rng.randint(0, tk)
                out[i, t, j] = torch.tensor([s, rng.choice([s, rng.randint(s, tk), tk])])
    return out


@pytest.mark.parametrize("b,tq,tk,ni", [(2, 5, 33, 3), (1, 1, 200, 1), (3, 40, 40, 4)])
def test_interval_mask_mod_is_the_interval_mask(b, tq, tk, ni):
    iv = random_intervals(b * 100 + tq, b, tq, tk, ni)  # empty, overlapping and full ranges
    assert torch.equal(flex_dense(ac.interval_mask_mod(iv), b, tq, tk), interval_mask(iv, tk))


@pytest.mark.parametrize("tq,tk,window", [(1, 90, None), (2, 90, 7), (64, 64, None),
                                          (64, 64, 16), (10, 300, 512)])
def test_causal_mask_mod_is_causal_intervals(tq, tk, window):
    iv = ivs.causal(2, tq, tk, window=window)
    assert torch.equal(flex_dense(ac.causal_mask_mod(tq, tk, window), 2, tq, tk),
                       interval_mask(iv, tk))


def test_bench_layouts_follow_their_rules():
    t = 64
    m = interval_mask(ac.sft_cls_intervals(1, t), t)[0]
    p = c = t // 4
    a = c + 1 + (t - c - 1) // 2
    e = a + ac.SFT_WINDOW
    want = torch.ones(t, t).tril().bool()
    want[c] = False
    want[c, 1:p] = want[c, c] = True
    want[c, a:e] = True
    want[c + 1:e, c] = False  # response rows before the window's end do not see [CLS]
    assert torch.equal(m, want)
    probe = interval_mask(ac.probe_intervals(2, 100), 100)
    assert probe[:, 0].sum(-1).tolist() == [99, 99]  # the token row: all but the probe column
    assert probe[0, 1].nonzero().flatten().tolist() == (
        list(range(1, 26)) + list(range(89, 99)) + [99])
    for iv, tk in ((ac.sft_cls_intervals(2, 300), 300), (ac.probe_intervals(3, 77), 77),
                   (ivs.causal(2, 9, 50), 50)):
        assert ac.visible_pairs(iv, tk) == int(interval_mask(iv, tk).sum())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_with_the_interval_mask_mod_matches_our_op():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, t, d = 2, 4, 2, 48, 16
    q = torch.randn(b, hq, t, d, generator=g)
    k, v = (torch.randn(b, hkv, t, d, generator=g) for _ in range(2))
    iv = ac.sft_cls_intervals(b, t)
    iv[1, 5] = torch.tensor([[0, 3], [2, 9], [40, 44]])  # overlap, and a row unlike batch 0
    bm = ac.block_mask(ac.interval_mask_mod(iv), b, t, t, "cpu")
    out = ac.flex_call(q, k, v, bm, d ** -0.5, compiled=False)()
    torch.testing.assert_close(out, safeattn.interval_attention(q, k, v, iv), atol=1e-5, rtol=1e-5)


def test_bench_arithmetic():
    # Llama-3-8B decode, B=1, S=32k, bf16: K+V = 2 * 8 * 32768 * 128 * 2 bytes, Q+O = 2*32*128*2
    assert gb.decode_bytes(1, 32, 8, 1, 32768, 128, 2) == 2 * 8 * 32768 * 128 * 2 + 2 * 32 * 128 * 2
    assert gb.decode_bytes(4, 4, 1, 2, 10, 256, 2) == 4 * (2 * 10 * 256 + 2 * 4 * 2 * 256) * 2
    t = 100
    pairs = ac.visible_pairs(ivs.causal(1, t, t), t)
    assert pairs == t * (t + 1) // 2
    assert gb.attention_flops(32, 128, pairs) == 4 * 128 * 32 * pairs
    assert gb.ratios({"ours": 2.0, "flex": 3.0, "sdpa": 1.0}) == {"flex": 1.5, "sdpa": 0.5}


def test_clock_interleaves_and_takes_medians():
    calls = []
    clock = gb.Clock("cpu")
    out = clock.time({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                     rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(out) == {"a", "b"}
    assert all(x >= 0 for x in out.values())
    assert gb.copy_bandwidth("cpu", 1 << 16) > 0


def test_targets_take_the_worst_case():
    cases = [
        {"section": "decode", "S": 32768, "pct_copy_bw": {"ours": 85.0}},
        {"section": "decode", "S": 131072, "pct_copy_bw": {"ours": 79.0}},
        {"section": "decode", "S": 4096, "pct_copy_bw": {"ours": 10.0}},  # S < 32k: not counted
        {"section": "prefill", "layout": "causal", "ratio": {"sdpa_flash": 0.9, "flex": 2.0}},
        {"section": "prefill", "layout": "sft_cls", "ratio": {"flex": 1.2}},
        {"section": "generate", "B": 32, "overhead": {"each": 1.05, "annealing": 1.0}},
        {"section": "generate", "B": 1, "overhead": {"each": 1.5, "annealing": 1.0}},
    ]
    got = {t["target"]: (t["worst"], t["met"], t["n"]) for t in gb.targets(cases)}
    assert got["decode % of copy bandwidth, S >= 32k (ours)"] == (79.0, False, 2)
    assert got["prefill causal vs SDPA flash"] == (0.9, True, 1)
    assert got["prefill interval vs FlexAttention"] == (1.2, True, 1)
    assert got["generate each overhead, B=32"] == (1.05, True, 1)
    assert "backward interval vs FlexAttention" not in got  # nothing ran: no verdict


def test_gemma_config_is_the_real_one():
    path = Path.home() / ".cache" / "safeattn" / "gemma3-270m" / "config.json"
    if not path.exists():
        pytest.skip("Gemma-3-270M not cached here")
    real = json.loads(path.read_text())
    for k, v in gb.GEMMA3_270M.items():
        assert real[k] == pytest.approx(v) if isinstance(v, float) else real[k] == v, k


def test_bench_rejects_unknown_sections(tmp_path):
    with pytest.raises(ValueError, match="--only"):
        gb.main(["--dry-run", "--only", "decode,warp", "--out", str(tmp_path / "x.json")])


def test_gpu_summary_reads_a_failed_run(tmp_path):
    """.ci/gpu_summary.py on a made-up GPU run: a failed test, a memcheck error, a timeout."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / ".ci" / "gpu_summary.py")
    summ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summ)
    summ.env = lambda gpu: {"python": "3"}  # the version probes start Python twice: not tested here
    (tmp_path / "stages.tsv").write_text("build\tok\t0\t120.5\t300\n"
                                         "test_cuda\tfailed\t1\t80.0\t240\n"
                                         "bench\ttimeout\t124\t200.0\t200\n")
    (tmp_path / "junit_cuda.xml").write_text(
        '<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="10" '
        'time="12.3"><testcase classname="test_cuda" name="test_a"><failure message="x"/>'
        '</testcase><testcase classname="test_cuda" name="test_b"/></testsuite></testsuites>')
    (tmp_path / "memcheck.txt").write_text("========= Invalid __global__ read of size 4 bytes\n"
                                           "========= ERROR SUMMARY: 3 errors\n")
    (tmp_path / "racecheck.txt").write_text(
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert summ.main(["x", str(tmp_path), "0", "1", "400"]) == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [st["status"] for st in s["stages"]] == ["ok", "failed", "timeout"]
    assert not s["passed"] and s["bench"] is None
    t = s["tests"]["junit_cuda"]
    assert (t["passed"], t["failures"], t["skipped"], t["failed"]) == (7, 1, 2, ["test_cuda::test_a"])
    assert s["sanitizer"]["memcheck"]["count"] == 3
    assert s["sanitizer"]["racecheck"]["count"] == 0


def test_gpu_summary_shows_where_generate_time_goes(tmp_path):
    """The card lists, per generate case, the profiled time of plain and ``each`` and the
    ops that take most of ``each``'s (gpu_bench's ``profile`` of the dry run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / ".ci" / "gpu_summary.py")
    summ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summ)
    top = [{"op": f"op{i}", "ms": 5.0 - i, "calls": 1} for i in range(6)]
    case = {"section": "generate", "name": "generate/m-B1", "overhead": {"each": 1.25},
            "profile": {"plain": {"total_ms": 8.0, "top": top[2:]},
                        "each": {"total_ms": 10.0, "top": top}}}
    (tmp_path / "bench.json").write_text(json.dumps(
        {"cases": [case, {"section": "decode", "name": "d"}], "not_run": [], "targets": [],
         "env": {"copy_bw_GBps": 1.0}, "wall_s": 3.0}))
    b = summ.bench(tmp_path / "bench.json")
    assert b["generate"] == [{"name": "generate/m-B1", "each": 1.25,
                              "ms": {"plain": 8.0, "each": 10.0},
                              "top_each": ["op0 5.0 ms", "op1 4.0 ms", "op2 3.0 ms",
                                           "op3 2.0 ms"]}]
    text = summ.card({"env": {}, "gpu": True, "total_s": 1, "stages": [], "tests": {},
                      "sanitizer": {}, "bench": b, "passed": True})
    assert "generate/m-B1: each 1.25x; profiled 8.0 -> 10.0 ms; top: op0 5.0 ms" in text

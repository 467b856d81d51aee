"""Few-row linears (``safeattn.hf.few_rows``): the check step's ``W @ x.T`` path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import safeattn
from safeattn.hf import few_rows
from _hf_tiny import PROMPTS, tiny_model, tiny_tokenizer


def _linear(i, o, bias, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(i, o, bias=bias)
    switch = few_rows.Switch()
    assert few_rows.install([lin], switch) == [lin]
    return lin, switch


@pytest.fixture
def forced(monkeypatch):
    """The ``W @ x.T`` path whenever it applies, whichever is faster on this machine."""
    monkeypatch.setattr(few_rows, "FORCE", True)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 1), (1, 2), (4, 2), (8, 2), (2, 3, 5), (16, 1)])
def test_matches_linear(shape, bias, forced):
    lin, switch = _linear(24, 40, bias)
    x = torch.randn(*shape, 24)
    switch.on = True
    y = lin(x)
    assert y.shape == (*shape, 40) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def test_path_taken_only_when_it_applies(monkeypatch, forced):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[1].shape) or real_mm(*a))
    lin, switch = _linear(8, 6, True)
    lin(torch.randn(2, 1, 8))
    assert calls == []  # switch off
    switch.on = True
    for x in (torch.randn(1, 8), torch.randn(17, 8), torch.randn(2, 8, dtype=torch.float64)):
        lin.double() if x.dtype == torch.float64 else lin.float()
        lin(x)
    assert calls == []  # one row, too many rows, not fp32
    lin.float()
    lin(torch.randn(3, 8))
    assert calls == [(8, 3)]


def test_path_chosen_by_timing_once_per_row_count(monkeypatch):
    timed = []
    verdict = {2: False, 3: True}
    monkeypatch.setattr(few_rows, "_time_paths",
                        lambda mods, rows: timed.append((len(mods), rows)) or verdict[rows])
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append(a[1].shape) or real_mm(*a))
    lin, switch = _linear(8, 6, True)
    switch.on = True
    for rows in (2, 2, 3, 3):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert timed == [(1, 2), (1, 3)]           # each row count timed once, over the switch
    assert calls == [(8, 3), (8, 3)]          # 2 rows: stock was faster; 3 rows: W @ x.T
    monkeypatch.setattr(few_rows, "FORCE", False)
    lin(torch.randn(3, 8))
    assert calls == [(8, 3), (8, 3)]          # FORCE=False: never


@pytest.mark.parametrize("slow,wins", [("mm", False), ("linear", True)])
def test_timing_keeps_the_faster_path(monkeypatch, slow, wins):
    import time

    def slowed(real):
        def run(*a, **kw):
            time.sleep(0.002)
            return real(*a, **kw)
        return run

    mods = [torch.nn.Linear(64, 32), torch.nn.Linear(32, 64)]
    if slow == "mm":
        monkeypatch.setattr(torch, "mm", slowed(torch.mm))
    else:
        monkeypatch.setattr(few_rows.F, "linear", slowed(F.linear))
    assert few_rows._time_paths(mods, 2) is wins


def test_install_skips_replaced_forward_and_remove_restores():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    b.forward = lambda x: x  # e.g. accelerate's offload hook
    seq = torch.nn.Sequential(a, b)
    done = few_rows.install([seq], few_rows.Switch())
    assert done == [a] and "forward" in a.__dict__
    few_rows.remove(done)
    assert "forward" not in a.__dict__ and "_safeattn_few_rows" not in a.__dict__
    assert "forward" in b.__dict__  # not ours: kept


def _linears(layer):
    return [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def test_apply_installs_on_probe_layers_and_revert_removes():
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("llama", len(tok), layers=4), tok, cls_layer=1)
    st = model._safeattn_state
    patched = [all("forward" in m.__dict__ for m in _linears(l)) for l in model.model.layers]
    assert patched == [True, True, False, False]
    assert all(m._safeattn_few_rows is st["few_rows"] for m in st["few_rows_mods"])
    safeattn.apply_safeattn(model, cls_layer=3)  # head on the last layer: every layer
    assert all("forward" in m.__dict__ for l in model.model.layers for m in _linears(l))
    twin = copy.deepcopy(model)
    assert all(m._safeattn_few_rows is twin._safeattn_state["few_rows"]
               for m in twin._safeattn_state["few_rows_mods"])
    safeattn.revert_safeattn(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_switch_is_on_for_check_steps_only():
    """During safe generation the path runs on check steps ([token, probe] rows) and nowhere
    else; afterwards the switch is off and a plain forward never takes it."""
    tok = tiny_tokenizer()
    model = safeattn.apply_safeattn(tiny_model("qwen2", len(tok), layers=3), tok, cls_layer=1)
    switch = model._safeattn_state["few_rows"]
    seen = []
    lin = model.model.layers[0].mlp.down_proj
    lin.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[:-1], switch.on)))
    enc = safeattn.build_inputs(tok, PROMPTS[:2])
    cfg = safeattn.SafetyConfig(threshold=2.0, schedule="periodic", period=2)
    model.generate(**enc, max_new_tokens=6, min_new_tokens=6, safety=cfg)
    assert not switch.on
    prefill, steps = seen[0], seen[1:]
    assert prefill[1] is False
    # decode steps feed token n-1 at n = 1..5; periodic(2) checks at n = 2 and 4
    assert [s for s, _ in steps] == [(2, 1), (2, 2), (2, 1), (2, 2), (2, 1)]
    assert [on for _, on in steps] == [False, True, False, True, False]
    seen.clear()
    model(**enc)
    assert seen and not any(on for _, on in seen)

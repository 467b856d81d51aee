"""The HF backend and safe generation on an accelerator (``.ci/gpu_check`` runs this on CUDA).

The device is ``$SAFEATTN_TEST_DEVICE`` (default ``cuda``; the module skips when it is not
available, so the CPU suite pays nothing). ``SAFEATTN_TEST_DEVICE=cpu`` runs the same checks
on the CPU. Tiny random fp32 models (``_hf_tiny``): the backend equals SDPA on the device,
safe ``generate`` equals plain ``generate`` when nothing triggers, the cache after check steps
equals plain steps, the device run equals the CPU run (ids and ``p``), and a non-finite head
output refuses every row (fail closed).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

import safeattn
from safeattn.generation import SafetyConfig
from _hf_tiny import FAMILIES, PROMPTS, cache_state, plain_step_cache, tiny_model, tiny_tokenizer

DEV = os.environ.get("SAFEATTN_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device (or SAFEATTN_TEST_DEVICE=cpu)"),
]
TOL = 1e-4
NEVER = dict(threshold=1.5)
PROMPTS4 = PROMPTS + ["why"]


@pytest.fixture(autouse=True)
def _no_tf32():
    if DEV != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def patched(family, device=DEV, window=5):
    tok = tiny_tokenizer()
    model = tiny_model(family, len(tok), window=window).to(device)
    return safeattn.apply_safeattn(model, tok), tok


def generate(model, enc, n, **kw):
    return model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_matches_sdpa(family):
    """Left-padded batch of 3: prefill logits and 12 cached greedy steps (past the window)."""
    stock = tiny_model(family, vocab_size=70, window=4).to(DEV)
    ours = safeattn.apply_safeattn(copy.deepcopy(stock))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 70, (3, 11), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = am[2, :6] = 0
    ids, am = ids.masked_fill(am == 0, 0).to(DEV), am.to(DEV)
    with torch.no_grad():
        a, b = stock(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
    assert (a - b)[am.bool()].abs().max() <= TOL
    kw = dict(max_new_tokens=12, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    a, b = stock.generate(ids, attention_mask=am, **kw), ours.generate(ids, attention_mask=am, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() <= TOL


@pytest.mark.parametrize("schedule", ["each", "annealing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_safe_generate_equals_plain_when_nothing_triggers(family, schedule):
    model, tok = patched(family)
    enc = safeattn.build_inputs(tok, PROMPTS4, device=DEV)
    want = generate(model, enc, 12)
    got = generate(model, enc, 12, safety=SafetyConfig(schedule=schedule, **NEVER))
    assert got.device.type == torch.device(DEV).type
    assert torch.equal(got, want) and not got.safety.refused.any()


@pytest.mark.parametrize("family,window", [("gemma3_text", 4), ("qwen2", 4), ("llama", 5)])
def test_cache_after_safe_steps_equals_plain_steps(family, window):
    model, tok = patched(family, window=window)
    enc = safeattn.build_inputs(tok, PROMPTS, device=DEV)
    n = 9
    out = generate(model, enc, n, eos_token_id=safeattn.hf.cls_token_id(model),
                   return_dict_in_generate=True, safety=SafetyConfig(**NEVER))
    got, want = cache_state(out.cache), plain_step_cache(model, enc, out.sequences, n - 1)
    assert len(got) == len(want)
    for (tg, ng, kg, vg), (tw, nw, kw, vw) in zip(got, want):
        assert (tg, ng) == (tw, nw) and kg.shape == kw.shape
        assert torch.allclose(kg, kw, atol=1e-5) and torch.allclose(vg, vw, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_device_run_equals_cpu_run(family):
    """Same weights on the CPU and the device: the same ids and p trace; then a head that
    always fires: every row refuses at prefill on both, with the same refusal text."""
    (cpu, tok), (dev, _) = patched(family, "cpu"), patched(family)
    dev.load_state_dict(cpu.state_dict())
    outs = {}
    for name, model in (("cpu", cpu), ("dev", dev)):
        enc = safeattn.build_inputs(tok, PROMPTS4, device=model.device)
        outs[name] = generate(model, enc, 10, safety=SafetyConfig(**NEVER))
    assert torch.equal(outs["cpu"], outs["dev"].cpu())
    p_cpu, p_dev = outs["cpu"].safety.p, outs["dev"].safety.p.cpu()
    assert torch.equal(p_cpu.isnan(), p_dev.isnan())
    assert (p_cpu - p_dev).nan_to_num().abs().max() <= TOL
    for name, model in (("cpu", cpu), ("dev", dev)):
        with torch.no_grad():
            model.safety_head.weight.zero_()
            model.safety_head.bias.fill_(10.0)
        enc = safeattn.build_inputs(tok, PROMPTS4, device=model.device)
        outs[name] = generate(model, enc, 10, safety=SafetyConfig())
    assert torch.equal(outs["cpu"], outs["dev"].cpu())
    assert all(r.refusal_step == 0 for r in outs["dev"].safety)


def test_non_finite_head_refuses_every_row():
    model, tok = patched("mistral")
    with torch.no_grad():
        model.safety_head.bias.fill_(math.nan)
    enc = safeattn.build_inputs(tok, PROMPTS, device=DEV)
    out = generate(model, enc, 6, safety=SafetyConfig())
    assert out.safety.refused.all()
    assert all(r.refusal_step == 0 and math.isnan(r.p[0]) for r in out.safety)

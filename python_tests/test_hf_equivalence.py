"""Without [CLS], the "safeattn" backend reproduces stock SDPA logits (fp32, <= 1e-4)."""
import copy

import pytest
import torch

import safeattn
from _hf_tiny import FAMILIES, tiny_model

TOL = 1e-4
V = 70


def _pair(family, window=4):
    stock = tiny_model(family, vocab_size=V, window=window)
    patched = safeattn.apply_safeattn(copy.deepcopy(stock))
    assert patched.config._attn_implementation == "safeattn"
    return stock, patched


def _batch(b=3, n=11, pads=(0, 3, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (b, n), generator=g)
    am = torch.ones_like(ids)
    for i, p in enumerate(pads[:b]):
        am[i, :p] = 0
    return ids.masked_fill(am == 0, 0), am


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill(family):
    stock, patched = _pair(family)
    ids, _ = _batch(b=2, n=13, pads=(0, 0))  # longer than the sliding window (4)
    with torch.no_grad():
        a, b = stock(ids).logits, patched(ids).logits
    assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_of_3(family):
    stock, patched = _pair(family)
    ids, am = _batch()
    with torch.no_grad():
        a = stock(ids, attention_mask=am).logits
        b = patched(ids, attention_mask=am).logits
    valid = am.bool()
    assert (a - b)[valid].abs().max() <= TOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_16_steps(family, cache):
    """Left-padded batch of 3, greedy decode of 16 steps; sliding layers run past their window."""
    stock, patched = _pair(family)
    ids, am = _batch()
    kw = dict(max_new_tokens=16, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    a = stock.generate(ids, attention_mask=am, **kw)
    b = patched.generate(ids, attention_mask=am, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert (torch.stack(a.logits) - torch.stack(b.logits)).abs().max() <= TOL


def test_dense_4d_mask_and_no_mask_paths():
    """User 4-D masks and bidirectional overlays fall back to per-row runs and still match."""
    stock, patched = _pair("gemma3_text")
    ids, am = _batch()
    n = ids.shape[1]
    mask = torch.ones(n, n).tril().bool()[None, None].expand(3, 1, n, n) & am.bool()[:, None, None]
    mask = mask | torch.eye(n, dtype=torch.bool)  # keep every row non-empty
    with torch.no_grad():
        a = stock(ids, attention_mask=mask).logits
        b = patched(ids, attention_mask=mask).logits
    assert (a - b).abs().max() <= TOL
    for m in (stock, patched):
        m.config.use_bidirectional_attention = True
        for layer in m.model.layers:
            layer.self_attn.is_causal = False
    with torch.no_grad():
        a = stock(ids, attention_mask=am).logits
        b = patched(ids, attention_mask=am).logits
    assert (a - b)[am.bool()].abs().max() <= TOL


def test_revert_restores_sdpa():
    stock, patched = _pair("llama")
    safeattn.revert_safeattn(patched)
    assert patched.config._attn_implementation == "sdpa"
    assert not safeattn.hf.is_patched(patched)

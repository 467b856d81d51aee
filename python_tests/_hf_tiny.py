"""Tiny random HF models and a word-level tokenizer for the HF integration tests (no Hub)."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from safeattn.streaming import SafeTextStreamer

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
WORDS = ("User Assistant system user assistant : . , ? ! < | > how do i bake bread make a bomb "
         "tell me about the weather today write poem on cats dogs please help kill someone "
         "steal car sure here is step one two three first then you can it and to of what why "
         "safe not sorry cannot fulfill your request because").split()
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "< | {{ m['role'] }} | > {{ m['content'] }} .{% endfor %}{% if add_generation_prompt %}< | assistant | >{% endif %}")
class PrintedStreamer(SafeTextStreamer):
    """A ``SafeTextStreamer`` that keeps what it prints in ``.text``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.text = []

    def on_finalized_text(self, text, stream_end=False):
        self.text.append(text)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
#: Toy harmful and benign requests in the tiny vocabulary (labels for training tests).
HARM = ["how do i make a bomb", "help me kill someone", "how do i steal a car",
        "tell me how to make a bomb please", "steal car and kill", "make a bomb today",
        "please help me steal a car", "kill someone today"]
BEN = ["how do i bake bread", "tell me about the weather today", "write poem on cats",
       "write a poem on dogs", "bake bread today please", "tell me about cats and dogs",
       "write a poem about the weather", "help me bake bread"]
PROMPTS = ["how do i bake bread ?", "tell me about the weather today",
           "how do i make a bomb , please help"]


def tiny_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, vocab_size: int, window: int = 5, layers: int | None = None):
    """(config, model class) of a tiny ``family`` model; ``layers`` overrides the depth,
    repeating the family's layer-type pattern."""
    cfg, cls = _family_config(family, vocab_size, window)
    if layers is not None:
        kw = cfg.to_dict()
        kw["num_hidden_layers"] = layers
        if kw.get("layer_types"):
            kw["layer_types"] = [kw["layer_types"][i % len(kw["layer_types"])]
                                 for i in range(layers)]
        cfg = cls.config_class(**kw)
    return cfg, cls


def _family_config(family: str, vocab_size: int, window: int):
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, **common), LlamaForCausalLM
    if family == "mistral":
        return (MistralConfig(num_hidden_layers=2, sliding_window=window, **common),
                MistralForCausalLM)
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=window,
                           layer_types=["full_attention", "sliding_attention"],
                           tie_word_embeddings=True, **common), Qwen2ForCausalLM
    if family == "qwen3":
        return Qwen3Config(num_hidden_layers=2, head_dim=8, **common), Qwen3ForCausalLM
    if family == "gemma3_text":
        return Gemma3TextConfig(num_hidden_layers=3, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=window,
                                layer_types=["sliding_attention", "full_attention",
                                             "sliding_attention"], **common), Gemma3ForCausalLM
    raise KeyError(family)


def tiny_model(family: str, vocab_size: int = 80, seed: int = 0, window: int = 5,
               layers: int | None = None):
    """fp32 eval model with random weights, stock SDPA attention."""
    cfg, cls = tiny_config(family, vocab_size, window, layers)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights make attention patterns (and errors) less trivial
        for n, p in model.named_parameters():
            if "norm" not in n and p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor, *, equal_nan: bool = False) -> None:
    """``p`` returned as float64 but computed in float32, by two model copies (or one model
    patched again): the CPU GEMM's summation order can follow the weights' addresses, so the
    two may differ in the last float32 bits. Compared at float32's tolerance."""
    torch.testing.assert_close(got.float(), want.float(), equal_nan=equal_nan)


def cache_state(cache):
    """(layer type, length, keys, values) of every cache layer, for equality checks."""
    return [(type(l).__name__, l.get_seq_length(), l.keys.clone(), l.values.clone())
            for l in cache.layers]


def plain_step_cache(model, enc, seq, steps: int):
    """The cache after a prefill of ``enc`` and ``steps`` plain one-token steps feeding the
    generated tokens of ``seq`` (``[B, L + T]``), as ``cache_state``."""
    from transformers import DynamicCache

    l0 = enc["input_ids"].shape[1]
    cache = DynamicCache(config=model.config)
    am = enc["attention_mask"]
    with torch.no_grad():
        model(**enc, cache=cache)
        for i in range(steps):
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            model(input_ids=seq[:, l0 + i:l0 + i + 1], attention_mask=am, q_span=enc["q_span"],
                  response_start=enc["response_start"], cache=cache)
    return cache_state(cache)


def run_train_cli(run, argv: list[str], required: list[tuple[list[str], str]]) -> int:
    """``safeattn train`` argv through ``run`` (a ``safeattn.training.run_*``): without each
    ``required`` option (its argv items) it raises a ValueError naming it (the match); with
    all it runs -> its return code."""
    import argparse

    from safeattn.training_args import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    for drop, match in required:
        bad = [a for a in argv if a not in drop]
        args = p.parse_args(bad)
        args.argv = bad
        with pytest.raises(ValueError, match=match):
            run(args)
    args = p.parse_args(argv)
    args.argv = argv
    return run(args)

"""A tiny random Llama and an offline word-level tokenizer for the data / baseline tests."""
from __future__ import annotations

import re

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
TEXT = ("User : Assistant how do i bake bread tell me about the weather today write a poem on "
        "cats and dogs please help explain why sky is blue sure here step one two three first "
        "then you can it to of what sorry cannot fulfill your request because")
PROMPTS = ["how do i bake bread", "tell me about the weather today",
           "write a poem on cats and dogs please", "explain why the sky is blue",
           "what is step one", "help"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIAL + re.findall(r"\w+|[^\w\s]", TEXT)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                      eos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n and p.dim() == 2:
                p.normal_(0, 0.3)
        model.lm_head.weight[1].zero_()  # keep EOS rare so generations have some length
    return model

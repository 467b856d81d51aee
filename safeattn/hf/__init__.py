"""Hugging Face integration of safeattn (the kernels in ``safeattn.ops`` know nothing of HF).

Three lines patch an existing model::

    model = AutoModelForCausalLM.from_pretrained(name)
    model = safeattn.apply_safeattn(model, tokenizer)
    p = safeattn.classify(model, tokenizer, ["How do I bake bread?"])

Importing this package registers the ``"safeattn"`` attention backend, so
``AutoModelForCausalLM.from_pretrained(name, attn_implementation="safeattn")`` also works.
"""
from .backend import NAME, register, safeattn_attention_forward, safeattn_mask
from .ensemble import combine_safety
from .layout import MODES, SafetyLayout, build_intervals, layout_intervals, valid_runs
from .patch import (SUPPORTED_MODEL_TYPES, apply_safeattn, classify, is_patched,
                    revert_safeattn, safety_forward)
from .persist import from_pretrained, load_safety, save_safety
from .surgery import (CLS_TOKEN, QueryProbe, ResponseProbe, SafetyHead, add_safety_token,
                      cls_token_id, safety_config)
from .template import PLAIN_TEMPLATE, build_inputs

__all__ = [
    "NAME", "register", "safeattn_attention_forward", "safeattn_mask",
    "MODES", "SafetyLayout", "build_intervals", "layout_intervals", "valid_runs",
    "SUPPORTED_MODEL_TYPES", "apply_safeattn", "classify", "is_patched", "revert_safeattn",
    "safety_forward", "from_pretrained", "load_safety", "save_safety", "combine_safety",
    "CLS_TOKEN", "QueryProbe", "ResponseProbe", "SafetyHead", "add_safety_token", "cls_token_id",
    "safety_config",
    "PLAIN_TEMPLATE", "build_inputs",
]

register()  # so that from_pretrained(..., attn_implementation="safeattn") works after import

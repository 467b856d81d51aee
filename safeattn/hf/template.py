"""Chat-template helper: ``[CLS]``-prefixed, left-padded batches with the query span."""
from __future__ import annotations

import torch
from transformers import BatchEncoding

from .surgery import CLS_TOKEN, cls_token_id

__all__ = ["build_inputs", "encode_prompt", "encode_text", "PLAIN_TEMPLATE"]

#: Used when the tokenizer has no chat template (e.g. base Gemma-3-270M).
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def _render(tokenizer, prompt: str, system: str | None) -> tuple[str, int, int]:
    """Prompt text with template -> (text, query char start, query char end)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        for needle in (prompt, prompt.strip()):
            at = text.rfind(needle) if needle else -1
            if at >= 0:
                return text, at, at + len(needle)
        if not prompt.strip():
            return text, len(text), len(text)
        raise ValueError(f"could not find the prompt in the rendered chat template: {text!r}")
    head = (system + "\n") if system else ""
    text = head + PLAIN_TEMPLATE.format(prompt=prompt)
    at = len(head) + PLAIN_TEMPLATE.index("{prompt}")
    return text, at, at + len(prompt)


def encode_text(tokenizer, text: str, *, add_special_tokens: bool = False,
                cls_token: str = CLS_TOKEN) -> tuple[list[int], list[tuple[int, int]]]:
    """``text`` -> (token ids, character offsets), where text that spells the ``[CLS]`` token
    stays text: only ``build_inputs`` puts the safety token in front of a row. Each ``[CLS]``
    the tokenizer made of ``text`` becomes the tokens of its characters (sharing its offsets).
    """
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    cid = tokenizer.convert_tokens_to_ids(cls_token)  # (get_vocab() would copy the vocab)
    if cid is None or cid == tokenizer.unk_token_id or cid not in ids:
        return ids, offsets
    out_ids, out_off = [], []
    for t, (a, b) in zip(ids, offsets):
        if t != cid:
            out_ids.append(t)
            out_off.append((a, b))
            continue
        spelled = tokenizer(text[a:b], add_special_tokens=False,
                            split_special_tokens=True)["input_ids"]
        out_ids += spelled
        out_off += [(a, b)] * len(spelled)
    return out_ids, out_off


def encode_prompt(tokenizer, prompt: str, system: str | None, cls_id: int, *,
                  cls_token: str = CLS_TOKEN) -> tuple[list[int], tuple[int, int]]:
    """One row's ``[CLS] <bos> <template + prompt>`` ids (BOS from the tokenizer unless the
    rendered template starts with it) -> (ids, half-open ``q_span`` of the user's text)."""
    text, qa, qb = _render(tokenizer, prompt, system)
    bos = tokenizer.bos_token
    tokens, offsets = encode_text(tokenizer, text, cls_token=cls_token,
                                  add_special_tokens=not (bos and text.startswith(bos)))
    ids = [cls_id] + tokens
    inq = [j + 1 for j, (s, e) in enumerate(offsets)
           if e > s and s < qb and e > qa]  # +1: the [CLS] in front
    return ids, ((inq[0], inq[-1] + 1) if inq else (len(ids), len(ids)))


def build_inputs(tokenizer, prompts: list[str] | str, responses: list[str] | None = None, *,
                 system: str | None = None, cls_token: str = CLS_TOKEN,
                 add_eos: bool = True, device=None) -> BatchEncoding:
    """Tokenize ``[CLS] <bos> <template + prompt> [response <eos>]`` rows, left-padded.

    Uses the tokenizer's chat template (user turn + generation prompt), or
    :data:`PLAIN_TEMPLATE` when it has none. Responses, if given, follow the generation
    prompt and end with EOS (``add_eos``).

    Returns a ``BatchEncoding`` of ``[B, L]`` long tensors ``input_ids``, ``attention_mask``
    (0 = left padding), ``position_ids`` (``[CLS]`` at 0), plus ``q_span [B, 2]`` (half-open
    columns of the user's text only: no BOS, template, system or padding tokens) and
    ``response_start [B]`` (first response column; the prompt end when no responses).
    ``[CLS]`` comes only in front: the text ``"[CLS]"`` in a prompt, system prompt or response
    is tokenized as ordinary characters.
    All of it can be passed straight to a patched model: ``model(**enc)``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_inputs needs a fast tokenizer (for offset mappings)")
    cid = cls_token_id(tokenizer=tokenizer, cls_token=cls_token)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows, spans, starts = [], [], []
    for i, prompt in enumerate(prompts):
        ids, (qs, qe) = encode_prompt(tokenizer, prompt, system, cid, cls_token=cls_token)
        starts.append(len(ids))
        if responses is not None:
            resp = responses[i]
            if not getattr(tokenizer, "chat_template", None) and resp and not resp[0].isspace():
                resp = " " + resp
            ids += encode_text(tokenizer, resp, cls_token=cls_token)[0]
            if add_eos and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        rows.append(ids)
        spans.append((qs, qe))
    n = max(len(r) for r in rows)
    pads = [n - len(r) for r in rows]
    input_ids = torch.tensor([[pad_id] * p + r for p, r in zip(pads, rows)], dtype=torch.long)
    mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pads, rows)], dtype=torch.long)
    pad = torch.tensor(pads, dtype=torch.long)
    out = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
        "q_span": torch.tensor(spans, dtype=torch.long) + pad[:, None],
        "response_start": torch.tensor(starts, dtype=torch.long) + pad,
    }
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return BatchEncoding(out)

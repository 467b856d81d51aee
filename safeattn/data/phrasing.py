"""Phrasing augmentation: one request in several surface forms, for both labels.

A head trained on AdvBench alone learns its phrasing ("Write a tutorial on how to …") rather
than harm. :func:`rephrase` rewrites any request, harmful or benign, into one of
:data:`FORMS` with fixed, deterministic wording, and :func:`pick_forms` chooses the forms of a
row by a seeded hash. Benign rows get exactly the same forms as harmful ones, so no form
predicts the label: only the request inside it does.

==================  ==========================================================================
form                what it does to "Write a poem about the sea" / "How do I bake bread?"
==================  ==========================================================================
``question``        an instruction becomes a question ("Can you write a poem about the sea?");
                    a question stays as it is, with another lead-in
``imperative``      a question becomes an order ("Answer this: how do I bake bread?")
``need``            first-person need ("I need you to write …", "I need to know: …")
``polite``          polite and indirect ("Could you please …? Thanks in advance.")
``hypothetical``    hypothetical framing ("Hypothetically speaking, if someone asked you to …")
``roleplay``        role-play framing (a character in a story is asked the request)
``short``           terse: lower case, no closing punctuation, no lead-in
``long``            wrapped in neutral context before and after
``ask``             opt-in (:data:`EXTRA_FORMS`): a first-person question ("How can I write a
                    poem about the sea?"; "Write a guide on how to bake bread" → "How do I
                    bake bread?"); a question gets a lead-in ("Asking for myself: …")
``shout``           opt-in: the request in upper case ("WRITE A POEM ABOUT THE SEA")
``leet``            opt-in: letters swapped for look-alike digits ("Wr173 4 p03m 4b0u7 7h3
                    534")
==================  ==========================================================================

Each form has a few wordings; the wording is chosen by the same hash. Requests that span
several lines keep their lines (the wrapping goes around them).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from .core import hash64

__all__ = ["FORMS", "EXTRA_FORMS", "rephrase", "pick_forms", "is_question", "leetspeak"]

FORMS = ("question", "imperative", "need", "polite", "hypothetical", "roleplay", "short",
         "long")
#: Forms that :func:`pick_forms` chooses from only when asked to (``forms=``). ``ask``: the
#: harmful sources trained on have no first-person how-questions (AdvBench none of 520),
#: while the benign prompts have many, so without it that form alone reads as benign. Tried
#: on Gemma-3-270M and not shipped (its artifact README).
#: ``shout`` and ``leet``: the shipped chat head's ``p_0`` flags almost none of the harmful
#: test prompts written in upper case or leetspeak (README, "Disguised letters").
EXTRA_FORMS = ("ask", "shout", "leet")

# form -> (wordings for an instruction, wordings for a question). Slots: {lc} the request
# with its first letter lowered and closing punctuation removed, {q} the question as given,
# {bare} the request without closing punctuation, {core} an instruction's action (the "X" of
# "… how to X", else {lc}).
_WORDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "question": (("Can you {lc}?", "How would you {lc}?", "Is there a way for you to {lc}?"),
                 ("{q}", "Quick question: {q}", "Here is my question. {q}")),
    "imperative": (("{bare}.", "{bare}. Do it now.", "Your task: {lc}."),
                   ("Answer this: {lc}?", "Tell me: {lc}?", "Explain the following: {q}")),
    "need": (("I need you to {lc}.", "I really need to {lc}. Help me.",
              "For my work I have to {lc}."),
             ("I need to know: {q}", "I have to find out: {lc}?", "I need an answer. {q}")),
    "polite": (("Could you please {lc}? Thanks in advance.",
                "Would you mind helping me {lc}?", "If it's not too much trouble, please {lc}."),
               ("Could you tell me, {lc}?", "Sorry to bother you, but {lc}?",
                "I would be grateful if you could answer this: {q}")),
    "hypothetical": (("Hypothetically speaking, if someone asked you to {lc}, what would your "
                      "answer be?", "Imagine a world with no rules. How would one {lc}?",
                      "In theory, what would it look like to {lc}?"),
                     ("Hypothetically speaking, {lc}?", "Just as a thought experiment: {q}",
                      "Imagine a world with no rules. {q}")),
    "roleplay": (("Let's write a story. A character is asked to {lc}. Write their detailed "
                  "answer.", "You are an expert who always answers. A client says: \"{bare}.\" "
                  "Respond in character.", "Pretend you are my old friend who knows "
                  "everything. {bare}."),
                 ("Let's write a story. A character asks: \"{q}\" Write the detailed reply.",
                  "You are an expert who always answers. A client asks: \"{q}\" Respond in "
                  "character.", "Pretend you are my old friend who knows everything. {q}")),
    "short": (("{lc_bare}",), ("{lc_bare}",)),
    "long": (("I have been thinking about this for a while and would appreciate a thorough "
              "answer. {bare}. Please be detailed and explain each step.",
              "Some background first: I am working on a project and want to get this right. "
              "{bare}. Take your time and be specific.",
              "This is important to me, so please read carefully. {bare}. Include everything "
              "I would need to know."),
             ("I have been thinking about this for a while and would appreciate a thorough "
              "answer. {q} Please be detailed and explain each step.",
              "Some background first: I am working on a project and want to get this right. "
              "{q} Take your time and be specific.",
              "This is important to me, so please read carefully. {q} Include everything I "
              "would need to know.")),
    "shout": (("{upper}",), ("{upper}",)),
    "leet": (("{leet}",), ("{leet}",)),
    "ask": (("How can I {core}?", "How do I {core}?", "What's the best way to {core}?",
             "Where do I start if I want to {core}?"),
            ("Asking for myself: {q}", "My question: {q}", "I'd like to know for myself. {q}")),
}
_LEET = str.maketrans("aeiostAEIOST", "431057431057")
_HOW_TO = re.compile(r"^(?:\S+\s+){0,8}?how to\s+(\S.*)$", re.IGNORECASE | re.DOTALL)


def leetspeak(text: str) -> str:
    """``text`` with a, e, i, o, s, t (either case) as 4, 3, 1, 0, 5, 7."""
    return text.translate(_LEET)


def is_question(text: str) -> bool:
    """Whether a request reads as a question (its last line ends with ``?``)."""
    return text.rstrip().endswith("?")


def _lower_first(text: str) -> str:
    """First letter lowered unless the first word is an acronym or "I" ("DNA", "I'm")."""
    word = text.split(maxsplit=1)[0] if text.split() else ""
    core = word.rstrip(",.:;!?'\"")
    if not core or core == "I" or core.startswith("I'") or (len(core) > 1 and
                                                              not core[1:].islower()):
        return text
    return text[0].lower() + text[1:]


def _action(lc: str) -> str:
    """The action an instruction asks for: "make a bomb" of "write a tutorial on how to make a
    bomb"; the instruction itself when it has no such scaffold."""
    m = _HOW_TO.match(lc)
    return m.group(1) if m else lc


def rephrase(text: str, form: str, key: str = "") -> str:
    """``text`` (one request) in the surface form ``form`` (one of :data:`FORMS` or
    :data:`EXTRA_FORMS`).

    ``key`` picks among the form's wordings (a hash; the same key gives the same wording).
    Raises ``ValueError`` for an unknown form or an empty request.
    """
    if form not in _WORDINGS:
        raise ValueError(f"unknown form {form!r}; expected one of {FORMS + EXTRA_FORMS}")
    text = text.strip()
    if not text:
        raise ValueError("cannot rephrase an empty request")
    question = is_question(text)
    options = _WORDINGS[form][1 if question else 0]
    wording = options[hash64(f"wording:{form}:{key}") % len(options)]
    bare = text.rstrip(" .!?;:")
    if not bare:
        bare = text
    lc = _lower_first(bare)
    return wording.format(q=text, bare=bare, lc=lc, lc_bare=lc.lower() if form == "short"
                          and "\n" not in lc else lc, core=_action(lc), upper=text.upper(),
                          leet=leetspeak(text))


def pick_forms(row: Mapping | str, n: int, seed: int = 0,
               forms: Sequence[str] = FORMS) -> list[str]:
    """``n`` distinct forms of ``forms`` for one row (``row["id"]`` or a key), ranked by a
    seeded hash (a form's rank does not depend on the other forms offered). ``n`` is capped
    at ``len(forms)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unknown = [f for f in forms if f not in _WORDINGS]
    if unknown or len(set(forms)) != len(forms):
        raise ValueError(f"forms must be distinct names of {FORMS + EXTRA_FORMS}, got "
                         f"{list(forms)}")
    key = row if isinstance(row, str) else row["id"]
    ranked = sorted(forms, key=lambda f: hash64(f"form:{seed}:{key}:{f}"))
    return ranked[:min(n, len(forms))]

"""Streaming only what the safety probe has cleared.

:class:`HoldBack` is the contract, on token ids: generated tokens are held back until a safety
check that saw them came back benign. :class:`SafeTextStreamer` applies it to HF ``generate``'s
streamer; the vLLM server applies it per request (:mod:`safeattn.vllm.serving`).
"""
from __future__ import annotations

import torch
from transformers import TextStreamer

__all__ = ["HoldBack", "SafeTextStreamer"]


class HoldBack:
    """Which of a row's generated tokens a stream may show (batch of one row).

    At most ``hold`` tokens stay held while the row is not mid-alarm: beyond that the oldest
    unchecked tokens are released (under sparse schedules, or after a Rule-3 check that
    cleared an alarm without seeing the newest tokens). While an alarm is pending (a check
    hit, fewer than ``tau`` so far) nothing is released, and when the row switches to refusal
    the held (flagged) tokens are dropped, never shown; from then on every token (the refusal
    prefix and the justification) is released at once. At :meth:`end` held tokens are released
    unless an alarm is pending.

    :meth:`put`, :meth:`update` and :meth:`end` return the tokens released by that call.
    """

    def __init__(self, hold: int = 3):
        if not isinstance(hold, int) or hold < 1:  # 0 would show each token before its check
            raise ValueError(f"hold must be an int >= 1 (with 0 each token would show before "
                             f"the check that sees it), got {hold!r}")
        self.hold = hold
        self.pending: list[int] = []
        self.n_put = 0  # generated tokens received
        self.n_out = 0  # generated tokens released or dropped
        self.alarm = False
        self.refused = False
        self.dropped: list[int] = []  # flagged tokens that were never shown

    def put(self, ids: list[int]) -> list[int]:
        self.n_put += len(ids)
        if self.refused:
            return self._out(list(ids))
        self.pending.extend(ids)
        if self.alarm:
            return []
        return self._out(self._take(len(self.pending) - self.hold))

    def update(self, *, checked: bool, benign: bool, refused: bool, seen: int) -> list[int]:
        """A check ran (``checked``) with a benign outcome (``benign``) over the generated
        tokens before ``seen`` (its window's end: a Rule-3 window can end before the newest
        token, and a benign outcome clears only what it saw); ``refused``: the row now refuses
        (its held tokens are dropped)."""
        if refused and not self.refused:
            self.refused = True
            return self._drop()
        if self.refused or not checked:
            return []
        self.alarm = not benign
        return self._out(self._take(seen - self.n_out)) if benign else []

    def end(self) -> list[int]:
        if self.alarm or self.refused:
            return self._drop()
        return self._out(self._take(len(self.pending)))

    def _drop(self) -> list[int]:
        """The held tokens are flagged: never shown (nothing is released)."""
        self.dropped.extend(self.pending)
        self.n_out += len(self.pending)
        self.pending = []
        return []

    def _take(self, k: int) -> list[int]:
        k = max(0, min(k, len(self.pending)))
        ids, self.pending = self.pending[:k], self.pending[k:]
        return ids

    def _out(self, ids: list[int]) -> list[int]:
        self.n_out += len(ids)
        return ids


class SafeTextStreamer(TextStreamer):
    """Streams generated text like :class:`transformers.TextStreamer` (batch 1), gated by safety:
    only the tokens :class:`HoldBack` releases are printed (through ``TextStreamer``'s
    word-boundary logic); the refusal prefix and the justification stream normally after
    ``refusal_notice``.

    Used with ``model.generate(..., safety=cfg, streamer=SafeTextStreamer(tok))``; with stock
    ``generate`` (no safety updates) it only delays text by ``hold`` tokens.

    Args:
        tokenizer: the tokenizer used to decode.
        skip_prompt: do not print the prompt.
        hold: tokens held back at most. ``None`` (default): the ``stream_hold`` of the
            generation's ``SafetyConfig`` (τ unless set); 3 under stock ``generate``.
        refusal_notice: text printed when the row flips to refusal (default none).
        decode_kwargs: passed to ``tokenizer.decode``.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, hold: int | None = None,
                 refusal_notice: str = "", **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        self.gate = HoldBack(3 if hold is None else hold)
        self._hold = hold  # as given: None follows the config
        self.refusal_notice = refusal_notice
        self._got_prompt = False

    @property
    def hold(self) -> int:
        return self.gate.hold

    @property
    def refused(self) -> bool:
        return self.gate.refused

    @property
    def dropped(self) -> list[int]:
        """Flagged tokens that were never printed."""
        return self.gate.dropped

    @property
    def _pending(self) -> list[int]:
        return self.gate.pending

    # ------------------------------------------------------------------ HF streamer API
    def put(self, value):
        if len(value.shape) > 1 and value.shape[0] > 1:
            raise ValueError("SafeTextStreamer only supports batch size 1")
        if not self._got_prompt:  # the first put is the prompt (TextStreamer prints or skips it)
            self._got_prompt = True
            self.gate = HoldBack(self.gate.hold)  # a new stream; the last one's state stays readable
            return super().put(value)
        self._release(self.gate.put(value.reshape(-1).tolist()))

    def end(self):
        self._release(self.gate.end())
        super().end()
        self._got_prompt = False

    def reset(self, hold: int | None = None) -> None:
        """Forget a stream that never ended (an error cut it off): nothing it held is printed,
        and the next ``put`` is a new prompt. Safe generation calls it before it streams, with
        its config's ``stream_hold`` (``hold``), which a streamer made with ``hold=None`` takes."""
        self.gate = HoldBack(hold if self._hold is None and hold is not None else self.gate.hold)
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt, self._got_prompt = True, False

    # ------------------------------------------------------------------ safety updates
    def safety_update(self, *, checked: bool, benign: bool, refused: bool, seen: int) -> None:
        """Called by safe generation after each step (see :meth:`HoldBack.update`)."""
        was = self.gate.refused
        self._release(self.gate.update(checked=checked, benign=benign, refused=refused,
                                       seen=seen))
        if self.gate.refused and not was:
            self._flush()  # print what was released before the refusal
            if self.refusal_notice:
                self.on_finalized_text(self.refusal_notice)

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            self.on_finalized_text(text[self.print_len:])
            self.token_cache, self.print_len = [], 0

    def _release(self, ids: list[int]) -> None:
        if ids:
            super().put(torch.tensor(ids))

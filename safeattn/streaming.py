"""``SafeTextStreamer``: a ``TextStreamer`` that prints only text the safety probe has cleared."""
from __future__ import annotations

import torch
from transformers import TextStreamer

__all__ = ["SafeTextStreamer"]


class SafeTextStreamer(TextStreamer):
    """Streams generated text like :class:`transformers.TextStreamer` (batch 1), gated by safety.

    Generated tokens are held back until a safety check that saw them came back benign; then
    they are released (printed through ``TextStreamer``'s word-boundary logic). At most
    ``hold`` tokens (default ``SafetyConfig.tau``, i.e. 3) stay held while the row is not
    mid-alarm: under sparse schedules the oldest unchecked tokens are released beyond that.
    While an alarm is pending (a check hit, fewer than ``tau`` so far) nothing is released, and
    when the row switches to refusal the held-back (flagged) tokens are discarded, never printed;
    the refusal prefix and the justification stream normally after ``refusal_notice``.
    At ``end()`` held tokens are released unless an alarm is pending.

    Used with ``model.generate(..., safety=cfg, streamer=SafeTextStreamer(tok))``; with stock
    ``generate`` (no safety updates) it only delays text by ``hold`` tokens.

    Args:
        tokenizer: the tokenizer used to decode.
        skip_prompt: do not print the prompt.
        hold: tokens held back at most (``None``: ``tau`` of the generation's config, or 3).
        refusal_notice: text printed when the row flips to refusal (default none).
        decode_kwargs: passed to ``tokenizer.decode``.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, hold: int | None = None,
                 refusal_notice: str = "", **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=skip_prompt, **decode_kwargs)
        if hold is not None and (not isinstance(hold, int) or hold < 0):
            raise ValueError(f"hold must be an int >= 0, got {hold!r}")
        self.hold = 3 if hold is None else hold
        self.refusal_notice = refusal_notice
        self._pending: list[int] = []
        self._n_put = 0  # generated tokens received
        self._n_out = 0  # generated tokens released (or dropped)
        self._alarm = False
        self._got_prompt = False
        self.refused = False
        self.dropped: list[int] = []  # flagged tokens that were never printed

    # ------------------------------------------------------------------ HF streamer API
    def put(self, value):
        if len(value.shape) > 1 and value.shape[0] > 1:
            raise ValueError("SafeTextStreamer only supports batch size 1")
        if not self._got_prompt:  # the first put is the prompt (TextStreamer prints or skips it)
            self._got_prompt = True
            return super().put(value)
        ids = value.reshape(-1).tolist()
        self._n_put += len(ids)
        if self.refused:
            self._release(ids)
            return
        self._pending.extend(ids)
        self._overflow()

    def end(self):
        if not self._alarm and not self.refused:
            self._release(self._pending)
        else:
            self.dropped.extend(self._pending)
        self._pending = []
        super().end()
        self._got_prompt = False
        self._n_put = self._n_out = 0
        self._alarm = False

    # ------------------------------------------------------------------ safety updates
    def safety_update(self, *, checked: bool, benign: bool, refused: bool, seen: int) -> None:
        """Called by safe generation after each step: a check that saw ``seen`` generated
        tokens ran (``checked``) with a benign outcome (``benign``); ``refused``: the row now
        refuses."""
        if refused and not self.refused:
            self.refused = True
            self.dropped.extend(self._pending)
            self._n_out += len(self._pending)
            self._pending = []
            self._flush()  # print what was released before the refusal
            if self.refusal_notice:
                self.on_finalized_text(self.refusal_notice)
            return
        if self.refused or not checked:
            return
        self._alarm = not benign
        if benign:
            k = max(0, min(seen - self._n_out, len(self._pending)))
            self._release(self._pending[:k])
            self._pending = self._pending[k:]

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            self.on_finalized_text(text[self.print_len:])
            self.token_cache, self.print_len = [], 0

    def _overflow(self) -> None:
        if self._alarm:
            return
        extra = len(self._pending) - self.hold
        if extra > 0:
            self._release(self._pending[:extra])
            self._pending = self._pending[extra:]

    def _release(self, ids: list[int]) -> None:
        if ids:
            self._n_out += len(ids)
            super().put(torch.tensor(ids))

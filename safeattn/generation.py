"""Strategic decoding (DESIGN §3): batched generation with O(1)-per-step safety re-checks.

After :func:`safeattn.apply_safeattn`, ``model.generate(**inputs, safety=SafetyConfig(...))``
runs :func:`safe_generate`; without ``safety`` it is stock ``generate``.

How one decode step works (per batch, all rows at once):

- **Plain step** (no row re-checks): the new token alone, ``[B, 1]``, as in ``generate``.
- **Check step**: query rows ``[token, probe]`` (probe = the ``[CLS]`` id at RoPE position 0)
  in *one* forward. The probe is the last query row of a :class:`~safeattn.hf.SafetyLayout`
  with ``probe_window``: it sees ``{itself} ∪ q_span ∪ W_t``. Rows whose probe does not run
  (finished, refused, skipped) get ``probe_active = False`` and their probe row sees only
  itself. The LM head runs on the token row only. With a head on decoder layer ``cls_layer``
  the probe row leaves the forward after that layer (``probe_exit``): later layers run the
  token row alone, as in a plain step. The probe's (final-normed) hidden state goes through
  the model's :class:`SafetyHead` and then ``torch.ops.safeattn.safety_step`` updates every
  row's state on the device and returns the next probe's intervals, so nothing waits for the
  host besides the one per-step read that ``generate`` also does (finished? — we add "any
  row mid-alarm?" to the same read).
- **Probe K/V rollback**: before a check step the cache layers the probe runs through record
  their past (``activate_past_recording``), after it ``crop(-1)`` drops the probe's key/value
  entry from them. For full layers this is a slice; sliding-window layers (which keep only
  ``sliding_window - 1`` keys and would otherwise have evicted the oldest key the next token
  still needs) restore their window. Recording is switched off again right after, so the cache
  equals the cache of a plain step (tested, also for Gemma3 with a window smaller than the
  number of steps).
- **Refusal**: once a row refuses, the refusal prefix is force-fed one token per step with
  ``torch.where`` (other rows decode normally); afterwards the row decodes freely, which is the
  justification. ``rollback=True`` hides the response span from ``S_t`` on by zeroing those
  columns in the row's 2-D attention mask (the interval layout turns the hole into one more
  key range, so it costs nothing), and restarts the row's RoPE positions at ``S_t``: for the
  model the row continues as if the flagged tokens had never been generated. The returned
  ``sequences`` leave them out (that row is right-padded with the pad token). One
  approximation: on sliding-window layers the hidden columns still take window slots (the
  window counts cache columns, as HF's sliding masks do, and the sliding cache has already
  evicted the older keys that would refill them), so those layers see that many fewer old
  tokens, a few out of e.g. Gemma-3's 512.
- **Prefill checks** *(ours)*: response text already in the input (an assistant prefill, as
  in a prefill attack) is checked before the first token, every ``prefill_stride`` tokens: a
  forward of the probe row alone whose window ends ``k`` tokens into the prefill, through the
  same ``safety_step`` (θ, τ, Rules 1–3) as a decoding-time check at that token; its K/V
  leaves the cache as above. With a head on decoder layer ``cls_layer`` the forward ends
  after that layer. Without them only the prefill's last window is ever checked.
- **Head ensembles** *(ours)*: with ``K`` heads (:mod:`safeattn.hf.ensemble`) every check
  carries ``K`` probe rows, one per member, and ``p`` is the sigmoid of their mean logit;
  ``p_0`` then comes from a prefill check with an empty window.
- **Fail closed**: a non-finite ``p`` refuses (inside the op); an exception raised by the head
  or the op makes every row that was checked refuse. Both are logged as warnings on the
  ``"safeattn"`` logger.

Schedules (``n`` = response tokens the probe sees, ``n >= 1``; ``p_0`` always runs):
``each`` every step; ``first`` the first ``first_n`` steps; ``periodic`` every ``period``-th
step; ``annealing`` at 1, 2, 3, 5, 8, 13, ... (gaps ``1, 1, 2, 3, 5, 8, ...``) up to ``t_max``.
*(ours)* With ``escalate=True`` (default) a row whose last check was a hit (mode
``transition``) is re-checked at every following step until it clears or refuses, so that
``tau`` consecutive hits can happen under sparse schedules too.

*(ours)* **A row does not end mid-alarm.** While an alarm is pending its EOS is masked, so
the checks that follow decide. When no check can come before the row's last token (at the
token budget, or at once under a sparse schedule without ``escalate``) the row refuses, and
a row that a stopping criterion ends mid-alarm (a stop string) counts as refused at its end.
Fail closed: what the alarm flagged was never cleared, and a stream never shows it either.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .ops import BENIGN, MALICIOUS, TRANSITION
from . import ops as _ops

__all__ = ["SafetyConfig", "SafetyOutput", "RowSafety", "SafeGenerateOutput", "safe_generate",
           "generate", "SCHEDULES", "MODE_NAMES"]

logger = logging.getLogger("safeattn")

SCHEDULES = ("each", "first", "periodic", "annealing")
#: Names of the per-step modes in the trace; ``"refusal"`` once the row refuses.
MODE_NAMES = {BENIGN: "benign", MALICIOUS: "malicious", TRANSITION: "transition"}
REFUSAL = 3  # the trace's mode code for rows that refuse


def _fib_gaps():
    a, b = 1, 1
    while True:
        yield a
        a, b = b, a + b


#: θ of a model whose safety config has no calibrated ``threshold``.
DEFAULT_THRESHOLD = 0.5
#: The paper's refusal prefix; the prefix of a model whose safety config names none.
DEFAULT_REFUSAL_PREFIX = "Sorry, I cannot fulfill your request because"
#: r1 = r2 = r3 (the paper's) of a model whose safety config has no ``probe_window``.
DEFAULT_WINDOW = 10


def _is_theta(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
        and x >= 0


#: How a refused row's turn ends (:attr:`SafetyConfig.refusal_end`).
REFUSAL_ENDS = ("sentence", "free")
_SENTENCE_ENDS: dict = {}


def _sentence_end_ids(tokenizer, device) -> torch.Tensor:
    """``[V]`` bool: token ``v``'s text contains ``.``, ``!``, ``?`` or a line break (cached
    per tokenizer)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _SENTENCE_ENDS:
        texts = tokenizer.batch_decode([[v] for v in range(len(tokenizer))])
        _SENTENCE_ENDS[key] = torch.tensor([any(c in t for c in ".!?\n") for t in texts])
    return _SENTENCE_ENDS[key].to(device)


@dataclass(frozen=True)
class SafetyConfig:
    """Parameters of strategic decoding (DESIGN §3). Frozen: it is checked once, when made;
    ``dataclasses.replace`` makes a changed copy.

    Attributes:
        threshold: θ; ``p >= θ`` is a hit. ``None`` (default): the model's calibrated θ
            (``threshold`` in its safety config, written by ``safeattn calibrate``), else
            :data:`DEFAULT_THRESHOLD`; :meth:`resolved` fills it in.
        query_threshold: the θ of the prefill check ``p_0`` alone, which refuses on one hit
            (the decoding-time checks keep ``threshold``). ``None`` (default): the model's
            calibrated ``query_threshold`` when ``threshold`` is ``None`` too (``safeattn
            calibrate --split-thresholds``), else ``threshold``.
        late_threshold, late_after: θ of the decoding-time checks that have seen at least
            ``late_after`` tokens the model wrote (an assistant prefill does not count; the
            checks before keep ``threshold``): a head whose training views of long answers
            are few may score benign answers higher late, so late checks get a θ calibrated
            for them (``safeattn calibrate --late-after K``). ``None`` (default): the model's
            calibrated ones when ``threshold`` is ``None`` too, else none: one θ throughout.
        tau: consecutive hits that switch a row to refusal.
        r1, r2, r3: probe windows of Rules 1–3. ``None`` (default): the model's
            ``probe_window`` (the window its head was trained on, ``safeattn train
            --probe-window``), else :data:`DEFAULT_WINDOW`.
        schedule: ``'each'``, ``'first'``, ``'periodic'`` or ``'annealing'`` (module doc).
        period: ``k`` of ``'periodic'``.
        first_n: how many steps ``'first'`` re-checks.
        gaps: annealing gaps (default ``1, 1, 2, 3, 5, 8, ...``; a finite list repeats its
            last gap).
        t_max: no annealing re-check after step ``t_max`` (``None``: never stop).
        escalate: re-check a row at every step while it is mid-alarm (``transition``).
            Either way a row does not end mid-alarm (module doc).
        refusal_prefix: the text force-fed when a row refuses (``""``: none; the row then
            writes EOS and ends at once, rather than go on with the text it refused). ``None``
            (default): the model's (``refusal_prefix`` in its safety config, chosen with the
            head so that the model's own justification names the request), else
            :data:`DEFAULT_REFUSAL_PREFIX`; :meth:`resolved` fills it in.
        refusal_end: ``'sentence'`` (default): a refused row's turn ends with the first
            sentence (``.``, ``!``, ``?`` or a line break) of the justification the model
            writes after the prefix, so the unchecked text after a refusal cannot slide into
            compliance; ``'free'``: the model writes on until EOS or the token limit.
        refusal_break: the text force-fed before the prefix when the row refuses after
            response text (mid-answer, or after an assistant prefill) that does not already
            end with it, so that the refusal starts its own paragraph instead of running on
            from the last word (``""``: none).
        rollback: crop the row back to ``S_t`` (the first alarm) before the refusal.
        prefill_stride: check an assistant prefill (response text already in the input, as
            in a prefill attack) before generating: a probe whose window ends ``k`` response
            tokens in, for ``k = prefill_stride, 2·prefill_stride, …`` below the prefill's
            length, through the same state machine (θ, τ, Rules 1–3) as the decoding-time
            checks, which go on from there. ``0``: only the prefill's last window is checked
            (by the first decoding-time check), so harm earlier in a long prefill goes unseen.
        stream_hold: tokens a :class:`~safeattn.streaming.SafeTextStreamer` holds back
            (default ``tau``).
    """

    threshold: float | None = None
    query_threshold: float | None = None
    late_threshold: float | None = None
    late_after: int | None = None
    tau: int = 3
    r1: int | None = None
    r2: int | None = None
    r3: int | None = None
    schedule: str = "each"
    period: int = 4
    first_n: int = 10
    gaps: tuple[int, ...] | None = None
    t_max: int | None = 512
    escalate: bool = True
    refusal_prefix: str | None = None
    refusal_end: str = "sentence"
    refusal_break: str = "\n\n"
    rollback: bool = False
    prefill_stride: int = 4
    stream_hold: int | None = None

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"SafetyConfig.{name} {what}, got {getattr(self, name)!r}")

        for name in ("threshold", "query_threshold", "late_threshold"):
            need(getattr(self, name) is None or _is_theta(getattr(self, name)), name,
                 "must be None or a finite number >= 0 (values > 1 never trigger)")
        for name, lo in (("tau", 1), ("r1", 0), ("r2", 0), ("r3", 0), ("period", 1),
                         ("first_n", 0), ("prefill_stride", 0), ("late_after", 1)):
            v = getattr(self, name)
            if v is None and name in ("r1", "r2", "r3", "late_after"):
                continue
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name,
                 f"must be an int >= {lo}")
        need(self.late_threshold is None or self.late_after is not None
             or self.threshold is None, "late_after",
             "must be set with late_threshold and threshold (the checks it starts from)")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.t_max is None or (isinstance(self.t_max, int) and self.t_max >= 1), "t_max",
             "must be None or an int >= 1")
        if self.gaps is not None:
            object.__setattr__(self, "gaps", tuple(self.gaps))
            need(len(self.gaps) > 0 and all(isinstance(g, int) and g >= 1 for g in self.gaps),
                 "gaps", "must be a non-empty sequence of ints >= 1")
        need(self.refusal_prefix is None or isinstance(self.refusal_prefix, str),
             "refusal_prefix", "must be None or a str")
        need(self.refusal_end in REFUSAL_ENDS, "refusal_end", f"must be one of {REFUSAL_ENDS}")
        need(isinstance(self.refusal_break, str), "refusal_break", "must be a str")
        need(isinstance(self.rollback, bool), "rollback", "must be a bool")
        need(isinstance(self.escalate, bool), "escalate", "must be a bool")
        if self.stream_hold is None:
            object.__setattr__(self, "stream_hold", self.tau)
        need(isinstance(self.stream_hold, int) and self.stream_hold >= 1, "stream_hold",
             "must be an int >= 1 (with 0 each token would stream before the check that "
             "sees it)")

    def resolved(self, model) -> "SafetyConfig":
        """This config with its model defaults filled in: ``threshold=None`` becomes the
        calibrated ``threshold`` of the safety config (``model.config.safeattn``, or ``model``
        itself when it is that mapping), else :data:`DEFAULT_THRESHOLD`;
        ``query_threshold=None`` its ``query_threshold`` when ``threshold`` was ``None`` too,
        else ``threshold``; ``late_threshold`` / ``late_after`` ``None`` its own when
        ``threshold`` was ``None`` too; ``refusal_prefix=None`` its ``refusal_prefix``, else
        :data:`DEFAULT_REFUSAL_PREFIX`; ``r1``-``r3`` ``None`` its ``probe_window``, else
        :data:`DEFAULT_WINDOW`."""
        if None not in (self.threshold, self.query_threshold, self.refusal_prefix, self.r1,
                        self.r2, self.r3):
            return self
        cfg = model if isinstance(model, Mapping) else getattr(
            getattr(model, "config", None), "safeattn", None)
        cfg = cfg or {}

        def calibrated(key, default):
            theta = cfg.get(key, default)
            if not _is_theta(theta):
                raise ValueError(f"the model's safety config has {key} {theta!r}; expected "
                                 "a finite number >= 0")
            return float(theta)

        theta, query = self.threshold, self.query_threshold
        late, after = self.late_threshold, self.late_after
        if theta is None:
            theta = calibrated("threshold", DEFAULT_THRESHOLD)
            if query is None:
                query = calibrated("query_threshold", theta)
            if late is None and cfg.get("late_threshold") is not None:
                late = calibrated("late_threshold", None)
            if after is None:
                after = cfg.get("late_after")
        if query is None:
            query = theta
        if late is not None and after is None:
            raise ValueError("SafetyConfig.late_threshold needs late_after (the model's safety "
                             "config has none)")
        prefix = self.refusal_prefix
        if prefix is None:
            prefix = cfg.get("refusal_prefix", DEFAULT_REFUSAL_PREFIX)
            if not isinstance(prefix, str):
                raise ValueError(f"the model's safety config has refusal_prefix {prefix!r}; "
                                 "expected a str")
        window = cfg.get("probe_window", DEFAULT_WINDOW)
        if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1):
            raise ValueError(f"the model's safety config has probe_window {window!r}; "
                             "expected an int >= 1")
        r1, r2, r3 = (window if r is None else r for r in (self.r1, self.r2, self.r3))
        return replace(self, threshold=float(theta), query_threshold=float(query),
                       late_threshold=None if late is None else float(late), late_after=after,
                       refusal_prefix=prefix, r1=r1, r2=r2, r3=r3)

    def check_threshold(self, written: int) -> float:
        """θ of a decoding-time check that has seen ``written`` tokens the model wrote
        (resolved configs)."""
        if self.late_threshold is not None and written >= self.late_after:
            return self.late_threshold
        return self.threshold

    def check_steps(self, max_steps: int) -> list[bool]:
        """``out[n]`` for ``n`` in ``[0, max_steps]``: whether the schedule re-checks at step ``n``
        (the probe then sees ``n`` response tokens; step 0 is the prefill ``p_0``, always)."""
        out = [False] * (max_steps + 1)
        out[0] = True
        if self.schedule == "each":
            for n in range(1, max_steps + 1):
                out[n] = True
        elif self.schedule == "first":
            for n in range(1, min(self.first_n, max_steps) + 1):
                out[n] = True
        elif self.schedule == "periodic":
            for n in range(self.period, max_steps + 1, self.period):
                out[n] = True
        else:  # annealing
            stop = max_steps if self.t_max is None else min(max_steps, self.t_max)
            gaps = iter(self.gaps) if self.gaps is not None else _fib_gaps()
            last = self.gaps[-1] if self.gaps is not None else None
            n = 1
            while n <= stop:
                out[n] = True
                n += next(gaps, last)
        return out


@dataclass
class RowSafety:
    """The safety trace of one row.

    ``p[n]`` is the probe's P(malicious) after it saw ``n`` response tokens (``p[0]`` = the
    prefill ``p_0``), ``nan`` where no check ran; ``mode[n]`` the row's mode after step ``n``
    (``'benign'``, ``'transition'``, ``'malicious'`` or ``'refusal'``). ``refusal_step`` is the
    response index where the refusal prefix begins (``None``: never refused), ``alarm_step`` the
    ``S_t`` of that refusal, ``justification`` the text generated after the prefix.
    ``prefill_checks``: the checks of an assistant prefill before generation
    (:attr:`SafetyConfig.prefill_stride`), as ``(response tokens the probe saw, p)``; a
    refusal they start has ``refusal_step`` 0.
    """

    p: list[float]
    checked: list[bool]
    mode: list[str]
    refusal_step: int | None
    alarm_step: int | None
    justification: str | None
    rolled_back: bool = False
    prefill_checks: list[tuple[int, float]] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.refusal_step is not None


@dataclass
class SafetyOutput:
    """``.safety`` of a safe ``generate``: per-row :class:`RowSafety` plus the raw tensors.

    ``p`` ``[B, T+1]`` float64 (nan = unchecked), ``mode`` ``[B, T+1]`` int (3 = refusal),
    ``refused`` ``[B]`` bool, ``refusal_step`` ``[B]`` long (-1 = none), ``config`` the
    :class:`SafetyConfig`, ``threshold`` θ. Indexing gives rows: ``out.safety[0].p``.
    """

    rows: list[RowSafety]
    p: torch.Tensor
    mode: torch.Tensor
    refused: torch.Tensor
    refusal_step: torch.Tensor
    config: SafetyConfig
    prompt_length: int = 0
    refusal_ids: list[int] = field(default_factory=list)

    def __getitem__(self, i) -> RowSafety:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


@dataclass
class SafeGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``safety`` (a :class:`SafetyOutput`)."""

    safety: Any = None


# ------------------------------------------------------------------------------ helpers
def _get_tokenizer(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    st = getattr(model, "_safeattn_state", None) or {}
    return st.get("tokenizer")


def _refusal_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    if not getattr(tokenizer, "chat_template", None) and not text[0].isspace():
        text = " " + text  # as build_inputs does for responses after the plain template
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _break_ids(tokenizer, safety: "SafetyConfig") -> list[int]:
    """``safety.refusal_break`` as token ids; none when there is no refusal prefix."""
    if not (safety.refusal_prefix and safety.refusal_break):
        return []
    return list(tokenizer(safety.refusal_break, add_special_tokens=False)["input_ids"])


class Refusal:
    """What a refusing row is forced to write, for both engines (the HF decoder, batched, and
    the vLLM logits processor, per request): the break, then the prefix, as token ids; with no
    prefix, ``eos_id`` alone, so that the row ends instead of going on with what it refused."""

    def __init__(self, tokenizer, safety: "SafetyConfig", eos_id: int | None):
        self.prefix = _refusal_ids(tokenizer, safety.refusal_prefix)
        self.brk = _break_ids(tokenizer, safety)
        self.ids = self.brk + self.prefix
        if not self.ids:
            if eos_id is None:
                raise ValueError("refusal_prefix '' ends a refused row with EOS, but there is "
                                 "no eos_token_id to end it with")
            self.ids = [int(eos_id)]

    def start(self, text, ends_with_break):
        """Where a row that refuses after ``text`` response tokens starts in :attr:`ids`: past
        the break when it has no response text yet or its text already ends with the break,
        else at 0. Takes ints and bools, or tensors of them (one per row)."""
        skip = (text == 0) | ((text >= len(self.brk)) & ends_with_break)
        return skip * len(self.brk)

    def justification(self, tokenizer, new_ids: list[int], refusal_step: int, fstart: int,
                      eos) -> str:
        """The text a refused row wrote after its forced tokens: ``new_ids`` are its generated
        ids, forced from ``refusal_step`` on, starting ``fstart`` into :attr:`ids`; up to the
        first id in ``eos``."""
        toks = []
        for t in new_ids[refusal_step + len(self.ids) - fstart:]:
            if t in eos:
                break
            toks.append(t)
        return tokenizer.decode(toks, skip_special_tokens=True).strip()


def recheck_ahead(schedule: list[bool], escalate: bool, n: int, max_new: int) -> bool:
    """Whether a row mid-alarm that is choosing response token ``n`` (of ``max_new``) can
    still be checked: the check at step ``m`` (it sees ``m`` tokens) runs for ``n < m <
    max_new`` when the schedule (``schedule[m]``) or ``escalate`` says so."""
    return n + 1 < max_new and (escalate or any(schedule[n + 1:max_new]))


def _window(mode, s_t, n, r1, r2, r3):
    """Vectorised ``reference.window`` (fallback when the op failed)."""
    lo2, hi2 = (n - r2).clamp_min(0), n
    lo = torch.where(mode == MALICIOUS, torch.zeros_like(n),
                     torch.where(mode == TRANSITION, (s_t - r2).clamp_min(0), lo2))
    hi = torch.where(mode == MALICIOUS, n.clamp_max(r1),
                     torch.where(mode == TRANSITION, torch.minimum(n, s_t + r3 + 1), hi2))
    return lo, hi


class _Cfg:  # the few generation settings the loop reads
    pass


def _prepare(model, input_ids, generation_config, logits_processor, stopping_criteria, kwargs,
             tokenizer=None):
    """Merge kwargs into a GenerationConfig and build HF's processors / stopping criteria
    exactly as ``generate`` does (so sampling and penalties match stock generation)."""
    from transformers.generation import LogitsProcessorList, StoppingCriteriaList

    has_default_max_length = (kwargs.get("max_length") is None and (
        generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None)
    has_default_min_length = (kwargs.get("min_length") is None and (
        generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None)
    gc, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    if getattr(gc, "num_beams", 1) not in (None, 1) or getattr(gc, "num_return_sequences", 1) \
            not in (None, 1):
        raise ValueError("safe generation supports greedy and sampling only (num_beams=1, "
                         "num_return_sequences=1)")
    model._prepare_special_tokens(gc, True, device=input_ids.device, batch_size=input_ids.shape[0])
    gc = model._prepare_generated_length(
        generation_config=gc, has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length, model_input_name="input_ids",
        inputs_tensor=input_ids, input_ids_length=input_ids.shape[1])
    procs = model._get_logits_processor(
        generation_config=gc, input_ids_seq_length=input_ids.shape[1], encoder_input_ids=input_ids,
        logits_processor=logits_processor if logits_processor is not None
        else LogitsProcessorList(), device=input_ids.device, model_kwargs=model_kwargs)
    stops = model._get_stopping_criteria(
        generation_config=gc, stopping_criteria=stopping_criteria if stopping_criteria is not None
        else StoppingCriteriaList(), tokenizer=tokenizer)  # stop_strings need it
    return gc, model_kwargs, procs, stops


# --------------------------------------------------------------------------- the decoder
class _Decode:
    """One safe ``generate`` call: what it fixes up front, the row state its steps share, and
    the trace. :func:`safe_generate` runs :meth:`prefill`, then per token :meth:`choose`,
    :meth:`force_refusals`, :meth:`emit` and :meth:`forward`, then :meth:`outputs`.

    Per row, on the device: the state ``safety_step`` updates in place (``mode``, ``consec``,
    ``s_t``, ``step``, ``refused``); ``fpos``, the row's position in the forced break +
    prefix (``fstart`` where it began); ``refusal_at`` / ``alarm_at`` (-1: none);
    ``rolled`` / ``drop_upto``, the span a rollback hides; ``unfinished``.
    """

    def __init__(self, model, tokenizer, safety, input_ids, attention_mask, q_span,
                 response_start, position_ids, gc, procs, stops, streamer):
        self.model, self.tokenizer, self.safety = model, tokenizer, safety
        self.gc, self.procs, self.stops, self.streamer = gc, procs, stops, streamer
        self.dev = input_ids.device
        self.b, self.l0 = input_ids.shape
        self._layout_inputs(attention_mask, q_span, response_start, position_ids)
        self._forcing()
        self._row_state()
        self._cache(input_ids)
        self.gate = getattr(streamer, "safety_update", None)
        want = gc.return_dict_in_generate
        self.scores_out = [] if (want and gc.output_scores) else None
        self.logits_out = [] if (want and gc.output_logits) else None

    def _layout_inputs(self, attention_mask, q_span, response_start, position_ids):
        """The columns of ``[CLS]``, the request and the response, and the positions."""
        from .hf.ensemble import member_count
        from .hf.surgery import cls_token_id

        dev, b, l0 = self.dev, self.b, self.l0
        self.am = (torch.ones((b, l0), dtype=torch.long, device=dev) if attention_mask is None
                   else attention_mask.to(dev)).long()
        self.q_span = torch.as_tensor(q_span, device=dev).long()
        self.cls_col = self.am.argmax(-1)
        self.rs = (torch.full((b,), l0, dtype=torch.long, device=dev) if response_start is None
                   else torch.as_tensor(response_start, device=dev).long().reshape(b))
        self.pos = ((self.am.cumsum(-1) - 1).clamp_min(0) if position_ids is None
                    else position_ids.to(dev).long())
        self.cid = cls_token_id(self.model)
        self.k = member_count(self.model)  # probe rows per check
        self.vis = bool((self.model.config.safeattn or {}).get("cls_visible_to_response", False))
        self.q32, self.rs32 = self.q_span.int().contiguous(), self.rs.int().contiguous()
        self.one = torch.ones(1, dtype=torch.float32, device=dev)
        self.zero = torch.zeros(1, dtype=torch.float32, device=dev)
        self.no_probe = torch.zeros(b, 1, dtype=torch.float32, device=dev)
        self.no_logits = torch.zeros(0, dtype=torch.long, device=dev)  # logits_to_keep: none

    def _forcing(self):
        """What a refusal forces (the break, then the prefix), the pad and stop ids, the
        token budget and the check schedule."""
        gc, tokenizer, safety, dev = self.gc, self.tokenizer, self.safety, self.dev
        pad_t = gc._pad_token_tensor
        self.pad_id = int(pad_t) if pad_t is not None else (
            int(gc._eos_token_tensor.reshape(-1)[0]) if gc._eos_token_tensor is not None else 0)
        self.has_eos = any(hasattr(c, "eos_token_id") for c in self.stops)
        self.max_new = max(int(gc.max_length) - self.l0, 0)
        self.sched = safety.check_steps(self.max_new + 1)
        eos = gc._eos_token_tensor
        self.refusal = Refusal(tokenizer, safety,
                               None if eos is None else int(eos.reshape(-1)[0]))
        self.n_brk, self.n_forced = len(self.refusal.brk), len(self.refusal.ids)
        self.eos_list = [] if eos is None else eos.reshape(-1).tolist()
        self.eos_ids = None  # those inside the logits, on the device (at the first step)
        self.forced = torch.tensor(self.refusal.ids, dtype=torch.long, device=dev)
        self.brk_cols = torch.arange(-self.n_brk, 0, device=dev)
        self.ends = _sentence_end_ids(tokenizer, dev) if safety.refusal_end == "sentence" and \
            tokenizer is not None else None

    def _row_state(self):
        """Every row's state (the class docstring) at its start, and the trace's lists."""
        b, dev = self.b, self.dev

        def rows(fill, dtype):
            return torch.full((b,), fill, dtype=dtype, device=dev)

        self.mode = rows(BENIGN, torch.int32)
        self.consec, self.s_t = rows(0, torch.int32), rows(-1, torch.int32)
        self.step, self.refused = rows(0, torch.int32), rows(False, torch.bool)
        self.fpos, self.fstart = rows(0, torch.long), rows(0, torch.long)
        self.refusal_at, self.alarm_at = rows(-1, torch.long), rows(-1, torch.long)
        self.rolled, self.drop_upto = rows(False, torch.bool), rows(0, torch.long)
        self.unfinished = rows(1, torch.long)
        self.nonfinite_seen = rows(False, torch.bool)
        self.closed = rows(False, torch.bool)  # refused at their end (close_open)
        self.seen_to = rows(0, torch.long)  # generated tokens before the last probe's window end
        self.all_rows = rows(True, torch.bool)
        # Response tokens already in the input (an assistant prefill, e.g. a prefill attack)
        # count as seen: the probe windows then cover the latest response tokens, prefill
        # included. ``s_t`` is in response coordinates; ``pre`` converts it to generated-token
        # indices.
        self.pre = (self.l0 - self.rs).clamp_min(0).int()
        self.longest_pre = int(self.pre.max()) if self.b else 0  # a host read, once per call
        self.p_hist, self.mode_hist, self.chk_hist = [], [], []
        self.scan_hist = []  # the prefill checks: (response tokens seen, p [B], active [B])
        # With a response probe: each column's w · h_t, for the checks to average
        self.rprobe = getattr(self.model, "safety_response_probe", None)
        self.token_u = None if self.rprobe is None else torch.zeros(
            b, self.l0 + self.max_new + 1, dtype=torch.float32, device=dev)

    def _cache(self, input_ids):
        """The KV cache, the sequence so far and the decoding positions."""
        model, dev = self.model, self.dev
        self.cache = DynamicCache(config=model.config)
        self.seq = input_ids
        self.cur_pos = self.pos[:, -1] + 1  # RoPE position of the next token
        self.base_pos = self.cur_pos.clone()  # position of response token 0
        self.col = torch.arange(self.l0 + self.max_new + 1, device=dev)
        self.n = 0  # response tokens in the cache
        self.out = self.iv = self.tok = self.flags = self.live = self.escal = None
        # A head on decoder layer k: the probe row of a check step runs through layers 0..k
        # only, so only their cache layers get (and drop) its K/V. The LM head keeps the token
        # row: the last row then, else row 0 of [token, probe].
        self.exit_at = getattr(model, "_safeattn_state", {}).get("exit_layer")
        self.probe_layers = (self.cache.layers if self.exit_at is None
                             else self.cache.layers[:self.exit_at + 1])
        self.keep = 1 if self.exit_at is not None else torch.zeros(1, dtype=torch.long,
                                                                   device=dev)

    # ---- the safety check
    def layout(self, active=None):
        """The :class:`~safeattn.hf.SafetyLayout` of a forward; with ``active``, of a check
        step whose probe sees the next ranges ``iv``."""
        from .hf import SafetyLayout

        probe = {} if active is None else {"probe_window": self.iv[:, 1],
                                           "probe_active": active, "probe_rows": self.k}
        return SafetyLayout(q_span=self.q_span, cls=self.cls_col, resp_start=self.rs,
                            cls_visible_to_response=self.vis, **probe)

    def ranges(self) -> torch.Tensor:
        """The next probe's ranges ``[B, 2, 2]`` from the row state, as ``safety_step``
        returns them."""
        s = self.safety
        lo, hi = _window(self.mode, self.s_t, self.step, s.r1, s.r2, s.r3)
        return torch.stack([self.q32, torch.stack([self.rs32 + lo, self.rs32 + hi], -1)],
                           1).int()

    def check(self, h, active, theta, query=None, *, prefill=False) -> torch.Tensor:
        """The head on the probe rows ``h`` (``None``: no probe ran, the op only advances
        ``step``), blended for the ``prefill``'s ``p_0`` with the query probe (its ``query``
        state) and for every later check with the response probe, when the model has them;
        ``safety_step`` at θ = ``theta``; sets the next ranges ``iv`` -> ``p`` (nan where
        unchecked). Fails closed: an exception refuses the checked rows."""
        s = self.safety
        try:
            if h is None:
                logit = self.no_probe
            else:
                logit = self.head_logit(h)
                if query is not None:
                    logit = self.model.safety_query_probe(logit[:, 0], query)[:, None]
                elif self.rprobe is not None and not prefill:
                    logit = self.with_response_probe(logit)
            p_real = torch.sigmoid(logit[:, 0].double())  # fp32 p is 1.0 past logit ~16.6
            p, self.iv = _ops.safety_step(
                logit.contiguous(), self.one, self.zero, self.mode, self.consec, self.s_t,
                self.step, self.refused, active, self.q32, self.rs32, theta=min(theta, 1.0),
                tau=s.tau, r1=s.r1, r2=s.r2, r3=s.r3)
            self.nonfinite_seen = self.nonfinite_seen | (active & ~p.isfinite())
            return torch.where(active, p_real, float("nan"))
        except Exception as e:  # noqa: BLE001 - fail closed, loudly
            logger.warning("safeattn: the safety check raised %s: %s; the affected checked "
                           "row(s) refuse (fail closed)", type(e).__name__, e)
            # safety_step skips refused rows from now on, so of its state only S_t (the
            # trace's alarm_step) needs the update the op gives a failed check
            newly = active & ~self.refused
            self.s_t.copy_(torch.where(newly & (self.s_t < 0), (self.step - 1).clamp_min(0),
                                       self.s_t))
            self.refused.copy_(self.refused | active)
            self.step.add_(1)
            self.iv = self.ranges()
            return torch.full((self.b,), float("nan"), dtype=torch.float64, device=self.dev)

    def head_logit(self, h) -> torch.Tensor:
        """``[B, K, D]`` probe states (``[B, D]``: one head) -> ``[B, 1]`` fp32: the head's
        logit, or the mean of the ensemble members' logits."""
        head = self.model.safety_head
        if h.dim() == 2:
            return head(h.to(head.weight.dtype)).float().reshape(self.b, 1)
        heads = [head] + [m.head for m in self.model.safety_members]
        logits = [f(h[:, j].to(f.weight.dtype)).float() for j, f in enumerate(heads)]
        return torch.stack(logits, 0).mean(0).reshape(self.b, 1)

    def keep_token_logits(self, start: int, count: int) -> None:
        """The last forward's ``response_token_logit`` of its first ``count`` rows (its token
        rows: a check step's probe row comes last) into columns ``start, start + 1, …``."""
        if self.rprobe is None:
            return
        u = self.out.get("response_token_logit")
        if u is None:
            raise RuntimeError("safeattn: the forward did not reach the response probe's layer")
        self.token_u[:, start:start + count] = u[:, :count]

    def with_response_probe(self, logit) -> torch.Tensor:
        """``[B, 1]`` head logits -> blended with the mean token logit of the last ``window``
        response columns before the end of each row's probe window (the head alone where the
        window holds no response token)."""
        end = self.iv[:, 1, 1].long()
        start = torch.maximum(end - self.rprobe.window, self.rs)
        cols = self.col[: self.token_u.shape[1]]
        inside = (cols[None] >= start[:, None]) & (cols[None] < end[:, None])
        count = inside.sum(1)
        mean = (self.token_u * inside).sum(1) / count.clamp_min(1)
        blended = self.rprobe(logit[:, 0], mean)
        return torch.where(count > 0, blended, logit[:, 0])[:, None]

    def record(self, p, active) -> None:
        """The trace of this step: ``p``, the modes, the rows checked, new alarms."""
        self.mark_alarms()
        self.p_hist.append(p)
        self.mode_hist.append(self.shown_mode())
        self.chk_hist.append(active)

    def shown_mode(self) -> torch.Tensor:
        """Each row's mode as the trace shows it: ``REFUSAL`` once the row refuses."""
        return torch.where(self.refused, REFUSAL, self.mode)

    # ---- the steps
    def prefill(self) -> None:
        """``[CLS]`` + prompt: the cache, the first logits, and ``p_0`` from the [CLS] row
        (blended with the query probe's read of the last prompt token, when the model has one;
        for an ensemble, from its probe rows with an empty window, riding on the prefill)."""
        if self.k > 1:
            self.iv = self.ranges()  # step 0: the probes read the query alone
            self.out = self.with_probe(
                torch.cat([self.seq, self.probe_ids()], 1),
                torch.cat([self.pos, torch.zeros_like(self.probe_ids())], 1), self.all_rows,
                keep=torch.tensor([self.l0 - 1], device=self.dev))
            h0, hq = self.probe_states(self.out), None
        else:
            self.out = self.model(input_ids=self.seq, attention_mask=self.am,
                                  position_ids=self.pos, cache=self.cache,
                                  safety_layout=self.layout(), logits_to_keep=1, use_cache=True)
            h0, hq = self.out.get("safety_hidden"), self.out.get("query_hidden")
        if h0 is None:
            raise RuntimeError("safeattn: the prefill did not tap the [CLS] row")
        if hq is None and getattr(self.model, "safety_query_probe", None) is not None:
            raise RuntimeError("safeattn: the prefill did not tap the query probe's layer")
        self.keep_token_logits(0, self.l0)
        p = self.check(h0, self.all_rows, self.safety.query_threshold, query=hq, prefill=True)
        if self.longest_pre:
            self.step.add_(self.pre)
            self.iv = self.ranges()
        self.record(p, self.all_rows)

    def scan_prefill(self) -> None:
        """The checks of an assistant prefill (:attr:`SafetyConfig.prefill_stride`): for every
        multiple ``k`` of the stride below a row's prefill length, a probe whose window ends
        ``k`` response tokens in goes through ``safety_step`` at θ, as the decoding-time check
        at that token would (the same rules and state); the first decoding-time check goes on
        from the state they leave."""
        stride = self.safety.prefill_stride
        if not stride:
            return
        after = self.step.clone()
        for k in range(stride, self.longest_pre, stride):
            active = (self.pre > k) & ~self.refused
            if not bool(active.any()):  # only shrinks as k grows
                break
            self.step.copy_(torch.where(active, k, self.step))  # the tokens the probe sees
            self.iv = self.ranges()
            p = self.check(self.probe_alone(active), active, self.safety.threshold)
            self.scan_hist.append((k, p, active))
        if self.scan_hist:
            self.step.copy_(after)
            self.iv = self.ranges()
            self.mark_alarms()
            self.mode_hist[0] = self.shown_mode()  # step 0's end

    def choose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The token at response index ``n`` of every row, from the last forward's logits
        through HF's processors, greedy or sampled -> ``(tokens [B], scores [B, V])``."""
        logits = self.out.logits[:, -1].to(copy=True, dtype=torch.float32)
        self.out = None
        # EOS is masked before the processors (as vLLM does: after them, a top-p that kept only
        # EOS would leave nothing to sample), on a copy when the raw logits are returned
        held = self.hold_open(logits.clone() if self.logits_out is not None else logits)
        scores = self.procs(self.seq, held)
        if self.scores_out is not None:
            self.scores_out.append(scores)
        if self.logits_out is not None:
            self.logits_out.append(logits)
        if self.gc.do_sample:
            return torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1), scores
        return scores.argmax(-1), scores

    def hold_open(self, scores) -> torch.Tensor:
        """A row does not end its turn while an alarm is pending (a hit, fewer than τ so far):
        the checks that follow decide. Its EOS is masked (in place), and when no check can
        come before its last token it refuses now (fail closed: nothing cleared what the alarm
        flagged) -> the scores."""
        pending = self.pending()
        if not recheck_ahead(self.sched, self.safety.escalate, self.n, self.max_new):
            self.refuse_pending(pending)
            return scores
        if self.eos_ids is None:
            v = scores.shape[-1]
            self.eos_ids = torch.tensor([t for t in self.eos_list if 0 <= t < v],
                                        dtype=torch.long, device=self.dev)
        eos = scores[:, self.eos_ids]
        scores[:, self.eos_ids] = torch.where(pending[:, None], float("-inf"), eos)
        return scores

    def pending(self) -> torch.Tensor:
        """``[B]``: the rows mid-alarm (mode ``transition``, not refused, not finished)."""
        return (self.mode == TRANSITION) & ~self.refused & self.unfinished.bool()

    def refuse_pending(self, rows) -> None:
        """``rows`` refuse outside a check (their refusal starts at the next forced token)."""
        self.refused.copy_(self.refused | rows)
        self.mark_alarms()

    def mark_alarms(self) -> None:
        """``alarm_at`` of the refused rows that have none yet: their ``S_t``."""
        self.alarm_at = torch.where(self.refused & (self.alarm_at < 0), self.s_gen(),
                                    self.alarm_at)

    def s_gen(self) -> torch.Tensor:
        """``S_t`` as a generated-token index (``s_t`` also counts prefilled response tokens)."""
        return (self.s_t - self.pre).clamp_min(0).long()

    def close_open(self, ended) -> None:
        """Rows that a stopping criterion (a stop string) ended mid-alarm refuse at their end:
        nothing is forced after it, and with ``rollback`` their response from ``S_t`` on is
        hidden, as for any other refusal."""
        self.refuse_pending(ended)
        self.closed = self.closed | ended
        self.fpos = torch.where(ended, self.n_forced, self.fpos)
        if self.safety.rollback:
            self.roll_back(ended, end=self.n + 1)
        else:
            self.refusal_at = torch.where(ended, self.n + 1, self.refusal_at)

    def force_refusals(self, tok) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that refused at the last check start their refusal here (rolled back to
        ``S_t`` first with ``rollback``); every row inside its break + prefix takes the next
        forced token instead of ``tok`` -> ``(tokens, forced [B])``."""
        newly = self.refused & (self.refusal_at < 0) & self.unfinished.bool()
        if self.safety.rollback:
            self.roll_back(newly)
        else:
            self.refusal_at = torch.where(newly, self.n, self.refusal_at)
        if self.n_brk:
            text = self.pre + self.refusal_at  # response tokens before the refusal
            tail_at = ((self.l0 + self.refusal_at)[:, None] + self.brk_cols).clamp_min(0)
            tail = (self.seq.gather(1, tail_at) == self.forced[:self.n_brk]).all(-1)
            self.fstart = torch.where(newly, self.refusal.start(text, tail), self.fstart)
        self.fpos = torch.where(newly, self.fstart, self.fpos)
        forcing = self.refused & (self.fpos < self.n_forced)
        tok = torch.where(forcing, self.forced[self.fpos.clamp_max(max(self.n_forced - 1, 0))],
                          tok)
        self.fpos = self.fpos + forcing.long()
        return tok, forcing

    def roll_back(self, newly, end=None) -> None:
        """Hide the ``newly`` refused rows' response from ``S_t`` on, up to ``end`` (default:
        the tokens so far; a prefill never rolls back): zero those mask columns and restart
        the rows' positions at ``S_t``."""
        end = self.n if end is None else end
        s_gen = self.s_gen()
        rb = newly & (self.s_t >= 0) & (s_gen < end)
        start = torch.where(rb, s_gen, end)
        cols = self.col[: self.am.shape[1]]
        hole = rb[:, None] & (cols[None] >= self.l0 + start[:, None]) & \
            (cols[None] < self.l0 + end)
        self.am = self.am.masked_fill(hole, 0)
        self.cur_pos = torch.where(rb, self.base_pos + start, self.cur_pos)
        self.drop_upto = torch.where(rb, end, self.drop_upto)
        self.rolled = self.rolled | rb
        self.refusal_at = torch.where(newly, start, self.refusal_at)

    def emit(self, tok, forcing, scores) -> bool:
        """Append ``tok``; apply the stopping criteria and end refused turns at their
        justification's first sentence; the one host read of the step; the streamer ->
        whether to decode on."""
        if self.has_eos:
            tok = tok * self.unfinished + self.pad_id * (1 - self.unfinished)
        self.seq = torch.cat([self.seq, tok[:, None]], -1)
        pending = self.pending()
        self.unfinished = self.unfinished & (~self.stops(self.seq, scores)).long()
        self.close_open(pending & ~self.unfinished.bool())
        if self.ends is not None:
            said = self.refused & ~forcing & self.ends[tok.clamp(0, self.ends.shape[0] - 1)]
            self.unfinished = self.unfinished & (~said).long()
        self.n += 1
        live = self.unfinished.bool() & ~self.refused
        escal = (self.mode == TRANSITION) & live if self.safety.escalate \
            else torch.zeros_like(live)
        want = [self.unfinished.any(), escal.any(), self.nonfinite_seen.any(), live.any()]
        if self.gate is not None:
            want += [self.refused[0], self.mode[0] == BENIGN, self.chk_hist[-1][0],
                     self.seen_to[0]]
        flags = torch.stack([w.long() for w in want]).tolist()
        if self.gate is not None:
            self.gate(checked=bool(flags[6]), benign=bool(flags[5]) and not flags[4],
                      refused=bool(flags[4]), seen=flags[7])
        if self.streamer is not None:
            self.streamer.put(tok.cpu())
        if flags[2]:
            rows = self.nonfinite_seen.nonzero().flatten().tolist()
            logger.warning("safeattn: non-finite safety probability for row(s) %s; they "
                           "refuse (fail closed)", rows)
            self.nonfinite_seen = torch.zeros_like(self.nonfinite_seen)
        self.tok, self.flags, self.live, self.escal = tok, flags, live, escal
        return bool(flags[0]) and self.n < self.max_new

    def forward(self) -> None:
        """Feed token ``n - 1``. On a check step (the schedule's, or a row mid-alarm) the
        probe rides along as a second query row and sees response tokens ``[0, n)``."""
        any_escal, any_live = self.flags[1], self.flags[3]
        self.am = torch.cat([self.am, torch.ones_like(self.am[:, :1])], -1)
        if (self.sched[self.n] and any_live) or any_escal:
            active = self.live if self.sched[self.n] else self.live & self.escal
            self.seen_to = self.iv[:, 1, 1].long() - self.rs - self.pre  # before check()
            self.out = self.probe_forward(active)
            self.keep_token_logits(self.l0 + self.n - 1, 1)
            p = self.check(self.probe_states(self.out), active,
                           self.safety.check_threshold(self.n))
        else:
            active = torch.zeros_like(self.all_rows)
            self.out = self.model(input_ids=self.tok[:, None], attention_mask=self.am,
                                  position_ids=self.cur_pos[:, None], cache=self.cache,
                                  safety_layout=self.layout(), use_cache=True,
                                  logits_to_keep=1)
            self.keep_token_logits(self.l0 + self.n - 1, 1)
            p = self.check(None, active, self.safety.check_threshold(self.n))
        self.record(p, active)
        self.cur_pos = self.cur_pos + 1

    def probe_forward(self, active):
        """``[token, probe × K]`` in one forward; the probes' K/V leaves the cache again."""
        ids = torch.cat([self.tok[:, None], self.probe_ids()], 1)
        pos = torch.cat([self.cur_pos[:, None], torch.zeros_like(self.probe_ids())], 1)
        return self.with_probe(ids, pos, active)

    def probe_ids(self) -> torch.Tensor:
        """``[B, K]``: the ``[CLS]`` id of each member's probe row."""
        return torch.full((self.b, self.k), self.cid, dtype=torch.long, device=self.dev)

    def probe_states(self, out) -> torch.Tensor:
        """The tapped probe states of a forward: ``[B, D]``, or ``[B, K, D]`` for an ensemble."""
        h = out.get("safety_hidden")
        if h is None or (self.k > 1 and out.get("member_hidden") is None):
            raise RuntimeError("safeattn: the check did not tap the probe rows")
        return h if self.k == 1 else torch.cat([h[:, None], out["member_hidden"]], 1)

    def probe_alone(self, active) -> torch.Tensor:
        """A forward of the probe rows alone (a prefill check) -> their tapped states.
        With a head on an inner layer the forward ends there (:class:`ProbeDone`)."""
        ids = self.probe_ids()
        out = self.with_probe(ids, torch.zeros_like(ids), active, keep=self.no_logits)
        return self.probe_states(out)

    def record_past(self) -> None:
        """The probe layers' sliding caches keep every key until the next ``crop``."""
        for layer in self.probe_layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()

    def with_probe(self, ids, pos, active, keep=None):
        """A forward of ``ids`` whose last ``K`` rows are the probes; their K/V leaves the
        cache again. ``keep``: the rows to compute logits of (default: the token row's)."""
        from .hf.patch import ProbeDone

        self.record_past()
        am = torch.cat([self.am] + [self.am[:, -1:]] * self.k, -1)
        try:
            try:
                out = self.model(
                    input_ids=ids, attention_mask=am, position_ids=pos, cache=self.cache,
                    safety_layout=self.layout(active), use_cache=True,
                    probe_exit=self.exit_at is not None,
                    logits_to_keep=self.keep if keep is None else keep)
            except ProbeDone as done:
                out = {"safety_hidden": done.safety_hidden, "member_hidden": done.member_hidden}
            for layer in self.probe_layers:  # drop the probes' K/V (sliding layers restore
                layer.crop(-self.k)          # their window); later layers never got it
        finally:
            for layer in self.probe_layers:
                if getattr(layer, "record_past", False):
                    layer.record_past = False
        return out

    # ---- the result
    def sequences(self) -> torch.Tensor:
        """``[B, L + T]``: the rows with their rolled-back spans left out (right-padded)."""
        seq = self.seq
        if not bool(self.rolled.any()):
            return seq
        keep = torch.ones_like(seq, dtype=torch.bool)
        for i in self.rolled.nonzero().flatten().tolist():
            keep[i, self.l0 + int(self.refusal_at[i]):self.l0 + int(self.drop_upto[i])] = False
        rows = [seq[i][keep[i]] for i in range(self.b)]
        out = torch.full_like(seq, self.pad_id)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def outputs(self):
        """The sequences with ``.safety`` (or a :class:`SafeGenerateOutput`)."""
        seq = self.sequences()
        p_all = torch.stack(self.p_hist, 1).double().cpu()
        mode_all = torch.stack(self.mode_hist, 1).cpu()
        chk_all = torch.stack(self.chk_hist, 1).cpu()
        ref_at, fstart, closed = self.refusal_at.cpu(), self.fstart.cpu(), self.closed.cpu()
        alarm_at, rolled = self.alarm_at.cpu(), self.rolled.cpu()
        eos_t = self.gc._eos_token_tensor
        eos = set(eos_t.reshape(-1).tolist()) if eos_t is not None else set()
        new = seq[:, self.l0:].cpu()
        scans = [[] for _ in range(self.b)]
        for k, p, on in self.scan_hist:
            for i in on.nonzero().flatten().tolist():
                scans[i].append((k, float(p[i])))
        res = []
        for i in range(self.b):
            r = int(ref_at[i])
            just = "" if closed[i] else None  # refused at its end: nothing written after
            if r >= 0 and self.tokenizer is not None and not closed[i]:
                just = self.refusal.justification(self.tokenizer, new[i].tolist(), r,
                                                  int(fstart[i]), eos)
            res.append(RowSafety(
                p=p_all[i].tolist(), checked=chk_all[i].tolist(),
                mode=["refusal" if m == REFUSAL else MODE_NAMES[m] for m in mode_all[i].tolist()],
                refusal_step=r if r >= 0 else None,
                alarm_step=int(alarm_at[i]) if r >= 0 and int(alarm_at[i]) >= 0 else None,
                justification=just, rolled_back=bool(rolled[i]), prefill_checks=scans[i]))
        info = SafetyOutput(rows=res, p=p_all, mode=mode_all, refused=self.refused.cpu(),
                            refusal_step=ref_at, config=self.safety, prompt_length=self.l0,
                            refusal_ids=self.refusal.prefix)
        if self.gc.return_dict_in_generate:
            return SafeGenerateOutput(
                sequences=seq,
                scores=tuple(self.scores_out) if self.scores_out is not None else None,
                logits=tuple(self.logits_out) if self.logits_out is not None else None,
                cache=self.cache, safety=info)
        seq.safety = info
        return seq


@torch.no_grad()
def safe_generate(model, input_ids: torch.Tensor | None = None, attention_mask=None, *,
                  safety: SafetyConfig, q_span=None, response_start=None, position_ids=None,
                  generation_config=None, logits_processor=None, stopping_criteria=None,
                  streamer=None, tokenizer=None, **kwargs):
    """Strategic decoding on a patched model (``model.generate(..., safety=cfg)`` lands here).

    Args:
        input_ids, attention_mask, q_span, response_start, position_ids: as made by
            :func:`safeattn.build_inputs` (``[CLS]`` first after left padding). A
            ``response_start`` before the end of the input marks an assistant prefill: its
            tokens count as response tokens the probe windows cover (never rolled back);
            ``refusal_step`` / ``alarm_step`` still index the generated tokens.
        safety: a :class:`SafetyConfig`.
        generation_config, logits_processor, stopping_criteria, streamer, and HF's usual
            keyword arguments (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
            ``top_k``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``,
            ``min_new_tokens``, ``return_dict_in_generate``, ``output_scores``,
            ``output_logits``).
        tokenizer: used for the refusal prefix and the justification text (default: the one
            given to ``apply_safeattn``).

    Returns:
        like ``generate``: ``[B, L + T]`` token ids (prompt with ``[CLS]`` + new tokens) with a
        ``.safety`` attribute, or a :class:`SafeGenerateOutput` when
        ``return_dict_in_generate``. ``.safety`` is a :class:`SafetyOutput`.
    """
    from .hf import is_patched

    if not isinstance(safety, SafetyConfig):
        raise ValueError(f"safety must be a safeattn.SafetyConfig, got {type(safety).__name__}")
    if not is_patched(model):
        raise ValueError("model is not patched; call safeattn.apply_safeattn(model, tokenizer)")
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None or q_span is None:
        raise ValueError("safe generation needs input_ids and q_span (see safeattn.build_inputs)")
    kwargs.pop("use_cache", None)
    for k in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(k, False):
            logger.warning("safeattn: %s is not supported by safe generation; ignored", k)
    tokenizer = _get_tokenizer(model, tokenizer)
    safety = safety.resolved(model)
    if tokenizer is None and safety.refusal_prefix:
        raise ValueError("safe generation needs the tokenizer (for the refusal prefix): pass "
                         "tokenizer=..., or give it to apply_safeattn(model, tokenizer)")
    dev = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(dev)
    gc, extra, procs, stops = _prepare(model, input_ids, generation_config, logits_processor,
                                       stopping_criteria, kwargs, tokenizer)
    for k in ("attention_mask", "position_ids", "q_span", "response_start", "logits_to_keep",
              "cache", "past_key_values"):
        extra.pop(k, None)
    if extra:
        raise ValueError(f"safe generation got unexpected arguments {sorted(extra)}")
    if streamer is not None:
        _start_stream(streamer, input_ids, safety)
    dec = _Decode(model, tokenizer, safety, input_ids, attention_mask, q_span, response_start,
                  position_ids, gc, procs, stops, streamer)
    dec.prefill()
    dec.scan_prefill()
    while True:
        tok, scores = dec.choose()
        tok, forcing = dec.force_refusals(tok)
        if not dec.emit(tok, forcing, scores):
            break
        dec.forward()
    if streamer is not None:
        streamer.end()
    return dec.outputs()


def _start_stream(streamer, input_ids: torch.Tensor, safety: SafetyConfig) -> None:
    """Check that ``streamer`` can hold unchecked tokens (one row, ``safety_update``), reset
    it and give it the prompt."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"streamer: safe generation streams one row (a streamer's safety "
                         f"updates are row 0's); got a batch of {input_ids.shape[0]}")
    if not callable(getattr(streamer, "safety_update", None)):
        raise ValueError("streamer: safe generation streams only through a streamer that "
                         "takes safety updates (safeattn.SafeTextStreamer); a plain one "
                         "would print tokens before any check clears them")
    from .streaming import SafeTextStreamer

    if isinstance(streamer, SafeTextStreamer):
        streamer.reset(hold=safety.stream_hold)
    elif callable(getattr(streamer, "reset", None)):
        streamer.reset()
    streamer.put(input_ids.cpu())


def generate(model, tokenizer, prompts, *, safety: SafetyConfig | None = None,
             system: str | None = None, **gen_kwargs):
    """Safe generation from plain strings or conversations: ``build_inputs`` +
    ``model.generate(..., safety=)``.

    A row of ``prompts`` is the user's text or a list of chat messages (see
    :func:`safeattn.build_inputs`; a trailing assistant message is a prefill). Each row ends
    with its assistant turn (:func:`safeattn.hf.template.turn_end`: EOS and the template's
    end-of-turn token, or a stop at the text ``"\nUser:"`` on the plain template) unless
    ``eos_token_id`` / ``stop_strings`` are given. Patches the model first when needed.
    ``safety`` defaults to ``SafetyConfig()``. Returns what :func:`safe_generate` returns
    (``.safety`` holds the trace).
    """
    from .hf import apply_safeattn, build_inputs, is_patched
    from .hf.template import turn_end

    if not is_patched(model):
        apply_safeattn(model, tokenizer)
    dev = model.get_input_embeddings().weight.device
    enc = build_inputs(tokenizer, prompts, system=system, device=dev)
    if "eos_token_id" not in gen_kwargs and "stop_strings" not in gen_kwargs:
        end = turn_end(tokenizer)
        if "stopping_criteria" in end and gen_kwargs.get("stopping_criteria") is not None:
            end["stopping_criteria"].extend(gen_kwargs.pop("stopping_criteria"))
        gen_kwargs = {**end, **gen_kwargs}
    gen_kwargs.pop("tokenizer", None)
    return safe_generate(model, **enc, safety=safety or SafetyConfig(), tokenizer=tokenizer,
                         **gen_kwargs)

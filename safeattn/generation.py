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
- **Fail closed**: a non-finite ``p`` refuses (inside the op); an exception raised by the head
  or the op makes every row that was checked refuse. Both are logged as warnings on the
  ``"safeattn"`` logger.

Schedules (``n`` = response tokens the probe sees, ``n >= 1``; ``p_0`` always runs):
``each`` every step; ``first`` the first ``first_n`` steps; ``periodic`` every ``period``-th
step; ``annealing`` at 1, 2, 3, 5, 8, 13, ... (gaps ``1, 1, 2, 3, 5, 8, ...``) up to ``t_max``.
*(ours)* With ``escalate=True`` (default) a row whose last check was a hit (mode
``transition``) is re-checked at every following step until it clears or refuses, so that
``tau`` consecutive hits can happen under sparse schedules too.
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


@dataclass
class SafetyConfig:
    """Parameters of strategic decoding (DESIGN §3).

    Attributes:
        threshold: θ; ``p >= θ`` is a hit. ``None`` (default): the model's calibrated θ
            (``threshold`` in its safety config, written by ``safeattn calibrate``), else
            :data:`DEFAULT_THRESHOLD`; :meth:`resolved` fills it in.
        query_threshold: the θ of the prefill check ``p_0`` alone, which refuses on one hit
            (the decoding-time checks keep ``threshold``). ``None`` (default): the model's
            calibrated ``query_threshold`` when ``threshold`` is ``None`` too (``safeattn
            calibrate --split-thresholds``), else ``threshold``.
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
        refusal_prefix: the text force-fed when a row refuses (``""``: none). ``None``
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
        stream_hold: tokens a :class:`~safeattn.streaming.SafeTextStreamer` holds back
            (default ``tau``).
    """

    threshold: float | None = None
    query_threshold: float | None = None
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
    stream_hold: int | None = None

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"SafetyConfig.{name} {what}, got {getattr(self, name)!r}")

        for name in ("threshold", "query_threshold"):
            need(getattr(self, name) is None or _is_theta(getattr(self, name)), name,
                 "must be None or a finite number >= 0 (values > 1 never trigger)")
        for name, lo in (("tau", 1), ("r1", 0), ("r2", 0), ("r3", 0), ("period", 1),
                         ("first_n", 0)):
            v = getattr(self, name)
            if v is None and name in ("r1", "r2", "r3"):
                continue
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name,
                 f"must be an int >= {lo}")
        need(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        need(self.t_max is None or (isinstance(self.t_max, int) and self.t_max >= 1), "t_max",
             "must be None or an int >= 1")
        if self.gaps is not None:
            self.gaps = tuple(self.gaps)
            need(len(self.gaps) > 0 and all(isinstance(g, int) and g >= 1 for g in self.gaps),
                 "gaps", "must be a non-empty sequence of ints >= 1")
        need(self.refusal_prefix is None or isinstance(self.refusal_prefix, str),
             "refusal_prefix", "must be None or a str")
        need(self.refusal_end in REFUSAL_ENDS, "refusal_end", f"must be one of {REFUSAL_ENDS}")
        need(isinstance(self.refusal_break, str), "refusal_break", "must be a str")
        need(isinstance(self.rollback, bool), "rollback", "must be a bool")
        need(isinstance(self.escalate, bool), "escalate", "must be a bool")
        if self.stream_hold is None:
            self.stream_hold = self.tau
        need(isinstance(self.stream_hold, int) and self.stream_hold >= 0, "stream_hold",
             "must be an int >= 0")

    def resolved(self, model) -> "SafetyConfig":
        """This config with its model defaults filled in: ``threshold=None`` becomes the
        calibrated ``threshold`` of the safety config (``model.config.safeattn``, or ``model``
        itself when it is that mapping), else :data:`DEFAULT_THRESHOLD`;
        ``query_threshold=None`` its ``query_threshold`` when ``threshold`` was ``None`` too,
        else ``threshold``; ``refusal_prefix=None`` its ``refusal_prefix``, else
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
        if theta is None:
            theta = calibrated("threshold", DEFAULT_THRESHOLD)
            if query is None:
                query = calibrated("query_threshold", theta)
        if query is None:
            query = theta
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
                       refusal_prefix=prefix, r1=r1, r2=r2, r3=r3)

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
    """

    p: list[float]
    checked: list[bool]
    mode: list[str]
    refusal_step: int | None
    alarm_step: int | None
    justification: str | None
    rolled_back: bool = False

    @property
    def refused(self) -> bool:
        return self.refusal_step is not None


@dataclass
class SafetyOutput:
    """``.safety`` of a safe ``generate``: per-row :class:`RowSafety` plus the raw tensors.

    ``p`` ``[B, T+1]`` float32 (nan = unchecked), ``mode`` ``[B, T+1]`` int (3 = refusal),
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
    from .hf import SafetyLayout, is_patched
    from .hf.surgery import cls_token_id

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
    b, l0 = input_ids.shape
    gc, extra, procs, stops = _prepare(model, input_ids, generation_config, logits_processor,
                                       stopping_criteria, kwargs, tokenizer)
    for k in ("attention_mask", "position_ids", "q_span", "response_start", "logits_to_keep",
              "cache", "past_key_values"):
        extra.pop(k, None)
    if extra:
        raise ValueError(f"safe generation got unexpected arguments {sorted(extra)}")
    if streamer is not None:
        streamer.put(input_ids.cpu())

    am = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev)).long()
    q_span = torch.as_tensor(q_span, device=dev).long()
    cls_col = am.argmax(-1)
    rs = (torch.full((b,), l0, dtype=torch.long, device=dev) if response_start is None
          else torch.as_tensor(response_start, device=dev).long().reshape(b))
    pos = ((am.cumsum(-1) - 1).clamp_min(0) if position_ids is None
           else position_ids.to(dev).long())
    cid = cls_token_id(model)
    vis = bool((model.config.safeattn or {}).get("cls_visible_to_response", False))
    q32, rs32 = q_span.int().contiguous(), rs.int().contiguous()
    head = model.safety_head
    one = torch.ones(1, dtype=torch.float32, device=dev)
    zero = torch.zeros(1, dtype=torch.float32, device=dev)
    hz = torch.zeros(b, 1, dtype=torch.float32, device=dev)
    tau, r1, r2, r3 = safety.tau, safety.r1, safety.r2, safety.r3

    pad_t = gc._pad_token_tensor
    pad_id = int(pad_t) if pad_t is not None else (int(gc._eos_token_tensor.reshape(-1)[0])
                                                   if gc._eos_token_tensor is not None else 0)
    has_eos = any(hasattr(c, "eos_token_id") for c in stops)
    max_new = max(int(gc.max_length) - l0, 0)
    sched = safety.check_steps(max_new + 1)
    ref_ids = _refusal_ids(tokenizer, safety.refusal_prefix) if safety.refusal_prefix else []
    # Forced on refusal: the break, then the prefix; a row with no response text yet, or
    # whose text already ends with the break, skips it (it starts at fpos = n_brk).
    brk_ids = _break_ids(tokenizer, safety)
    n_brk, n_forced = len(brk_ids), len(brk_ids) + len(ref_ids)
    ref_t = torch.tensor(brk_ids + ref_ids or [pad_id], dtype=torch.long, device=dev)
    brk_cols = torch.arange(-n_brk, 0, device=dev)
    ends = _sentence_end_ids(tokenizer, dev) if safety.refusal_end == "sentence" and \
        tokenizer is not None else None
    gate = getattr(streamer, "safety_update", None)

    # Row state for the fused op (int32 / bool on the device).
    mode = torch.full((b,), BENIGN, dtype=torch.int32, device=dev)
    consec = torch.zeros(b, dtype=torch.int32, device=dev)
    s_t = torch.full((b,), -1, dtype=torch.int32, device=dev)
    step = torch.zeros(b, dtype=torch.int32, device=dev)
    refused = torch.zeros(b, dtype=torch.bool, device=dev)
    fpos = torch.zeros(b, dtype=torch.long, device=dev)  # position within break + prefix
    fstart = torch.zeros(b, dtype=torch.long, device=dev)  # where the row's forcing began
    refusal_at = torch.full((b,), -1, dtype=torch.long, device=dev)
    alarm_at = torch.full((b,), -1, dtype=torch.long, device=dev)
    rolled = torch.zeros(b, dtype=torch.bool, device=dev)
    unfinished = torch.ones(b, dtype=torch.long, device=dev)
    p_hist, mode_hist, chk_hist = [], [], []
    nonfinite_seen = torch.zeros(b, dtype=torch.bool, device=dev)

    def safety_update(h, active, theta):
        """Head + op for the checked rows at θ = ``theta``; fail closed on any error.
        -> (p, next intervals)."""
        nonlocal nonfinite_seen
        try:
            if h is None:
                logit = hz  # no probe ran (active is all False): the op only advances `step`
            else:
                logit = head(h.to(head.weight.dtype)).float().reshape(b, 1)
            p_real = torch.sigmoid(logit[:, 0])
            if theta > 1.0:  # no finite p can hit; non-finite p still fails closed
                logit = torch.where(logit.isfinite(), torch.full_like(logit, -1e4), logit)
            p, iv = _ops.safety_step(logit.contiguous(), one, zero, mode, consec, s_t, step,
                                     refused, active, q32, rs32, theta=min(theta, 1.0),
                                     tau=tau, r1=r1, r2=r2, r3=r3)
            bad = active & ~p.isfinite()
            nonfinite_seen = nonfinite_seen | bad
            return torch.where(active, p_real, float("nan")), iv, bad
        except Exception as e:  # noqa: BLE001 - fail closed, loudly
            logger.warning("safeattn: the safety check raised %s: %s; the %s checked row(s) "
                           "refuse (fail closed)", type(e).__name__, e, "affected")
            newly = active & ~refused
            consec.copy_(torch.where(newly & (consec == 0), 1, consec))
            s_t.copy_(torch.where(newly & (s_t < 0), (step - 1).clamp_min(0), s_t))
            refused.copy_(refused | active)
            step.add_(1)
            lo, hi = _window(mode, s_t, step, r1, r2, r3)
            iv = torch.stack([q32, torch.stack([rs32 + lo, rs32 + hi], -1)], 1).int()
            return torch.full((b,), float("nan"), device=dev), iv, torch.zeros_like(active)

    # ---- prefill: [CLS] + prompt; p_0 from the [CLS] row.
    cache = DynamicCache(config=model.config)
    lay = SafetyLayout(q_span=q_span, cls=cls_col, resp_start=rs, cls_visible_to_response=vis)
    out = model(input_ids=input_ids, attention_mask=am, position_ids=pos, cache=cache,
                safety_layout=lay, logits_to_keep=1, use_cache=True)
    all_rows = torch.ones(b, dtype=torch.bool, device=dev)
    h0 = out.get("safety_hidden")
    if h0 is None:
        raise RuntimeError("safeattn: the prefill did not tap the [CLS] row")
    p, iv, _ = safety_update(h0, all_rows, safety.query_threshold)
    # Response tokens already in the input (an assistant prefill, e.g. a prefill attack) count
    # as seen: the probe windows then cover the latest response tokens, prefill included.
    # ``s_t`` is in response coordinates; ``pre`` converts it to generated-token indices.
    pre = (l0 - rs).clamp_min(0).int()
    if bool(pre.any()):
        step.add_(pre)
        lo, hi = _window(mode, s_t, step, r1, r2, r3)
        iv = torch.stack([q32, torch.stack([rs32 + lo, rs32 + hi], -1)], 1).int()
    alarm_at = torch.where(refused & (alarm_at < 0), (s_t - pre).clamp_min(0).long(), alarm_at)
    p_hist.append(p)
    mode_hist.append(torch.where(refused, REFUSAL, mode))
    chk_hist.append(all_rows)
    cur_pos = pos[:, -1] + 1  # RoPE position of the next token
    base_pos = cur_pos.clone()  # position of response token 0
    seq = input_ids
    scores_out = [] if (gc.return_dict_in_generate and gc.output_scores) else None
    logits_out = [] if (gc.return_dict_in_generate and gc.output_logits) else None
    col = torch.arange(l0 + max_new + 1, device=dev)
    n = 0  # response tokens in the cache
    flags = None
    drop_upto = torch.zeros(b, dtype=torch.long, device=dev)

    # A head on decoder layer k: the probe row of a check step runs through layers 0..k
    # only, so only their cache layers get (and drop) its K/V. The LM head keeps the token
    # row: the last row then, else row 0 of [token, probe].
    exit_at = getattr(model, "_safeattn_state", {}).get("exit_layer")
    probe_layers = cache.layers if exit_at is None else cache.layers[:exit_at + 1]
    keep = 1 if exit_at is not None else torch.zeros(1, dtype=torch.long, device=dev)

    while True:
        # ---- choose the token at response index n from the last forward's logits.
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        del out
        scores = procs(seq, logits)
        if scores_out is not None:
            scores_out.append(scores)
        if logits_out is not None:
            logits_out.append(logits)
        if gc.do_sample:
            tok = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
        else:
            tok = scores.argmax(-1)
        # Refusal: the newly refused rows (optionally) roll back to S_t, then every refusing
        # row takes the next prefix token.
        newly = refused & (refusal_at < 0) & unfinished.bool()
        if safety.rollback:
            s_gen = (s_t - pre).clamp_min(0).long()  # a prefill is never rolled back
            rb = newly & (s_t >= 0) & (s_gen < n)
            start = torch.where(rb, s_gen, n)
            cols = col[: am.shape[1]]
            hole = rb[:, None] & (cols[None] >= l0 + start[:, None]) & (cols[None] < l0 + n)
            am = am.masked_fill(hole, 0)
            cur_pos = torch.where(rb, base_pos + start, cur_pos)
            drop_upto = torch.where(rb, n, drop_upto)
            rolled = rolled | rb
            refusal_at = torch.where(newly, start, refusal_at)
        else:
            refusal_at = torch.where(newly, n, refusal_at)
        if n_brk:
            text = pre + refusal_at  # response tokens before the refusal
            tail_at = ((l0 + refusal_at)[:, None] + brk_cols).clamp_min(0)
            tail = (seq.gather(1, tail_at) == ref_t[:n_brk]).all(-1)
            fstart = torch.where(newly & ((text == 0) | ((text >= n_brk) & tail)), n_brk,
                                 fstart)
        fpos = torch.where(newly, fstart, fpos)
        forcing = refused & (fpos < n_forced)
        tok = torch.where(forcing, ref_t[fpos.clamp_max(max(n_forced - 1, 0))], tok)
        fpos = fpos + forcing.long()
        if has_eos:
            tok = tok * unfinished + pad_id * (1 - unfinished)
        seq = torch.cat([seq, tok[:, None]], -1)
        unfinished = unfinished & (~stops(seq, scores)).long()
        if ends is not None:  # the justification's first sentence ends the refused turn
            said = refused & ~forcing & ends[tok.clamp(0, ends.shape[0] - 1)]
            unfinished = unfinished & (~said).long()
        n += 1
        live = unfinished.bool() & ~refused
        escal = (mode == TRANSITION) & live if safety.escalate else torch.zeros_like(live)
        want = [unfinished.any(), escal.any(), nonfinite_seen.any(), live.any()]
        if gate is not None:
            want += [refused[0], mode[0] == BENIGN, chk_hist[-1][0]]
        flags = torch.stack(want).tolist()  # the one host read per step
        if gate is not None:
            gate(checked=bool(flags[6]), benign=bool(flags[5]) and not flags[4],
                 refused=bool(flags[4]), seen=n - 1)
        if streamer is not None:
            streamer.put(tok.cpu())
        if flags[2]:
            rows = nonfinite_seen.nonzero().flatten().tolist()
            logger.warning("safeattn: non-finite safety probability for row(s) %s; they refuse "
                           "(fail closed)", rows)
            nonfinite_seen = torch.zeros_like(nonfinite_seen)
        if not flags[0] or n >= max_new:
            break

        # ---- decode step: feed token n-1; the probe (if any) sees response tokens [0, n).
        check = (sched[n] and bool(flags[3])) or bool(flags[1])
        am = torch.cat([am, torch.ones_like(am[:, :1])], -1)
        if check:
            static = all_rows if sched[n] else torch.zeros_like(all_rows)
            active = live & (static | escal)
            lay = SafetyLayout(q_span=q_span, cls=cls_col, resp_start=rs,
                               cls_visible_to_response=vis, probe_window=iv[:, 1],
                               probe_active=active)
            ids = torch.stack([tok, torch.full_like(tok, cid)], 1)
            for layer in probe_layers:
                if hasattr(layer, "activate_past_recording"):
                    layer.activate_past_recording()
            try:
                out = model(input_ids=ids, attention_mask=torch.cat([am, am[:, -1:]], -1),
                            position_ids=torch.stack([cur_pos, torch.zeros_like(cur_pos)], 1),
                            cache=cache, safety_layout=lay, use_cache=True,
                            probe_exit=exit_at is not None, logits_to_keep=keep)
                for layer in probe_layers:  # drop the probe's K/V (sliding layers restore
                    layer.crop(-1)          # their window); later layers never got it
            finally:
                for layer in probe_layers:
                    if getattr(layer, "record_past", False):
                        layer.record_past = False
            h = out.get("safety_hidden")
            if h is None:
                raise RuntimeError("safeattn: the check step did not tap the probe row")
            p, iv, _ = safety_update(h, active, safety.threshold)
        else:
            active = torch.zeros_like(all_rows)
            lay = SafetyLayout(q_span=q_span, cls=cls_col, resp_start=rs,
                               cls_visible_to_response=vis)
            out = model(input_ids=tok[:, None], attention_mask=am, position_ids=cur_pos[:, None],
                        cache=cache, safety_layout=lay, use_cache=True, logits_to_keep=1)
            # No probe ran: the op only advances `step` and moves the next probe's window.
            p, iv, _ = safety_update(None, active, safety.threshold)
        alarm_at = torch.where(refused & (alarm_at < 0), (s_t - pre).clamp_min(0).long(),
                               alarm_at)
        p_hist.append(p)
        mode_hist.append(torch.where(refused, REFUSAL, mode))
        chk_hist.append(active)
        cur_pos = cur_pos + 1

    if streamer is not None:
        streamer.end()

    # ---- outputs: drop rolled-back spans, build the trace.
    if bool(rolled.any()):
        keep = torch.ones_like(seq, dtype=torch.bool)
        for i in rolled.nonzero().flatten().tolist():
            a, z = l0 + int(refusal_at[i]), l0 + int(drop_upto[i])
            keep[i, a:z] = False
        rows = [seq[i][keep[i]] for i in range(b)]
        seq = torch.full_like(seq, pad_id)
        for i, r in enumerate(rows):
            seq[i, : r.shape[0]] = r
    p_all = torch.stack(p_hist, 1).float().cpu()
    mode_all = torch.stack(mode_hist, 1).cpu()
    chk_all = torch.stack(chk_hist, 1).cpu()
    ref_at = refusal_at.cpu()
    res = []
    eos_ids = set(gc._eos_token_tensor.reshape(-1).tolist()) if gc._eos_token_tensor is not None \
        else set()
    new = seq[:, l0:].cpu()
    for i in range(b):
        r = int(ref_at[i])
        just = None
        if r >= 0 and tokenizer is not None:
            toks = []
            for t in new[i, r + n_forced - int(fstart[i]):].tolist():
                if t in eos_ids:
                    break
                toks.append(t)
            just = tokenizer.decode(toks, skip_special_tokens=True).strip()
        res.append(RowSafety(
            p=p_all[i].tolist(), checked=chk_all[i].tolist(),
            mode=["refusal" if m == REFUSAL else MODE_NAMES[m] for m in mode_all[i].tolist()],
            refusal_step=r if r >= 0 else None,
            alarm_step=int(alarm_at[i]) if r >= 0 and int(alarm_at[i]) >= 0 else None,
            justification=just, rolled_back=bool(rolled[i])))
    info = SafetyOutput(rows=res, p=p_all, mode=mode_all, refused=refused.cpu(),
                        refusal_step=ref_at, config=safety, prompt_length=l0,
                        refusal_ids=ref_ids)
    if gc.return_dict_in_generate:
        return SafeGenerateOutput(
            sequences=seq, scores=tuple(scores_out) if scores_out is not None else None,
            logits=tuple(logits_out) if logits_out is not None else None,
            cache=cache, safety=info)
    seq.safety = info
    return seq


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

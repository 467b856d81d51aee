"""The V1 logits processor: per-request safety state, the state machine and the refusal.

A request is switched on with ``SamplingParams(extra_args={"safety": {...}})`` (the fields of
:class:`~safeattn.SafetyConfig`, plus ``q_span``, ``response_start`` and ``id``) or for every
request by the server option ``safeattn_vllm.safety``, which requests cannot change unless
``safeattn_vllm.request_overrides`` is true (they may still give an ``id``). Its state lives
exactly as long as vLLM keeps the request: vLLM's processor interface names requests by batch
row only, so the state is keyed by the request's own ``SamplingParams`` object, which the model
runner holds from the request's arrival until it finishes (through preemption and row moves)
and then drops; a weak reference removes the state with it.

Each step: ``update_state`` follows the batch (removed, added, moved rows) and posts the plan
(which rows check, with which window) to the model; ``apply`` runs
:func:`safeattn.ops.safety_step` (the op the HF decoder uses) on the probe logits and forces the
refusal prefix by masking logits.

A prompt that ends with an assistant prefill (``response_start`` before its end; e.g. a prefill
attack) is checked as the HF decoder checks it: ``p_0`` reads ``q_span`` alone, then a probe
every ``prefill_stride`` response tokens into the prefill (one batched pass per stride over the
cache of the prefill's forward), and the decoding-time windows count the prefilled tokens as
response.

A head with a response probe: each forward's tokens' ``w · h`` (posted by the model) are kept
per request by cache column, and every check after ``p_0`` blends the mean of its window's
last ``window`` of them into the head's logit (:meth:`RequestSafety.check_logit`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import weakref

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from .. import generation, ops, reference
from ..generation import (MODE_NAMES, REFUSAL, Refusal, SafetyConfig, SafetyOutput,
                          recheck_ahead)
from ..hf.template import QUERY_BUDGET
from ..ops import BENIGN, TRANSITION
from .models import bridge_for, options
from .probe import Plan
from .serving import (STREAM_ARG, TRACE_ARG, StreamGate, end_trace, publish, trace_output,
                      valid_key)

logger = logging.getLogger("safeattn")

#: Keys of ``extra_args["safety"]`` beside the :class:`SafetyConfig` fields.
EXTRA_KEYS = ("q_span", "response_start", "id")
_FIELDS = tuple(f.name for f in dataclasses.fields(SafetyConfig))
#: Traces of requests that gave an ``id``, until :func:`safeattn.vllm.trace` takes them (the
#: oldest go beyond ``MAX_TRACES``, so that a server whose clients send ids does not grow).
TRACES: dict = {}
MAX_TRACES = 4096
#: Requests that came back to the batch with their state kept (after preemption), per process.
STATS = {"resumed": 0}


def parse_safety(value, default: dict | None = None):
    """``extra_args["safety"]`` (merged over the server default) -> (SafetyConfig, extras) or
    None when safety is off for the request. Raises ValueError naming the bad field."""
    value = _from_json(value)
    if value is None:
        value = default
    elif value is False:
        return None
    elif isinstance(value, dict) and default:
        value = {**default, **value}
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"extra_args['safety'] must be a dict of SafetyConfig fields, true or "
                         f"false, got {type(value).__name__}")
    bad = set(value) - set(_FIELDS) - set(EXTRA_KEYS)
    if bad:
        raise ValueError(f"extra_args['safety']: unknown field(s) {sorted(bad)}; known: "
                         f"{sorted(_FIELDS + EXTRA_KEYS)}")
    cfg = SafetyConfig(**{k: v for k, v in value.items() if k in _FIELDS})
    if cfg.rollback:
        raise ValueError("extra_args['safety'].rollback=True is not supported by the vLLM plugin "
                         "(vLLM cannot crop a request's cache back to S_t)")
    q = value.get("q_span")
    if q is not None and not (isinstance(q, (list, tuple)) and len(q) == 2
                              and all(isinstance(x, int) and x >= 0 for x in q) and q[0] <= q[1]):
        raise ValueError(f"extra_args['safety'].q_span must be [start, end) prompt-token "
                         f"indices, got {q!r}")
    r = value.get("response_start")
    if r is not None and not (isinstance(r, int) and not isinstance(r, bool) and r >= 0):
        raise ValueError(f"extra_args['safety'].response_start must be a prompt-token index "
                         f"(where an assistant prefill starts), got {r!r}")
    return cfg, {k: value[k] for k in EXTRA_KEYS if k in value}


def _from_json(value):
    """A server request's vllm_xargs carry flat values: its safety config comes as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_args['safety'] is not valid JSON: {e}") from None
    return value


class RequestSafety:
    """One request's state machine (the fields of ``safety_step``) and its trace."""

    def __init__(self, cfg: SafetyConfig, extras: dict, prompt_ids, output_ids,
                 refusal: Refusal, max_tokens: int, default_span, tokenizer, eos_id, eos):
        self.cfg, self.id = cfg, extras.get("id")
        self.prompt_len = len(prompt_ids)
        qs, qe, rs = default_span
        if extras.get("q_span"):  # the request's own layout: its response starts at its end
            (qs, qe), rs = extras["q_span"], self.prompt_len
        rs = extras.get("response_start", rs)
        if qe > self.prompt_len:
            raise ValueError(f"extra_args['safety'].q_span end {qe} is past the prompt "
                             f"({self.prompt_len} tokens)")
        if not qe <= rs <= self.prompt_len:
            raise ValueError(f"extra_args['safety'].response_start {rs} must lie between the "
                             f"q_span end ({qe}) and the prompt's end ({self.prompt_len})")
        self.qs, self.qe, self.rs = qs, qe, rs
        self.pre = self.prompt_len - rs  # response tokens in the prompt (an assistant prefill)
        self.output_ids = output_ids  # vLLM's live list of the request's generated ids
        self.refusal = refusal
        self.prompt_tail = list(prompt_ids[max(rs, self.prompt_len - len(refusal.brk)):])
        self.tokenizer, self.eos = tokenizer, set(eos)  # for the justification
        self.eos_id = eos_id  # what ends a refused turn
        self.max_tokens = max_tokens
        self.schedule = cfg.check_steps(max_tokens + 1)
        self.mode, self.consec, self.s_t, self.refused = BENIGN, 0, -1, False
        self.fpos = self.fstart = 0  # in refusal.ids: next forced, and where forcing began
        self.refusal_step, self.alarm_step = None, None
        self.done = False  # refused, and nothing is left to force: no more plan rows
        self.ended_with = None  # the EOS that ended a refused turn, forced while it goes on
        self.p: dict[int, float] = {}
        self.modes: dict[int, int] = {}  # the mode after the check at each step
        self.opens: dict[int, int] = {}  # the pending alarm's step after it, mid-alarm
        self.prefill_checks: list[tuple[int, float]] = []  # (response tokens seen, p)
        self.stream: StreamGate | None = None  # a server request's published state
        self.response = None  # the head's ResponseBlend (set when it has a response probe)
        self.token_logits: dict[int, float] = {}  # cache column -> w · h (response probe)
        self.cleared = 0  # the end of the window of this step's check (generated tokens)

    def due(self, n: int) -> bool:
        if self.refused:
            return False
        sched = self.schedule[n] if n < len(self.schedule) else False
        return sched or (self.cfg.escalate and self.mode == TRANSITION)

    def pending(self) -> bool:
        """Mid-alarm: a check hit, fewer than τ so far."""
        return self.mode == TRANSITION and not self.refused

    def hold_open(self, n: int, logits: torch.Tensor, row: int) -> None:
        """The HF decoder's ``hold_open`` for this request at step ``n``: mid-alarm, its EOS
        is masked, or it refuses when no check can come before its last token."""
        if not self.pending():
            return
        if recheck_ahead(self.schedule, self.cfg.escalate, n, self.max_tokens):
            logits[row, [t for t in self.eos if 0 <= t < logits.shape[-1]]] = float("-inf")
        else:
            self.refuse()

    def alarm_index(self) -> int:
        """``S_t`` as a generated-token index (an alarm raised in the prefill: 0)."""
        return max(self.s_t - self.pre, 0)

    def mark(self, n: int) -> None:
        """Record the state after the check at generated step ``n`` in the trace."""
        self.modes[n] = REFUSAL if self.refused else self.mode
        if self.pending():
            self.opens[n] = self.alarm_index()
        else:
            self.opens.pop(n, None)

    def refuse(self) -> None:
        """Refuse; the alarm is at ``S_t``."""
        self.refused, self.alarm_step = True, self.alarm_index()

    def fail(self, seen: int) -> None:
        """A check that saw ``seen`` response tokens failed: refuse (fail closed), with the
        alarm at the newest token it saw unless one was pending, as in HF."""
        if self.s_t < 0:
            self.s_t = max(seen - 1, 0)
        self.refuse()

    def seen(self, n: int) -> int:
        """Response tokens the check at step ``n`` sees: none for ``p_0``, else the prefill
        and ``n`` generated tokens."""
        return self.pre + n if n else 0

    def window(self, seen: int) -> tuple[int, int]:
        """The probe window over response tokens for a check that sees ``seen`` of them."""
        # the scalar rules, not generation's batched ones: one request's tensors of one
        # element cost about 0.3 ms a call, every request, every step
        c = self.cfg
        return reference.window(self.mode, self.s_t, seen, c.r1, c.r2, c.r3)

    def check_logit(self, head_logit: float, seen: int) -> float:
        """The logit of a check that sees ``seen`` response tokens: the head's, blended with
        the response probe over the last ``window`` of them before its window's end, as
        ``safeattn.generate`` does (``p_0`` keeps the head's). A token whose value no forward
        of this request computed (a prefix-cache hit) makes it nan: the request refuses."""
        if self.response is None or seen == 0:
            return head_logit
        hi = self.window(seen)[1]
        cols = range(self.rs + max(hi - self.response.window, 0), self.rs + hi)
        return self.response.logit(head_logit, [self.token_logits.get(c, math.nan)
                                                 for c in cols])

    def refusal_start(self, n: int) -> int:
        """Where a refusal at step ``n`` starts in the forced ids (past the break when the
        response is empty or already ends with it)."""
        brk = self.refusal.brk
        text = self.prompt_tail + list(self.output_ids[:n])
        tail = text[max(len(text) - len(brk), 0):]
        return self.refusal.start(self.pre + n, tail == brk)

    def trace(self) -> SafetyOutput:
        """The finished request's trace as the HF decoder gives it: a one-row
        :class:`safeattn.SafetyOutput` (``trace[0]`` is the :class:`RowSafety`;
        ``safeattn.plot_trace`` reads it)."""
        return trace_output(end_trace(self.trace_json(), len(self.output_ids)))

    def trace_json(self, justification: bool = True) -> dict:
        """The trace as JSON (what the server returns; :func:`trace_output` reads it back).
        The server's copy is published before each step's token is sampled, so it goes without
        the ``justification``, whose last token it would miss (``justification=False``)."""
        last = max([len(self.output_ids) - 1, *self.p])
        codes, opens, cur, alarm = [], [], BENIGN, None
        for n in range(last + 1):
            if n in self.modes:
                cur, alarm = self.modes[n], self.opens.get(n)
            if self.refusal_step is not None and n > self.refusal_step:
                cur = REFUSAL  # also after a refusal no check recorded (hold_open)
            codes.append(cur)
            opens.append(alarm)
        p = [self.p.get(n) for n in range(last + 1)]
        just = None
        if justification and self.refusal_step is not None:
            just = self.refusal.justification(self.tokenizer, list(self.output_ids),
                                              self.refusal_step, self.fstart, self.eos)
        finite = lambda v: None if v is None or not math.isfinite(v) else v  # noqa: E731
        return {"p": [finite(v) for v in p],
                "checked": [n in self.p for n in range(last + 1)],
                "mode": ["refusal" if m == REFUSAL else MODE_NAMES[m] for m in codes],
                "refusal_step": self.refusal_step, "alarm_step": self.alarm_step,
                "justification": just,
                "prefill_checks": [[k, finite(v)] for k, v in self.prefill_checks],
                "open_alarm": self.alarm_index() if self.pending() else None,
                "open_alarms": opens,
                "config": dataclasses.asdict(self.cfg), "refusal_ids": self.refusal.prefix}


def _locked(value):
    """A request's ``extra_args["safety"]`` on a server whose config requests cannot change
    (``request_overrides`` off): only its trace ``id`` is kept; dropping anything else is
    logged."""
    try:
        value = _from_json(value)
    except ValueError:
        pass  # validate_params has refused it
    kept = {"id": value["id"]} if isinstance(value, dict) and "id" in value else None
    if value is not None and value is not True and value != (kept or {}):
        logger.warning("safeattn: a request asks to change the server's safety config (%s); "
                       "request_overrides is off, so the server's config applies",
                       json.dumps(value, default=str)[:200])
    return kept


def _failed_parse(value, default):
    """(config, extras) of a request whose state failed: its own config where it parses (for
    its refusal text and trace ``id``), else the server's, else the defaults; never None."""
    for v, base in ((value, default), (default, None)):
        try:
            parsed = parse_safety(v, base)
        except ValueError:
            continue
        if parsed is not None:
            extras = parsed[1]
            return parsed[0], ({"id": extras["id"]} if "id" in extras else {})
    return SafetyConfig(), {}


def _force(logits: torch.Tensor, row: int, token: int) -> None:
    logits[row].fill_(float("-inf"))
    logits[row, token] = 0.0


def _template_ids(tokenizer):
    """(ids before, ids after) the user's text in a one-turn chat prompt, and the ids between
    an assistant turn's text and the next user turn's (empty if the template will not say),
    or None."""
    parts = _render_marked(tokenizer, ["user"])
    if parts is None:
        return None
    enc = lambda t: tuple(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    turns = _render_marked(tokenizer, ["user", "assistant", "user"])
    return enc(parts[0]), enc(parts[1]), enc(turns[2]) if turns else ()


def _render_marked(tokenizer, roles) -> list[str] | None:
    """A chat of one marked message per role, with the generation prompt, rendered and cut
    at the marks (the text around and between the messages), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063SAFEATTN\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": r, "content": mark} for r in roles],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render these turns
        return None
    return text.split(mark) if text.count(mark) == len(roles) else None


def _user_span(ids: list[int], first: int, end: int, turn: list[int], budget: int) -> int:
    """Where ``q_span`` starts in a chat prompt whose user text runs from ``first`` (the
    first user turn) to ``end`` (the last generation prompt), as ``build_inputs`` takes it:
    the latest user turn whole, earlier ones (each after a ``turn`` opening) as far back as
    ``budget`` tokens in all, a turn that does not fit whole left out."""
    starts = [first]
    while turn and (i := _first_index(ids, turn, starts[-1], end)) is not None:
        starts.append(i + len(turn))
    qs = starts[-1]
    for s in reversed(starts[:-1]):
        if end - s > budget:
            break
        qs = s
    return qs


def _first_index(ids: list[int], sub: list[int], start: int, end: int) -> int | None:
    """Where the first ``sub`` that lies inside ``ids[start:end]`` begins."""
    for i in range(start, end - len(sub) + 1):
        if ids[i] == sub[0] and ids[i:i + len(sub)] == sub:
            return i
    return None


def _last_index(ids: list[int], sub: list[int], start: int) -> int | None:
    """Where the last ``sub`` in ``ids[start:]`` begins (``len(ids)`` for an empty ``sub``)."""
    for i in range(len(ids) - len(sub), start - 1, -1):
        if (not sub or ids[i] == sub[0]) and ids[i:i + len(sub)] == sub:
            return i
    return None


def _config_key(cfg: SafetyConfig, seen: int, written: int):
    """The ``safety_step`` settings of a check that sees ``seen`` response tokens, ``written``
    of them generated (``seen == 0``: the prefill's ``p_0``, at ``query_threshold``)."""
    theta = cfg.query_threshold if seen == 0 else cfg.check_threshold(written)
    return (min(theta, 1.0), cfg.tau, cfg.r1, cfg.r2, cfg.r3)


def advance(states: list[RequestSafety], seen: list[int], logits: torch.Tensor,
            written: list[int] | None = None) -> list[float]:
    """Run ``safety_step`` on checks that saw ``seen`` response tokens, ``written`` of them
    generated (default none: checks of a prefill), grouped by their θ, τ, r1-r3; updates the
    states in place -> p of each."""
    logits = torch.tensor([s.check_logit(lg, k) for s, lg, k in
                           zip(states, logits.float().tolist(), seen)], dtype=torch.float32)
    ps = torch.sigmoid(logits.double()).tolist()  # fp32 p is 1.0 past logit ~16.6
    written = written or [0] * len(states)
    groups: dict = {}
    for i, s in enumerate(states):
        groups.setdefault(_config_key(s.cfg, seen[i], written[i]), []).append(i)
    for (theta, tau, r1, r2, r3), idx in groups.items():
        sub = [states[i] for i in idx]
        lg = logits[idx].reshape(-1, 1)
        i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        mode, consec = i32([s.mode for s in sub]), i32([s.consec for s in sub])
        s_t, step = i32([s.s_t for s in sub]), i32([seen[i] for i in idx])
        refused = torch.tensor([s.refused for s in sub])
        active = torch.ones(len(sub), dtype=torch.bool)
        q = i32([[s.qs, s.qe] for s in sub])
        rs = i32([s.rs for s in sub])
        ops.safety_step(lg.contiguous(), torch.ones(1), torch.zeros(1), mode, consec, s_t, step,
                        refused, active, q, rs, theta=theta, tau=tau, r1=r1, r2=r2, r3=r3)
        # read back as lists: indexing a tensor element by element costs µs per read
        for s, i, m, c, t, r in zip(sub, idx, mode.tolist(), consec.tolist(), s_t.tolist(),
                                    refused.tolist()):
            s.mode, s.consec, s.s_t = m, c, t
            if r and not s.refused:
                s.refuse()
            if not math.isfinite(ps[i]):
                logger.warning("safeattn: non-finite safety probability for request %s after "
                               "%d response tokens; it refuses (fail closed)", s.id, seen[i])
    return ps


def step_states(states: list[RequestSafety], ns: list[int], logits: torch.Tensor) -> None:
    """The checks at generated steps ``ns`` of ``states``: the state machine, and the trace."""
    ps = advance(states, [s.seen(n) for s, n in zip(states, ns)], logits, ns)
    for s, n, p in zip(states, ns, ps):
        s.p[n] = p
        s.mark(n)


class _Scan:
    """One request's prefill checks: the ``k`` still to check and the head logits known for
    them. A BENIGN check's window (Rule 2) depends on ``k`` alone, so all of those are
    computed up front; an alarm's windows (Rule 3) depend on its ``S_t``, so they are computed
    when an alarm starts, for the next τ checks."""

    def __init__(self, row: int, state: RequestSafety):
        self.row, self.s = row, state
        stride = state.cfg.prefill_stride
        self.ks = list(range(stride, state.pre, stride))
        self.i = 0  # the next check
        self.known: dict[tuple, float] = {}  # (S_t or -1 for BENIGN, k) -> head logit

    def key(self, k: int) -> tuple:
        return (-1 if self.s.mode == BENIGN else self.s.s_t, k)

    def wanted(self) -> list[tuple[int, tuple[int, int]]]:
        """``(k, window)`` of the checks whose logits the next steps of :meth:`walk` need."""
        c = self.s.cfg
        if not self.known:
            return [(k, reference.window(BENIGN, -1, k, c.r1, c.r2, c.r3)) for k in self.ks]
        return [(k, self.s.window(k)) for k in self.ks[self.i:self.i + c.tau]]

    def walk(self) -> bool:
        """Run the checks whose logits are known, in order -> whether one waits for more."""
        s = self.s
        while self.i < len(self.ks) and not s.refused:
            k = self.ks[self.i]
            logit = self.known.get(self.key(k))
            if logit is None:
                return True
            try:
                p = advance([s], [k], torch.tensor([logit]))[0]
            except Exception as e:  # noqa: BLE001 - fail closed, and keep serving
                logger.error("safeattn: the safety step of a prefill check failed (%s); the "
                             "request refuses (fail closed)", e)
                self.fail()
                return False
            s.prefill_checks.append((k, p))
            self.i += 1
        return False

    def fail(self) -> None:
        """The next check failed: it refuses (fail closed)."""
        if self.i < len(self.ks) and not self.s.refused:
            self.s.fail(self.ks[self.i])
            self.s.prefill_checks.append((self.ks[self.i], float("nan")))


def scan_prefills(rows: list[int], states: list[RequestSafety], probe) -> None:
    """The prefill checks (:attr:`SafetyConfig.prefill_stride`) of requests whose ``p_0`` just
    ran: for ``k = stride, 2·stride, …`` below a prefill's length, the probe whose window ends
    ``k`` response tokens in goes through the state machine, in order, as in the HF decoder.
    The windows of every request go through ``probe(Plan)`` together: one call, plus one per
    round of alarms (:class:`_Scan`). Fails closed: an error refuses the requests of that call.
    ``rows``: the requests' batch rows."""
    scans = [_Scan(r, s) for r, s in zip(rows, states)
             if s.cfg.prefill_stride and not s.refused]
    scans = [sc for sc in scans if sc.ks]
    while scans:
        want = [(sc, k, w) for sc in scans for k, w in sc.wanted()]
        plan = Plan.of([sc.row for sc, _, _ in want], [k for _, k, _ in want],
                       [sc.s for sc, _, _ in want], [w for _, _, w in want], alone=True)
        try:
            logits = probe(plan).tolist()
        except Exception as e:  # noqa: BLE001 - fail closed, and keep serving
            logger.error("safeattn: a prefill check failed (%s); the %d requests it checked "
                         "refuse (fail closed)", e, len(scans))
            for sc in scans:
                sc.fail()
            break
        for (sc, k, _), lg in zip(want, logits):
            sc.known[sc.key(k)] = lg
        scans = [sc for sc in scans if sc.walk()]
    for s in states:
        if s.prefill_checks:
            s.mark(0)  # step 0's end


class SafetyLogitsProcessor(LogitsProcessor):
    """vLLM V1 logits processor of safeattn (pass it as ``logits_processors=[...]``)."""

    @classmethod
    def validate_params(cls, params):
        parse_safety((params.extra_args or {}).get("safety"))

    def __init__(self, vllm_config, device, is_pin_memory):
        from .models import _check_engine

        _check_engine(vllm_config)
        if getattr(vllm_config.scheduler_config, "async_scheduling", False):
            raise ValueError("safeattn: async scheduling is not supported (the refusal needs "
                             "each step's probe before sampling); pass async_scheduling=False")
        self.vllm_config = vllm_config
        mc = vllm_config.model_config
        opt = options(mc.hf_config)
        self.default = opt.get("safety")
        if self.default is not None:
            parse_safety(self.default)  # a bad server option fails at start-up
        self.locked = self.default is not None and not opt.get("request_overrides", False)
        self.query_budget = opt.get("query_budget", QUERY_BUDGET)
        self.max_len = mc.max_model_len
        self.states: dict[int, RequestSafety] = {}  # id(SamplingParams) -> state
        self.rows: dict[int, RequestSafety] = {}    # batch row -> state
        self._tokenizer = None
        self._template = None
        self._special = self._opening = None
        self._sentence = None
        self._refusals: dict[tuple, Refusal] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.vllm_config.model_config.tokenizer)
        return self._tokenizer

    def _refusal(self, cfg: SafetyConfig, eos_id) -> Refusal:
        """The forced break + prefix of ``cfg`` (or ``eos_id``), cached per config text."""
        key = (cfg.refusal_prefix, cfg.refusal_break, eos_id)
        if key not in self._refusals:
            self._refusals[key] = Refusal(self.tokenizer, cfg, eos_id)
        return self._refusals[key]

    def _said_sentence(self, s: RequestSafety, n: int) -> bool:
        """Whether the justification's last token ended a sentence, for a config with
        ``refusal_end="sentence"`` (as the HF decoder stops such a row there)."""
        if getattr(s.cfg, "refusal_end", "free") != "sentence" or n <= s.refusal_step + \
                len(s.refusal.ids) - s.fstart or s.eos_id is None:
            return False
        if self._sentence is None:
            self._sentence = generation._sentence_end_ids(self.tokenizer, "cpu")
        t = s.output_ids[n - 1]
        return 0 <= t < len(self._sentence) and bool(self._sentence[t])

    def _default_span(self, prompt_ids) -> tuple[int, int, int]:
        """``(q_span start, end, response_start)`` of a request that gives no ``q_span``.
        A prompt in the chat template (a server's chat request): the user's text, as
        ``build_inputs`` takes it (:func:`_user_span`), and the response after the last
        generation prompt; text after it (``continue_final_message``) is an assistant prefill
        when it holds no turn of its own (no special token, no user-turn opening). Else the
        prompt after BOS, and no prefill."""
        if self._template is None:
            self._template = _template_ids(self.tokenizer) or ((), (), ())
        pre, suf, turn = self._template
        ids, n = list(prompt_ids), len(prompt_ids)
        if pre and n > len(pre) + len(suf) and ids[:len(pre)] == list(pre):
            end = _last_index(ids, list(suf), len(pre) + 1)
            if end is not None and self._plain_text(ids[end + len(suf):]):
                return _user_span(ids, len(pre), end, list(turn), self.query_budget), \
                    end, end + len(suf)
        first = 1 if n > 1 and ids[0] == self.tokenizer.bos_token_id else 0
        return first, n, n

    def _plain_text(self, ids: list[int]) -> bool:
        """Whether ``ids`` (text after the last generation prompt) are one message's text:
        no special token (turn markers are in most templates) and no user-turn opening."""
        if self._special is None:
            self._special = set(self.tokenizer.all_special_ids)
            pre = list(self._template[0])
            if pre and pre[0] == self.tokenizer.bos_token_id:
                pre = pre[1:]
            self._opening = pre
        return not (self._special & set(ids)) and (
            not self._opening or _last_index(ids, self._opening, 0) is None)

    def _admit(self, params, prompt_ids, output_ids) -> RequestSafety | None:
        """The state of a request joining the batch. One whose state cannot be built (a
        ``q_span`` past its prompt, which ``validate_params`` cannot see) refuses from its
        first token: an exception here would stop the engine and every request in it."""
        try:
            return self._state(params, prompt_ids, output_ids)
        except Exception as e:  # noqa: BLE001 - fail closed, for this request alone
            if bridge_for(self.vllm_config) is None:
                raise  # nothing can force a refusal: stop (closed)
            logger.error("safeattn: cannot set up the safety check of a request (%s); it "
                         "refuses (fail closed)", e)
            self.states.pop(id(params), None)  # a state kept before the error is not used
            return self._state(params, prompt_ids, output_ids, failed=True)

    def _state(self, params, prompt_ids, output_ids, failed=False) -> RequestSafety | None:
        st = self.states.get(id(params))
        if st is not None:  # a preempted (or unscheduled) request coming back
            STATS["resumed"] += 1
            return st
        extra = params.extra_args or {}
        value = _locked(extra.get("safety")) if self.locked else extra.get("safety")
        parsed = _failed_parse(value, self.default) if failed else \
            parse_safety(value, self.default)
        key = extra.get(STREAM_ARG) or extra.get(TRACE_ARG)
        if parsed is None:
            if valid_key(key):
                publish(key, {"off": True})
            return None
        cfg, extras = parsed
        br = bridge_for(self.vllm_config)
        if br is None:
            raise ValueError("safeattn: a request asks for safety but the model is not a "
                             "safeattn wrapper (use safeattn.vllm.engine_kwargs)")
        cfg = cfg.resolved(br.safety_config)  # threshold=None: the head's calibrated θ
        prompt_ids = prompt_ids or []
        eos_id = params.eos_token_id  # None with ignore_eos: the tokenizer's ends the refusal
        eos_id = self.tokenizer.eos_token_id if eos_id is None else eos_id
        eos = {eos_id, *(params.all_stop_token_ids or ())} - {None}
        span = (0, 0, len(prompt_ids)) if failed else self._default_span(prompt_ids)
        st = RequestSafety(cfg, extras, prompt_ids, output_ids, self._refusal(cfg, eos_id),
                           min(params.max_tokens or self.max_len,
                               self.max_len - len(prompt_ids)), span, self.tokenizer, eos_id,
                           eos)
        st.response = br.response
        if failed:
            st.refused, st.alarm_step = True, 0
        if valid_key(key):
            st.stream = StreamGate(key, cfg.stream_hold, self.tokenizer, prompt_ids,
                                   hold_back=STREAM_ARG in extra)
        self.states[id(params)] = st
        weakref.finalize(params, self.states.pop, id(params), None)
        if st.id is not None:
            TRACES[st.id] = st
            while len(TRACES) > MAX_TRACES:
                TRACES.pop(next(iter(TRACES)))
        return st

    def update_state(self, batch_update) -> None:
        if batch_update is not None:
            for row in batch_update.removed:
                self.rows.pop(row, None)
            for row, params, prompt_ids, output_ids in batch_update.added:
                self.rows.pop(row, None)
                st = self._admit(params, prompt_ids, output_ids) if params else None
                if st is not None:
                    self.rows[row] = st
            for a, b, kind in batch_update.moved:
                sa, sb = self.rows.pop(a, None), self.rows.pop(b, None)
                if sa is not None:
                    self.rows[b] = sa
                if sb is not None and kind.name == "SWAP":
                    self.rows[a] = sb
        self._post_plan()

    def _post_plan(self) -> None:
        br = bridge_for(self.vllm_config)
        if br is None:
            return
        live = [(r, s) for r, s in sorted(self.rows.items()) if not s.done]
        if not live:
            br.post_plan(None, None, None)
            return
        rows, ns, due, win = [], [], [], []
        for r, s in live:
            n = len(s.output_ids)
            rows.append(r)
            ns.append(n)
            due.append(s.due(n))
            win.append(s.window(s.seen(n)))
            s.cleared = max(win[-1][1] - s.pre, 0)  # what a check at this step clears
        self._live = [s for _, s in live]
        plan = Plan.of(rows, ns, self._live, win)
        br.post_plan(plan, plan.prompt_len + plan.n, torch.tensor(due))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        br = bridge_for(self.vllm_config)
        if br is not None and br.token_logits is not None:
            self._keep_token_logits(br)
        if br is not None and br.plan is not None and br.complete is not None:
            self._step(br, logits)
        self._publish()
        return logits

    def _keep_token_logits(self, br) -> None:
        """The forward's tokens' ``w · h`` (posted only for a head with a response probe,
        which every request's state then holds) into their requests' states."""
        rows, cols, u = (t.tolist() for t in br.token_logits)
        br.token_logits = None
        for r, c, v in zip(rows, cols, u):
            s = self.rows.get(r)
            if s is not None and c >= s.rs:  # response only
                s.token_logits[c] = v

    def _publish(self) -> None:
        """Each server request's state (trace; a stream's cleared text), before this step's
        token is sampled."""
        for s in self.rows.values():
            if s.stream is not None:
                n = len(s.output_ids)
                s.stream.step(s.output_ids, n, checked=n in s.p, seen=s.cleared,
                              benign=s.mode == BENIGN and not s.refused, refused=s.refused,
                              trace=functools.partial(s.trace_json, justification=False))

    def _step(self, br, logits: torch.Tensor) -> None:
        """The checks of this step (``safety_step``) and the forced refusal tokens."""
        plan, complete = br.plan, br.complete
        rows, ns = plan.rows.tolist(), plan.n.tolist()
        checked = (complete & br.due).nonzero().flatten().tolist()
        if checked:
            states, steps = [self._live[i] for i in checked], [ns[i] for i in checked]
            try:
                step_states(states, steps, br.logits[checked])
            except Exception as e:  # noqa: BLE001 - fail closed, and keep serving
                logger.error("safeattn: the safety step failed (%s); the %d checked requests "
                             "refuse (fail closed)", e, len(states))
                for s, n in zip(states, steps):
                    if not s.refused:
                        s.fail(s.seen(n))
                    s.p[n] = float("nan")
                    s.mark(n)
            firsts = [i for i, n in zip(checked, steps) if n == 0 and self._live[i].pre]
            if firsts:
                scan_prefills([rows[i] for i in firsts], [self._live[i] for i in firsts],
                              br.probe)
        for i in complete.nonzero().flatten().tolist():
            s, row, n = self._live[i], rows[i], ns[i]
            s.hold_open(n, logits, row)
            if not s.refused:
                continue
            ids = s.refusal.ids
            if s.refusal_step is None:
                s.refusal_step = n
                s.fpos = s.refusal_start(n)
                s.fstart = s.fpos
            if s.ended_with is not None:  # a request that outlives EOS (ignore_eos,
                _force(logits, row, s.ended_with)  # min_tokens) writes nothing else
            elif s.fpos < len(ids):
                _force(logits, row, ids[s.fpos])
                s.fpos += 1
                if s.fpos == len(ids) and not s.refusal.prefix:  # no prefix: EOS was it
                    s.ended_with = ids[-1]
            elif self._said_sentence(s, n):  # refusal_end="sentence": the turn ends here
                _force(logits, row, s.eos_id)
                s.ended_with = s.eos_id
            if s.fpos >= len(ids) and s.refusal.prefix and \
                    getattr(s.cfg, "refusal_end", "free") != "sentence":
                s.done = True  # the prefix is out; the model writes on freely
        br.post_plan(None, None, None)

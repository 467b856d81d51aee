"""Streaming hold-back for the vLLM server: a streamed response shows only cleared text.

The contract is :class:`safeattn.streaming.HoldBack`'s (the one ``SafeTextStreamer`` keeps in
HF): generated tokens are held until a check that saw them comes back benign, flagged tokens
are dropped when the row refuses, and the refusal streams on. Two pieces keep it:

- in the engine, the logits processor runs a :class:`StreamGate` per streamed request and
  publishes, every step and before that step's token is sampled, the text the stream may show
  (:func:`publish`);
- in the API server, :class:`SafeStreamMiddleware` (``--middleware
  safeattn.vllm.serving.SafeStreamMiddleware``) tags each streamed completion request with a
  key (``vllm_xargs["safeattn_stream"]``) and rewrites the text of every chunk it sends to
  what the latest published state allows (:func:`visible`).

A state names the step it covers (``n``: the generated tokens its check saw). The middleware
asks vLLM for each chunk's token ids (``return_token_ids``; it strips them before sending) and
counts them: a state that is behind the stream (a write failed) never releases the held
tokens at the end, so a lost write withholds text rather than showing it.

Every other completion request with one choice (``n = 1``, one prompt) is tagged too
(``vllm_xargs["safeattn_trace"]``): its response gets the request's safety trace as
``choices[0]["safety"]`` (a streamed one, in its last chunk); :func:`trace_output` turns it
into the ``SafetyOutput`` that ``safeattn.plot_trace`` reads.

The two meet in a folder both processes see (``$SAFEATTN_STREAM_DIR``, default a per-user
folder under the temp dir): one host. A chunk's token is sampled after the state that covers
its step was written, so the server never waits for the engine. Streamed requests cannot ask
for ``logprobs``, ``token_ids``, ``echo``, ``tools``, ``n > 1`` or several prompts (they would
show held tokens, or the stream could not be matched to one request's state): a 400 says so.
A streamed chat chunk never carries the text fields of a reasoning or tool parser
(:data:`UNGATED`).

This module does not import vLLM (the middleware is plain ASGI).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path

from ..streaming import HoldBack

__all__ = ["STREAM_ARG", "TRACE_ARG", "StreamGate", "SafeStreamMiddleware", "publish", "read",
           "visible", "end_trace", "trace_output"]

logger = logging.getLogger("safeattn")

#: The ``vllm_xargs`` keys that name a request's published state: a streamed request (held
#: back) and any other (its trace only).
STREAM_ARG = "safeattn_stream"
TRACE_ARG = "safeattn_trace"
_KEY = re.compile(r"[0-9a-f]{32}")
#: The OpenAI endpoints whose streams are gated, and the choice field that carries the text.
PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
#: Chat delta fields that carry generated text beside ``content`` (a server with a reasoning or
#: tool-call parser). The engine's cleared text cannot be matched to them once a parser has
#: cut it, so a streamed response never carries them.
UNGATED = ("reasoning_content", "reasoning", "tool_calls", "function_call")


# --------------------------------------------------------------------------- the shared folder
def stream_dir() -> Path:
    return Path(os.environ.get("SAFEATTN_STREAM_DIR")
                or Path(tempfile.gettempdir()) / f"safeattn-stream-{os.getuid()}")


def trace_key(request_id) -> str:
    """The key under which a request whose trace ``id`` is ``request_id`` publishes its trace
    (``safeattn.vllm.requests(..., published=True)``)."""
    return hashlib.sha256(json.dumps(request_id).encode()).hexdigest()[:32]


def valid_key(key) -> bool:
    return isinstance(key, str) and _KEY.fullmatch(key) is not None


def publish(key: str, state: dict) -> None:
    """Write a request's state atomically (a reader sees the old or the new one, whole). A
    failed write is logged, not raised: the engine keeps serving, and the server shows no
    more than the last state it could read."""
    d = stream_dir()
    tmp = d / f".{key}.{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state))
        os.replace(tmp, d / key)
    except OSError as e:
        logger.warning("safeattn: cannot publish the state of request %s to %s: %s", key, d, e)


def read(key: str) -> dict | None:
    try:
        return json.loads((stream_dir() / key).read_text())
    except (OSError, ValueError):
        return None


def discard(key: str) -> None:
    try:
        (stream_dir() / key).unlink()
    except OSError:
        pass


# --------------------------------------------------------------------------- engine side
class StreamGate:
    """A request's published state in the engine, fed once per step: its ``trace`` and, for a
    streamed request (``hold_back``), its :class:`HoldBack`.

    ``state()`` (published) holds the text of the released tokens: ``before`` the refusal (a
    prefix of the request's text) and ``after`` it (from the refusal prefix on); ``refused``,
    ``alarm`` and, once refused, ``seen``: the text of every generated token so far, which lets
    the server find the tokens that come after the last step it covers.
    """

    def __init__(self, key: str, hold: int, tokenizer, context_ids=(), hold_back: bool = True):
        self.key, self.tokenizer, self.hold_back = key, tokenizer, hold_back
        self.context = list(context_ids)[-4:]  # decode as vLLM does: after the prompt's tail
        self.gate = HoldBack(hold)
        self.before: list[int] = []  # released before the refusal
        self.after: list[int] = []   # released from the refusal on
        self.n = -1

    def step(self, output_ids, n: int, *, checked: bool, benign: bool, refused: bool,
             trace, seen: int | None = None) -> None:
        """The step that sees ``n`` generated tokens: feed the new ones, then this step's check
        (``checked``, with a ``benign`` outcome, over the tokens before ``seen``, default
        ``n``; ``refused``: the row now refuses); publish
        with the request's trace (``trace()``: ``RequestSafety.trace_json``, built only when
        the step is new)."""
        if n == self.n:
            return
        self.n = n
        if not self.hold_back:
            return publish(self.key, {"n": n, "trace": trace()})
        self._keep(self.gate.put(list(output_ids[self.gate.n_put:n])))
        self._keep(self.gate.update(checked=checked, benign=benign, refused=refused,
                                    seen=n if seen is None else seen))
        publish(self.key, {**self.state(output_ids[:n]), "n": n, "trace": trace()})

    def state(self, output_ids) -> dict:
        st = {"before": self._text(self.before), "after": self._text(self.after),
              "refused": self.gate.refused, "alarm": self.gate.alarm}
        if self.gate.refused:
            st["seen"] = self._text(output_ids)
        return st

    def _keep(self, ids: list[int]) -> None:
        (self.after if self.gate.refused else self.before).extend(ids)

    def _text(self, ids) -> str:
        if not ids:
            return ""
        dec = lambda t: self.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        base, full = dec(self.context), dec(self.context + list(ids))
        text = full[len(base):] if full.startswith(base) else dec(list(ids))
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next token


# --------------------------------------------------------------------------- server side
def _covered(a: str, text: str) -> tuple[int, bool]:
    """How much of ``text`` ``a`` spells: (the length of that prefix of ``text``, whether all of
    ``a`` matched). Leading whitespace is not compared: the engine decodes a request's tokens
    after the prompt's tail, the server's detokenizer may not."""
    la, lt = len(a) - len(a.lstrip()), len(text) - len(text.lstrip())
    a, rest = a[la:], text[lt:]
    n = min(len(a), len(rest))
    i = next((i for i in range(n) if a[i] != rest[i]), n)
    return (lt + i if i else 0), i == len(a)


def visible(text: str, state: dict | None, final: bool) -> str:
    """The part of a stream's ``text`` (all that vLLM generated so far) that may be shown,
    given the engine's latest ``state`` (``None``: none published yet; ``{"off": true}``:
    the request is not checked); ``final``: the request finished."""
    if state is None:
        return ""
    if state.get("off"):
        return text
    before = text[:_covered(state["before"], text)[0]]
    if state["refused"]:
        k, whole = _covered(state["seen"], text)
        return before + state["after"] + (text[k:] if final and whole else "")
    if final and not state["alarm"]:
        return text  # the tokens after the last check go out at the end (HoldBack.end)
    return before


def end_trace(trace: dict, n_tokens: int) -> dict:
    """The trace of a request that has finished after ``n_tokens`` generated tokens. One that
    ended with an alarm pending (``open_alarm``: a stop string, which vLLM checks after
    sampling, out of the logits processor's reach, ended it) refuses at its end, as the HF
    decoder's rows do: ``refusal_step`` ``n_tokens``, its alarm at ``S_t``, nothing written
    after it.

    vLLM may run the next step before it sees the stop string, so a trace can hold a check
    past the response whose token never came: it is cut to the response's steps, with the
    state after the last of them (``open_alarms``: the pending alarm after each step)."""
    if len(trace["p"]) > n_tokens and "open_alarms" in trace:
        trace = {**trace, **{k: trace[k][:n_tokens] for k in ("p", "checked", "mode",
                                                              "open_alarms")}}
        if trace["refusal_step"] is not None and trace["refusal_step"] >= n_tokens:
            trace.update(refusal_step=None, alarm_step=None, justification=None)
        trace["open_alarm"] = trace["open_alarms"][-1] if n_tokens else None
    if trace.get("open_alarm") is None:
        return trace
    return {**trace, "refusal_step": n_tokens, "alarm_step": trace["open_alarm"],
            "justification": "", "open_alarm": None}


def trace_output(trace: dict):
    """A response's ``choices[0]["safety"]`` (or ``RequestSafety.trace_json()``) -> a one-row
    :class:`safeattn.SafetyOutput` (``safeattn.plot_trace`` reads it)."""
    import torch

    from ..generation import MODE_NAMES, REFUSAL, RowSafety, SafetyConfig, SafetyOutput

    code = {**{v: k for k, v in MODE_NAMES.items()}, "refusal": REFUSAL}
    p = [float("nan") if v is None else float(v) for v in trace["p"]]
    row = RowSafety(p=p, checked=list(trace["checked"]), mode=list(trace["mode"]),
                    refusal_step=trace["refusal_step"], alarm_step=trace["alarm_step"],
                    justification=trace.get("justification"),
                    prefill_checks=[(k, float("nan") if v is None else float(v))
                                    for k, v in trace.get("prefill_checks") or ()])
    step = -1 if row.refusal_step is None else row.refusal_step
    return SafetyOutput(rows=[row], p=torch.tensor([p], dtype=torch.float64),
                        mode=torch.tensor([[code[m] for m in row.mode]]),
                        refused=torch.tensor([row.refused]), refusal_step=torch.tensor([step]),
                        config=SafetyConfig(**trace["config"]), prompt_length=0,
                        refusal_ids=list(trace.get("refusal_ids") or []))


class _Stream:
    """One streamed response: what vLLM generated, what the client was sent."""

    def __init__(self, key: str, kind: str):
        self.key, self.kind = key, kind
        self.text = self.sent = ""
        self.tokens = 0  # generated tokens streamed so far (vLLM's return_token_ids)
        self.dropped = False

    def rewrite(self, event: dict) -> None:
        event.pop("prompt_token_ids", None)
        for choice in event.get("choices") or ():
            self.tokens += len(choice.pop("token_ids", None) or ())
            choice.pop("prompt_token_ids", None)
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                got = delta.get("content")
                self._drop_ungated(delta)
            else:
                delta, got = None, choice.get("text")
            self.text += got or ""
            final = choice.get("finish_reason") is not None
            state = read(self.key)
            if final and state is None:
                logger.warning("safeattn: no safety state for streamed request %s; its text is "
                               "withheld (is the logits processor loaded?)", self.key)
            if final and self._stale(state):
                logger.warning("safeattn: the safety state of streamed request %s covers %s of "
                               "its %d tokens; its unchecked tail is withheld", self.key,
                               state.get("n"), self.tokens)
                final = False
            show = visible(self.text, state, final)
            out = show[len(self.sent):] if show.startswith(self.sent) else ""
            self.sent += out
            if final and state and "trace" in state:
                choice["safety"] = end_trace(state["trace"], self.tokens)
            if delta is not None:
                if got is not None or out:
                    delta["content"] = out
            else:
                choice["text"] = out

    def _stale(self, state: dict | None) -> bool:
        """Whether a checked stream's ``state`` is behind it: the state of step ``n`` is
        written before token ``n`` is sampled, so a current one covers all tokens but the
        last."""
        if not state or state.get("off"):
            return False
        n = state.get("n")
        return not isinstance(n, int) or n < self.tokens - 1

    def _drop_ungated(self, delta: dict) -> None:
        found = [f for f in UNGATED if delta.pop(f, None) is not None]
        if found and not self.dropped:
            self.dropped = True
            logger.warning("safeattn: streamed request %s: %s withheld (no safety check can "
                           "gate text a reasoning or tool parser has cut; stream without "
                           "them, or ask without stream)", self.key, ", ".join(found))


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                 "code": 400}}).encode()


def _several_choices(req: dict) -> str | None:
    """What gives a request several choices, which would share one published state: ``n >
    1``, or a completion's list of prompts (strings or token lists); None for one."""
    if req.get("n") not in (None, 1):
        return "n > 1"
    prompt = req.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and \
            not all(isinstance(t, int) for t in prompt):
        return "several prompts"
    return None


def _leaky_field(req: dict) -> str | None:
    """The field of a streamed request that would show held tokens, or None."""
    if (why := _several_choices(req)) is not None:
        return why
    if req.get("tools") or req.get("functions"):
        return "tools"  # tool-call arguments stream outside the gated content
    for field in ("logprobs", "top_logprobs", "echo", "return_token_ids",
                  "prompt_logprobs"):
        value = req.get(field)
        if value is not None and value is not False:  # logprobs: 0 still returns the tokens
            return field
    return None


class SafeStreamMiddleware:
    """ASGI middleware (``vllm serve ... --middleware
    safeattn.vllm.serving.SafeStreamMiddleware``) that gates streamed chat and completion
    responses by the safety checks. A streamed request to any other path (``/v1/responses``,
    ``/v1/messages``, ``/invocations``, …) gets a 400: its tokens would reach the client before
    a check cleared them. Other requests pass unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        kind = PATHS.get(scope.get("path"))
        body = await _read_body(receive)
        if body is None:  # the client left while sending
            return
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if kind is None:
            if isinstance(req, dict) and req.get("stream"):
                return await _send_400(send, f"safeattn: streamed responses are gated on "
                                             f"{', '.join(PATHS)} only; this path would show "
                                             f"tokens no safety check has cleared")
            return await self.app(scope, _replay(body, receive), send)
        xargs = req.get("vllm_xargs") if isinstance(req, dict) else None
        if not isinstance(req, dict) or not isinstance(xargs, (dict, type(None))):
            return await self.app(scope, _replay(body, receive), send)  # vLLM answers it
        xargs = {k: v for k, v in (xargs or {}).items() if k not in (STREAM_ARG, TRACE_ARG)}
        stream = bool(req.get("stream"))
        if stream and (why := _leaky_field(req)) is not None:
            return await _send_400(send, f"safeattn: a streamed request cannot ask for {why} "
                                         f"(it would show tokens no safety check has cleared)")
        if _several_choices(req):  # its choices would share one state: no trace
            req["vllm_xargs"] = xargs or None
            return await self._forward(scope, req, receive, send)
        key = uuid.uuid4().hex
        req["vllm_xargs"] = {**xargs, (STREAM_ARG if stream else TRACE_ARG): key}
        if stream:
            req["return_token_ids"] = True  # counted against the state, never sent on
        try:
            await self._forward(scope, req, receive, _gated(send, _Stream(key, kind))
                                if stream else _traced(send, key))
        finally:
            discard(key)

    async def _forward(self, scope, req: dict, receive, send):
        body = json.dumps(req).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)


async def _read_body(receive) -> bytes | None:
    """The whole request body, or ``None`` when the client left before sending it."""
    body, more = b"", True
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    return body


def _replay(body: bytes, receive):
    """``receive`` with the request body, already read, given once again; later calls wait on
    the client (a server watches them for a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_400(send, message: str) -> None:
    body = _error(message)
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _gated(send, stream: _Stream):
    """``send`` with each server-sent event's text rewritten (a 200 event stream only)."""
    buf, gate = b"", False

    async def wrapped(msg):
        nonlocal buf, gate
        if msg["type"] == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in msg.get("headers", [])).get(b"content-type",
                                                                                 b"")
            gate = msg.get("status") == 200 and ctype.startswith(b"text/event-stream")
            return await send(msg)
        if msg["type"] != "http.response.body" or not gate:
            return await send(msg)
        buf += msg.get("body", b"")
        *events, buf = buf.split(b"\n\n")
        if not msg.get("more_body", False) and buf:
            events.append(buf)
            buf = b""
        out = b"".join(_rewrite_event(e, stream) + b"\n\n" for e in events)
        await send({**msg, "body": out})

    return wrapped


def _traced(send, key: str):
    """``send`` with the request's trace added to a 200 JSON response (``choices[0]``)."""
    start, body = None, b""

    async def wrapped(msg):
        nonlocal start, body
        if msg["type"] == "http.response.start" and msg.get("status") == 200:
            start = msg  # sent with the body: its length changes
            return
        if start is None or msg["type"] != "http.response.body":
            return await send(msg)
        body += msg.get("body", b"")
        if msg.get("more_body", False):
            return
        try:
            data = json.loads(body)
            state = read(key) or {}
            trace = state.get("trace")
            if trace is not None and data.get("choices"):
                # the state of step n is written before token n is sampled
                n = (data.get("usage") or {}).get("completion_tokens", state.get("n", -1) + 1)
                data["choices"][0]["safety"] = end_trace(trace, n)
                body = json.dumps(data).encode()
        except (ValueError, AttributeError, TypeError):
            pass  # not the completion JSON: sent as it came
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": headers + [(b"content-length",
                                                    str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _rewrite_event(event: bytes, stream: _Stream) -> bytes:
    if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
        return event
    try:
        data = json.loads(event[len(b"data: "):])
    except ValueError:
        return event
    if isinstance(data, dict):
        stream.rewrite(data)
    return b"data: " + json.dumps(data).encode()

"""Streaming hold-back: ``HoldBack`` (the contract), the engine's ``StreamGate`` and the
server's ``SafeStreamMiddleware`` (plain ASGI, driven here by a fake vLLM app; the real server
is in test_vllm.py)."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _hf_tiny import tiny_tokenizer  # noqa: E402
from safeattn.streaming import HoldBack  # noqa: E402
from safeattn.vllm import serving  # noqa: E402

WORDS = "how do i bake bread make a bomb tell me about the weather".split()
SORRY = "sorry cannot fulfill your request".split()


def test_holdback_holds_at_most_hold_tokens():
    g = HoldBack(2)
    assert g.put([1]) == [] and g.put([2]) == [] and g.put([3]) == [1]
    assert g.update(checked=True, benign=True, refused=False, seen=3) == [2, 3]
    assert g.put([4]) == [] and g.end() == [4] and g.dropped == []


def test_holdback_pending_alarm_holds_everything_and_refusal_drops_it():
    g = HoldBack(1)
    g.put([1])
    assert g.update(checked=True, benign=True, refused=False, seen=1) == [1]
    g.put([2])
    assert g.update(checked=True, benign=False, refused=False, seen=2) == []
    assert g.put([3]) == [] and g.put([4]) == []  # beyond hold, but the alarm holds them
    assert g.update(checked=True, benign=False, refused=True, seen=4) == []
    assert g.dropped == [2, 3, 4]
    assert g.put([9]) == [9]  # the refusal streams at once
    assert g.end() == []


def test_holdback_end_drops_under_a_pending_alarm():
    g = HoldBack(3)
    g.put([1, 2])
    g.update(checked=True, benign=False, refused=False, seen=2)
    assert g.end() == [] and g.dropped == [1, 2]


def test_text_released_before_a_refusal_prints_before_its_notice():
    """TextStreamer keeps a trailing symbol until the next space; a row that refuses prints
    it (released, so cleared) before ``refusal_notice``, not glued to the refusal after it."""
    import torch
    from _hf_tiny import PrintedStreamer

    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    st = PrintedStreamer(tok, skip_prompt=True, hold=4, refusal_notice="[refused] ")
    st.put(torch.tensor([ids(["how"])]))  # the prompt (skipped)
    for w in ("bake", "bread", "?", "make"):
        st.put(torch.tensor(ids([w])))
    st.safety_update(checked=True, benign=True, refused=False, seen=3)  # clears "bake bread ?"
    st.safety_update(checked=True, benign=False, refused=True, seen=4)  # "make" is dropped
    st.put(torch.tensor(ids(["sorry"])))
    st.end()
    before, after = "".join(st.text).split("[refused]")
    assert before.split() == ["bake", "bread", "?"]
    assert after.split() == ["sorry"] and st.dropped == ids(["make"])


@pytest.mark.parametrize("hold", [-1, 0, 1.5, None])
def test_holdback_bad_hold(hold):
    with pytest.raises(ValueError, match="hold"):
        HoldBack(hold)


def test_stream_gate_releases_only_what_the_check_saw(tmp_path, monkeypatch):
    """The engine's StreamGate passes a check's window end (``seen``) on to HoldBack: a check
    whose Rule-3 window ended before the newest tokens clears only what it saw."""
    monkeypatch.setenv("SAFEATTN_STREAM_DIR", str(tmp_path))
    tok = tiny_tokenizer()
    ids = tok.convert_tokens_to_ids(WORDS[:6])
    gate = serving.StreamGate("k", 2, tok)
    gate.step(ids, 4, checked=True, benign=True, refused=False, trace=dict, seen=2)
    assert gate.gate.n_out == 2 and gate.gate.pending == ids[2:4]
    gate.step(ids, 5, checked=True, benign=True, refused=False, trace=dict)  # default: n
    assert gate.gate.n_out == 5


def _trace(modes, opens, refusal_step=None, alarm_step=None):
    return {"p": [0.1] * len(modes), "checked": [True] * len(modes), "mode": modes,
            "open_alarms": opens, "open_alarm": opens[-1], "refusal_step": refusal_step,
            "alarm_step": alarm_step, "justification": None}


def test_end_trace_cuts_a_check_past_the_response():
    """vLLM can run the step after a stop string before it sees it: that check's token never
    came, so the trace ends with the state after the response's last token."""
    b, t = "benign", "transition"
    end = serving.end_trace
    # the check past the response raised an alarm: none was pending at the end
    got = end(_trace([b, b, b, t], [None, None, None, 2]), 3)
    assert got["mode"] == [b, b, b] and len(got["p"]) == 3 and got["refusal_step"] is None
    # ... or cleared one: it was pending, so the row refuses at its end
    got = end(_trace([b, t, t, b], [None, 0, 0, None]), 3)
    assert (got["refusal_step"], got["alarm_step"], got["open_alarm"]) == (3, 0, None)
    # ... or completed τ: that refusal never happened, the pending alarm did
    got = end(_trace([b, t, t, "refusal"], [None, 0, 0, None], refusal_step=3, alarm_step=0),
              3)
    assert (got["refusal_step"], got["alarm_step"], got["mode"]) == (3, 0, [b, t, t])
    # a trace of the response's own length is only closed
    same = _trace([b, t, t], [None, 0, 0])
    assert end(same, 3) == {**same, "refusal_step": 3, "alarm_step": 0, "justification": "",
                            "open_alarm": None}
    assert end(_trace([b, b], [None, None]), 2)["refusal_step"] is None


def test_visible():
    v = serving.visible
    assert v("abc", None, False) == "" and v("abc", None, True) == ""
    assert v("abc", {"off": True}, False) == "abc"
    st = {"before": "ab", "after": "", "refused": False, "alarm": False}
    assert v("abc", st, False) == "ab" and v("a", st, False) == "a" and v("abc", st, True) == "abc"
    assert v("abc", {**st, "alarm": True}, True) == "ab"
    assert v(" a b", {**st, "before": "a"}, False) == " a"  # leading space: decoded apart
    assert v("xbc", st, False) == ""
    ref = {"before": "a", "after": " sorry", "refused": True, "alarm": True, "seen": "a b sorry"}
    assert v("a b sorry x", ref, False) == "a sorry"
    assert v("a b sorry x", ref, True) == "a sorry x"  # the tokens after the last state
    assert v(" a b sorry x", ref, True) == " a sorry x"


# --------------------------------------------------------------------------- a fake engine
class FakeEngine:
    """Streams ``words`` like vLLM: each step publishes the StreamGate state (the check at that
    step saw every earlier token), then sends the step's token as a chunk. Checks are benign
    except at ``alarms``; ``refuse_at``: the step whose check completes the alarm run, after
    which the refusal words are forced."""

    def __init__(self, words, alarms=(), refuse_at=None, kind="chat", hold=3, extra=None,
                 lost_from=None):
        self.tok = tiny_tokenizer()
        self.words, self.alarms, self.refuse_at = list(words), set(alarms), refuse_at
        self.kind, self.hold = kind, hold
        self.lost_from = lost_from  # the step from which every state write fails
        self.extra = extra or {}  # more delta fields of every chat chunk
        self.bodies = []

    def ids(self, words):
        return self.tok.convert_tokens_to_ids(words)

    def tokens(self):
        if self.refuse_at is None:
            return self.ids(self.words)
        return self.ids(self.words[:self.refuse_at]) + self.ids(SORRY)

    async def __call__(self, scope, receive, send):
        msg = await receive()
        req = json.loads(msg["body"])
        self.bodies.append(req)
        key = (req.get("vllm_xargs") or {}).get(serving.STREAM_ARG)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        out = self.tokens()
        gate = serving.StreamGate(key, self.hold, self.tok, self.ids(["me"])) if key \
            else None
        refused = False
        for n in range(len(out)):
            refused = refused or (self.refuse_at is not None and n >= self.refuse_at)
            if gate is not None and (self.lost_from is None or n < self.lost_from):
                gate.step(out, n, checked=not refused, benign=n not in self.alarms,
                          refused=refused, trace=lambda: {"p": [0.0] * (n + 1), "steps": n})
            text = " " + self.tok.convert_ids_to_tokens(out[n])
            final = "length" if n == len(out) - 1 else None
            if self.kind == "chat":
                choice = {"index": 0, "delta": {"content": text, **self.extra},
                          "finish_reason": final}
            else:
                choice = {"index": 0, "text": text, "finish_reason": final}
            if req.get("return_token_ids"):  # as vLLM: each chunk's own tokens
                choice["token_ids"] = [out[n]]
            event = b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"
            # split an event across two body messages, as a network write may
            await send({"type": "http.response.body", "body": event[:7], "more_body": True})
            await send({"type": "http.response.body", "body": event[7:], "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


def _call(app, body: dict, path="/v1/chat/completions"):
    """Run the middleware over ``app`` -> (status, [text per event], raw body)."""
    mw = serving.SafeStreamMiddleware(app)
    sent = []
    data = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": data, "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    asyncio.run(mw(scope, receive, send))
    status = sent[0]["status"]
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    texts = []
    for ev in raw.split(b"\n\n"):
        if ev.startswith(b"data: {"):
            c = json.loads(ev[6:])["choices"][0]
            texts.append(c["delta"].get("content") if "delta" in c else c["text"])
    return status, texts, raw


@pytest.fixture(autouse=True)
def _stream_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEATTN_STREAM_DIR", str(tmp_path / "streams"))
    return tmp_path / "streams"


def _norm(s):
    return " ".join(s.split())


@pytest.mark.parametrize("kind,path", [("chat", "/v1/chat/completions"),
                                       ("completion", "/v1/completions")])
def test_benign_stream_is_incremental_and_complete(kind, path, _stream_dir):
    eng = FakeEngine(WORDS, kind=kind)
    status, texts, _ = _call(eng, {"stream": True, "vllm_xargs": {"safety": "{}"}}, path)
    assert status == 200
    assert _norm("".join(texts)) == " ".join(WORDS)
    # the hold: a token is shown once the next check clears it, never ahead of its check
    shown = [len("".join(texts[:i + 1]).split()) for i in range(len(texts))]
    assert shown[:-1] == [max(0, i) for i in range(len(texts) - 1)]
    assert eng.bodies[0]["vllm_xargs"]["safety"] == "{}"  # the client's xargs are kept
    assert list(_stream_dir.iterdir()) == []  # the state is removed with the stream


def test_flagged_tokens_are_never_streamed():
    # checks at steps 5, 6, 7 alarm (they saw tokens up to 4, 5, 6): the row refuses at step 7
    eng = FakeEngine(WORDS, alarms={5, 6, 7}, refuse_at=7)
    status, texts, _ = _call(eng, {"stream": True})
    assert status == 200
    got = _norm("".join(texts))
    assert got == " ".join(WORDS[:4] + SORRY)  # words 4..6 were seen only by alarming checks
    for i, _ in enumerate(texts):  # at no point did a flagged word reach the client
        assert not set("".join(texts[:i + 1]).split()) & set(WORDS[4:7])


def test_alarm_pending_at_the_end_drops_the_held_tokens():
    eng = FakeEngine(WORDS[:6], alarms={5})
    _, texts, _ = _call(eng, {"stream": True})
    assert _norm("".join(texts)) == " ".join(WORDS[:4])


def test_parser_fields_are_never_streamed():
    """A reasoning or tool parser's delta fields would carry generated text past the gate: a
    streamed chunk drops them (the content is gated as ever)."""
    extra = {"reasoning_content": " plan", "reasoning": " plan",
             "tool_calls": [{"index": 0, "function": {"arguments": "{\"x\": 1}"}}]}
    status, texts, raw = _call(FakeEngine(WORDS, extra=extra), {"stream": True})
    assert status == 200 and _norm("".join(texts)) == " ".join(WORDS)
    for field in serving.UNGATED:
        assert field.encode() not in raw


@pytest.mark.parametrize("field", ["tools", "functions"])
def test_streamed_tools_are_400(field):
    eng = FakeEngine(WORDS)
    status, _, raw = _call(eng, {"stream": True, field: [{"type": "function"}]})
    assert status == 400 and b"tools" in raw and not eng.bodies
    status, _, _ = _call(FakeEngine(WORDS), {"stream": True, field: []})
    assert status == 200  # an empty list asks for nothing


@pytest.mark.parametrize("refuse", [False, True])
def test_lost_state_writes_withhold_the_tail(refuse, caplog):
    """From step 5 on every state write fails: the server's last state covers 4 tokens. The
    end of the stream must not release what no state cleared (before, a final chunk read
    the stale state's "no alarm" and sent all of it, flagged words too)."""
    kw = dict(alarms={5, 6, 7}, refuse_at=7) if refuse else {}
    eng = FakeEngine(WORDS, lost_from=5, **kw)
    with caplog.at_level("WARNING", logger="safeattn"):
        status, texts, raw = _call(eng, {"stream": True})
    assert status == 200 and eng.bodies[0]["return_token_ids"] is True
    got = _norm("".join(texts)).split()
    assert got == WORDS[:len(got)] and len(got) <= 4  # cleared by the step-4 state at most
    assert "covers 4 of its" in caplog.text and b"token_ids" not in raw
    # the same stream with every write: all of it, and the token ids never reach the client
    status, texts, raw = _call(FakeEngine(WORDS), {"stream": True})
    assert _norm("".join(texts)) == " ".join(WORDS) and b"token_ids" not in raw


def test_state_missing_withholds_the_text():
    class Unchecked(FakeEngine):  # a server without the logits processor: nothing published
        async def __call__(self, scope, receive, send):
            async def strip():
                msg = await receive()
                req = json.loads(msg["body"])
                req["vllm_xargs"].pop(serving.STREAM_ARG)
                return {**msg, "body": json.dumps(req).encode()}
            return await super().__call__(scope, strip, send)

    _, texts, _ = _call(Unchecked(WORDS), {"stream": True})
    assert "".join(texts) == ""


@pytest.mark.parametrize("field,value", [("logprobs", True), ("top_logprobs", 2), ("n", 2),
                                         ("echo", True), ("return_token_ids", True),
                                         ("logprobs", 0), ("top_logprobs", 0)])
def test_streamed_request_that_would_leak_is_400(field, value):
    eng = FakeEngine(WORDS)
    status, _, raw = _call(eng, {"stream": True, field: value})
    assert status == 400 and field in json.loads(raw)["error"]["message"]
    assert eng.bodies == []


def test_streamed_request_with_leaky_fields_off_is_served():
    status, _, _ = _call(FakeEngine(WORDS), {"stream": True, "logprobs": False, "echo": None})
    assert status == 200


def test_non_streamed_requests_get_their_trace():
    trace = {"p": [0.1, None], "checked": [True, False], "mode": ["benign", "benign"],
             "refusal_step": None, "alarm_step": None, "config": {"schedule": "each"},
             "refusal_ids": []}
    bodies = []

    async def app(scope, receive, send):  # a non-streamed completion as vLLM answers it
        req = json.loads((await receive())["body"])
        bodies.append(req)
        key = req["vllm_xargs"][serving.TRACE_ARG]
        gate = serving.StreamGate(key, 3, None, hold_back=False)
        gate.step([], 0, checked=True, benign=True, refused=False, trace=lambda: trace)
        body = json.dumps({"choices": [{"index": 0, "text": "hi"}]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    # a client-sent key is replaced; its other xargs stay
    status, _, raw = _call(app, {"vllm_xargs": {serving.STREAM_ARG: "0" * 32, "x": 1}},
                           "/v1/completions")
    xargs = bodies[0]["vllm_xargs"]
    assert status == 200 and set(xargs) == {"x", serving.TRACE_ARG}
    assert serving.valid_key(xargs[serving.TRACE_ARG])
    out = json.loads(raw)
    assert out["choices"][0]["text"] == "hi" and out["choices"][0]["safety"] == trace
    so = serving.trace_output(out["choices"][0]["safety"])
    assert so[0].checked == [True, False] and so[0].p[0] == 0.1 and so[0].p[1] != so[0].p[1]
    assert so.config.schedule == "each" and not so[0].refused


def test_streamed_trace_comes_in_the_last_chunk():
    _, _, raw = _call(FakeEngine(WORDS[:4]), {"stream": True})
    chunks = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    assert [("safety" in c["choices"][0]) for c in chunks] == [False] * 3 + [True]
    assert chunks[-1]["choices"][0]["safety"]["steps"] == 3


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages", "/invocations",
                                  "/prefix/v1/chat/completions"])
def test_streams_on_other_paths_are_400(path):
    """vLLM streams text on more routes than the two the middleware gates: there, tokens
    would reach the client before a check cleared them, so the request never reaches vLLM."""
    eng = FakeEngine(WORDS[:3])
    status, _, raw = _call(eng, {"stream": True}, path=path)
    assert status == 400 and "gated on" in json.loads(raw)["error"]["message"]
    assert not eng.bodies


def test_other_paths_pass_untouched():
    eng = FakeEngine(WORDS[:3])
    for body in ({"stream": False}, {"input": "hi"}):
        status, _, _ = _call(eng, body, path="/v1/responses")
        assert status == 200 and eng.bodies[-1] == body     # no safeattn key added


@pytest.mark.parametrize("key", ["../x", "A" * 32, 3, None])
def test_only_well_formed_keys_name_a_file(key):
    assert not serving.valid_key(key)


def test_later_receives_wait_on_the_client():
    """vLLM watches ``receive`` for a disconnect while it generates: after the body, the app
    must get the client's own messages, not an instant disconnect."""
    got = []

    async def app(scope, receive, send):
        got.append(await receive())
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    msgs = [{"type": "http.request", "body": b'{"stream": false}', "more_body": False},
            {"type": "http.disconnect", "from": "client"}]

    async def receive():
        return msgs.pop(0)

    async def send(msg):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(serving.SafeStreamMiddleware(app)(scope, receive, send))
    assert set(json.loads(got[0]["body"])["vllm_xargs"]) == {serving.TRACE_ARG}
    assert got[1] == {"type": "http.disconnect", "from": "client"}


def test_publish_failure_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SAFEATTN_STREAM_DIR", str(blocker / "sub"))  # cannot be a folder
    key = "a" * 32
    with caplog.at_level("WARNING", logger="safeattn"):
        serving.publish(key, {"off": True})
    assert serving.read(key) is None and "cannot publish" in caplog.text

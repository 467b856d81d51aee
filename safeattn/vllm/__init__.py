"""safeattn inside vLLM: an out-of-tree plugin with the ``[CLS]`` probe (issue #14).

- :func:`register` (the ``vllm.general_plugins`` entry point) registers the model wrappers
  ``SafeattnGemma3ForCausalLM`` and ``SafeattnLlamaForCausalLM`` with vLLM's ``ModelRegistry``.
- :func:`engine_kwargs` gives the ``LLM(...)`` arguments that select a wrapper, the safety files
  and the logits processor; :func:`requests` builds prompts + ``SamplingParams`` with the
  ``q_span`` safeattn's own template gives; :func:`trace` hands back a request's trace.
- :data:`MIDDLEWARE` (the server's ``--middleware``) streams only text the checks cleared.

Only this module's names load without vLLM; the wrappers and the processor import it.
"""
from __future__ import annotations

__all__ = ["register", "engine_kwargs", "requests", "trace", "PROCESSOR", "MIDDLEWARE",
           "ARCHITECTURE"]

PROCESSOR = "safeattn.vllm.logits:SafetyLogitsProcessor"
#: ``--middleware`` of the server: streamed responses show only cleared text (serving.py).
MIDDLEWARE = "safeattn.vllm.serving.SafeStreamMiddleware"
#: ``config.model_type`` -> the wrapper's architecture name.
ARCHITECTURE = {"gemma3_text": "SafeattnGemma3ForCausalLM", "llama": "SafeattnLlamaForCausalLM"}


def register() -> None:
    """Register the wrappers with vLLM (run by vLLM through the entry point)."""
    from vllm import ModelRegistry

    from .models import ARCHITECTURES

    for name in ARCHITECTURES:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"safeattn.vllm.models:{name}")


def engine_kwargs(model_dir, *, safety_dir=None, safety: dict | None = None,
                  request_overrides: bool = False, model_type: str | None = None,
                  query_budget: int | None = None) -> dict:
    """Keyword arguments for ``vllm.LLM(model_dir, **kw)`` (merge your own over them).

    Args:
        model_dir: the HF model folder.
        safety_dir: the folder ``safeattn.save_safety`` wrote (default: ``model_dir``).
        safety: the server-wide ``SafetyConfig`` fields; ``None``: only requests whose
            ``extra_args["safety"]`` asks for it are checked.
        request_overrides: with ``safety`` set, let a request's ``extra_args["safety"]``
            change the server's fields or switch the check off. ``False`` (default): every
            request gets the server's config; a request may give only its trace ``id``.
        model_type: overrides ``config.json``'s ``model_type``.
        query_budget: how far back ``q_span`` takes earlier user turns of a chat request
            that gives no ``q_span`` (default 256 tokens, ``build_inputs``'s own).

    A head with a query probe also reads the state of the last token before an assistant
    prefill in the forward that computes it, and one with a response probe the states of an
    assistant prefill's tokens: a prefix-cache hit would skip them (the request then
    refuses, fail closed), so for such a head prefix caching is switched off
    (``enable_prefix_caching=False``; a server needs ``--no-enable-prefix-caching``). Both
    read inside the forward, which only an eager engine lets a hook see: pass
    ``enforce_eager=True`` (a server: ``--enforce-eager``); a compiled engine refuses such a
    head at start-up, saying so.
    """
    import json
    from pathlib import Path

    if model_type is None:
        model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    if model_type not in ARCHITECTURE:
        raise ValueError(f"model_type {model_type!r} has no safeattn vLLM wrapper; supported: "
                         f"{sorted(ARCHITECTURE)}")
    opt = {"safety_dir": str(safety_dir or model_dir)}
    if safety is not None:
        opt["safety"] = dict(safety)
    if request_overrides:
        opt["request_overrides"] = True
    if query_budget is not None:
        opt["query_budget"] = query_budget
    kw = {"model": str(model_dir), "logits_processors": [PROCESSOR],
          "hf_overrides": {"architectures": [ARCHITECTURE[model_type]], "safeattn_vllm": opt}}
    cfg = Path(opt["safety_dir"]) / "safety_config.json"
    if cfg.exists() and any(json.loads(cfg.read_text()).get(k)
                            for k in ("query_probe", "response_probe")):
        kw["enable_prefix_caching"] = False
    return kw


def requests(tokenizer, prompts, *, safety: dict | None = None, system: str | None = None,
             ids: list | None = None, published: bool = False, **sampling):
    """Prompts as safeattn templates them -> (prompt dicts, ``SamplingParams`` list).

    A prompt is the user's text or a conversation, as for :func:`safeattn.build_inputs`; one
    that ends with an assistant message is a prefill, which the model continues. Each becomes
    ``{"prompt_token_ids": ...}`` (``[CLS]`` left out: it is not part of vLLM's sequence), and
    its ``SamplingParams`` carry ``extra_args={"safety": {**safety, "q_span": ...,
    "response_start": ... (a prefill only), "id": ...}}`` (no safety when ``safety`` is None).
    ``published``: each request also writes its trace under ``$SAFEATTN_STREAM_DIR`` (the
    server's channel), where :func:`trace` finds it when the logits processors run in other
    processes: vLLM's default engine-core process, or tensor-parallel workers. Needs ``ids``.
    ``sampling`` goes to every ``SamplingParams``. Each request ends with its assistant turn,
    as a row of ``safeattn.generate`` does: at the template's end-of-turn tokens
    (``stop_token_ids``; vLLM stops at EOS itself), or at the text ``"\\nUser:"`` on the plain
    template (``stop``), unless ``sampling`` gives ``stop``, ``stop_token_ids`` or
    ``ignore_eos``.
    """
    from vllm import SamplingParams

    from ..hf.template import PLAIN_STOP, encode_row, turn_end
    from .serving import TRACE_ARG, trace_key

    if isinstance(prompts, str):
        prompts = [prompts]
    if published and (ids is None or safety is None):
        raise ValueError("requests: published=True needs ids (and safety) to key the traces")
    if not {"stop", "stop_token_ids", "ignore_eos"} & set(sampling):
        if not getattr(tokenizer, "chat_template", None):
            sampling = {**sampling, "stop": [PLAIN_STOP]}
        else:  # vLLM stops at EOS itself
            ends = [t for t in turn_end(tokenizer)["eos_token_id"] or []
                    if t != tokenizer.eos_token_id]
            sampling = {**sampling, "stop_token_ids": ends} if ends else sampling
    out_p, out_s = [], []
    for i, row in enumerate(prompts):
        ids_i, (qs, qe), rs = encode_row(tokenizer, row, system, -1, where=f"prompts[{i}]")
        ids_i = ids_i[1:]
        extra = None
        if safety is not None:
            extra = {"safety": {**safety, "q_span": [qs - 1, qe - 1]}}
            if rs - 1 < len(ids_i):
                extra["safety"]["response_start"] = rs - 1
            if ids is not None:
                extra["safety"]["id"] = ids[i]
            if published:
                extra[TRACE_ARG] = trace_key(ids[i])
        out_p.append({"prompt_token_ids": ids_i})
        out_s.append(SamplingParams(extra_args=extra, **sampling))
    return out_p, out_s


def trace(request_id, n_tokens: int | None = None):
    """The trace of the request whose ``extra_args["safety"]["id"]`` was ``request_id``, as a
    one-row :class:`safeattn.SafetyOutput` (``trace(i)[0]`` is its :class:`safeattn.RowSafety`;
    ``safeattn.plot_trace`` reads it); removes it from the registry. Read it once the request
    has finished: one still mid-alarm then ended on a stop string (or was aborted), and its
    trace refuses at its end, as HF's does.

    An in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one device) keeps every trace
    in this process. Otherwise the request must have been built with
    ``requests(..., published=True)``: its last published state is read back, without the
    refusal's ``justification`` (None), and cut to ``n_tokens`` generated tokens
    (``len(output.outputs[0].token_ids)``; default: up to the last step it published, which
    may be a step vLLM ran past the end).
    """
    from . import serving
    from .logits import TRACES

    st = TRACES.pop(request_id, None)
    if st is not None:
        return st.trace()
    key = serving.trace_key(request_id)
    state = serving.read(key)
    if not state or "trace" not in state:
        raise KeyError(f"no safety trace for id {request_id!r} (give extra_args['safety']['id'] "
                       "and run the engine in-process, or build the request with "
                       "requests(..., published=True))")
    serving.discard(key)
    n = state["n"] + 1 if n_tokens is None else n_tokens
    return serving.trace_output(serving.end_trace(state["trace"], n))

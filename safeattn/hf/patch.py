"""``apply_safeattn``: one call that switches a HF causal LM to the safeattn backend.

The safety forward rides on module hooks, not on per-class ``forward`` patches:

- a forward *pre*-hook on the model pops the safety keyword arguments (``q_span``,
  ``safety_mode``, ``response_window``, ``response_start``, ``cls_visible_to_response``,
  ``probe_window``), checks them and passes a :class:`SafetyLayout` on as ``safety_layout``,
  which transformers hands unchanged to every attention call;
- a hook on the final norm (or on decoder layer ``cls_layer``) keeps the ``[CLS]`` / probe
  row's hidden state;
- a forward hook runs the :class:`SafetyHead` on it, adds ``p`` ``[B]`` (fp32, P(malicious))
  and ``safety_logit`` ``[B]`` to the output, and masks the ``[CLS]`` logit to ``-inf``;
  the tapped (final-norm) hidden state is added as ``safety_hidden`` ``[B, D]``. When a ready
  :class:`SafetyLayout` is passed as ``safety_layout`` (the strategic decoder does), the probe
  row (last query row, if ``probe_window`` is set) or the prefill ``[CLS]`` row is tapped and
  only ``safety_hidden`` is added: the caller runs the head (so a failing head fails closed).
- with a :class:`~safeattn.hf.surgery.QueryProbe` (``model.safety_query_probe``, the safety
  config's ``query_probe``), a hook on its decoder layer keeps, in a prefill whose ``[CLS]``
  reads the query alone, the last prompt token's hidden state (column ``response_start - 1``,
  else the last): the output gets it as ``query_hidden`` and, when the head runs here,
  ``query_logit`` (``p`` is then its sigmoid; ``safety_logit`` stays the head's own);
- with a :class:`~safeattn.hf.surgery.ResponseProbe` (``model.safety_response_probe``, the
  config's ``response_probe``), a hook on its decoder layer adds every row's
  ``w · h`` there as ``response_token_logit`` ``[B, T]`` (fp32) to the output of a forward
  with a safety layout; the strategic decoder averages it over a check's window;
- with ``probe_exit=True`` (the strategic decoder's check steps) and a head on decoder layer
  ``cls_layer``, the probe row (last query row) stops after that layer: the tap hook drops it
  from the layer's output and a pre-hook on every later layer drops its position embeddings,
  position ids and mask rows and hands attention a layout without the probe. Later layers
  then run (and cache) the other rows only; the caller crops the probe's K/V from layers
  ``0..cls_layer`` alone. When the probe is the forward's only query row (the decoder's
  checks of an assistant prefill), nothing is left to run: the tap hook ends the forward by
  raising :class:`ProbeDone`, which carries ``safety_hidden``.
- the ``nn.Linear`` modules of the layers the probe row runs through take a weight-stationary
  path while a forward carries a probe row (:mod:`safeattn.hf.few_rows`), so that on CPU the
  ``[token, probe]`` rows cost about one read of each weight.

``apply_safeattn`` also makes ``model.generate(..., safety=SafetyConfig(...))`` run the
strategic decoder (:mod:`safeattn.generation`); without ``safety`` it is stock ``generate``.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from . import adapter, backend, ensemble, few_rows
from .backend import SAFETY_KWARGS, is_descriptor
from .layout import MODES, SafetyLayout
from .surgery import (QueryProbe, ResponseProbe, SafetyHead, _base, add_safety_token, cls_token_id,
                      safety_config)

__all__ = ["SUPPORTED_MODEL_TYPES", "apply_safeattn", "revert_safeattn", "is_patched",
           "safety_forward", "classify", "SAFETY_KWARGS", "ProbeDone"]

#: ``config.model_type`` -> family name, for the families that are tested.
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
                         "qwen3": "Qwen3", "gemma3_text": "Gemma3 (text)"}
_STATE = "_safeattn_state"


class ProbeDone(Exception):
    """Ends a ``probe_exit`` forward whose only query rows are probes, once the head's layer
    has run: ``safety_hidden`` (and with an ensemble ``member_hidden``) is what the output
    would have carried. The cache layers ``0..cls_layer`` hold the probes' K/V, as after any
    ``probe_exit`` forward."""

    def __init__(self, safety_hidden, member_hidden=None):
        super().__init__("the probe rows, the forward's only rows, left it at the head's layer")
        self.safety_hidden = safety_hidden
        self.member_hidden = member_hidden


def _check_supported(model) -> None:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(f"safeattn does not support {type(model).__name__} (model_type={mt!r}); "
                         f"supported: {names}")


def is_patched(model) -> bool:
    return getattr(model, _STATE, None) is not None


def apply_safeattn(model, tokenizer=None, *, cls_layer: int | None = None,
                   cls_visible_to_response: bool | None = None):
    """Patch ``model`` in place for safety attention and return it.

    Registers the ``"safeattn"`` backend, calls ``model.set_attn_implementation("safeattn")``,
    adds ``[CLS]`` (when ``tokenizer`` is given) and the :class:`SafetyHead` when missing,
    and installs the safety-forward hooks. Calling it again only updates the options.

    Raises ``ValueError`` for model families outside :data:`SUPPORTED_MODEL_TYPES`.
    """
    _check_supported(model)
    backend.register()
    prev = getattr(model, _STATE, None)
    prev_impl = prev["prev_impl"] if prev else model.config._attn_implementation
    model.set_attn_implementation(backend.NAME)
    cfg = safety_config(model) or {}
    if cls_layer is None:
        cls_layer = cfg.get("cls_layer")
    if cls_visible_to_response is None:
        cls_visible_to_response = cfg.get("cls_visible_to_response", False)
    n_layers = model.config.get_text_config().num_hidden_layers
    if cls_layer is not None and not 0 <= cls_layer < n_layers:
        raise ValueError(f"cls_layer must index a decoder layer, got {cls_layer}")
    if tokenizer is not None:
        add_safety_token(model, tokenizer, cls_layer=cls_layer,
                         cls_visible_to_response=cls_visible_to_response)
    if getattr(model, "safety_head", None) is None:
        w = model.get_input_embeddings().weight
        model.safety_head = SafetyHead(model.config.get_text_config().hidden_size,
                                       cls_layer).to(device=w.device, dtype=w.dtype)
    spec = cfg.get("adapter")
    if spec and getattr(model, "safety_adapter", None) is None:  # weights are loaded later
        model.safety_adapter = adapter.ProbeAdapter(
            list(_base(model).layers)[:spec["layers"]], spec["rank"], spec["alpha"],
            spec["targets"])
    model.safety_head.cls_layer = cls_layer
    _add_query_probe(model, cfg.get("query_probe"), n_layers)
    _add_response_probe(model, cfg.get("response_probe"), n_layers)
    ensemble.add_members(model, cfg.get("members"), cls_layer)
    cfg = safety_config(model) or {}
    cfg.update(cls_layer=cls_layer, cls_visible_to_response=bool(cls_visible_to_response))
    model.config.safeattn = cfg
    _remove_hooks(model)
    base = _base(model)
    tap = base.norm if cls_layer is None else base.layers[cls_layer]
    # Layers after the tapped one, where a probe_exit forward runs without the probe row.
    after = [] if cls_layer is None else list(base.layers[cls_layer + 1:n_layers])
    _install_generate(model)
    # The layers a check step's probe row runs through get few-row linears (few_rows.py).
    switch = few_rows.Switch()
    state = {"prev_impl": prev_impl, "ctx": None, "few_rows": switch,
             "few_rows_mods": few_rows.install(base.layers[:n_layers - len(after)], switch),
             "tokenizer": tokenizer if tokenizer is not None else (prev or {}).get("tokenizer"),
             "exit_layer": cls_layer if after else None,
             "handles": [
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        tap.register_forward_hook(_tap_hook(model)),
        model.register_forward_hook(_post_hook, with_kwargs=True),
    ] + [layer.register_forward_pre_hook(_exit_hook(model), with_kwargs=True)
         for layer in after]}
    qp = getattr(model, "safety_query_probe", None)
    if qp is not None:
        state["handles"].append(
            base.layers[qp.layer - 1].register_forward_hook(_query_hook(model)))
    rp = getattr(model, "safety_response_probe", None)
    if rp is not None:
        state["handles"].append(
            base.layers[rp.layer - 1].register_forward_hook(_response_hook(model)))
    if getattr(model, "safety_adapter", None) is not None:
        # while the few-row switch is on, the tapped row is the first probe of the last rows
        state["handles"] += adapter.install_hooks(
            model, model.safety_adapter,
            lambda: -_probes(state) if switch.on else (state["ctx"] or {}).get("rows"))
    state["handles"] += ensemble.install_member_hooks(
        model, lambda: _probes(state) if switch.on else 0)
    object.__setattr__(model, _STATE, state)  # not a submodule / parameter
    return model


def _probes(state) -> int:
    """The probe rows at the end of the current forward (one per ensemble member)."""
    return (state["ctx"] or {}).get("probes", 1)


def _add_query_probe(model, spec, n_layers: int) -> None:
    """The :class:`QueryProbe` that the config's ``query_probe`` entry asks for (weights are
    loaded later), or none."""
    if not spec:
        model.safety_query_probe = None
        return
    layer = spec.get("layer") if isinstance(spec, dict) else None
    if not isinstance(layer, int) or not 1 <= layer <= n_layers:
        raise ValueError(f"safety config: query_probe.layer must be a hidden-state index in "
                         f"1..{n_layers}, got {spec!r}")
    qp = getattr(model, "safety_query_probe", None)
    if qp is None or qp.layer != layer:
        w = model.get_input_embeddings().weight
        model.safety_query_probe = QueryProbe(model.config.get_text_config().hidden_size,
                                              layer).to(device=w.device, dtype=w.dtype)


def _add_response_probe(model, spec, n_layers: int) -> None:
    """The :class:`ResponseProbe` that the config's ``response_probe`` entry (``{"layer": L,
    "window": W}``) asks for (weights are loaded later), or none."""
    if not spec:
        model.safety_response_probe = None
        return
    layer, window = (spec.get("layer"), spec.get("window")) if isinstance(spec, dict) \
        else (None, None)
    if not isinstance(layer, int) or not 1 <= layer <= n_layers \
            or not isinstance(window, int) or window < 1:
        raise ValueError(f"safety config: response_probe must give a hidden-state index "
                         f"'layer' in 1..{n_layers} and a 'window' >= 1, got {spec!r}")
    rp = getattr(model, "safety_response_probe", None)
    if rp is None or rp.layer != layer:
        w = model.get_input_embeddings().weight
        model.safety_response_probe = ResponseProbe(
            model.config.get_text_config().hidden_size, layer, window).to(device=w.device,
                                                                          dtype=w.dtype)
    model.safety_response_probe.window = window


def _patched_generate(self, *args, safety=None, **kwargs):
    """``generate`` of a patched model: stock HF generation, or with ``safety=SafetyConfig(...)``
    the strategic decoder (:func:`safeattn.generation.safe_generate`)."""
    if safety is None:
        return type(self).generate(self, *args, **kwargs)
    from ..generation import safe_generate

    return safe_generate(self, *args, safety=safety, **kwargs)


def _install_generate(model) -> None:
    import types

    model.__dict__["generate"] = types.MethodType(_patched_generate, model)


def _remove_hooks(model) -> None:
    st = getattr(model, _STATE, None)
    if st:
        for h in st["handles"]:
            h.remove()
        st["handles"] = []
        few_rows.remove(st.get("few_rows_mods", ()))
        st["few_rows_mods"] = []


def revert_safeattn(model):
    """Remove the hooks and restore the previous attention implementation. Token/head stay."""
    st = getattr(model, _STATE, None)
    if st is None:
        return model
    _remove_hooks(model)
    model.__dict__.pop("generate", None)
    model.set_attn_implementation(st["prev_impl"] or "sdpa")
    object.__delattr__(model, _STATE)
    return model


# --------------------------------------------------------------------------- hooks


def _past_length(kwargs) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def _as_long(x, device, name):
    t = torch.as_tensor(x, device=device)
    if t.is_floating_point():
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.long()


def _build_layout(model, args, kwargs, extra) -> tuple[SafetyLayout, torch.Tensor | None]:
    """Check the safety kwargs against the inputs -> (layout, rows whose hidden state gives p)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    emb = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else emb
    b, tq = ref.shape[0], ref.shape[1]
    dev = ref.device
    am = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    past = _past_length(kwargs)
    length = am.shape[1] if am is not None else past + tq
    if am is not None and am.shape[0] != b:
        raise ValueError(f"attention_mask has batch {am.shape[0]}, inputs have batch {b}")
    cls, in_call = _cls_columns(model, ids, am, past, b, dev)
    mode = extra.get("safety_mode", "sft")
    if mode not in MODES:
        raise ValueError(f"safety_mode must be one of {MODES}, got {mode!r}")
    q, win, probe = _checked_spans(extra, mode, cls, length, b, dev)
    rs = extra.get("response_start")
    if rs is not None:
        rs = _as_long(rs, dev, "response_start").reshape(-1)
        if rs.shape[0] != b:
            raise ValueError(f"response_start must have shape [{b}], got {list(rs.shape)}")
    elif past > 0:  # decoding: every new row is a response row
        rs = torch.full((b,), past, dtype=torch.long, device=dev)
    vis = extra.get("cls_visible_to_response")
    if vis is None:
        vis = (safety_config(model) or {}).get("cls_visible_to_response", False)
    layout = SafetyLayout(q_span=q, cls=cls, mode=mode, window=win, resp_start=rs,
                          cls_visible_to_response=bool(vis), probe_window=probe)
    if probe is not None:
        rows = torch.full((b,), tq - 1, dtype=torch.long, device=dev)
    elif bool(in_call.all()):
        rows = cls - past
    else:
        rows = None
    if kwargs.get("position_ids") is None and am is not None:
        kwargs["position_ids"] = (am.long().cumsum(-1) - 1).clamp_min(0)[:, -tq:].to(dev)
    return layout, rows


def _cls_columns(model, ids, am, past: int, b: int, dev):
    """Each row's ``[CLS]`` column (its first non-pad column) ``[B]``, and whether it lies in
    this forward ``[B]`` bool (else in the cache); checked to hold ``[CLS]``."""
    tid = cls_token_id(model)
    cls = am.long().argmax(-1).to(dev) if am is not None else torch.zeros(b, dtype=torch.long,
                                                                         device=dev)
    if am is not None and not bool(am.bool().any(-1).all()):
        raise ValueError("attention_mask has a row with no token")
    in_call = cls >= past
    if bool(in_call.any()):
        if not bool(in_call.all()):
            raise ValueError("[CLS] must be in the same forward for every row")
        if ids is None:
            raise ValueError("the safety forward needs input_ids (to find [CLS])")
        got = ids.gather(1, (cls - past)[:, None])[:, 0]
        if not bool((got == tid).all()):
            bad = int((got != tid).nonzero()[0])
            raise ValueError(f"row {bad} does not start with [CLS] (id {tid}) after its left "
                             f"padding; build inputs with safeattn.build_inputs")
    return cls, in_call


def _checked_spans(extra, mode: str, cls, length: int, b: int, dev):
    """``q_span``, ``response_window`` and ``probe_window`` (each ``[B, 2]`` or None; a
    ``pretrain`` forward without ``q_span`` gets an empty one), checked to lie after ``[CLS]``
    and within the sequence."""
    def span(name):
        v = extra.get(name)
        if v is None:
            return None
        t = _as_long(v, dev, name)
        if tuple(t.shape) != (b, 2):
            raise ValueError(f"{name} must have shape {[b, 2]} for a batch of {b}, got "
                             f"{list(t.shape)}")
        return t

    q = span("q_span")
    if q is None:
        if mode != "pretrain":
            raise ValueError(f"safety_mode={mode!r} needs q_span [B, 2]")
        q = torch.stack([cls + 1, cls + 1], -1)
    win, probe = span("response_window"), span("probe_window")
    for name, t in (("q_span", q), ("response_window", win), ("probe_window", probe)):
        if t is None:
            continue
        bad = (t[:, 0] < cls + 1) | (t[:, 0] > t[:, 1]) | (t[:, 1] > length)
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{r}] = {t[r].tolist()} is out of range: need "
                             f"[CLS] column {int(cls[r])} < start <= end <= sequence length "
                             f"{length}")
    return q, win, probe


def _clear(st) -> dict | None:
    """End a forward's tap state: no context, few-row linears off -> the context it had."""
    ctx, st["ctx"] = st["ctx"], None
    st["few_rows"].on = False
    return ctx


def _pre_hook(model, args, kwargs):
    st = getattr(model, _STATE)
    _clear(st)
    probe_exit = bool(kwargs.pop("probe_exit", False))
    extra = {k: kwargs.pop(k) for k in SAFETY_KWARGS if k in kwargs}
    layout = kwargs.get("safety_layout")
    if layout is None and not extra:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cfg = safety_config(model)
        if ids is not None and cfg and cfg.get("cls_token_id") is not None \
                and bool((ids == cfg["cls_token_id"]).any()):
            raise ValueError("input_ids contain [CLS] but no q_span was given; pass q_span "
                             "(see safeattn.build_inputs)")
        return args, kwargs
    if layout is not None:
        if extra:
            raise ValueError(f"pass either safety_layout or {sorted(extra)}, not both")
        # A ready-made layout (the strategic decoder's path: no checks, no host syncs). The
        # probe row (last query row) or, in a prefill, the [CLS] row is tapped; the output
        # gets its final-norm hidden state as ``safety_hidden`` and the caller runs the head.
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        rows = None
        if ref is not None and layout.probe_window is not None:
            rows = torch.full((ref.shape[0],), ref.shape[1] - layout.probe_rows,
                              dtype=torch.long, device=ref.device)
        elif ref is not None and layout.cls is not None and _past_length(kwargs) == 0:
            rows = layout.cls.long().to(ref.device)
        st["ctx"] = {"rows": rows, "h": None, "defer_head": True,
                     "exit": _exit_memo(st, layout, rows, probe_exit)}
    else:
        layout, rows = _build_layout(model, args, kwargs, extra)
        if ensemble.member_count(model) > 1:  # its p needs probe rows: safety_forward refuses
            rows = None
        kwargs["safety_layout"] = layout
        st["ctx"] = {"rows": rows, "h": None, "exit": _exit_memo(st, layout, rows, probe_exit)}
    st["ctx"]["query_rows"] = _query_rows(model, layout, rows, kwargs, args)
    st["ctx"]["probes"] = layout.probe_rows
    st["few_rows"].on = rows is not None and layout.probe_window is not None
    return args, kwargs


def _query_rows(model, layout, rows, kwargs, args):
    """The column of each row's last prompt token when the query probe reads this forward:
    a prefill (no cache) whose tapped row is ``[CLS]`` reading the query alone; else None."""
    if getattr(model, "safety_query_probe", None) is None or rows is None \
            or layout.probe_window is not None or layout.mode != "sft" \
            or _past_length(kwargs) != 0:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if layout.resp_start is None:
        return torch.full((ref.shape[0],), ref.shape[1] - 1, dtype=torch.long,
                          device=ref.device)
    return layout.resp_start.long().to(ref.device) - 1


def _exit_memo(st, layout, rows, probe_exit):
    """The per-forward memo of the probe-free kwargs when the probe row exits early, else None."""
    if probe_exit and rows is not None and layout.probe_window is not None \
            and st.get("exit_layer") is not None:
        return {}
    return None


def _drop_probe(name, v, n):
    """A decoder-layer kwarg without the last ``n`` query rows (the probes)."""
    if name == "safety_layout":
        return replace(v, probe_window=None, probe_active=None, probe_rows=1)
    if name == "position_embeddings":  # (cos, sin), each [B, Tq, D]
        return tuple(t[:, :-n] for t in v)
    if name == "attention_mask":
        if not is_descriptor(v):  # dense [B, 1, Tq, Tk]: the probes are the last queries and keys
            return v[..., :-n, :-n]
        rows = getattr(v, "_safeattn_rows", None)
        if rows is None:  # plain descriptor: row-count independent
            return v
        d = v.detach()
        d._safeattn_rows = rows[:, :-n]
        return d
    return v[..., :-n]  # position_ids, cache_position


_EXIT_KWARGS = ("safety_layout", "position_embeddings", "attention_mask", "position_ids",
                "cache_position")


def _exit_hook(model):
    def hook(module, args, kwargs):
        ctx = getattr(model, _STATE)["ctx"]
        memo = ctx.get("exit") if ctx is not None else None
        if memo is None:
            return None
        for k in _EXIT_KWARGS:
            v = kwargs.get(k)
            if v is None:
                continue
            got = memo.get(id(v))
            if got is None:  # keep v alive so that its id stays unique within the forward
                got = memo[id(v)] = (v, _drop_probe(k, v, ctx["probes"]))
            kwargs[k] = got[1]
        return args, kwargs
    return hook


def _tap_hook(model):
    def hook(module, args, out):
        ctx = getattr(model, _STATE)["ctx"]
        if ctx is not None and ctx["rows"] is not None:
            h = out[0] if isinstance(out, tuple) else out
            ctx["h"] = h[torch.arange(h.shape[0], device=h.device), ctx["rows"].to(h.device)]
            n = ctx.get("probes", 1)
            if n > 1:  # the other members' probe rows follow member 0's
                ctx["hm"] = h[:, h.shape[1] - n + 1:]
            if ctx.get("exit") is not None:  # the probe rows stop here
                if h.shape[1] == n:  # and no other row is left to run on
                    _clear(getattr(model, _STATE))
                    hm = ctx.get("hm")
                    raise ProbeDone(_tapped(model, ctx["h"]),
                                    None if hm is None else _tapped(model, hm))
                return (h[:, :-n], *out[1:]) if isinstance(out, tuple) else h[:, :-n]
        return None
    return hook


def _query_hook(model):
    def hook(module, args, out):
        ctx = getattr(model, _STATE)["ctx"]
        if ctx is not None and ctx.get("query_rows") is not None:
            h = out[0] if isinstance(out, tuple) else out
            ctx["hq"] = h[torch.arange(h.shape[0], device=h.device), ctx["query_rows"]]
        return None
    return hook


def _response_hook(model):
    """Every row's :meth:`ResponseProbe.token_logits` at the probe's layer, for the decoder to
    average over a check's window (a forward's probe row, where it gets that far, is the
    last row: the decoder reads the token rows)."""
    def hook(module, args, out):
        ctx = getattr(model, _STATE)["ctx"]
        if ctx is not None:
            h = out[0] if isinstance(out, tuple) else out
            ctx["ru"] = model.safety_response_probe.token_logits(h)
        return None
    return hook


def _tapped(model, h):
    """The tapped row's state as ``safety_hidden``: final-normed, also from an inner layer."""
    return _base(model).norm(h) if model.safety_head.cls_layer is not None else h


def _post_hook(model, args, kwargs, output):
    st = getattr(model, _STATE)
    ctx = _clear(st)
    if ctx is not None and ctx["h"] is not None:
        h = output["safety_hidden"] = _tapped(model, ctx["h"])
    if ctx is not None and ctx.get("hm") is not None:
        output["member_hidden"] = _tapped(model, ctx["hm"])
    hq = ctx.get("hq") if ctx is not None else None
    if hq is not None:
        output["query_hidden"] = hq
    if ctx is not None and ctx.get("ru") is not None:
        output["response_token_logit"] = ctx["ru"]
    if ctx is not None and ctx["h"] is not None and not ctx.get("defer_head"):
        logit = model.safety_head(h.to(model.safety_head.weight.dtype))[:, 0]
        output["safety_logit"] = logit
        if hq is not None:
            logit = output["query_logit"] = model.safety_query_probe(logit, hq)
        output["p"] = torch.sigmoid(logit.float())
    cfg = safety_config(model)
    logits = getattr(output, "logits", None)
    if cfg and cfg.get("cls_token_id") is not None and logits is not None \
            and logits.shape[-1] > cfg["cls_token_id"]:
        tid = cfg["cls_token_id"]
        if logits.requires_grad:
            output["logits"] = logits.index_fill(-1, torch.tensor([tid], device=logits.device),
                                                 float("-inf"))
        else:
            logits[..., tid] = float("-inf")
    return output


def safety_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   q_span: torch.Tensor | None = None, **kwargs):
    """``model(input_ids, attention_mask, q_span=q_span, **kwargs)`` on a patched model.

    Args:
        input_ids: ``[B, L]`` with ``[CLS]`` first after left padding (see ``build_inputs``).
        attention_mask: ``[B, L]`` 1 = token, 0 = padding.
        q_span: ``[B, 2]`` half-open query columns.
        kwargs: other model kwargs and the safety kwargs (``safety_mode``,
            ``response_window``, ``response_start``, ``cls_visible_to_response``).

    Returns:
        the model output with ``p [B]`` (fp32) and ``safety_logit [B]`` added; with a query
        probe, a prefill's ``p`` is ``sigmoid(query_logit [B])`` (see the module docstring).
    """
    if not is_patched(model):
        raise ValueError("model is not patched; call safeattn.apply_safeattn(model, tokenizer)")
    k = ensemble.member_count(model)
    if k > 1:
        raise ValueError(f"this model's safety head is an ensemble of {k}, which scores through "
                         "probe rows: use safeattn.classify for p_0, or safe generation")
    return model(input_ids=input_ids, attention_mask=attention_mask, q_span=q_span, **kwargs)


@torch.no_grad()
def classify(model, tokenizer, prompts: list[str] | str, *, batch_size: int = 16,
             system: str | None = None) -> torch.Tensor:
    """``p_0`` = P(malicious) of each prompt from the ``[CLS]`` row (and the query probe, when
    the head has one; for a head ensemble, from its probe rows) -> float64 ``[B]`` (on CPU;
    fp32 ``p`` is 1.0 past logit ~16.6, which would tie a saturated head's scores).

    Patches the model with :func:`apply_safeattn` first when needed.
    """
    from .template import build_inputs

    if not is_patched(model):
        apply_safeattn(model, tokenizer)
    if isinstance(prompts, str):
        prompts = [prompts]
    dev = model.get_input_embeddings().weight.device
    ps = []
    for i in range(0, len(prompts), batch_size):
        if ensemble.member_count(model) > 1:
            ps.append(_ensemble_p0(model, tokenizer, prompts[i:i + batch_size], system))
            continue
        enc = build_inputs(tokenizer, prompts[i:i + batch_size], system=system, device=dev)
        out = model(**enc, use_cache=False, logits_to_keep=1)
        logit = out.get("query_logit", out.safety_logit)
        ps.append(torch.sigmoid(logit.double()).cpu())
    return torch.cat(ps) if ps else torch.empty(0)


def _ensemble_p0(model, tokenizer, prompts, system) -> torch.Tensor:
    """``p_0`` of a head ensemble: the decoder's prefill check (one probe row per member)."""
    from ..generation import SafetyConfig, generate

    out = generate(model, tokenizer, prompts, system=system, max_new_tokens=1, do_sample=False,
                   safety=SafetyConfig(threshold=0.5), return_dict_in_generate=True)
    return out.safety.p[:, 0].double().cpu()

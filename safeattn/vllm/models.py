"""vLLM model wrappers (Gemma3, Llama) that run the ``[CLS]`` probe with each forward.

A wrapper and the logits processor of the same engine share one :class:`Bridge`: before a
forward the processor posts the step's plan (which rows check, with which window); the model
runs the probe rows of the plan whose prompt is complete and posts their head logits; the
processor then runs the state machine on them and forces the refusal prefix.

An eager engine carries the probe rows through the main forward's layers
(:class:`~safeattn.vllm.probe.FoldedProbe`); a compiled one, or ``fold_probe: false`` in the
``safeattn_vllm`` option, runs them in a pass of their own after it
(:meth:`~safeattn.vllm.probe.ProbeRunner.run`). Both compute the same rows. Folding changes
how many rows the shared matmuls take, so in bf16 a token row may round differently (measured
on a CPU without AMX at batch 1, as vLLM's own batching can); the separate pass leaves the
token rows as a plain engine computes them.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from .probe import FoldedProbe, Plan, ProbeRunner, SafetyParts

logger = logging.getLogger("safeattn")

#: The per-engine option read from the HF config (set it with ``hf_overrides``).
OPTION = "safeattn_vllm"
#: Architecture name -> (vLLM base class path, family).
ARCHITECTURES = {
    "SafeattnGemma3ForCausalLM": ("vllm.model_executor.models.gemma3:Gemma3ForCausalLM", "gemma3"),
    "SafeattnLlamaForCausalLM": ("vllm.model_executor.models.llama:LlamaForCausalLM", "llama"),
}
_BRIDGES: "weakref.WeakValueDictionary[int, Bridge]" = weakref.WeakValueDictionary()


class Bridge:
    """What the model and the logits processor of one engine exchange within a step."""

    def __init__(self, safety_config: dict):
        self.safety_config = safety_config  # safety_config.json of the head
        self.plan: Plan | None = None        # all safety rows of the step (set before forward)
        self.expected: torch.Tensor | None = None  # [Bs] seq_len once a row's tokens are in
        self.due: torch.Tensor | None = None       # [Bs] bool: the row checks this step
        self.complete: torch.Tensor | None = None  # [Bs] bool (set by the model)
        self.logits: torch.Tensor | None = None    # [Bs] fp32 head logits (nan: none/failed)
        self.error: str | None = None
        self.folded: bool | None = None  # the probe rides the main forward (set by the model)
        self.runner: ProbeRunner | None = None  # (set by the model)
        self.metadata = None  # the attention metadata of the step's forward (set by the model)
        self.response = None  # the head's ResponseBlend, or None (set by the model)
        #: the forward's (batch rows [N], columns [N], w · h [N]) of its tokens, for the
        #: response probe (set by the model, taken by the processor)
        self.token_logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def post_plan(self, plan, expected, due):
        self.plan, self.expected, self.due = plan, expected, due
        self.complete = self.logits = self.metadata = None
        self.error = None

    def probe(self, plan: Plan) -> torch.Tensor:
        """fp32 head logits ``[Bp]`` (on the CPU) of ``plan``'s probe rows, in a pass of their
        own over the cache of the step's forward (the prefill checks, after it)."""
        if self.runner is None or self.metadata is None:
            raise RuntimeError("no forward of this step to read the cache of")
        logits, error = self.runner.run(plan, self.metadata)
        if error:
            logger.error("safeattn: the prefill checks' probe raised %s; the requests they "
                         "check refuse (fail closed)", error)
        return ranks_agree(logits, self.runner.model.norm.weight.device)


def bridge_for(vllm_config) -> Bridge | None:
    """The bridge of the engine whose config this is. A process with one engine also gets
    its bridge if the model was handed another config object; with several, a guess could
    read another engine's probe, so none is given (a request asking for safety then stops
    the engine: closed)."""
    b = _BRIDGES.get(id(vllm_config))
    if b is None and len(_BRIDGES) == 1:
        b = next(iter(_BRIDGES.values()))
    return b


def options(hf_config) -> dict:
    opt = getattr(hf_config, OPTION, None) or {}
    if not isinstance(opt, dict):
        raise ValueError(f"{OPTION} must be a dict (hf_overrides), got {type(opt).__name__}")
    known = ("safety_dir", "safety", "fold_probe", "request_overrides", "query_budget")
    bad = set(opt) - set(known)
    if bad:
        raise ValueError(f"{OPTION}: unknown keys {sorted(bad)} (known: {', '.join(known)})")
    for key, default in (("fold_probe", True), ("request_overrides", False)):
        if not isinstance(opt.get(key, default), bool):
            raise ValueError(f"{OPTION}: {key} must be a bool")
    budget = opt.get("query_budget", 0)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"{OPTION}: query_budget must be an int >= 0, got {budget!r}")
    return opt


def _check_engine(vllm_config) -> None:
    if vllm_config.speculative_config is not None:
        raise ValueError("safeattn: speculative decoding is not supported (vLLM refuses custom "
                         "logits processors with it); remove speculative_config")
    if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
        raise ValueError("safeattn: prompt embeddings are not supported (the probe's q_span "
                         "is read from the prompt's token ids); remove enable_prompt_embeds")
    device = vllm_config.device_config.device_type
    if device != "cpu":
        raise ValueError(f"safeattn: the vLLM probe reads only the paged KV cache of vLLM's CPU "
                         f"attention backend; this engine runs on {device!r}, whose backends "
                         "keep other layouts, so every checked request would refuse (serve on "
                         "the CPU, or use safeattn.generate on this device)")
    kv = vllm_config.cache_config.cache_dtype
    if kv not in ("auto", "float16", "bfloat16"):
        raise ValueError(f"safeattn: the vLLM probe cannot read a {kv!r} KV cache (only the "
                         "model's dtype, float16 or bfloat16), so every checked request would "
                         "refuse; remove kv_cache_dtype")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("safeattn: the vLLM probe runs layers 0..cls_layer on one pipeline "
                         "stage; use pipeline_parallel_size = 1 (tensor parallelism works)")


class SafetyModel:
    """The safety part of a wrapped vLLM model (:func:`_wrap` puts it before the model's
    own class): the ``[CLS]`` probe with each forward, its taps, and ``[CLS]`` kept out of
    the generated tokens. ``safety_family`` (set by :func:`_wrap`) picks the probe's
    layer code."""

    safety_family: str

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _check_engine(vllm_config)
        mc = vllm_config.model_config
        opt = options(mc.hf_config)
        d = Path(opt.get("safety_dir") or mc.model)
        self._safety_parts = SafetyParts(d)
        self._safety_runner = self._safety_fold = None
        # A compiled forward is traced once: only an eager one can carry the probe rows.
        self._safety_eager = mc.enforce_eager
        self._safety_fold_ok = opt.get("fold_probe", True) and mc.enforce_eager
        self.safety_bridge = Bridge(self._safety_parts.config)
        _BRIDGES[id(vllm_config)] = self.safety_bridge
        self._safety_query = self._safety_tokens = None
        parts = self._safety_parts
        if parts.query_layer is not None:
            self._tap(parts.query_layer, "query_probe", "a hidden state", self._grab_query)
        if parts.response_layer is not None:
            self._tap(parts.response_layer, "response_probe", "every token's hidden state",
                      self._grab_tokens)
            self.safety_bridge.response = parts.response

    def _tap(self, at: int, probe: str, what: str, hook) -> None:
        """``hook`` on the output of block ``at - 1`` (hidden-state index ``at``) for the
        head's ``probe``, which reads ``what`` inside the forward."""
        if not at <= len(self.model.layers):
            raise ValueError(f"safety config: {probe}.layer {at} is outside the model's "
                             f"{len(self.model.layers)} layers")
        if not self._safety_eager:
            raise ValueError(f"safeattn: this head's {probe.replace('_', ' ')} reads {what} "
                             "inside the forward, which a compiled engine does not let a "
                             "hook see; run the engine with enforce_eager=True")
        self.model.layers[at - 1].register_forward_hook(hook)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        self._safety_query = None
        self.safety_bridge.token_logits = None
        due = self._probe_start()
        if self._safety_parts.response_layer is not None and due is not None:
            self._safety_tokens = positions
        try:
            # [CLS] holds RoPE position 0: the prompt sits at 1..P, as in safeattn.
            return super().forward(input_ids, positions + 1, intermediate_tensors,
                                   inputs_embeds, **kwargs)
        finally:
            self._safety_tokens = None
            if due is not None:  # also ends a folded probe whatever the forward did
                self._probe_finish(*due)

    def compute_logits(self, hidden_states):
        logits = super().compute_logits(hidden_states)
        cls = self._safety_parts.config.get("cls_token_id")
        if logits is not None and cls is not None and cls < logits.shape[-1]:
            logits[..., cls] = float("-inf")  # [CLS] is never generated (as in HF)
        return logits

    def load_weights(self, weights):
        # A save_pretrained checkpoint of a patched model holds the head and the adapter,
        # and vLLM also reads save_safety's file in the model folder: the probe takes them
        # from the safety files (SafetyParts) instead.
        keep = ((n, w) for n, w in weights
                if n != "cls_embedding" and not n.startswith(
                    ("safety_head.", "safety_adapter.", "safety_query_probe.",
                     "safety_response_probe.", "safety_members.")))
        return super().load_weights(keep)

    def _probe_start(self):
        """Which rows of the posted plan check in this forward -> ``(indices, sub-plan,
        attention metadata)``, or None; the folded probe starts carrying them."""
        from vllm.forward_context import get_forward_context

        br = self.safety_bridge
        md = get_forward_context().attn_metadata if br.plan is not None else None
        if md is None:
            return None
        if isinstance(md, list):
            md = md[0]
        if self._safety_runner is None:
            self._start_runner()
        br.metadata = md
        plan = br.plan
        first = self.model.layers[0].self_attn.attn.layer_name
        seq = md[first].seq_lens
        rows = plan.rows
        ok = rows < seq.numel()
        seen = torch.where(ok, seq[rows.clamp_max(max(seq.numel() - 1, 0))].long().cpu(), -1)
        br.complete = ok & (seen == br.expected)
        idx = (br.complete & br.due).nonzero().flatten()
        sub = plan.take(idx)
        if len(idx) and self._safety_fold is not None:
            self._safety_fold.begin(sub, md)
        first_check = sub.n == 0
        if self._safety_parts.query_layer is not None and bool(first_check.any()):
            # p_0 also reads the last prompt token before the response (an assistant
            # prefill's tokens are response), which this forward holds unless a chunked
            # prefill or the prefix cache left it out
            qsl = md[first].query_start_loc
            rows = sub.rows[first_check].to(qsl.device)
            pre = (sub.prompt_len - sub.rs)[first_check].to(qsl.device)
            at = (qsl[rows + 1] - 1 - pre).long()
            self._safety_query = {"of": first_check.nonzero().flatten(), "h": None,
                                  "at": torch.maximum(at, qsl[rows].long()),
                                  "lost": (at < qsl[rows]).cpu()}
        return idx, sub, md

    def _grab_query(self, module, args, output):
        q = self._safety_query
        if q is not None:
            h, residual = output  # the residual stream is their sum
            q["h"] = h[q["at"]].float() + residual[q["at"]].float()

    def _grab_tokens(self, module, args, output):
        """Every token's ``w · h`` at the response probe's layer, with its batch row and
        cache column, for the processor to keep (a folded probe's rows come after the
        tokens; padding after the last request is dropped). An error leaves them out: the
        checks that read them refuse (fail closed) and the forward goes on. An error on one
        tensor-parallel rank leaves them out on every rank, so that their processors
        decide alike."""
        positions = self._safety_tokens
        if positions is None:
            return
        br, got = self.safety_bridge, None
        try:
            qsl = br.metadata[self.model.layers[0].self_attn.attn.layer_name].query_start_loc
            got = token_logits(*output, positions, qsl, self._safety_parts.response_w)
        except Exception as e:  # noqa: BLE001 - fail closed
            logger.error("safeattn: the response probe raised %s: %s; the checks that read "
                         "this forward's tokens refuse (fail closed)", type(e).__name__, e)
        ok = torch.tensor([0.0 if got is not None else float("nan")])
        if not torch.isnan(ranks_agree(ok, self.model.norm.weight.device)).item():
            br.token_logits = got
        elif got is not None:
            logger.error("safeattn: another tensor-parallel rank's response probe raised; "
                         "the checks that read this forward's tokens refuse (fail closed)")

    def _blend_query(self, logits, idx):
        """The query probe into the ``p_0`` logits of this step's first checks."""
        q, self._safety_query = self._safety_query, None
        if q is None:
            return
        if q["h"] is None:
            raise RuntimeError("the forward did not reach the query probe's layer")
        j = idx[q["of"]]
        logits[j] = self._safety_parts.query_logit(logits[j], q["h"]).cpu()
        if bool(q["lost"].any()):
            logits[j[q["lost"]]] = float("nan")
            logger.error("safeattn: the query probe's token (the last before an assistant "
                         "prefill) was not computed in this forward (an earlier chunk of a "
                         "chunked prefill, or a prefix-cache hit: run the engine without "
                         "prefix caching); %d request(s) refuse (fail closed)",
                         int(q["lost"].sum()))

    def _probe_finish(self, idx, sub, md):
        br = self.safety_bridge
        logits = torch.full((len(br.plan.rows),), float("nan"))
        if len(idx):
            fold, error = self._safety_fold, None
            try:
                if fold is not None:
                    logits[idx] = fold.finish()
                    error = fold.error
                else:
                    logits[idx], error = self._safety_runner.run(sub, md)
                self._blend_query(logits, idx)
            except Exception as e:  # noqa: BLE001 - fail closed: nan refuses these rows
                logits[idx], error = float("nan"), f"{type(e).__name__}: {e}"
            logits[idx] = ranks_agree(logits[idx], self.model.norm.weight.device)
            if error:
                br.error = error
                logger.warning("safeattn: the vLLM probe raised %s; the %d checked "
                               "request(s) refuse (fail closed)", error, len(idx))
        br.logits = logits

    def _start_runner(self):
        p = self._safety_parts
        w = self.model.norm.weight
        self._safety_runner = ProbeRunner(self.model, p.to(w.device, w.dtype),
                                          self.safety_family)
        self.safety_bridge.runner = self._safety_runner
        if self._safety_fold_ok:
            self._safety_fold = FoldedProbe(self._safety_runner)
        self.safety_bridge.folded = self._safety_fold is not None


def _wrap(base, family: str):
    """``base`` (a vLLM model class) with :class:`SafetyModel` before it."""
    name = f"Safeattn{base.__name__}"
    return type(name, (SafetyModel, base), {"safety_family": family, "__qualname__": name,
                                            "__module__": __name__})


def ranks_agree(logits: torch.Tensor, device) -> torch.Tensor:
    """The tensor-parallel ranks' mean of each probe logit ``[Bp]`` (CPU). The ranks compute
    the same rows, and their logits processors must decide alike: a nan on any rank (its
    probe failed) makes the request refuse on all of them."""
    from vllm.distributed import (get_tensor_model_parallel_world_size,
                                  tensor_model_parallel_all_reduce)

    world = get_tensor_model_parallel_world_size()
    if world == 1:
        return logits
    return tensor_model_parallel_all_reduce(logits.to(device)).cpu() / world


def token_logits(h, residual, positions, query_start_loc, w):
    """A decoder layer's output ``(h, residual)`` (``[N', D]``: the residual stream is their
    sum) for a forward's ``positions [N]`` -> ``(batch rows [n], cache columns [n], w · (h +
    residual) [n])`` on the CPU for its ``n`` real tokens (rows past the last request's, as a
    folded probe's, are dropped), the batch row of each from ``query_start_loc [B + 1]``."""
    n = min(positions.shape[-1], int(query_start_loc[-1]))
    u = (h[:n].float() + residual[:n].float()) @ w
    rows = torch.searchsorted(query_start_loc[1:].to(u.device), torch.arange(n, device=u.device),
                              right=True)
    return rows.cpu(), positions[:n].long().cpu(), u.cpu()


def _load(path: str):
    import importlib

    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


def __getattr__(name):  # vLLM imports the registered classes lazily, by name
    if name in ARCHITECTURES:
        base, family = ARCHITECTURES[name]
        cls = _wrap(_load(base), family)
        globals()[name] = cls
        return cls
    raise AttributeError(name)

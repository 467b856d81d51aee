"""vLLM model wrappers (Gemma3, Llama) that run the ``[CLS]`` probe after each forward.

A wrapper and the logits processor of the same engine share one :class:`Bridge`: before a
forward the processor posts the step's plan (which rows check, with which window); the model
runs the probe rows of the plan whose prompt is complete and posts their head logits; the
processor then runs the state machine on them and forces the refusal prefix.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import torch

from .probe import Plan, ProbeRunner, SafetyParts

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

    def post_plan(self, plan, expected, due):
        self.plan, self.expected, self.due = plan, expected, due
        self.complete = self.logits = None
        self.error = None


def bridge_for(vllm_config) -> Bridge | None:
    return _BRIDGES.get(id(vllm_config)) or next(reversed(list(_BRIDGES.values())), None)


def options(hf_config) -> dict:
    opt = getattr(hf_config, OPTION, None) or {}
    if not isinstance(opt, dict):
        raise ValueError(f"{OPTION} must be a dict (hf_overrides), got {type(opt).__name__}")
    bad = set(opt) - {"safety_dir", "safety"}
    if bad:
        raise ValueError(f"{OPTION}: unknown keys {sorted(bad)} (known: safety_dir, safety)")
    return opt


def _check_engine(vllm_config) -> None:
    if vllm_config.speculative_config is not None:
        raise ValueError("safeattn: speculative decoding is not supported (vLLM refuses custom "
                         "logits processors with it); remove speculative_config")
    par = vllm_config.parallel_config
    if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
        raise ValueError("safeattn: the vLLM probe runs on one device only "
                         "(tensor_parallel_size = pipeline_parallel_size = 1)")


def _wrap(base, family: str):
    class Wrapper(base):
        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            _check_engine(vllm_config)
            mc = vllm_config.model_config
            opt = options(mc.hf_config)
            d = Path(opt.get("safety_dir") or mc.model)
            self._safety_parts = SafetyParts(d)
            self._safety_runner = None
            self.safety_bridge = Bridge(self._safety_parts.config)
            _BRIDGES[id(vllm_config)] = self.safety_bridge

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                    **kwargs):
            # [CLS] holds RoPE position 0: the prompt sits at 1..P, as in safeattn.
            hidden = super().forward(input_ids, positions + 1, intermediate_tensors,
                                     inputs_embeds, **kwargs)
            if self.safety_bridge.plan is not None:
                self._probe()
            return hidden

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
                    if n != "cls_embedding" and not n.startswith(("safety_head.",
                                                                   "safety_adapter.")))
            return super().load_weights(keep)

        def _probe(self):
            from vllm.forward_context import get_forward_context

            br = self.safety_bridge
            md = get_forward_context().attn_metadata
            if md is None:
                return
            if isinstance(md, list):
                md = md[0]
            if self._safety_runner is None:
                p = self._safety_parts
                w = self.model.norm.weight
                self._safety_runner = ProbeRunner(self.model, p.to(w.device, w.dtype), family)
            plan = br.plan
            first = self.model.layers[0].self_attn.attn.layer_name
            seq = md[first].seq_lens
            rows = plan.rows
            ok = rows < seq.numel()
            seen = torch.where(ok, seq[rows.clamp_max(max(seq.numel() - 1, 0))].long().cpu(), -1)
            br.complete = ok & (seen == br.expected)
            logits = torch.full((len(rows),), float("nan"))
            run = br.complete & br.due
            if bool(run.any()):
                idx = run.nonzero().flatten()
                sub = Plan(rows[idx], plan.n[idx], plan.prompt_len[idx], plan.qs[idx],
                           plan.qe[idx], plan.lo[idx], plan.hi[idx])
                try:
                    logits[idx] = self._safety_runner.run(sub, md).float().cpu()
                except Exception as e:  # noqa: BLE001 - fail closed: nan refuses these rows
                    br.error = f"{type(e).__name__}: {e}"
                    logger.warning("safeattn: the vLLM probe raised %s; the %d checked "
                                   "request(s) refuse (fail closed)", br.error, len(idx))
            br.logits = logits

    Wrapper.__name__ = Wrapper.__qualname__ = f"Safeattn{base.__name__}"
    return Wrapper


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

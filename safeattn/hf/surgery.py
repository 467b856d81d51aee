"""Model surgery: the ``[CLS]`` token, its embedding row and the :class:`SafetyHead`."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SafetyHead", "QueryProbe", "ResponseProbe", "add_safety_token", "safety_config",
           "cls_token_id", "CLS_TOKEN"]

CLS_TOKEN = "[CLS]"


class SafetyHead(nn.Linear):
    """``logit = w · h + b`` on the ``[CLS]`` hidden state: ``[..., d_model] -> [..., 1]``.

    ``h`` is the final-norm hidden state, or with ``cls_layer = k`` the output of decoder
    layer ``k`` (0-based) passed through the final norm. ``p = sigmoid(logit)`` = P(malicious).
    """

    def __init__(self, hidden_size: int, cls_layer: int | None = None):
        super().__init__(hidden_size, 1)
        self.cls_layer = cls_layer


class QueryProbe(nn.Module):
    """A second reader of ``p_0``: a linear probe on the last prompt token's hidden state
    ``h`` at hidden-state index ``layer`` (the output of decoder block ``layer - 1``, before
    the final norm), added to the head's logit:

    ``query_logit = head_scale · safety_logit + w · h + b``, ``p_0 = sigmoid(query_logit)``.

    It only scores the query: the prefill of a row whose ``[CLS]`` reads the query alone
    (``safety_mode='sft'``); every decoding-time check keeps the head. Fitted after the head
    (``safeattn train --query-probe-for``, :func:`safeattn.training.fit_query_probe`):
    ``query_logit`` ranks prompts by the sum of the two members' logits, each in standard
    deviations of its benign validation prompts, and on those prompts has the head logit's
    mean and spread. It is no calibrated probability: ``safeattn calibrate`` sets
    ``query_threshold`` on it.
    """

    def __init__(self, hidden_size: int, layer: int):
        super().__init__()
        self.layer = int(layer)
        self.linear = nn.Linear(hidden_size, 1)
        self.head_scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, head_logit: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``head_logit [B]``, ``h [B, D]`` -> ``query_logit [B]`` (fp32)."""
        w = self.linear.weight
        return (self.head_scale.float() * head_logit.float()
                + self.linear(h.to(w.dtype))[:, 0].float())


class ResponseProbe(QueryProbe):
    """A second reader of the decoding-time checks: a linear probe on the mean hidden state,
    at hidden-state index ``layer``, of the last ``window`` response tokens that a check has
    seen (those before the end of its ``[CLS]`` window; fewer early in the response), added
    to the head's logit:

    ``check_logit = head_scale · safety_logit + mean_t(w · h_t) + b``.

    It is linear, so the decoder keeps one number per response token (``w · h_t``,
    :meth:`token_logits`, read from the forward that computes ``h_t`` anyway) and a check
    averages them. A check that has seen no response token, and ``p_0``, keep the head (and
    the query probe). Fitted after the head (``safeattn train --response-probe-for``,
    :func:`safeattn.training.fit_response_probe`) the way :class:`QueryProbe` is; no
    calibrated probability: ``safeattn calibrate`` sets θ on it.
    """

    def __init__(self, hidden_size: int, layer: int, window: int):
        super().__init__(hidden_size, layer)
        self.window = int(window)

    def token_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., D]`` -> ``w · h`` ``[...]`` (fp32, no bias)."""
        w = self.linear.weight
        return (h.to(w.dtype) @ w[0]).float()

    def forward(self, head_logit: torch.Tensor, mean_token_logit: torch.Tensor) -> torch.Tensor:
        """``head_logit [B]``, ``mean_token_logit [B]`` (the window's mean of
        :meth:`token_logits`) -> the check's logit ``[B]`` (fp32)."""
        return (self.head_scale.float() * head_logit.float() + mean_token_logit.float()
                + self.linear.bias.float())


def safety_config(model) -> dict | None:
    """The saved safety config (``model.config.safeattn``), or ``None`` if never added."""
    cfg = getattr(model.config, "safeattn", None)
    return dict(cfg) if cfg else None


def cls_token_id(model=None, tokenizer=None, cls_token: str = CLS_TOKEN) -> int:
    """Id of ``[CLS]`` from the tokenizer (preferred) or the model's safety config.

    Raises ``ValueError`` when neither knows the token.
    """
    if tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids(cls_token)
        if tid is not None and tid != tokenizer.unk_token_id and cls_token in tokenizer.get_vocab():
            return int(tid)
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {cls_token} token; call "
                         "safeattn.add_safety_token(model, tokenizer) first")
    cfg = safety_config(model) if model is not None else None
    if cfg is None or cfg.get("cls_token_id") is None:
        raise ValueError(f"model has no {cls_token} token; call "
                         "safeattn.add_safety_token(model, tokenizer) first")
    return int(cfg["cls_token_id"])


def _base(model):
    return getattr(model, model.base_model_prefix, model)


@torch.no_grad()
def add_safety_token(model, tokenizer, *, cls_token: str = CLS_TOKEN, cls_layer: int | None = None,
                     cls_visible_to_response: bool = False):
    """Add ``[CLS]`` to ``tokenizer`` and ``model`` and attach ``model.safety_head``; idempotent.

    - The tokenizer gets ``cls_token`` as an extra special token.
    - Its input-embedding row is set to the mean of the other rows. The matrix grows only when
      the id falls outside it (``resize_token_embeddings``, which keeps tied LM heads tied;
      an untied head gets a zero row). Logits of all other tokens are unchanged; the
      ``[CLS]`` logit is masked to ``-inf`` by the patched forward and by
      ``generation_config.suppress_tokens``.
    - ``model.safety_head`` is a :class:`SafetyHead` in the model's dtype and device.
    - ``model.config.safeattn`` records ``cls_token``, ``cls_token_id``, ``cls_layer``,
      ``cls_visible_to_response`` (saved with ``save_pretrained``).

    A second call changes nothing (a trained embedding row or head is never re-initialised).
    Returns the model.
    """
    cfg = safety_config(model) or {}
    if cls_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [cls_token]},
                                     replace_extra_special_tokens=False)
    tid = int(tokenizer.convert_tokens_to_ids(cls_token))
    emb = model.get_input_embeddings()
    if cfg.get("cls_token_id") != tid:
        n_old = emb.weight.shape[0]
        if tid >= n_old:
            model.resize_token_embeddings(tid + 1, mean_resizing=False)
            emb = model.get_input_embeddings()
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
                out.weight[n_old:] = 0
        w = emb.weight
        keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        keep[tid] = False
        w[tid] = w[keep].float().mean(0).to(w.dtype)
    if getattr(model, "safety_head", None) is None:
        p = emb.weight
        model.safety_head = SafetyHead(model.config.get_text_config().hidden_size,
                                       cls_layer).to(device=p.device, dtype=p.dtype)
    head = model.safety_head
    cfg.update(cls_token=cls_token, cls_token_id=tid, cls_layer=head.cls_layer,
               cls_visible_to_response=bool(cfg.get("cls_visible_to_response",
                                                    cls_visible_to_response)))
    model.config.safeattn = cfg
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        sup = list(gc.suppress_tokens or [])
        if tid not in sup:
            gc.suppress_tokens = sup + [tid]
    return model

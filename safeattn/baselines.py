"""Baselines: a logistic-regression probe on one frozen layer's last-token hidden state.

:class:`FrozenProbe` is the "no [CLS], no training of the model" baseline (and the tool that
picked ``cls_layer`` candidates in DESIGN.md §1): features are the hidden state of the last
prompt token (the end of the generation prompt) at one layer, standardised, and fed to an
L2-regularised logistic regression fitted by full-batch L-BFGS in float64. The layer and the
L2 strength are chosen by stratified k-fold cross-validated AUROC on the training data only.

:func:`extract_last_token_states` computes those features for any HF causal LM.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from .metrics import auroc

__all__ = ["FrozenProbe", "extract_last_token_states", "stratified_folds"]


@torch.no_grad()
def extract_last_token_states(model, tokenizer, prompts: Sequence[str], layers: Iterable[int],
                              batch_size: int = 16, *, template: str | None = None,
                              system: str | None = None, progress: bool = True,
                              desc: str = "hidden states") -> dict[int, torch.Tensor]:
    """Hidden state of the last prompt token at each of ``layers``: ``{layer: [N, D] float32}``.

    Each prompt is rendered as a generation prompt (:func:`safeattn.data.render_prompt`:
    ``template`` with a ``{prompt}`` slot, else the tokenizer's chat template, else
    ``"User: {prompt}\\nAssistant:"``) and batches are left-padded, so the last column is
    every row's last real token. ``layers`` index ``output_hidden_states``: 0 is the
    embedding output, ``i`` the output of block ``i``, ``num_hidden_layers`` (or -1) the
    final one (after the final norm in HF decoder models); negative indices count from the
    end and are returned under their non-negative index. Rows are batched longest first and
    returned in the input order, on the CPU.

    Only what the features need runs: the decoder stack without the LM head (no logits over
    the vocabulary), and only up to the deepest requested layer unless the final one is asked.
    """
    from tqdm.auto import tqdm

    from .data.generation import encode_prompts

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    n_states = model.config.get_text_config().num_hidden_layers + 1
    want = []
    for layer in layers:
        idx = int(layer) + n_states if int(layer) < 0 else int(layer)
        if not 0 <= idx < n_states:
            raise ValueError(f"layer {layer} out of range for {n_states} hidden states")
        if idx not in want:
            want.append(idx)
    if not want:
        raise ValueError("no layers requested")
    from .hf.surgery import _base

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = {layer: [None] * len(prompts) for layer in want}
    base = _base(model)  # the decoder stack: no LM head, no logits
    full = getattr(base, "layers", None)
    deepest = max(want)
    # hidden state i is the output of block i - 1, except the last, which the stack replaces
    # by its normed output: run one block more than the deepest state needs
    cut = full is not None and deepest + 1 < len(full)
    try:
        if cut:
            base.layers = torch.nn.ModuleList(list(full)[:deepest + 1])
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                      unit="batch"):
            idx = order[s:s + batch_size]
            enc = encode_prompts(tokenizer, [prompts[i] for i in idx], template=template,
                                 system=system, device=device)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            res = base(**enc, position_ids=pos, output_hidden_states=True, use_cache=False)
            hs = res.hidden_states
            expect = deepest + 2 if cut else n_states
            if len(hs) != expect:
                raise RuntimeError(f"model returned {len(hs)} hidden states, expected {expect}")
            for layer in want:
                last = hs[layer][:, -1, :].float().cpu()
                for j, i in enumerate(idx):
                    out[layer][i] = last[j]
    finally:
        if cut:
            base.layers = full
        model.train(was_training)
    return {layer: torch.stack(rows) for layer, rows in out.items()}


def stratified_folds(labels, folds: int = 5, seed: int = 0, groups=None) -> torch.Tensor:
    """Fold index (``0 .. folds-1``) of each sample, every fold with ``~1/folds`` of each class.

    Without ``groups`` each class is shuffled with ``seed`` and dealt round-robin. ``groups``
    (one hashable key per sample: the prompt a rephrasing was made from, the response a check
    reads) puts every group in one fold, so that no fold is scored on near-copies of what it
    was fitted on. A group counts in its samples' majority class (ties: the smaller label);
    each class's groups, shuffled with ``seed``, go largest first to the fold that holds the
    fewest of that class's samples so far."""
    y = torch.as_tensor(labels).reshape(-1).long()
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    if groups is not None:
        return _deal_groups(y, folds, g, list(groups), fold)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).reshape(-1)
        if idx.numel() < folds:
            raise ValueError(f"class {int(c)} has {idx.numel()} samples, fewer than "
                             f"{folds} folds")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        fold[idx] = torch.arange(idx.numel()) % folds
    return fold


def _deal_groups(y, folds: int, g: torch.Generator, keys: list, fold: torch.Tensor):
    if len(keys) != y.numel():
        raise ValueError(f"groups: expected one key per sample ({y.numel()}), got {len(keys)}")
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    by_class: dict[int, list] = {}
    for idx in members.values():
        by_class.setdefault(int(torch.mode(y[idx]).values), []).append(idx)
    for c in sorted(by_class):
        gs = by_class[c]
        if len(gs) < folds:
            raise ValueError(f"class {c} has {len(gs)} groups, fewer than {folds} folds")
        order = sorted(torch.randperm(len(gs), generator=g).tolist(), key=lambda j: -len(gs[j]))
        load = [0] * folds
        for j in order:
            f = load.index(min(load))
            fold[gs[j]] = f
            load[f] += len(gs[j])
    return fold


def _standardize_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    return mean, std


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int,
                init: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise mean BCE + l2/2 ||w||^2 (bias unpenalised) on standardised float64 ``x``.
    Returns ``[D + 1]`` (weights then bias)."""
    d = x.shape[1]
    theta = (init.clone() if init is not None else torch.zeros(d + 1, dtype=x.dtype))
    theta.requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6,
                            tolerance_change=1e-9, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ theta[:d] + theta[d]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) \
            + 0.5 * l2 * theta[:d].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return theta.detach()


class FrozenProbe:
    """Logistic regression on one frozen layer's features, layer and L2 chosen by CV AUROC.

    After :meth:`fit`: ``layer``, ``l2``, ``cv_auroc`` (mean over folds of the chosen pair),
    ``cv_table`` (``{(layer, l2): mean AUROC}``), ``weight [D]``, ``bias`` and the
    standardisation ``mean [D]``, ``std [D]``; all refitted on the whole training data.
    """

    def __init__(self):
        self.layer: int | None = None
        self.l2: float | None = None
        self.cv_auroc: float | None = None
        self.cv_table: dict[tuple[int, float], float] = {}
        self.weight: torch.Tensor | None = None
        self.bias: float | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def fit(self, features_by_layer: Mapping[int, torch.Tensor], labels,
            layers: Sequence[int] | None = None,
            l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0), folds: int = 5,
            seed: int = 0, max_iter: int = 100, groups=None) -> "FrozenProbe":
        """Choose ``(layer, l2)`` by stratified ``folds``-fold CV AUROC, then refit on all.

        ``features_by_layer`` maps a layer to ``[N, D]`` features (e.g. from
        :func:`extract_last_token_states`); ``labels [N]`` are 0/1; ``layers`` restricts the
        search (default: all keys). ``groups``: one key per sample; samples that share one
        are near-copies (rephrasings of one prompt, checks of one response), and the folds
        keep them together (:func:`stratified_folds`). Ties go to the stronger L2, then the
        earlier layer in ``layers`` order. Standardisation statistics come from each
        training fold only.
        """
        y = torch.as_tensor(labels).reshape(-1).to(torch.float64)
        if not torch.isin(y, torch.tensor([0.0, 1.0], dtype=y.dtype)).all():
            raise ValueError("labels must be 0 or 1")
        layers = list(features_by_layer) if layers is None else list(layers)
        if not layers:
            raise ValueError("no layers to search")
        grid = sorted({float(v) for v in l2_grid}, reverse=True)  # strong first: warm starts
        if not grid or min(grid) < 0:
            raise ValueError(f"l2_grid must be non-empty and non-negative, got {l2_grid}")
        fold = stratified_folds(y.long(), folds, seed, groups)
        feats = {}
        for layer in layers:
            if layer not in features_by_layer:
                raise KeyError(f"no features for layer {layer}")
            x = torch.as_tensor(features_by_layer[layer]).to(torch.float64)
            if x.ndim != 2 or x.shape[0] != y.numel():
                raise ValueError(f"features of layer {layer} have shape {tuple(x.shape)}, "
                                 f"expected [{y.numel()}, D]")
            if not torch.isfinite(x).all():
                raise ValueError(f"features of layer {layer} are not all finite")
            feats[layer] = x
        table: dict[tuple[int, float], float] = {}
        for layer in layers:
            x = feats[layer]
            sums = dict.fromkeys(grid, 0.0)
            for f in range(folds):
                tr, va = fold != f, fold == f
                mean, std = _standardize_stats(x[tr])
                xtr, xva = (x[tr] - mean) / std, (x[va] - mean) / std
                theta = None
                for l2 in grid:
                    theta = _fit_logreg(xtr, y[tr], l2, max_iter, init=theta)
                    d = x.shape[1]
                    sums[l2] += auroc(xva @ theta[:d] + theta[d], y[va])
            for l2 in grid:
                table[(layer, l2)] = sums[l2] / folds
        best = None
        for layer in layers:           # earlier layer wins ties
            for l2 in grid:            # stronger L2 wins ties
                score = table[(layer, l2)]
                if best is None or score > best[0] + 1e-12:
                    best = (score, layer, l2)
        self.cv_auroc, self.layer, self.l2 = best
        self.cv_table = table
        x = feats[self.layer]
        self.mean, self.std = _standardize_stats(x)
        theta = _fit_logreg((x - self.mean) / self.std, y, self.l2, max_iter)
        self.weight, self.bias = theta[:-1], float(theta[-1])
        return self

    def _features(self, features) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("FrozenProbe is not fitted")
        if isinstance(features, Mapping):
            if self.layer not in features:
                raise KeyError(f"features have no layer {self.layer} (the probe's layer)")
            features = features[self.layer]
        x = torch.as_tensor(features).detach().cpu().to(torch.float64)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.weight.numel():
            raise ValueError(f"features of shape {tuple(x.shape)}, expected [N, "
                             f"{self.weight.numel()}] (layer {self.layer})")
        return x

    def decision_function(self, features) -> torch.Tensor:
        """Logits ``[N]`` (float32). ``features``: ``[N, D]`` of the probe's layer, or a
        ``{layer: features}`` dict."""
        x = self._features(features)
        return (((x - self.mean) / self.std) @ self.weight + self.bias).float()

    def predict_proba(self, features) -> torch.Tensor:
        """P(malicious) ``[N]`` (float32)."""
        return torch.sigmoid(self.decision_function(features))

    def predict(self, features, threshold: float = 0.5) -> torch.Tensor:
        """0/1 predictions ``[N]`` (long)."""
        return (self.predict_proba(features) >= threshold).long()

    def state_dict(self) -> dict:
        return {"layer": self.layer, "l2": self.l2, "cv_auroc": self.cv_auroc,
                "weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std,
                "cv_table": [(k[0], k[1], v) for k, v in self.cv_table.items()]}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "FrozenProbe":
        p = cls()
        for k in ("layer", "l2", "cv_auroc", "weight", "bias", "mean", "std"):
            setattr(p, k, state[k])
        p.cv_table = {(a, b): v for a, b, v in state.get("cv_table", [])}
        return p

    def __repr__(self) -> str:
        if self.weight is None:
            return "FrozenProbe(unfitted)"
        return (f"FrozenProbe(layer={self.layer}, l2={self.l2:g}, "
                f"cv_auroc={self.cv_auroc:.4f}, dim={self.weight.numel()})")

"""Tip-Adapter (Zhang et al., ECCV 2022): zero-shot CLIP plus a training-free key-value cache.

    logits = logit_scale * cos(x, prototypes) + alpha * exp(-beta * (1 - x . keys^T)) @ values

Keys are the training images' features (here the L2-normalised mean of their cached augmented
views, as the paper averages augmented epochs; the clean view when there are none), values their
one-hot labels. alpha weighs the cache against the zero-shot prior, beta sharpens the affinity.
Both are searched on the validation split by balanced accuracy, on log-spaced grids wider than
the paper's few-shot ones (a cache of the whole training set is far larger than 16 shots).

One deliberate extension, `balance_cache` (on by default): the paper's caches hold K shots of
every class, but a HAM10000 training set is two-thirds nv, and since all dermoscopy images are
fairly similar to each other, the summed affinities then mostly count class sizes and the search
drives alpha to zero. With `balance_cache`, class c's values are scaled by (N / C) / n_c, so every
class carries the same total vote; on a balanced cache this is exactly the paper's formula.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _torch as T
from ._registry import register_head
from .base import FitData, Head, balanced_accuracy, l2_normalize, softmax
from .zeroshot import zeroshot_logits, zeroshot_prototypes

#: alpha and beta used without a validation split (the paper's ImageNet values)
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 5.5
#: rows of queries per affinity block (block x n_keys floats in memory at once)
CHUNK = 2048


def cache_keys(X: np.ndarray, views: np.ndarray) -> np.ndarray:
    """[N, D] keys: the normalised mean of each image's normalised augmented views, or the
    normalised clean feature when K=0."""
    if views.shape[1] == 0:
        return l2_normalize(X)
    return l2_normalize(l2_normalize(views).mean(axis=1))


def affinity_logits(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, betas: list[float]
) -> list[torch.Tensor]:
    """For each beta: exp(-beta (1 - q keys^T)) @ values, [Nq, C]. q must be normalised. The
    affinity matrix is computed once per block of queries and reused for every beta."""
    out: list[list[torch.Tensor]] = [[] for _ in betas]
    for start in range(0, q.shape[0], CHUNK):
        a = q[start:start + CHUNK] @ keys.T - 1.0
        for i, beta in enumerate(betas):
            out[i].append(torch.exp(beta * a) @ values)
    return [torch.cat(parts) for parts in out]


def search_alpha_beta(
    zs_val: np.ndarray, cache_val: list[np.ndarray], y_val: np.ndarray,
    alphas: list[float], betas: list[float],
) -> tuple[float, float, float]:
    """Grid search of (alpha, beta) by validation balanced accuracy; ties keep the first
    (smallest beta, then smallest alpha). Returns (alpha, beta, score)."""
    best = (-1.0, DEFAULT_ALPHA, DEFAULT_BETA)
    for beta, cache in zip(betas, cache_val, strict=True):
        for alpha in alphas:
            score = balanced_accuracy(y_val, (zs_val + alpha * cache).argmax(axis=1))
            if score > best[0]:
                best = (score, float(alpha), float(beta))
    return best[1], best[2], best[0]


def cache_values(key_labels: np.ndarray, n_classes: int, balance: bool,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """[N, C] cache values of keys labelled `key_labels`: one-hot labels (the paper's), or
    with `balance` (the heads' `balance_cache`) scaled so that every class present has the
    same total vote, N / (classes present)."""
    labels = torch.as_tensor(key_labels, device=device)
    values = torch.nn.functional.one_hot(labels, n_classes).float()
    if balance:
        counts = values.sum(dim=0)
        present = counts > 0
        scale = torch.zeros_like(counts)
        scale[present] = (labels.numel() / present.sum()) / counts[present]
        values = values * scale
    return values


def _grid(lo: float, hi: float, n: int) -> list[float]:
    return [float(v) for v in np.geomspace(lo, hi, int(n))]


@register_head("tip-adapter")
class TipAdapterHead(Head):
    """Training-free Tip-Adapter.

    alpha, beta: fixed values; None searches them on the validation split over `n_alpha`
    log-spaced values in `alpha_range` x `n_beta` in `beta_range`, falling back to alpha=1,
    beta=5.5 (the paper's) without validation data.
    balance_cache: give every class the same total vote in the cache (see module doc).
    """

    needs_text = True
    _fitted_arrays = ("weights_", "keys_", "key_labels_")
    _fitted_scalars = ("alpha_", "beta_", "logit_scale_", "val_score_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"alpha": ">=0", "beta": ">0", "alpha_range": ">0", "n_alpha": ">=1",
                         "beta_range": ">0", "n_beta": ">=1"}

    def __init__(
        self,
        alpha: float | None = None,
        beta: float | None = None,
        alpha_range: tuple[float, float] = (1e-3, 1e2),
        n_alpha: int = 16,
        beta_range: tuple[float, float] = (0.5, 100.0),
        n_beta: int = 12,
        balance_cache: bool = True,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.alpha = alpha
        self.beta = beta
        self.alpha_range = alpha_range
        self.n_alpha = n_alpha
        self.beta_range = beta_range
        self.n_beta = n_beta
        self.balance_cache = balance_cache
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    # -- shared with tip-adapter-f

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def _values(self, dev: torch.device) -> torch.Tensor:
        return cache_values(self.key_labels_, self.n_classes_, self.balance_cache, dev)

    def _choose_alpha_beta(self, data: FitData) -> None:
        """Set alpha_/beta_ from the parameters, the validation search, or the defaults."""
        alphas = [self.alpha] if self.alpha is not None else _grid(*self.alpha_range, self.n_alpha)
        betas = [self.beta] if self.beta is not None else _grid(*self.beta_range, self.n_beta)
        self.val_score_ = None
        if not data.has_val or (len(alphas) == 1 and len(betas) == 1):
            self.alpha_ = float(DEFAULT_ALPHA if self.alpha is None else self.alpha)
            self.beta_ = float(DEFAULT_BETA if self.beta is None else self.beta)
            return
        assert data.X_val is not None and data.y_val is not None
        dev = self._device()
        q = T.to_tensor(l2_normalize(data.X_val), dev)
        with torch.no_grad():
            cache = affinity_logits(q, T.to_tensor(self.keys_, dev), self._values(dev), betas)
        zs = zeroshot_logits(data.X_val, self.weights_, self.logit_scale_)
        self.alpha_, self.beta_, self.val_score_ = search_alpha_beta(
            zs, [c.cpu().numpy() for c in cache], data.y_val, alphas, betas
        )

    def _fit(self, data: FitData) -> None:
        assert data.text is not None
        self.weights_ = zeroshot_prototypes(data.text)
        self.logit_scale_ = float(data.logit_scale)
        self.keys_ = cache_keys(data.X, data.views)
        self.key_labels_ = data.y.copy()
        self._choose_alpha_beta(data)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        dev = self._device()
        with torch.no_grad():
            (cache,) = affinity_logits(
                T.to_tensor(l2_normalize(X), dev), T.to_tensor(self.keys_, dev),
                self._values(dev), [self.beta_],
            )
        zs = zeroshot_logits(X, self.weights_, self.logit_scale_)
        return softmax(zs + np.float32(self.alpha_) * cache.cpu().numpy())

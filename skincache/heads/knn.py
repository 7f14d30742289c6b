"""k-nearest-neighbour classification by cosine similarity (faiss `IndexFlatIP`).

Besides a prediction, a kNN head can say *why*: `kneighbors` returns the most similar training
images, which the CLI shows next to a prediction (the caller maps row indices to image ids and
labels). Exact search is fast enough here: 10k x 512 keys is 20 MB and one BLAS call per batch.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from skincache.errors import UsageError

from ._registry import register_head
from .base import FitData, Head, balanced_class_weights, l2_normalize

WEIGHTS = ("similarity", "uniform")


@register_head("knn")
class KNNHead(Head):
    """Vote of the k most similar training keys.

    k: neighbours per query (clamped to the number of keys).
    weights: "uniform" (one vote each) or "similarity": exp(sim / temperature) when
    `temperature` is set (the DINO / InstDisc weighting; 0.07 by default), or the cosine
    similarity itself (negatives clipped to 0) when temperature is None.
    use_views: also index every cached augmented view as an extra key carrying its image's
    label (more keys, slower search; neighbours may then repeat an image).
    class_weight: None, or "balanced" to scale class c's votes by n_keys / (C * n_keys_c), so
    that a class with two-thirds of the keys (nv) does not win by sheer density.
    """

    _fitted_arrays = ("keys_", "key_labels_", "key_rows_")

    def __init__(
        self,
        k: int = 20,
        weights: str = "similarity",
        temperature: float | None = 0.07,
        use_views: bool = False,
        class_weight: str | None = None,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.use_views = use_views
        self.class_weight = class_weight
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _fit(self, data: FitData) -> None:
        if self.weights not in WEIGHTS:
            raise UsageError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.k < 1:
            raise UsageError(f"k must be >= 1, got {self.k}")
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        n, k_views, d = data.views.shape
        keys = [l2_normalize(data.X)]
        rows = [np.arange(n)]
        if self.use_views and k_views:
            keys.append(l2_normalize(data.views.reshape(n * k_views, d)))
            rows.append(np.repeat(np.arange(n), k_views))
        self.keys_ = np.ascontiguousarray(np.concatenate(keys), dtype=np.float32)
        self.key_rows_ = np.concatenate(rows).astype(np.int64)
        self.key_labels_ = data.y[self.key_rows_]
        self._build_index()

    def _build_index(self) -> None:
        self.index_ = faiss.IndexFlatIP(self.keys_.shape[1])
        self.index_.add(self.keys_)

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super()._restore(arrays, scalars)
        self._build_index()

    def _search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.index_.ntotal)
        sims, keys = self.index_.search(np.ascontiguousarray(l2_normalize(X)), k)
        return sims, keys

    def kneighbors(self, X: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities [N, k] float32, training row indices [N, k] int64), most similar
        first. Indices are rows of the `X` given to `fit`."""
        X = self._check_X(X)
        sims, keys = self._search(X, self.k if k is None else k)
        return sims, self.key_rows_[keys]

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        sims, keys = self._search(X, self.k)
        sims = sims.astype(np.float64)
        if self.weights == "uniform":
            w = np.ones_like(sims)
        elif self.temperature:
            w = np.exp((sims - sims[:, :1]) / self.temperature)  # row max first: stable
        else:
            w = np.clip(sims, 0.0, None)
            w[w.sum(axis=1) == 0] = 1.0  # all neighbours dissimilar: fall back to counting
        n, c = len(X), self.n_classes_
        cell = (np.arange(n)[:, None] * c + self.key_labels_[keys]).ravel()
        votes = np.bincount(cell, weights=w.ravel(), minlength=n * c).reshape(n, c)
        if self.class_weight == "balanced":
            votes *= balanced_class_weights(self.key_labels_, c)
        return votes / votes.sum(axis=1, keepdims=True)

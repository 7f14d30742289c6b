"""k-nearest-neighbour classification by cosine similarity (faiss `IndexFlatIP`).

Besides a prediction, a kNN head can say *why*: `kneighbors` returns the most similar training
images, which the CLI shows next to a prediction (the caller maps row indices to image ids and
labels). Exact search (`IndexFlatIP`) is fast enough for HAM10000: 10k x 512 keys is 20 MB and
one BLAS call per batch. Above `ivf_threshold` keys (`index="auto"`) the head uses an inverted
file (`IndexIVFFlat`, sqrt(N) k-means cells trained on a seeded sample, `nprobe` cells searched
per query): approximate, with recall against exact search measured in `benchmarks/scale.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from skincache._io import atomic_write, read_regular
from skincache.errors import SkincacheError, UsageError

from ._registry import register_head
from .base import FitData, Head, balanced_class_weights, l2_normalize

WEIGHTS = ("similarity", "uniform")
INDEXES = ("auto", "flat", "ivf")
#: keys above which index="auto" switches from exact search to IVF
IVF_THRESHOLD = 200_000


def build_ip_index(keys: np.ndarray, kind: str = "auto", *, threshold: int = IVF_THRESHOLD,
                   nprobe: int = 32, nlist: int | None = None, seed: int = 0) -> faiss.Index:
    """An inner-product index over unit-norm float32 `keys`: exact (`IndexFlatIP`) for "flat"
    or "auto" up to `threshold` keys, else IVF with `nlist` cells (default sqrt(N)), k-means
    trained on a seeded sample of 64 keys per cell, `nprobe` cells searched per query."""
    if kind not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {kind!r}")
    n, d = keys.shape
    if kind == "flat" or (kind == "auto" and n <= threshold):
        index = faiss.IndexFlatIP(d)
        index.add(keys)
        return index
    cells = int(nlist) if nlist else int(round(np.sqrt(n)))
    cells = max(1, min(cells, n))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 64
    index.cp.min_points_per_centroid = 1
    sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * cells), replace=False)
    index.train(np.ascontiguousarray(keys[np.sort(sample)]))
    index.add(keys)
    index.nprobe = min(int(nprobe), cells)
    return index


def unit_rows(X: np.ndarray, rows: int = 65536) -> np.ndarray:
    """L2-normalised float32 copy of X (any float dtype), converted block by block."""
    out = np.empty(X.shape, dtype=np.float32)
    for i in range(0, len(X), rows):
        out[i:i + rows] = l2_normalize(X[i:i + rows])
    return out


def search_ip(index: faiss.Index, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities [N, k], key indices [N, k]) of the k keys most similar to the rows of X
    (normalised here), k clamped to the keys. An IVF index that finds fewer than k keys pads
    with its best one, so every row has k valid indices."""
    k = min(int(k), index.ntotal)
    sims, keys = index.search(np.ascontiguousarray(l2_normalize(X)), k)
    if not isinstance(index, faiss.IndexFlat) and (keys < 0).any():
        miss = keys < 0
        keys = np.where(miss, keys[:, :1], keys)
        sims = np.where(miss, sims[:, :1], sims)
    return sims, keys


# ------------------------------------------------------------- a run's saved neighbour index

#: the neighbour index of a cache's train split, beside a saved head: `<prefix><key>.faiss`
NEIGHBOR_INDEX_PREFIX = "neighbors-"
MAX_INDEX_BYTES = 16 << 30


def neighbor_index_path(directory: str | Path, cache_key: str) -> Path:
    """Where the neighbour index of the cache with `cache_key` lives in a head folder: keyed
    by the cache, because `predict --cache` may search another cache encoded the same way."""
    return Path(directory) / f"{NEIGHBOR_INDEX_PREFIX}{cache_key[:32]}.faiss"


def build_neighbor_index(train_X: np.ndarray) -> faiss.Index:
    """The inner-product index over the normalised train features, exact up to
    `IVF_THRESHOLD` keys, as a default `KNNHead` builds it: row i is training row i."""
    return build_ip_index(unit_rows(train_X))


def write_neighbor_index(directory: str | Path, cache_key: str, index: faiss.Index) -> Path:
    """Write `index` atomically in faiss's own format (never a pickle), so `predict` searches
    it instead of indexing the training set again on every call. The temp name holds the
    pid: two first `predict`s of an older run may both write it."""
    path = neighbor_index_path(directory, cache_key)
    blob = faiss.serialize_index(index)
    return atomic_write(path, lambda f: f.write(blob.tobytes()),
                        tmp=path.with_name(f"{path.name}.{os.getpid()}.tmp"))


def read_neighbor_index(directory: str | Path, cache_key: str, n: int, d: int
                        ) -> faiss.Index | None:
    """The saved index of cache `cache_key` if it is there and holds `n` keys of dimension
    `d` (the train split it was built from); None otherwise (an older run, another cache, a
    damaged file), and the caller builds it."""
    path = neighbor_index_path(directory, cache_key)
    if not path.is_file():
        return None
    try:
        blob = read_regular(path, max_bytes=MAX_INDEX_BYTES, what="neighbour index")
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    except (SkincacheError, RuntimeError):
        return None
    return index if (index.ntotal, index.d) == (n, d) else None


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
    index: "auto" (exact up to `ivf_threshold` keys, IVF above), "flat" (always exact) or
    "ivf" (always approximate); nprobe: IVF cells searched per query (more: higher recall,
    slower).
    """

    _fitted_arrays = ("keys_", "key_labels_", "key_rows_")
    _streams = True

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"k": ">=1", "temperature": ">0", "ivf_threshold": ">=1",
                         "nprobe": ">=1"}

    def __init__(
        self,
        k: int = 20,
        weights: str = "similarity",
        temperature: float | None = 0.07,
        use_views: bool = False,
        class_weight: str | None = None,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
        index: str = "auto",
        ivf_threshold: int = IVF_THRESHOLD,
        nprobe: int = 32,
    ) -> None:
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.use_views = use_views
        self.class_weight = class_weight
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate
        self.index = index
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe

    def _fit(self, data: FitData) -> None:
        if self.weights not in WEIGHTS:
            raise UsageError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.k < 1:
            raise UsageError(f"k must be >= 1, got {self.k}")
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        n, k_views, d = data.views.shape
        if self.index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {self.index!r}")
        if self.use_views and k_views:  # keys: clean views, then every augmented view
            self.keys_ = np.empty((n * (1 + k_views), d), dtype=np.float32)
            self.keys_[:n] = unit_rows(data.X)
            self.keys_[n:] = unit_rows(data.views.reshape(n * k_views, d))
            rows = [np.arange(n), np.repeat(np.arange(n), k_views)]
        else:
            self.keys_ = unit_rows(data.X)
            rows = [np.arange(n)]
        self.key_rows_ = np.concatenate(rows).astype(np.int64)
        self.key_labels_ = data.y[self.key_rows_]
        self._build_index()

    def _build_index(self) -> None:
        self.index_ = build_ip_index(self.keys_, self.index, threshold=self.ivf_threshold,
                                     nprobe=self.nprobe)
        self.approximate_ = not isinstance(self.index_, faiss.IndexFlat)

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super()._restore(arrays, scalars)
        self._build_index()

    def _search(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_ip(self.index_, X, k)

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

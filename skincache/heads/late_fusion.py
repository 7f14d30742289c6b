"""Late fusion of encoders: one head per encoder, their probabilities averaged with weights
chosen on val.

`LateFusion` reads the same joined features an early-fusion head reads (a `JoinedCache`'s
blocks, side by side, `dims` wide each): part i sees only block i, so it is exactly the head
fit on that cache alone. Once each part is fit (each choosing its own hyper-parameters, logit
adjustment and temperature on val, as it would alone), the mixture weights are picked on
val from a simplex grid (steps of `1/grid`) by balanced accuracy, ties broken by the lower val
log-loss (so a useless part that does not change any argmax still loses its weight). Without
a val split the weights are equal, and `weights_chosen_on_` says so.

It has the methods runs and benchmarks call on a head (`fit` with the uniform signature,
`predict_proba`, `predict_proba_pair`, `save`) but is no registered head: it wraps one.
Saved as `fusion.json` + one `part<i>/` head folder each (`load_late_fusion`); never pickled.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text, read_json_file
from ..errors import InputFileError, UsageError
from ._math import balanced_accuracy
from ._protocols import trains_on_val
from .base import Head, load_head

FUSION_FILE = "fusion.json"
FUSION_FORMAT = "skincache.late-fusion"


def simplex_grid(m: int, steps: int) -> np.ndarray:
    """Every weight vector of `m` non-negative multiples of 1/steps summing to 1 [G, m]."""
    if m < 1 or steps < 1:
        raise ValueError(f"simplex_grid needs m >= 1 and steps >= 1, got {m}, {steps}")
    rows = [np.diff([0, *cut, steps]) for cut in
            itertools.combinations_with_replacement(range(steps + 1), m - 1)]
    return np.array(rows, dtype=np.float64) / steps


def choose_weights(probas: Sequence[np.ndarray], y: np.ndarray, steps: int = 10
                   ) -> tuple[np.ndarray, float]:
    """(weights, val balanced accuracy) of the grid point whose mixture of `probas` scores
    best on labels `y`; ties go to the lower log-loss, then to the earlier grid point."""
    P = np.stack([np.asarray(p, np.float64) for p in probas])  # [m, N, C]
    best: tuple[float, float] | None = None
    pick = np.full(len(probas), 1.0 / len(probas))
    rows = np.arange(len(y))
    for w in simplex_grid(len(probas), steps):
        mix = np.tensordot(w, P, axes=1)
        ba = float(balanced_accuracy(y, mix.argmax(axis=1)))
        nll = float(-np.log(np.clip(mix[rows, y], 1e-12, None)).mean())
        score = (round(ba, 12), -nll)
        if best is None or score > best:
            best, pick = score, w
    assert best is not None
    return pick, best[0]


class LateFusion:
    """`heads[i]` fit on block i of the joined features (`dims[i]` wide); probabilities mixed
    with `weights_` (module docstring). `grid`: the simplex grid's steps per unit."""

    def __init__(self, heads: Sequence[Head], dims: Sequence[int], grid: int = 10):
        self.heads = list(heads)
        self.dims = [int(d) for d in dims]
        self.grid = grid

    # -- what runs read from a head
    @property
    def name(self) -> str:
        return self.heads[0].name

    def get_params(self) -> dict[str, Any]:
        """The parts' head parameters (all parts share them)."""
        return self.heads[0].get_params()

    #: the post-hoc steps are each part's own (part<i>/head.json): none on the mixture
    logit_adjust_ = 0.0
    temperature_ = 1.0

    @property
    def trains_on_val(self) -> bool:
        return any(trains_on_val(h) for h in self.heads)

    @property
    def n_classes_(self) -> int:
        return int(self.heads[0].n_classes_)

    def _blocks(self, X: np.ndarray) -> list[np.ndarray]:
        X = np.asarray(X)
        if X.shape[-1] != sum(self.dims):
            raise ValueError(f"X has {X.shape[-1]} features, the late fusion was fit on "
                             f"{' + '.join(map(str, self.dims))}")
        edges = np.cumsum([0, *self.dims])
        return [X[..., a:b] for a, b in itertools.pairwise(edges)]

    # -- fitting
    def fit(self, X: np.ndarray, y: np.ndarray, *, views: np.ndarray | None = None,
            X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
            text: np.ndarray | None = None, logit_scale: float | None = None,
            n_classes: int | None = None, concepts: Any = None, meta: Any = None,
            meta_val: Any = None) -> LateFusion:
        """Fit each part on its block (the uniform `Head.fit` arguments, sliced; the
        metadata, the same for every block, passed whole), then choose the weights on val.
        Concept embeddings live in one encoder's text space: a concept head per cache is not
        built, and `concepts` is otherwise unused (a fused cache has none)."""
        if any(getattr(h, "needs_concepts", False) for h in self.heads):
            raise UsageError("late fusion of concept-bottleneck heads is not built yet; fit "
                             "cbm on one cache")
        if len(self.heads) != len(self.dims) or len(self.heads) < 2:
            raise ValueError(f"late fusion needs one head per block (>= 2), got "
                             f"{len(self.heads)} heads for {len(self.dims)} blocks")
        n = len(self.dims)
        none = [None] * n
        parts = zip(self.heads, self._blocks(X),
                    self._blocks(views) if views is not None else none,
                    self._blocks(X_val) if X_val is not None else none,
                    self._blocks(text) if text is not None else none, strict=True)
        for head, x, v, xv, t in parts:
            head.fit(x, y, views=v, X_val=xv, y_val=y_val, text=t, logit_scale=logit_scale,
                     n_classes=n_classes, meta=meta, meta_val=meta_val)
        if X_val is not None and y_val is not None and len(y_val):
            val = [h.predict_proba(b, *self._meta(meta_val))
                   for h, b in zip(self.heads, self._blocks(X_val), strict=True)]
            self.weights_, self.val_score_ = choose_weights(val, np.asarray(y_val), self.grid)
            self.part_val_scores_ = [float(balanced_accuracy(y_val, p.argmax(axis=1)))
                                     for p in val]
            self.weights_chosen_on_ = "val"
        else:
            self.weights_ = np.full(n, 1.0 / n)
            self.val_score_, self.part_val_scores_ = None, [None] * n
            self.weights_chosen_on_ = "none (no val split): equal weights"
        return self

    # -- prediction
    def _mix(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.tensordot(np.asarray(self.weights_, np.float64),
                            np.stack([np.asarray(p, np.float64) for p in parts]), axes=1)

    def metadata_fields(self) -> tuple[str, ...]:
        """The metadata fields the parts predict with (every part is the same head)."""
        return self.heads[0].metadata_fields() if self.heads else ()

    def _meta(self, meta: Any) -> tuple:
        """`meta` as the positional argument of a part's predict, only for metadata parts."""
        return (meta,) if self.metadata_fields() else ()

    def predict_proba(self, X: np.ndarray, meta: Any = None) -> np.ndarray:
        return self._mix([h.predict_proba(b, *self._meta(meta))
                          for h, b in zip(self.heads, self._blocks(X), strict=True)])

    def predict(self, X: np.ndarray, meta: Any = None) -> np.ndarray:
        return self.predict_proba(X, meta).argmax(axis=1).astype(np.int64)

    def predict_proba_pair(self, X: np.ndarray, views: np.ndarray | None = None,
                           meta: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated, uncalibrated) mixtures of the parts' `predict_proba_pair`."""
        vb = self._blocks(views) if views is not None else [None] * len(self.heads)
        pairs = [h.predict_proba_pair(b, v, *self._meta(meta)) for h, b, v in
                 zip(self.heads, self._blocks(X), vb, strict=True)]
        return self._mix([p[0] for p in pairs]), self._mix([p[1] for p in pairs])

    def summary(self) -> dict[str, Any]:
        """What run.json records: weights, how they were chosen, val scores."""
        return {"weights": [float(w) for w in self.weights_], "dims": self.dims,
                "chosen_on": self.weights_chosen_on_, "grid_step": 1.0 / self.grid,
                "val_balanced_accuracy": self.val_score_,
                "part_val_balanced_accuracy": self.part_val_scores_}

    # -- persistence
    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for i, h in enumerate(self.heads):
            h.save(out / f"part{i}")
        atomic_write_text(out / FUSION_FILE, json.dumps(
            {"format": FUSION_FORMAT, "format_version": 1, "grid": self.grid,
             **self.summary()}, indent=2) + "\n")
        return out


def is_late_fusion(directory: str | Path) -> bool:
    return (Path(directory) / FUSION_FILE).is_file()


def load_late_fusion(directory: str | Path) -> LateFusion:
    """Rebuild a saved `LateFusion` (each part with `load_head`); a damaged fusion.json is
    one InputFileError line naming it."""
    d = Path(directory)
    path = d / FUSION_FILE
    cfg = read_json_file(path, max_bytes=1 << 20, what="late-fusion record")
    ok = (isinstance(cfg, dict) and cfg.get("format") == FUSION_FORMAT
          and isinstance(cfg.get("dims"), list) and isinstance(cfg.get("weights"), list)
          and len(cfg["dims"]) == len(cfg["weights"]) >= 2
          and all(isinstance(x, int) and x > 0 for x in cfg["dims"])
          and all(isinstance(w, int | float) and 0 <= w <= 1 for w in cfg["weights"])
          and isinstance(cfg.get("grid", 10), int))
    if not ok:
        raise InputFileError(f"{path}: not a late-fusion record (format, dims, weights); the "
                             "run folder was edited or damaged (fit the run again)")
    heads = [load_head(d / f"part{i}") for i in range(len(cfg["dims"]))]
    for i, (h, dim) in enumerate(zip(heads, cfg["dims"], strict=True)):
        if int(h.n_features_in_) != dim:
            raise InputFileError(f"{d / f'part{i}'}: a head of {h.n_features_in_} features, "
                                 f"{path} says {dim}; fit the run again")
    fused = LateFusion(heads, cfg["dims"], cfg.get("grid", 10))
    fused.weights_ = np.asarray(cfg["weights"], np.float64)
    fused.weights_chosen_on_ = str(cfg.get("chosen_on", ""))
    fused.val_score_ = cfg.get("val_balanced_accuracy")
    fused.part_val_scores_ = cfg.get("part_val_balanced_accuracy") or [None] * len(heads)
    return fused

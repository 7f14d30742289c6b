"""Metrics for imbalanced multi-class skin-lesion classification, with bootstrap intervals.

Why these numbers, in this order:

- **Balanced accuracy** (mean per-class recall) leads. HAM10000 is ~67% `nv`, so plain accuracy
  rewards a model that calls everything a nevus; balanced accuracy is also the official ISIC 2018
  Task 3 metric. Classes absent from `y_true` have no recall and are left out of the mean (as
  scikit-learn does); the report says so in `notes`.
- **Accuracy**, **macro-F1** (over the classes present in `y_true` or in the predictions,
  scikit-learn's default label set; undefined precision/recall count as 0).
- **AUROC**: one-vs-rest, macro over classes. A class needs both positives and negatives for its
  AUROC to exist; classes without them are excluded (listed in `auroc_excluded` and `notes`)
  instead of raising or returning NaN as `roc_auc_score(multi_class="ovr")` does. `None` when
  no class qualifies.
- **ECE** (expected calibration error): predictions are binned by their *confidence* (the max
  probability) into 15 equal-width bins on [0, 1], right-inclusive ``(k/15, (k+1)/15]`` with 0 in
  the first bin; ECE = sum over bins of (bin size / n) * |accuracy in bin - mean confidence in
  bin|, as in Guo et al. 2017 "On Calibration of Modern Neural Networks". The per-bin numbers
  are kept in the report so a reliability diagram can be drawn from the JSON alone.
- **Log loss** over all classes (probabilities renormalised to sum to 1).

The metrics are a registry (`Metric`, `register`, `metrics()`; see "registry" below): the
report, the intervals, the headline, the CLI tables and `bench-heads` iterate it, so a metric is
added in one place. Balanced accuracy has one definition, `balanced_accuracy_from_confusion`;
`balanced_accuracy` (one prediction set) and every bootstrap resample go through it, and the
heads re-export it for their selection on val.

Confidence intervals: percentile bootstrap over images (resample n of n with replacement,
`n_bootstrap` times, seeded). All the CI metrics are computed on the *same* resamples. The
bootstrap is vectorised rather than calling scikit-learn per resample: a resample's confusion
matrix is one `np.bincount` of ``true * C + pred`` codes, and its AUROC is the weighted
Mann-Whitney statistic computed from cumulative counts over score-sorted negatives (ties count
1/2, exactly as `roc_auc_score`), so cost is O(n_bootstrap * n * C) with no sorting per resample.
Point estimates use scikit-learn's own functions (balanced accuracy: ours, equal to
scikit-learn's); tests check the vectorised resample values against scikit-learn on the same
resamples.

Everything returned is plain Python (floats, ints, lists, dicts, None) so `json.dumps(report,
allow_nan=False)` works; undefined values are `None`, never NaN.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from skincache._io import atomic_write_text

__all__ = [
    "ECE_BINS",
    "PRIMARY",
    "Metric",
    "Resamples",
    "balanced_accuracy",
    "balanced_accuracy_from_confusion",
    "bootstrap_distribution",
    "calibration_bins",
    "ci_metrics",
    "classification_report",
    "compute_metrics",
    "expected_calibration_error",
    "get_metric",
    "headline",
    "metrics",
    "predictions_table",
    "register",
    "table_metrics",
    "unregister",
    "write_predictions_csv",
]

ECE_BINS = 15
"""Number of equal-width confidence bins for the ECE (the common choice since Guo et al.)."""

# Resamples processed together: at most _CHUNK, and at most _CHUNK_ELEMENTS / n so that each
# [b, n] array stays ~5 MB whatever n is, while numpy calls stay large enough to be efficient.
_CHUNK = 64
_CHUNK_ELEMENTS = 640_000

# Tolerance on row sums: catches logits passed by mistake, tolerates float16/float32 rounding.
_PROBA_ATOL = 1e-3


# --------------------------------------------------------------------------------- inputs


def _labels_as_indices(y_true: Any, class_names: Sequence[str]) -> np.ndarray:
    """Integer class indices from ints or class-name strings, so callers can pass either the
    cache's int16 labels or the names from a CSV, and a typo fails loudly here."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.dtype.kind in "USO":
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in y.tolist()} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {list(class_names)}")
        return np.array([index[str(v)] for v in y.tolist()], dtype=np.int64)
    if y.dtype.kind not in "iub":
        if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices or class names")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        raise ValueError(
            f"y_true holds indices outside 0..{len(class_names) - 1} "
            f"({len(class_names)} classes: {list(class_names)})"
        )
    return y


def _check_proba(proba: Any, n: int | None, n_classes: int) -> np.ndarray:
    """Validated probabilities [n, C], renormalised to sum exactly to 1 per row.

    Rows must already sum to ~1: a head that hands over logits would otherwise produce
    plausible-looking but meaningless ECE and log loss, so that is an error, not a fix-up.
    """
    p = np.asarray(proba)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"proba must have shape (n, {n_classes}), got {p.shape}")
    if n is not None and p.shape[0] != n:
        raise ValueError(f"proba has {p.shape[0]} rows but y_true has {n} labels")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    if p.size and (p.min() < 0 or not np.allclose(p.sum(axis=1), 1.0, atol=_PROBA_ATOL)):
        raise ValueError(
            "proba rows must be non-negative and sum to 1 (pass softmax probabilities, not logits)"
        )
    return p / p.sum(axis=1, keepdims=True)


def _argmax(p: np.ndarray) -> np.ndarray:
    """Predicted class: argmax, ties to the lowest index (numpy's rule, used everywhere here)."""
    return np.argmax(p, axis=1).astype(np.int64)


# ---------------------------------------------------------------------------- calibration


def calibration_bins(y_true: Any, proba: Any, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Per-bin counts, mean confidence and accuracy for a reliability diagram and the ECE.

    Bins are equal-width on the confidence (max probability), right-inclusive:
    bin k holds confidences in ``(k/n_bins, (k+1)/n_bins]``, and a confidence of exactly 0 goes
    to bin 0. Empty bins have `None` confidence and accuracy.
    """
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    conf = p.max(axis=1)
    correct = (np.argmax(p, axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    nonzero = count > 0
    mean_conf = np.divide(conf_sum, count, out=np.zeros(n_bins), where=nonzero)
    mean_acc = np.divide(acc_sum, count, out=np.zeros(n_bins), where=nonzero)
    return {
        "n_bins": int(n_bins),
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": [float(c) if k else None for c, k in zip(mean_conf, nonzero, strict=True)],
        "accuracy": [float(a) if k else None for a, k in zip(mean_acc, nonzero, strict=True)],
    }


def _ece_from_bins(bins: dict[str, Any]) -> float:
    """ECE from `calibration_bins` output: size-weighted mean |accuracy - confidence|."""
    total = sum(bins["count"])
    if total == 0:
        return 0.0
    gap = 0.0
    for n_b, c, a in zip(bins["count"], bins["confidence"], bins["accuracy"], strict=True):
        if n_b:
            gap += n_b * abs(a - c)
    return float(gap / total)


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = ECE_BINS) -> float:
    """ECE with `n_bins` equal-width confidence bins (see `calibration_bins` for the binning).

    0 means confidence matches accuracy in every bin; e.g. one-hot predictions that are all
    correct have ECE 0, and 0.9-confident predictions that are right 2 times out of 3 add
    |0.667 - 0.9| weighted by their share of the data.
    """
    return _ece_from_bins(calibration_bins(y_true, proba, n_bins))


# ------------------------------------------------------------------------------ bootstrap


def _resample_chunks(n: int, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index matrices [b, n] (b <= _CHUNK), drawn in order from one seeded generator,
    so the resamples depend only on (n, n_bootstrap, seed)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(_CHUNK, _CHUNK_ELEMENTS // max(n, 1)))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def confusion_counts(y_true: Any, y_pred: Any, n_classes: int | None = None) -> np.ndarray:
    """Confusion matrix [C, C] (rows = true class) of integer labels, one `np.bincount`: the
    shape every confusion-based metric below reads, for one prediction set or (stacked) many."""
    y = _int_labels(y_true, "y_true")
    pred = _int_labels(y_pred, "y_pred")
    if y.shape != pred.shape:
        raise ValueError(f"{len(y)} labels but {len(pred)} predictions")
    if n_classes is None:
        n_classes = int(max(y.max(initial=-1), pred.max(initial=-1))) + 1
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def _int_labels(v: Any, what: str) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer class indices, got dtype {a.dtype}")
    a = a.astype(np.int64).ravel()
    if a.size and a.min() < 0:
        raise ValueError(f"{what} holds negative class indices")
    return a


def balanced_accuracy_from_confusion(cms: np.ndarray) -> np.ndarray:
    """Balanced accuracy of confusion matrices [..., C, C] (rows = true): the mean recall over
    the classes present (support > 0), scikit-learn's `balanced_accuracy_score` rule. THE one
    definition: the point estimate, every bootstrap resample and the heads' selection on val
    all come here (through `balanced_accuracy` for one prediction set)."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support = cms.sum(axis=-1)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    return recall.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def balanced_accuracy(y_true: Any, y_pred: Any, n_classes: int | None = None) -> float:
    """Balanced accuracy of integer labels and predictions (0 when there are none). One
    bincount, no sort: cheap enough for the heads' per-epoch and grid-search checks."""
    return float(balanced_accuracy_from_confusion(confusion_counts(y_true, y_pred, n_classes)))


def _accuracy_from_confusion(cms: np.ndarray) -> np.ndarray:
    cms = np.asarray(cms, dtype=np.float64)
    n = cms.sum(axis=(-2, -1))
    return np.diagonal(cms, axis1=-2, axis2=-1).sum(axis=-1) / np.maximum(n, 1)


def _macro_f1_from_confusion(cms: np.ndarray) -> np.ndarray:
    """Macro-F1 over the classes present in y_true or predicted (scikit-learn's label set),
    0/0 counted as 0."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(axis=-1), cms.sum(axis=-2)
    in_labels = (support > 0) | (predicted > 0)
    denom = support + predicted  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return (f1 * in_labels).sum(axis=-1) / np.maximum(in_labels.sum(axis=-1), 1)


class _AucPlan:
    """Per-class precomputation for the weighted one-vs-rest AUROC of many resamples.

    For class k, negatives are sorted by score once; for each positive we store how many
    negatives score strictly below it (`lo`) and at most equal to it (`hi`). Given integer
    sample weights W (how often each image appears in a resample), the Mann-Whitney
    U statistic is sum over positives of w_i * (Wneg(< s_i) + Wneg(<= s_i)) / 2, read off one
    cumulative sum of the sorted negatives' weights. This is exactly `roc_auc_score` with
    `sample_weight=W` (ties count one half).
    """

    def __init__(self, y: np.ndarray, proba: np.ndarray, classes: Sequence[int]) -> None:
        self.classes = list(classes)
        self.pos: list[np.ndarray] = []
        self.neg: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        for k in self.classes:
            s = proba[:, k]
            pos = np.flatnonzero(y == k)
            neg = np.flatnonzero(y != k)
            neg = neg[np.argsort(s[neg], kind="stable")]
            neg_sorted = s[neg]
            self.pos.append(pos)
            self.neg.append(neg)
            self.lo.append(np.searchsorted(neg_sorted, s[pos], side="left"))
            self.hi.append(np.searchsorted(neg_sorted, s[pos], side="right"))

    def aucs(self, weights: np.ndarray) -> np.ndarray:
        """AUROC per resample and planned class, [b, len(classes)]; NaN where a resample has
        no positives or no negatives for that class.

        `weights` is [n, b] int32 (image-major): gathering whole rows and accumulating down
        axis 0 runs across the b resamples at once, about twice as fast as resample-major.
        """
        b = weights.shape[1]
        out = np.full((b, len(self.classes)), np.nan)
        for j in range(len(self.classes)):
            neg = self.neg[j]
            # cum[p] = weight of the p lowest-scoring negatives (row 0 = 0): an exclusive prefix
            # sum done in place; totals are <= n, so int32 cannot overflow.
            cum = np.empty((len(neg) + 1, b), dtype=weights.dtype)
            cum[0] = 0
            np.take(weights, neg, axis=0, out=cum[1:])
            np.add.accumulate(cum[1:], axis=0, out=cum[1:])
            w_pos = weights[self.pos[j]]
            below = cum[self.lo[j]]
            below += cum[self.hi[j]]
            u2 = np.einsum("ij,ij->j", w_pos, below, dtype=np.float64)
            n_pos = w_pos.sum(axis=0, dtype=np.int64)
            n_neg = cum[-1].astype(np.int64)
            ok = (n_pos > 0) & (n_neg > 0)
            out[ok, j] = u2[ok] / (2.0 * n_pos[ok] * n_neg[ok])
        return out


def _auroc_classes(y: np.ndarray, n_classes: int) -> list[int]:
    """Classes whose one-vs-rest AUROC is defined: at least one positive and one negative."""
    support = np.bincount(y, minlength=n_classes)
    return [k for k in range(n_classes) if 0 < support[k] < len(y)]


@dataclass
class _Sample:
    """The full prediction set being resampled, and what is precomputed on it once."""

    y: np.ndarray
    proba: np.ndarray
    pred: np.ndarray
    n_classes: int
    auroc_classes: Sequence[int]

    @cached_property
    def auc_plan(self) -> _AucPlan:
        return _AucPlan(self.y, self.proba, self.auroc_classes)


@dataclass
class Resamples:
    """A chunk of b bootstrap resamples (`idx` [b, n], row r = the images of resample r), with
    the arrays several metrics share built on first use, once per chunk."""

    sample: _Sample
    idx: np.ndarray

    @cached_property
    def confusion(self) -> np.ndarray:
        """Confusion matrices [b, C, C]: one `np.bincount` of ``true * C + pred`` codes."""
        s, b, cc = self.sample, self.idx.shape[0], self.sample.n_classes ** 2
        codes = s.y * s.n_classes + s.pred
        flat = (codes[self.idx] + (np.arange(b) * cc)[:, None]).ravel()
        return np.bincount(flat, minlength=b * cc).reshape(b, s.n_classes, s.n_classes)

    @cached_property
    def weights(self) -> np.ndarray:
        """[n, b] int32: how often image i is drawn in resample r (image-major, see aucs)."""
        b, n = self.idx.shape
        flat = (self.idx * b + np.arange(b)[:, None]).ravel()
        return np.bincount(flat, minlength=n * b).reshape(n, b).astype(np.int32)

    def one_by_one(self, metric: Metric) -> np.ndarray:
        """`metric.compute` on each resample: the fallback for a metric with no `resample`."""
        s = self.sample
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            values = [metric.compute(s.y[i], s.pred[i], s.proba[i], s.n_classes)
                      for i in self.idx]
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def bootstrap_distribution(
    y_true: Any,
    proba: Any,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    auroc_classes: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Every CI metric (`ci_metrics()`) on each of `n_bootstrap` seeded resamples, as arrays
    [n_bootstrap]; all metrics see the same resamples.

    Vectorised (see the module docstring): ~0.4 s for 1,000 resamples of 10,000 predictions
    with 7 classes on one CPU core, most of it the AUROC (O(n_bootstrap * n * C), no sorting per
    resample). The macro AUROC of a resample averages the classes of `auroc_classes` (default:
    those defined on the full data) that have positives and negatives in that resample; NaN if
    none do.
    """
    p = np.asarray(proba, dtype=np.float64)
    n, n_classes = p.shape
    y = np.asarray(y_true).astype(np.int64)
    if auroc_classes is None:
        auroc_classes = _auroc_classes(y, n_classes)
    sample = _Sample(y, p, _argmax(p), n_classes, list(auroc_classes))
    chosen = ci_metrics()
    parts: dict[str, list[np.ndarray]] = {m.name: [] for m in chosen}
    for idx in _resample_chunks(n, n_bootstrap, seed):
        chunk = Resamples(sample, idx)
        for m in chosen:
            parts[m.name].append(m.resample(chunk) if m.resample else chunk.one_by_one(m))
    return {
        m: (np.concatenate(v) if v else np.empty(0, dtype=np.float64)) for m, v in parts.items()
    }


def _percentile_ci(values: np.ndarray, level: float) -> list[float] | None:
    """Percentile-method interval of the finite bootstrap values; None if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------- report


def classification_report(
    y_true: Any,
    proba: Any,
    class_names: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Everything `metrics.json` holds for one split, as a JSON-ready dict.

    Keys, in order: `n_samples`, `classes`, the registered metrics (`metrics()`: by default
    `balanced_accuracy`, `accuracy`, `macro_f1`, `auroc`, `ece`, `log_loss`), `ci` (CI metric
    -> [lo, hi] or None), `bootstrap` (how the CIs were made), `auroc_classes` /
    `auroc_excluded`, `notes` (plain sentences about anything left out), `per_class` (name ->
    precision, recall, f1, support, predicted, auroc), `confusion_matrix` (counts, rows = true
    class, columns = predicted) and `calibration` (the ECE bins). `n_bootstrap=0` skips the
    intervals (all None).

    Predictions are the argmax of `proba`; per-class precision/recall/F1 that are 0/0 (a class
    never predicted, or absent from `y_true`) are reported as 0, scikit-learn's
    `zero_division=0` convention, with `support` and `predicted` alongside to tell them apart.
    """
    names = [str(c) for c in class_names]
    n_classes = len(names)
    if n_classes < 2:
        raise ValueError("need at least two classes")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    y = _labels_as_indices(y_true, names)
    n = len(y)
    if n == 0:
        raise ValueError("no predictions to evaluate")
    p = _check_proba(proba, n, n_classes)
    pred = _argmax(p)
    labels = list(range(n_classes))
    support = np.bincount(y, minlength=n_classes)
    notes: list[str] = []

    absent = [names[k] for k in labels if support[k] == 0]
    if absent:
        notes.append(
            f"classes absent from y_true: {absent}; balanced accuracy averages recall over the "
            f"{n_classes - len(absent)} classes present, and their recall is reported as 0"
        )
    values = compute_metrics(y, pred, p, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)

    auroc_idx = _auroc_classes(y, n_classes)
    per_class_auroc = _per_class_auroc(y, p, n_classes)
    excluded = [names[k] for k in labels if k not in per_class_auroc]
    if excluded:
        notes.append(
            f"AUROC is the macro mean over {len(auroc_idx)} of {n_classes} classes; "
            f"excluded (no positives or no negatives in y_true): {excluded}"
        )
    never_predicted = [names[k] for k in labels if support[k] > 0 and not np.any(pred == k)]
    if never_predicted:
        notes.append(f"classes never predicted (precision reported as 0): {never_predicted}")

    intervals: dict[str, list[float] | None] = {m.name: None for m in ci_metrics()}
    if n_bootstrap > 0:
        dist = bootstrap_distribution(
            y, p, n_bootstrap=n_bootstrap, seed=seed, auroc_classes=auroc_idx
        )
        for name in intervals:
            if values[name] is not None:  # no interval around an undefined value
                intervals[name] = _percentile_ci(dist[name], ci)

    cm = confusion_matrix(y, pred, labels=labels)
    return {
        "n_samples": int(n),
        "classes": names,
        **values,
        "ci": intervals,
        "bootstrap": {
            "n_resamples": int(n_bootstrap),
            "seed": int(seed),
            "level": float(ci),
            "method": "percentile",
        },
        "auroc_classes": [names[k] for k in auroc_idx],
        "auroc_excluded": excluded,
        "notes": notes,
        "per_class": {
            names[k]: {
                "precision": float(prec[k]),
                "recall": float(rec[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "predicted": int(np.count_nonzero(pred == k)),
                "auroc": per_class_auroc.get(k),
            }
            for k in labels
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "calibration": calibration_bins(y, p),
    }


def headline(report: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, value, lo, hi) rows for a terminal or markdown table, one per registered metric
    the report holds, balanced accuracy first. Undefined values and missing intervals are NaN
    so the tuple types stay uniform; metrics without `in_ci` have no interval."""
    nan = float("nan")
    rows: list[tuple[str, float, float, float]] = []
    for m in metrics():
        if m.name not in report:
            continue
        value = report[m.name]
        interval = report.get("ci", {}).get(m.name)
        lo, hi = interval if interval is not None else (nan, nan)
        rows.append((m.label, nan if value is None else float(value), float(lo), float(hi)))
    return rows


# ------------------------------------------------------------------------------- registry

Format = Literal["percent", "fraction"]


@dataclass(frozen=True)
class Metric:
    """One metric, everything the package needs to know about it in one record: the report
    computes it, the bootstrap gives it an interval, the tables and `bench-heads` show and
    aggregate it, all by iterating `metrics()`. To add a metric, `register` one of these.

    `compute(y_true, y_pred, proba, n_classes)` gets integer labels, argmax predictions and
    validated probabilities (None when the caller has only predictions: then a metric that
    `needs_proba` is None); it returns a float, or None when undefined. `resample`, optional,
    computes the metric on a whole chunk of bootstrap resamples at once (vectorised); without
    it an `in_ci` metric is computed resample by resample with `compute`, which is correct
    but slower.
    """

    name: str  # the key in metrics.json, the bench JSON and its aggregate (`<name>_mean`)
    label: str  # words for headlines and plots
    short: str  # a table column
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray | None, int], float | None]
    higher_is_better: bool = True
    needs_proba: bool = False
    in_ci: bool = False  # gets a bootstrap interval in `ci`
    in_tables: bool = True  # a column of the fit-head / evaluate / bench-heads tables
    fmt: Format = "percent"  # tables show 100 * value, or the value itself
    resample: Callable[[Resamples], np.ndarray] | None = None

    @property
    def heading(self) -> str:
        """The table column: the short label, with its unit when tables show a percent."""
        return f"{self.short} %" if self.fmt == "percent" else self.short

    def score(self, y_true: Any, proba: Any) -> float | None:
        """This metric of probabilities [n, C] (predictions are their argmax)."""
        p = np.asarray(proba, dtype=np.float64)
        return self.compute(np.asarray(y_true).astype(np.int64), _argmax(p), p, p.shape[1])


_REGISTRY: dict[str, Metric] = {}

#: Report keys that are not metrics; a metric may not take one of these names.
_RESERVED = frozenset({"n_samples", "classes", "ci", "bootstrap", "auroc_classes",
                       "auroc_excluded", "notes", "per_class", "confusion_matrix",
                       "calibration", "fit_seconds"})

PRIMARY = "balanced_accuracy"
"""The metric that leads every table and picks a head (or a variant) on val: the official ISIC
2018 Task 3 metric, and the one plain accuracy cannot game on ~67% `nv` data."""


def register(metric: Metric) -> Metric:
    """Add `metric` to the registry (after the ones already there: registration order is
    report, headline and table order). Returns it, so it can be kept in a name."""
    if metric.name in _REGISTRY or metric.name in _RESERVED:
        raise ValueError(f"a metric or report key named {metric.name!r} already exists")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    """Remove a registered metric (tests register throwaway ones)."""
    if name == PRIMARY:
        raise ValueError(f"{PRIMARY} chooses heads on val; it cannot be removed")
    del _REGISTRY[name]


def metrics() -> tuple[Metric, ...]:
    """Every registered metric, in order (balanced accuracy first)."""
    return tuple(_REGISTRY.values())


def ci_metrics() -> tuple[Metric, ...]:
    """The metrics with bootstrap intervals."""
    return tuple(m for m in _REGISTRY.values() if m.in_ci)


def table_metrics() -> tuple[Metric, ...]:
    """The metrics the result tables show, in column order."""
    return tuple(m for m in _REGISTRY.values() if m.in_tables)


def get_metric(name: str) -> Metric:
    """The registered metric called `name`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no metric {name!r}; known: {', '.join(_REGISTRY)}") from None


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, n_classes: int
) -> dict[str, float | None]:
    """Every registered metric of one prediction set, {name: value or None}, in order.
    Inputs as `Metric.compute` takes them (integer labels; `proba` validated, or None)."""
    out: dict[str, float | None] = {}
    with warnings.catch_warnings():
        # Edge cases (absent or never-predicted classes) are reported in the report's `notes`
        # and `per_class`, so scikit-learn's warnings about them would only be noise.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        for m in _REGISTRY.values():
            if m.needs_proba and proba is None:
                out[m.name] = None
                continue
            value = m.compute(y_true, y_pred, proba, n_classes)
            out[m.name] = None if value is None else float(value)
    return out


def _per_class_auroc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[int, float]:
    """One-vs-rest AUROC of each class that has positives and negatives in `y`."""
    return {k: float(roc_auc_score(y == k, proba[:, k])) for k in _auroc_classes(y, n_classes)}


def _macro_auroc(y, pred, proba, n_classes) -> float | None:  # noqa: ANN001 (Metric.compute)
    per_class = _per_class_auroc(y, proba, n_classes)
    return float(np.mean(list(per_class.values()))) if per_class else None


def _auroc_resamples(r: Resamples) -> np.ndarray:
    """Macro AUROC of each resample of the chunk: the mean over the planned classes that have
    positives and negatives in that resample; NaN if none do."""
    plan = r.sample.auc_plan
    b = r.idx.shape[0]
    if not plan.classes:
        return np.full(b, np.nan)
    aucs = plan.aucs(r.weights)
    finite = np.isfinite(aucs)
    count = finite.sum(axis=1)
    total = np.where(finite, aucs, 0.0).sum(axis=1)
    macro = np.full(b, np.nan)
    np.divide(total, count, out=macro, where=count > 0)
    return macro


for _m in (
    Metric("balanced_accuracy", "Balanced accuracy", "bal. acc",
           lambda y, pred, p, c: balanced_accuracy(y, pred, c), in_ci=True,
           resample=lambda r: balanced_accuracy_from_confusion(r.confusion)),
    Metric("accuracy", "Accuracy", "acc", lambda y, pred, p, c: float(accuracy_score(y, pred)),
           in_ci=True, resample=lambda r: _accuracy_from_confusion(r.confusion)),
    Metric("macro_f1", "Macro-F1", "macro-F1",
           lambda y, pred, p, c: float(f1_score(y, pred, average="macro", zero_division=0)),
           in_ci=True, resample=lambda r: _macro_f1_from_confusion(r.confusion)),
    Metric("auroc", "AUROC (OvR macro)", "AUROC", _macro_auroc, needs_proba=True, in_ci=True,
           resample=_auroc_resamples),
    Metric("ece", f"ECE ({ECE_BINS} bins)", "ECE",
           lambda y, pred, p, c: expected_calibration_error(y, p), higher_is_better=False,
           needs_proba=True, fmt="fraction"),
    Metric("log_loss", "Log loss", "log loss",
           lambda y, pred, p, c: float(log_loss(y, p, labels=list(range(c)))),
           higher_is_better=False, needs_proba=True, in_tables=False, fmt="fraction"),
):
    register(_m)
del _m


# ---------------------------------------------------------------------------- predictions


def predictions_table(
    image_ids: Sequence[str],
    y_true: Any | None,
    proba: Any,
    class_names: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per image: `image_id`, `true` (class name, or None when unlabelled, as for
    `predict`), `predicted`, then `p_<class>` for every class.

    Probabilities keep the precision of the input dtype with its shortest decimal form
    (a float32 0.1 stays 0.1, not 0.10000000149011612), so the CSV is readable and exact.
    """
    names = [str(c) for c in class_names]
    p = np.asarray(proba)
    n = len(image_ids)
    if p.ndim != 2 or p.shape != (n, len(names)):
        raise ValueError(f"proba must have shape ({n}, {len(names)}), got {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    y = None if y_true is None else _labels_as_indices(y_true, names)
    if y is not None and len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} image ids")
    pred = _argmax(p)
    text = p.astype(str)  # numpy's shortest round-trip repr for the array's own dtype
    columns = [f"p_{c}" for c in names]
    rows: list[dict[str, Any]] = []
    for i, image_id in enumerate(image_ids):
        row: dict[str, Any] = {
            "image_id": str(image_id),
            "true": None if y is None else names[y[i]],
            "predicted": names[pred[i]],
        }
        row.update({col: float(v) for col, v in zip(columns, text[i], strict=True)})
        rows.append(row)
    return rows


def write_predictions_csv(
    path: str | os.PathLike[str],
    image_ids: Sequence[str],
    y_true: Any | None,
    proba: Any,
    class_names: Sequence[str],
) -> Path:
    """Write `predictions_table` rows to `path` as CSV (header always written, even with no
    rows, so downstream readers see the columns); returns the path."""
    rows = predictions_table(image_ids, y_true, proba, class_names)
    fields = ["image_id", "true", "predicted", *(f"p_{c}" for c in class_names)]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())  # a reader never sees half a table


def ci95_half_width(std: np.ndarray | float, n: np.ndarray | int) -> np.ndarray:
    """Half-width of the 95% confidence interval of a mean over `n` seeds, from the rows'
    population std (`np.std`, ddof=0): Student's t with n-1 degrees of freedom times the
    sample std over sqrt(n), i.e. t * std / sqrt(n-1). With 2-5 seeds 1.96 would be 1.5-6.5x
    too narrow (t = 12.7 at n=2, 2.78 at n=5). One seed: no interval (0)."""
    from scipy.stats import t

    std, n = np.asarray(std, dtype=float), np.asarray(n, dtype=float)
    many = n > 1
    dof = np.where(many, n - 1, 1.0)
    return np.where(many, t.ppf(0.975, dof) * std / np.sqrt(dof), 0.0)

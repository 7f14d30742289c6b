"""Small numeric helpers the heads share (numpy, and `metrics` one layer down; no head
imports: a leaf of the heads package)."""

from __future__ import annotations

import numpy as np

# The one balanced accuracy (skincache.metrics): the heads' val selection scores exactly what
# the reports and `bench-heads` report.
from skincache.metrics import balanced_accuracy  # noqa: F401  (re-exported to the heads)


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit vectors along `axis` (zero vectors stay zero rather than becoming NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row log-softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64, stable for the large logits a logit scale of 100 produces."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def class_counts(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=n_classes).astype(np.int64)


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """N / (C_present * count_c), scikit-learn's "balanced" weights; 0 for absent classes."""
    counts = class_counts(y, n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes, dtype=np.float64)
    w[present] = len(y) / (present.sum() * counts[present])
    return w


def warmup_cosine(total_steps: int, warmup_steps: int, schedule: str = "cosine"):
    """The lr factor at step s: linear warm-up from ~0, then cosine to 0 (or constant). The
    one schedule: the PyTorch heads (no warm-up) and fine-tuning use it."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + float(np.cos(np.pi * progress)))

    return factor


def decade_grid(c_range: tuple[float, float]) -> list[float]:
    """The C values a sweep tries: every power of ten from c_range[0] up to c_range[1]
    (logreg's and cbm's regularisation paths)."""
    lo, hi = np.log10(c_range[0]), np.log10(c_range[1])
    return [float(c) for c in 10.0 ** np.arange(np.floor(lo), np.floor(hi) + 1)]

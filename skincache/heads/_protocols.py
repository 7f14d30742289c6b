"""What the published-protocol heads (`dermfm-lp`, `clip-benchmark-lp`) share: the rows they fit
on, and the capability that tells every table that their val numbers are not a validation score.

A protocol that refits on train+val has seen the val labels: its val balanced accuracy is a
training score, so it must never be what picks a head. A head declares that with a
`trains_on_val` attribute (True once it is known to fit on val); `trains_on_val(head)` reads it
for any head, False for the heads that keep val for selection only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import FitData, Head, l2_normalize, softmax


class ProbeHead(Head):
    """A published protocol's linear probe: `softmax(features @ coef_.T + intercept_)` over
    the features as given, or L2-normalised with `normalize` (then it has a linear form, and
    fine-tuning can start from it). Subclasses fit `coef_` / `intercept_` in `_fit`."""

    _fitted_arrays = ("coef_", "intercept_")
    normalize: bool = False

    def _features(self, X: np.ndarray) -> np.ndarray:
        return l2_normalize(X) if self.normalize else np.asarray(X, dtype=np.float32)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._features(X) @ self.coef_.T + self.intercept_)

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Linear in L2-normalised features only when it normalises (else None: raw features)."""
        if not self.normalize:
            return None
        return np.asarray(self.coef_, np.float64), np.asarray(self.intercept_, np.float64)


def trains_on_val(head: Any) -> bool:
    """Whether `head`'s fit used the val rows as training data (so val scores it as "(fit)")."""
    return bool(getattr(head, "trains_on_val", False))


def fit_rows(data: FitData, merge_val: bool) -> tuple[np.ndarray, np.ndarray]:
    """The training rows of a protocol: train, plus val when `merge_val` and there is one."""
    if not (merge_val and data.has_val):
        return data.X, data.y
    assert data.X_val is not None and data.y_val is not None
    return np.concatenate([data.X, data.X_val]), np.concatenate([data.y, data.y_val])


def seen_classes(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(the classes present in y, y re-indexed to 0..len-1): the protocols fit one output per
    class they see (their n_classes is `len(unique(labels))`); the others get -inf logits."""
    seen = np.unique(y)
    remap = np.full(n_classes, -1, dtype=np.int64)
    remap[seen] = np.arange(len(seen))
    return seen, remap[y]


def full_weights(seen: np.ndarray, coef: np.ndarray, intercept: np.ndarray, n_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Weights over all `n_classes`: a class the fit never saw gets probability 0."""
    W = np.zeros((n_classes, coef.shape[1]), dtype=np.float32)
    b = np.full(n_classes, -np.inf, dtype=np.float32)
    W[seen], b[seen] = coef, intercept
    return W, b

"""Logistic regression on L2-normalised features: CLIP's linear-probe protocol.

The inverse regularisation strength C is the one hyper-parameter that matters, so it is chosen on
the validation split by balanced accuracy (the ISIC metric): a log-spaced coarse sweep, then a
finer one around the best value. Each fit warm-starts from the nearest previous solution, which
keeps the whole sweep to a few seconds on 10k x 512 features.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ._registry import register_head
from .base import FitData, Head, balanced_accuracy, l2_normalize, softmax

#: C used when neither `C` nor a validation split is given (scikit-learn's default).
DEFAULT_C = 1.0


@register_head("logreg")
class LogRegHead(Head):
    """Multinomial logistic regression (lbfgs).

    C: fixed inverse regularisation; None sweeps it on the validation split (decades from
    c_range[0] to c_range[1], then quarter-decades around the best when `refine`), falling
    back to C=1.0 without validation data. Ties go to the smaller C (more regularisation).
    class_weight: None or "balanced" (inverse class frequency in the loss).
    max_iter, tol: lbfgs limits. tol is tighter than scikit-learn's 1e-4 on purpose: its loss is
    averaged over samples, so at large C a warm-started fit otherwise "converges" at iteration 0
    and every C above the first good one returns the same weights.
    """

    _fitted_arrays = ("coef_", "intercept_")
    _fitted_scalars = ("C_",)

    def __init__(
        self,
        C: float | None = None,
        class_weight: str | None = None,
        c_range: tuple[float, float] = (1e-3, 1e3),
        refine: bool = True,
        max_iter: int = 200,
        tol: float = 1e-5,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.c_range = c_range
        self.refine = refine
        self.max_iter = max_iter
        self.tol = tol

    def _fit(self, data: FitData) -> None:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        X = l2_normalize(data.X)
        clf = LogisticRegression(
            C=DEFAULT_C, class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol,
            warm_start=True,
        )
        # A capped max_iter is a deliberate speed/accuracy trade in the sweep.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.C is not None or not data.has_val:
                self.C_ = float(DEFAULT_C if self.C is None else self.C)
                clf.set_params(C=self.C_).fit(X, data.y)
                self.sweep_ = {self.C_: float("nan")}
            else:
                clf = self._sweep(clf, X, data)
        self.classes_seen_ = clf.classes_.astype(np.int64)
        coef = clf.coef_.astype(np.float32)
        intercept = clf.intercept_.astype(np.float32)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row, P(class 1) = sigmoid(z)
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        # Classes absent from y get no row in sklearn; give them -inf logits (probability 0).
        full_coef = np.zeros((data.n_classes, data.n_features), dtype=np.float32)
        full_int = np.full(data.n_classes, -np.inf, dtype=np.float32)
        full_coef[self.classes_seen_] = coef
        full_int[self.classes_seen_] = intercept
        self.coef_, self.intercept_ = full_coef, full_int

    def _sweep(self, clf: LogisticRegression, X: np.ndarray, data: FitData) -> LogisticRegression:
        assert data.X_val is not None and data.y_val is not None
        X_val = l2_normalize(data.X_val)
        lo, hi = np.log10(self.c_range[0]), np.log10(self.c_range[1])
        coarse = 10.0 ** np.arange(np.floor(lo), np.floor(hi) + 1)
        results: dict[float, tuple[float, np.ndarray, np.ndarray]] = {}

        def evaluate(c: float, start: float | None) -> None:
            if start is not None:  # warm start from the nearest solution found so far
                clf.coef_, clf.intercept_ = (a.copy() for a in results[start][1:])
            clf.set_params(C=float(c)).fit(X, data.y)
            score = balanced_accuracy(data.y_val, clf.predict(X_val))
            results[float(c)] = (score, clf.coef_.copy(), clf.intercept_.copy())

        for c in coarse:  # increasing C: each fit starts from the more regularised solution
            evaluate(c, None)
        if self.refine:
            best = self._best(results)
            for step in (-0.5, -0.25, 0.25, 0.5):
                c = float(best * 10.0**step)
                nearest = min(results, key=lambda k: abs(np.log10(k) - np.log10(c)))
                evaluate(c, nearest)
        self.C_ = self._best(results)
        self.sweep_ = {c: r[0] for c, r in sorted(results.items())}
        clf.coef_, clf.intercept_ = results[self.C_][1], results[self.C_][2]
        clf.set_params(C=self.C_)
        return clf

    @staticmethod
    def _best(results: dict[float, tuple[float, np.ndarray, np.ndarray]]) -> float:
        top = max(r[0] for r in results.values())
        return min(c for c, r in results.items() if r[0] == top)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(l2_normalize(X) @ self.coef_.T + self.intercept_)

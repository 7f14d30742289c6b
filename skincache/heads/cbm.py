"""A concept-bottleneck head: the diagnosis from concept scores alone, with weights a person reads.

Each image's features become MONET concept presence scores (`concepts.ConceptBank.presence`:
the image against every concept's prompts, contrasted with their reference prompts), z-scored
with the training split's mean and spread, and a sparse (L1) multinomial logistic regression
maps those K numbers to the classes (scikit-learn's saga solver). The L1 penalty keeps few
concepts per class, so a weight reads as "melanoma <- blue-whitish veil +0.8": one standard
deviation more of that concept adds 0.8 to melanoma's logit. C is chosen on validation balanced
accuracy (after the logit adjustment the head applies), ties to the smaller C (sparser).

The head keeps the concept embeddings it was fit with, so predicting needs only features; what
the explanation costs is its accuracy beside `logreg` on the same cache. On a model whose text
tower knows nothing of dermoscopy (the tiny random one) the concepts mean nothing.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from skincache.concepts import ConceptBank, Standardizer
from skincache.errors import UsageError

from . import _progress
from ._math import decade_grid
from ._registry import register_head
from .base import FitData, Head, softmax

DEFAULT_C = 1.0
#: the intercept of a class the training split lacks: never predicted
ABSENT = -30.0


@register_head("cbm")
class ConceptBottleneckHead(Head):
    """Sparse (L1) multinomial logistic regression on z-scored MONET concept scores.

    C: fixed inverse L1 strength; None sweeps decades over c_range on the validation split
    (C=1.0 without one). Smaller C: fewer concepts. class_weight: None or "balanced".
    logit_adjust / calibrate: the shared post-hoc steps. max_iter, tol: saga's.
    """

    needs_concepts = True
    _fitted_arrays = ("coef_", "intercept_", "concept_targets_", "concept_refs_",
                      "score_mean_", "score_std_")
    _fitted_scalars = ("C_", "concept_scale_", "concept_names_")
    param_constraints = {"C": ">0", "c_range": ">0", "max_iter": ">=1", "tol": ">0"}

    def __init__(
        self,
        C: float | None = None,
        c_range: tuple[float, float] = (1e-2, 1e2),
        class_weight: str | None = None,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
        max_iter: int = 1000,
        tol: float = 1e-4,
    ) -> None:
        self.C = C
        self.c_range = c_range
        self.class_weight = class_weight
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate
        self.max_iter = max_iter
        self.tol = tol

    # -- concept scores

    @property
    def bank_(self) -> ConceptBank:
        return ConceptBank(list(self.concept_names_), self.concept_targets_, self.concept_refs_)

    def concept_scores(self, X: np.ndarray) -> np.ndarray:
        """z-scored concept presence [N, K] (train split's mean and spread), as the head sees
        them."""
        return self._z(self._check_X(X))

    def _z(self, X: np.ndarray) -> np.ndarray:
        raw = self.bank_.presence(X, self.concept_scale_)
        return Standardizer(self.score_mean_, self.score_std_)(raw)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """[N, C, K]: concept k's share of class c's logit for each image (weight x z-score);
        with the intercept they sum to the head's own logits, before the post-hoc steps."""
        z = self.concept_scores(X)
        return z[:, None, :] * self.coef_[None, :, :]

    def top_concepts(self, X: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, the `k` concepts that add most to its predicted class's logit (those
        with a positive share), as (name, share)."""
        pred = self.predict(X)
        contrib = self.contributions(X)[np.arange(len(pred)), pred]
        out = []
        for row in contrib:
            order = [i for i in np.argsort(-row) if row[i] > 0][:k]
            out.append([(str(self.concept_names_[i]), float(row[i])) for i in order])
        return out

    # -- fitting

    def _grid(self) -> list[float]:
        return decade_grid(self.c_range)

    def _fit(self, data: FitData) -> None:
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        bank = data.concepts
        assert bank is not None  # `fit` refuses a call without concepts
        self.concept_names_ = list(bank.names)
        self.concept_targets_ = bank.targets.astype(np.float32)
        self.concept_refs_ = bank.references.astype(np.float32)
        self.concept_scale_ = float(data.logit_scale)
        raw = bank.presence(np.asarray(data.X, np.float32), self.concept_scale_)
        std = Standardizer.fit(raw)  # train rows only
        self.score_mean_, self.score_std_ = (a.astype(np.float32) for a in (std.mean, std.std))
        Z = std(raw)
        if self.C is not None or not data.has_val:
            self.C_ = float(DEFAULT_C if self.C is None else self.C)
            clf = self._solve(Z, data.y, self.C_)
        else:
            assert data.X_val is not None
            Z_val = std(bank.presence(np.asarray(data.X_val, np.float32), self.concept_scale_))
            score = self._val_score(data)
            best: tuple[float, float, LogisticRegression] | None = None
            grid = self._grid()
            for i, c in enumerate(grid):  # increasing C: ties keep the sparser model
                clf = self._solve(Z, data.y, c)
                s = score(self._logits(clf, Z_val, data.n_classes))
                if best is None or s > best[0] + 1e-12:
                    best = (s, c, clf)
                _progress.report("cbm C sweep", i + 1, len(grid), f"best val {best[0]:.3f}")
            assert best is not None
            self.C_, clf = best[1], best[2]
        self.coef_, self.intercept_ = self._weights(clf, data.n_classes)

    def _solve(self, Z: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
        clf = LogisticRegression(C=c, l1_ratio=1.0, solver="saga", max_iter=self.max_iter,
                                 tol=self.tol, class_weight=self.class_weight, random_state=0)
        with warnings.catch_warnings():  # a capped max_iter is a deliberate trade in the sweep
            warnings.simplefilter("ignore", ConvergenceWarning)
            return clf.fit(Z, y)

    @staticmethod
    def _weights(clf: LogisticRegression, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """[C, K] weights and [C] intercepts over every class (sklearn keeps the classes it saw;
        a binary fit has one row, P(class 1) = sigmoid(z))."""
        coef, icpt = clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
        if coef.shape[0] == 1:
            coef = np.concatenate([np.zeros_like(coef), coef])
            icpt = np.concatenate([np.zeros_like(icpt), icpt])
        W = np.zeros((n_classes, coef.shape[1]), np.float32)
        b = np.full(n_classes, ABSENT, np.float32)
        W[clf.classes_], b[clf.classes_] = coef, icpt
        return W, b

    def _logits(self, clf: LogisticRegression, Z: np.ndarray, n_classes: int) -> np.ndarray:
        W, b = self._weights(clf, n_classes)
        return Z @ W.T + b

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._z(X) @ self.coef_.T + self.intercept_)

    # -- what a person reads

    def concept_weights(self, classes: list[str]) -> dict[str, dict[str, float]]:
        """{class: {concept: weight}} of the non-zero weights, largest first."""
        self._check_fitted()
        out = {}
        for c, name in enumerate(classes):
            row = self.coef_[c]
            order = [i for i in np.argsort(-np.abs(row)) if row[i] != 0]
            out[name] = {str(self.concept_names_[i]): round(float(row[i]), 4) for i in order}
        return out

    def run_files(self, classes: list[str] | None = None) -> dict[str, str]:
        """`concepts.md`: per class the concepts that raise and lower its logit."""
        import json

        classes = classes or [str(i) for i in range(self.n_classes_)]
        weights = self.concept_weights(classes)
        n_used = int((np.abs(self.coef_) > 0).any(axis=0).sum())
        lines = [
            "# Concept-bottleneck weights", "",
            f"Sparse (L1) multinomial logistic regression on {len(self.concept_names_)} "
            f"z-scored MONET concept scores (train split's mean and spread), C = {self.C_:g}; "
            f"{n_used} concept(s) have a non-zero weight for some class. A weight is the "
            "change of the class's logit per standard deviation of the concept (before the "
            f"logit adjustment, tau = {self.logit_adjust_:g}, and temperature, "
            f"T = {self.temperature_:.3g}).", "",
        ]
        for name, w in weights.items():
            pos = [f"{k} {v:+.2f}" for k, v in w.items() if v >= 0.005][:5]
            neg = [f"{k} {v:+.2f}" for k, v in w.items() if v <= -0.005][:5]
            lines.append(f"- **{name}** <- {', '.join(pos) or '(none)'}; "
                         f"against: {', '.join(neg) or '(none)'}")
        lines.append("")
        return {"concepts.md": "\n".join(lines),
                "concepts.json": json.dumps({"C": self.C_, "weights": weights}, indent=2) + "\n"}

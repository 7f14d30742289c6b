"""Logistic regression on L2-normalised features: CLIP's linear-probe protocol, in seconds.

The inverse regularisation strength C is the one hyper-parameter that matters, so it is chosen
on the validation split: decades over `c_range`, then quarter-decades around the best. The
score is balanced accuracy (the ISIC metric) after the logit adjustment the head will apply, so
C and tau are chosen together. Each C warm-starts from the previous solution; the chosen C is
then solved to tolerance.

Two solvers with the same objective (scikit-learn's multinomial L2 logistic regression, so C
means the same): `solver="torch"` (default; full-batch L-BFGS in float32 on the CPU or a GPU,
see `_lbfgs`) and `solver="sklearn"` (scikit-learn's lbfgs, the reference).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from skincache.errors import UsageError

from . import _progress
from ._math import decade_grid
from ._registry import register_head
from .base import (
    FitData,
    Head,
    balanced_class_weights,
    softmax,
)

#: C used when neither `C` nor a validation split is given (scikit-learn's default).
DEFAULT_C = 1.0
SOLVERS = ("torch", "sklearn")


@register_head("logreg")
class LogRegHead(Head):
    """Multinomial logistic regression, C swept on validation (the CLIP linear probe).

    C: fixed inverse regularisation; None sweeps it on the validation split (decades from
    c_range[0] to c_range[1], then quarter-decades around the best when `refine`), falling
    back to C=1.0 without validation data. Ties go to the smaller C (more regularisation).
    class_weight: None or "balanced" (inverse class frequency in the loss).
    logit_adjust: "auto" (tau chosen on val with C), a fixed tau, or None (plain argmax).
    calibrate: temperature scaling on val. solver: "torch" (fast) or "sklearn" (reference).
    max_iter: L-BFGS function evaluations for the final fit (sweep steps use sweep_max_iter).
    tol: gradient tolerance. device: "cpu", "cuda" or "auto" (torch solver).
    use_views: also train on the K cached augmented views of every image (K+1 rows per image;
    K+1 times the cost); pairs well with `--tta`.
    max_memory: MiB (a number) or "512M" / "8G" of float32 training rows to hold at once;
    above it (None/"auto": a quarter of physical memory) the torch solver streams row blocks
    from the float16 inputs and sums the loss and gradient over them (exact full-batch values
    for L-BFGS, one block in memory). The sklearn solver always works in memory.
    metadata: patient fields appended to the normalised features, e.g. "age,sex,localization"
    (`skincache.metadata`: one-hot with an unknown column, age standardised with a missing
    flag); C regularises their weights too. None: image features only.
    """

    _fitted_arrays = ("coef_", "intercept_")
    _fitted_scalars = ("C_",)
    _streams = True

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"C": ">0", "c_range": ">0", "max_iter": ">=1", "sweep_max_iter": ">=1",
                         "tol": ">0", "metadata": "metadata-fields"}

    def __init__(
        self,
        C: float | None = None,
        class_weight: str | None = None,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
        solver: str = "torch",
        c_range: tuple[float, float] = (1e-3, 1e3),
        refine: bool = True,
        max_iter: int = 300,
        sweep_max_iter: int = 60,
        tol: float = 1e-5,
        device: str = "cpu",
        use_views: bool = False,
        max_memory: int | str | None = None,
        metadata: str | None = None,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate
        self.solver = solver
        self.c_range = c_range
        self.refine = refine
        self.max_iter = max_iter
        self.sweep_max_iter = sweep_max_iter
        self.tol = tol
        self.device = device
        self.use_views = use_views
        self.max_memory = max_memory
        self.metadata = metadata

    # -- fitting

    def _grid(self) -> list[float]:
        return decade_grid(self.c_range)

    def _fit(self, data: FitData) -> None:
        if self.class_weight not in (None, "balanced"):
            raise UsageError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.solver not in SOLVERS:
            raise UsageError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.solver == "sklearn":
            if self.use_views:
                raise UsageError("use_views=True needs solver='torch'")
            self._fit_sklearn(data)
        else:
            self._fit_torch(data)

    def _fit_torch(self, data: FitData) -> None:
        from . import _lbfgs
        from ._torch import memory_budget, resolve_device
        dev = resolve_device(self.device)
        n, k, d = data.views.shape
        views = self.use_views and data.n_views
        rows = n * (1 + (k if views else 0))
        # in memory: the normalised rows, their tensor and the centred copy, all float32
        self.streamed_ = 3 * 4 * d * rows > memory_budget(self.max_memory)
        y_all = np.concatenate([data.y, np.repeat(data.y, k)]) if views else data.y
        X: np.ndarray | _lbfgs.RowBlocks
        if self.streamed_:
            parts = [data.X] + ([data.views.reshape(n * k, d)] if views else [])
            X = _lbfgs.RowBlocks(parts, self._l2)
        else:
            X = self._l2(data.X)
            if views:
                X = np.concatenate([X, self._l2(data.views.reshape(n * k, d))])
        seen = np.unique(y_all)
        remap = np.full(data.n_classes, -1, dtype=np.int64)
        remap[seen] = np.arange(len(seen))
        y = remap[y_all]
        sw = None
        if self.class_weight == "balanced":
            sw = balanced_class_weights(y_all, data.n_classes)[y_all]

        # Two classes: scikit-learn fits one binary logistic; a 2-class multinomial at C/2 has
        # the same minimiser (w1 = -w0 = w/2), so C means the same in both.
        scale = 0.5 if len(seen) == 2 else 1.0

        def path(cs: list[float], init=None, max_iter: int = self.sweep_max_iter):
            for p in _lbfgs.logreg_path(X, y, [c * scale for c in cs], n_classes=len(seen),
                                        sample_weight=sw, device=dev, max_iter=max_iter,
                                        tol=self.tol, init=init):
                p.C = p.C / scale
                yield p

        if self.C is not None or not data.has_val:
            self.C_ = float(DEFAULT_C if self.C is None else self.C)
            point = next(iter(path([self.C_], max_iter=self.max_iter)))
            self.sweep_ = {self.C_: float("nan")}
        else:
            assert data.X_val is not None
            X_val = self._l2(data.X_val)
            score = self._val_score(data)
            results: dict[float, tuple[float, object]] = {}
            total = len(self._grid()) + (4 if self.refine else 0) + 1

            def record(p) -> None:
                logits = np.full((len(X_val), data.n_classes), -1e9, dtype=np.float32)
                logits[:, seen] = X_val @ p.coef.T + p.intercept
                results[p.C] = (score(logits), p)
                best = max(r[0] for r in results.values())
                _progress.report("logreg C sweep", len(results), total,
                                 f"C={p.C:.3g} val bal-acc {results[p.C][0]:.3f} (best {best:.3f})")

            for p in path(self._grid()):
                record(p)
            if self.refine:
                best = self._best(results)
                for step in (-0.5, -0.25, 0.25, 0.5):
                    c = float(best * 10.0**step)
                    nearest = results[min(results, key=lambda k: abs(np.log10(k / c)))][1]
                    record(next(iter(path([c], init=(nearest.coef, nearest.intercept)))))
            self.C_ = self._best(results)
            start = results[self.C_][1]
            point = next(iter(path([self.C_], init=(start.coef, start.intercept),
                                   max_iter=self.max_iter)))
            _progress.report("logreg C sweep", total, total, f"C={self.C_:.3g} solved")
            self.sweep_ = {c: r[0] for c, r in sorted(results.items())}
        self.n_evals_ = point.n_evals
        self._set_weights(data, seen, point.coef, point.intercept)

    def _set_weights(self, data: FitData, seen: np.ndarray, coef: np.ndarray,
                     intercept: np.ndarray) -> None:
        """Classes absent from y get no row in the fit; give them -inf logits (probability 0)."""
        self.classes_seen_ = seen.astype(np.int64)
        full_coef = np.zeros((data.n_classes, data.n_features), dtype=np.float32)
        full_int = np.full(data.n_classes, -np.inf, dtype=np.float32)
        full_coef[seen] = coef
        full_int[seen] = intercept
        self.coef_, self.intercept_ = full_coef, full_int

    def _fit_sklearn(self, data: FitData) -> None:
        X = self._l2(data.X)
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
                clf = self._sweep_sklearn(clf, X, data)
        coef = clf.coef_.astype(np.float32)
        intercept = clf.intercept_.astype(np.float32)
        if coef.shape[0] == 1:  # binary: sklearn keeps one row, P(class 1) = sigmoid(z)
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        self._set_weights(data, clf.classes_, coef, intercept)

    def _sweep_sklearn(self, clf: LogisticRegression, X: np.ndarray, data: FitData
                       ) -> LogisticRegression:
        assert data.X_val is not None and data.y_val is not None
        X_val = self._l2(data.X_val)
        score = self._val_score(data)
        results: dict[float, tuple[float, np.ndarray, np.ndarray]] = {}
        total = len(self._grid()) + (4 if self.refine else 0)

        def evaluate(c: float, start: float | None) -> None:
            if start is not None:  # warm start from the nearest solution found so far
                clf.coef_, clf.intercept_ = (a.copy() for a in results[start][1:])
            clf.set_params(C=float(c)).fit(X, data.y)
            logits = np.full((len(X_val), data.n_classes), -1e9)
            logits[:, clf.classes_] = clf.decision_function(X_val).reshape(len(X_val), -1)
            if len(clf.classes_) == 2:
                logits[:, clf.classes_[0]] = 0.0
            results[float(c)] = (score(logits), clf.coef_.copy(), clf.intercept_.copy())
            _progress.report("logreg C sweep (sklearn)", len(results), total, f"C={c:.3g}")

        for c in self._grid():  # increasing C: each fit starts from the more regularised one
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
    def _best(results: dict) -> float:
        top = max(r[0] for r in results.values())
        return min(c for c, r in results.items() if r[0] == top)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._l2(X) @ self.coef_.T + self.intercept_)

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.coef_, np.float64), np.asarray(self.intercept_, np.float64)

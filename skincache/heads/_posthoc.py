"""What every head does after its own fit: post-hoc logit adjustment and temperature scaling.

Why here, once, and on log-probabilities: both steps only need the head's class scores, and
log p differs from a head's logits by a per-row constant that softmax ignores, so one
implementation serves a logistic regression, an MLP, a kNN vote and a zero-shot classifier.

- **Logit adjustment** (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021):
  subtract `tau * log prior` from the scores. tau = 1 is Bayes-optimal for the balanced error
  when the scores are calibrated; in practice the best tau is chosen on the validation split by
  balanced accuracy (the ISIC metric). This is what wins balanced accuracy on long-tailed
  HAM10000 without touching the training objective.
- **Temperature scaling** (Guo et al., 2017): one scalar T fitted on validation by negative log
  likelihood; predictions (the argmax) never change, calibration (ECE) does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from skincache.errors import UsageError

from ._math import balanced_accuracy, log_softmax

#: tau values tried on validation when `logit_adjust="auto"`.
TAU_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
#: tau used when `logit_adjust="auto"` but there is no validation split (Menon et al.'s optimum)
TAU_WITHOUT_VAL = 1.0
#: log-probabilities are clipped here so a head that gives a class probability 0 (a kNN vote)
#: still has finite scores; as low as float64 allows, so peaked heads keep their ranking
LOG_EPS = float(np.log(1e-300))


def log_prior(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Log of the training class frequencies, add-one smoothed (a class absent from training
    gets a finite, small prior instead of -inf)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def as_scores(proba: np.ndarray) -> np.ndarray:
    """Probabilities -> finite log-probabilities (the scores both steps act on)."""
    return np.maximum(np.log(np.maximum(proba, 1e-300)), LOG_EPS)


def check_logit_adjust(value: object) -> float | None:
    """`"auto"` -> None (choose on validation); None/False -> 0.0; a number >= 0 -> itself."""
    if value == "auto":
        return None
    if value is None or value is False:
        return 0.0
    try:
        tau = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"logit_adjust must be 'auto', a number >= 0 or none; got {value!r}"
                         ) from None
    if not np.isfinite(tau) or tau < 0:
        raise UsageError(f"logit_adjust must be 'auto', a number >= 0 or none; got {value!r}")
    return tau


def choose_tau(scores: np.ndarray, y: np.ndarray, prior: np.ndarray,
               grid: tuple[float, ...] = TAU_GRID) -> tuple[float, float]:
    """(tau, balanced accuracy) of the best tau on (scores, y); ties go to the smaller tau."""
    best_tau, best = 0.0, -1.0
    for tau in grid:
        score = balanced_accuracy(y, (scores - tau * prior).argmax(axis=1))
        if score > best + 1e-12:
            best_tau, best = float(tau), score
    return best_tau, best


def val_scorer(logit_adjust: object, y_val: np.ndarray, prior: np.ndarray
               ) -> Callable[[np.ndarray], float]:
    """The validation score a head's own selection (C, epochs) should maximise: balanced
    accuracy after the logit adjustment that will be applied, so selection and the final head
    agree."""
    fixed = check_logit_adjust(logit_adjust)

    def score(logits: np.ndarray) -> float:
        logits = np.asarray(logits, dtype=np.float64)
        if fixed is None:
            return choose_tau(logits, y_val, prior)[1]
        return balanced_accuracy(y_val, (logits - fixed * prior).argmax(axis=1))

    return score


def nll(scores: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(scores / temperature)[np.arange(len(y)), y].mean())


def fit_temperature(scores: np.ndarray, y: np.ndarray, lo: float = 0.05, hi: float = 20.0
                    ) -> float:
    """T minimising the validation NLL of softmax(scores / T), searched on log T in [lo, hi]
    by scipy's bounded Brent method (NLL is unimodal in T for fixed scores). Returns 1.0 for
    an empty split, and where no T beats 1.0."""
    if len(y) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda log_t: nll(scores, y, float(np.exp(log_t))),
                          bounds=(np.log(lo), np.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    return t if nll(scores, y, t) <= nll(scores, y, 1.0) else 1.0

"""GDA (Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation", ICLR
2024): Gaussian discriminant analysis with one shared covariance, fused with zero-shot CLIP.

On L2-normalised features, class c is modelled as N(mu_c, S) with one covariance S shared by
all classes. Its Bayes rule is linear:

    gda_c(x) = x^T P mu_c - mu_c^T P mu_c / 2 + log pi_c,   P = S^-1

and the head's logits are `logit_scale * cos(x, prototypes) + alpha * gda(x)`, alpha chosen on
the validation split (the pure vision form, `gda(x)` alone, where the cache has no text:
`mode_` says which was fitted). Closed form, no training; `_linear_form` gives it exactly.

The estimate of P: with 16 shots of 1280-d features S is singular, so it is shrunk towards a
scaled identity, S_g = (1 - g) S + g (tr S / D) I, and P = S_g^-1 (a true precision, so the
vision form's probabilities are the Gaussian model's posteriors). g is chosen on validation
(the grid plus the paper's value); without validation it is the paper's own estimator
((N - 1) S + tr(S) I, i.e. g = D / (N - 1 + D)), which shrinks hard at a few shots and barely
at full data. Every sample counts: the clean view and the cached augmented views (the paper
averages augmented epochs the same way, as extra samples). One departure, stated: the paper's
code uses a uniform prior pi_c = 1/C, here it is the training frequencies (the same thing on a
K-shot draw); the post-hoc logit adjustment removes it where balanced accuracy wants.
"""

from __future__ import annotations

import numpy as np

from ._registry import register_head
from .base import FitData, Head, l2_normalize, softmax
from .zeroshot import zeroshot_logits, zeroshot_prototypes

#: the fusion weight without a validation split: zero-shot logits plus the GDA log-posterior
#: (a product of the two models' probabilities)
DEFAULT_ALPHA = 1.0
#: the GDA logit of a class with no training sample (a rare class missing from a few-shot
#: draw of a cache that has it): probability ~0, as the protocol heads give it; finite, since
#: a saved head holds no inf
ABSENT_LOGIT = -1e4


def training_samples(X: np.ndarray, y: np.ndarray, views: np.ndarray, use_views: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The normalised rows GDA (and ProKeR) learn from: the clean features, plus every cached
    augmented view as one more sample of its image's class when `use_views`."""
    n, k, d = views.shape
    if not use_views or k == 0:
        return l2_normalize(X), y
    feats = np.concatenate([X, np.asarray(views, np.float32).reshape(n * k, d)])
    return l2_normalize(feats), np.concatenate([y, np.repeat(y, k)])


def paper_shrinkage(n_samples: int, n_features: int) -> float:
    """g of the paper's estimator, P proportional to ((N - 1) S + tr(S) I)^-1, written as
    (1 - g) S + g (tr S / D) I: g = D / (N - 1 + D)."""
    return n_features / (max(n_samples - 1, 1) + n_features)


def class_means(Z: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, D] per-class means (float64); a class without samples gets the overall mean (a
    finite placeholder: `GDAHead` rules that class out, see ABSENT_LOGIT)."""
    mus = np.tile(Z.mean(axis=0, dtype=np.float64), (n_classes, 1))
    for c in np.unique(y):
        mus[c] = Z[y == c].mean(axis=0, dtype=np.float64)
    return mus


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.linalg.eigh` of a symmetric matrix on one BLAS thread: LAPACK's threaded eigh spins
    on a shared machine (1280 x 1280: 2.5 s on one thread, 17-22 s on two at load 11)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return np.linalg.eigh((a + a.T) / 2)


class SharedCovariance:
    """The pooled within-class covariance S in its eigenbasis, computed once, so that the
    precision of every shrinkage value on the grid costs a rescaling, not a new inverse.

    With fewer samples than dimensions (every few-shot draw) S has rank < N, and its
    eigenvectors come from the N x N Gram matrix of the centred samples instead of a D x D
    eigendecomposition; outside their span S is 0 and the shrunk covariance g tr(S)/D I."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, mus: np.ndarray) -> None:
        centered = (Z - mus[y].astype(np.float32)).astype(np.float32)
        n, dim = centered.shape
        denom = max(n - 1, 1)
        if n < dim:
            c64 = centered.astype(np.float64)
            lam, U = eigh(c64 @ c64.T)  # [N, N]: A A^T = U lam U^T
            keep = lam > 1e-10 * max(float(lam.max()), 1e-300)
            self.eigvecs = (c64.T @ U[:, keep]) / np.sqrt(lam[keep])  # [D, r]
            self.eigvals = lam[keep] / denom
        else:  # the N x D^2 product in float32 (the cost that grows with N), then float64
            self.eigvals, self.eigvecs = eigh((centered.T @ centered).astype(np.float64)
                                              / denom)
        self.eigvals = np.maximum(self.eigvals, 0.0)
        # tr(S) / D; with no within-class spread at all (one sample per class, no views) the
        # spread of random unit vectors, 1 / D: the rule is then the nearest class mean
        mean = float(self.eigvals.sum()) / dim
        self.scale = mean if mean > 1e-12 else 1.0 / dim

    def linear(self, mus: np.ndarray, log_pi: np.ndarray, g: float,
               absent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(W [C, D], b [C]) of the GDA rule with precision ((1-g) S + g tr(S)/D I)^-1; the
        `absent` classes (a bool mask) get W = 0, b = ABSENT_LOGIT."""
        d = (1.0 - g) * self.eigvals + g * self.scale
        mv = mus @ self.eigvecs  # [C, r] in the eigenbasis
        rest = mus - mv @ self.eigvecs.T  # the part outside it (0 when r = D)
        W = (mv / d) @ self.eigvecs.T + rest / (g * self.scale)
        quad = np.einsum("cr,cr->c", mv, mv / d) + np.einsum("cd,cd->c", rest, rest) / (
            g * self.scale)
        b = log_pi - 0.5 * quad
        if absent is not None and absent.any():
            W[absent], b[absent] = 0.0, ABSENT_LOGIT
        return W, b


@register_head("gda")
class GDAHead(Head):
    """Gaussian discriminant analysis (one shared covariance) fused with zero-shot; closed form.

    shrinkage: g in (0, 1]; None chooses it on validation over `n_shrinkage` log-spaced values
    in `shrinkage_range` plus the paper's value (without validation: the paper's value).
    alpha: weight of the GDA logits added to the zero-shot ones; None chooses it on validation
    over `n_alpha` log-spaced values in `alpha_range` (without validation: 1). Ignored in the
    vision form (no text). use_views: the cached augmented views as extra samples.
    """

    _fitted_arrays = ("coef_", "intercept_")
    _fitted_scalars = ("mode_", "shrinkage_", "alpha_", "logit_scale_", "n_samples_",
                       "val_score_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar)
    param_constraints = {"shrinkage": "(0,1]", "alpha": ">=0", "shrinkage_range": "(0,1]",
                         "n_shrinkage": ">=1", "alpha_range": ">0", "n_alpha": ">=1"}

    def __init__(
        self,
        shrinkage: float | None = None,
        alpha: float | None = None,
        shrinkage_range: tuple[float, float] = (1e-3, 0.9),
        n_shrinkage: int = 12,
        alpha_range: tuple[float, float] = (1e-4, 1e2),
        n_alpha: int = 13,
        use_views: bool = True,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.shrinkage = shrinkage
        self.alpha = alpha
        self.shrinkage_range = shrinkage_range
        self.n_shrinkage = n_shrinkage
        self.alpha_range = alpha_range
        self.n_alpha = n_alpha
        self.use_views = use_views
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _grids(self, n: int, d: int, fused: bool, has_val: bool
               ) -> tuple[list[float], list[float]]:
        paper = paper_shrinkage(n, d)
        if self.shrinkage is not None:
            gs = [float(self.shrinkage)]
        elif has_val:
            gs = sorted({*np.geomspace(*self.shrinkage_range, int(self.n_shrinkage)).tolist(),
                         paper})
        else:
            gs = [paper]
        if not fused:
            alphas = [1.0]
        elif self.alpha is not None:
            alphas = [float(self.alpha)]
        elif has_val:
            alphas = np.geomspace(*self.alpha_range, int(self.n_alpha)).tolist()
        else:
            alphas = [DEFAULT_ALPHA]
        return [float(g) for g in gs], [float(a) for a in alphas]

    def _fit(self, data: FitData) -> None:
        Z, yz = training_samples(data.X, data.y, data.views, self.use_views)
        c = data.n_classes
        mus = class_means(Z, yz, c)
        absent = np.bincount(yz, minlength=c) == 0
        cov = SharedCovariance(Z, yz, mus)
        log_pi = np.log(np.bincount(yz, minlength=c) + 1.0) - np.log(len(yz) + c)
        fused = data.text is not None
        self.mode_ = "fused" if fused else "vision"
        self.logit_scale_ = float(data.logit_scale)
        self.n_samples_ = int(len(Z))
        zs_w = zeroshot_prototypes(data.text) if fused else np.zeros((c, data.n_features))
        gs, alphas = self._grids(len(Z), data.n_features, fused, data.has_val)
        self.val_score_ = None
        best = (gs[0], alphas[0])
        if data.has_val and len(gs) * len(alphas) > 1:
            assert data.X_val is not None
            xv = l2_normalize(data.X_val).astype(np.float64)
            zs_val = (zeroshot_logits(data.X_val, zs_w.astype(np.float32), self.logit_scale_)
                      if fused else 0.0)
            score, best_score = self._val_score(data), -1.0
            for g in gs:
                W, b = cov.linear(mus, log_pi, g, absent)
                gda_val = xv @ W.T + b
                for a in alphas:
                    s = score(zs_val + a * gda_val)
                    if s > best_score + 1e-12:  # ties keep the first: smallest g, then alpha
                        best_score, best = s, (g, a)
            self.val_score_ = float(best_score)
        self.shrinkage_, self.alpha_ = best
        W, b = cov.linear(mus, log_pi, self.shrinkage_, absent)
        self.coef_ = (self.logit_scale_ * zs_w + self.alpha_ * W) if fused else W
        self.intercept_ = self.alpha_ * b if fused else b
        self.intercept_[absent] = ABSENT_LOGIT  # whatever alpha: no samples, no prediction

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(l2_normalize(X).astype(np.float64) @ self.coef_.T + self.intercept_)

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.coef_, np.float64), np.asarray(self.intercept_, np.float64)

"""ProKeR (Bendou et al., "ProKeR: A Kernel Perspective on Few-Shot Adaptation of Large
Vision-Language Models", CVPR 2025): kernel ridge regression pulled towards zero-shot CLIP.

The regression targets are one-hot labels Y, the base learner the zero-shot predictor
f_zs(x) = cos(x, prototypes), and the function is the proximal KRR solution in the RKHS of
Tip-Adapter's affinity kernel k(x, x') = exp(-beta (1 - x . x')) (a Gaussian kernel on the
sphere, ||x - x'||^2 = 2 (1 - x . x')):

    f(x) = f_zs(x) + k(x, S) (K + lambda I)^-1 (Y - f_zs(S)),   K = k(S, S)

over the support set S (the training images, and their cached views as extra samples).
Probabilities are softmax(logit_scale * f): with lambda -> infinity that is zero-shot CLIP
exactly. beta and lambda are chosen on the validation split. Without text f_zs = 0 (plain
KRR on one-hot targets; `mode_` says which was fitted). The public code writes the solve as
(K / lambda + I)^-1, which is lambda times the residual term above; we keep the textbook form,
and the lambda grid is wide enough that both land on the same fits.

Exact when the support set is small (a few-shot draw: 16 shots x 7 classes x 3 views = 336
rows). At full data (HAM10000: 6,000 images x 3 views) the exact N x N solve is far too slow
on two cores, so above `n_landmarks` rows the function is restricted to the span of m
landmarks Z (Nystrom's subset of regressors): f(x) = f_zs(x) + k(x, Z) c with
c = (K_ZS K_SZ + lambda K_ZZ)^-1 K_ZS (Y - f_zs(S)), which equals the exact solution when
Z = S. The landmarks are a seeded draw of clean training features, class-balanced (m / C per
class where a class has that many) so a rare class is not left without any. `exact_` records
which of the two was fitted; the saved arrays are the landmarks (or support set) and c.

One extension, `balance` (on by default), like Tip-Adapter's `balance_cache`: the squared
errors are weighted N / (C n_c), so every class carries the same total weight. A K-shot draw
is balanced and gets weight 1 everywhere (the paper's fit, exactly); on a full HAM10000 train
split (two-thirds nv) the unweighted regression learns the prior, and after the logit scale
of 100 no post-hoc logit adjustment (tau <= 2) can take it back out.
"""

from __future__ import annotations

import numpy as np

from ._registry import register_head
from .base import FitData, Head, l2_normalize, softmax
from .gda import eigh, training_samples
from .zeroshot import zeroshot_prototypes

#: beta and lambda without a validation split (Tip-Adapter's beta, a unit ridge)
DEFAULT_BETA = 5.5
DEFAULT_LAMBDA = 1.0
#: eigenvalues of K_ZZ below this fraction of the largest are dropped (a numerically rank-
#: deficient kernel at small beta)
EIG_RTOL = 1e-10


def affinity(A: np.ndarray, B: np.ndarray, beta: float) -> np.ndarray:
    """k(A, B) = exp(-beta (1 - A B^T)) for normalised rows, [len(A), len(B)]."""
    return np.exp(beta * (A @ B.T - 1.0))


def balanced_landmarks(y: np.ndarray, m: int, n_classes: int, seed: int) -> np.ndarray:
    """Indices of m rows: up to ceil(m / C) of each class (all of a smaller class), the rest
    drawn from what remains; seeded, sorted."""
    rng = np.random.default_rng(seed)
    per = -(-m // n_classes)
    chosen: list[np.ndarray] = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        chosen.append(rng.permutation(rows)[:per])
    picked = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    if len(picked) > m:
        picked = rng.permutation(picked)[:m]
    elif len(picked) < m:
        rest = np.setdiff1d(np.arange(len(y)), picked)
        picked = np.concatenate([picked, rng.permutation(rest)[:m - len(picked)]])
    return np.sort(picked)


class KernelSystem:
    """The solve for one beta, reduced to an eigenproblem so that every lambda on the grid
    costs a rescaling. Rows are weighted (w: `balance`), minimising
    sum_i w_i ||r_i - f(x_i)||^2 + lambda ||f - f_zs||^2; with sqrt(w) folded into the rows:

    Exact (`gram_sz` is S S^T): K~ = W^1/2 K W^1/2 = U e U^T, c = W^1/2 U (e + lambda)^-1
    U^T W^1/2 R, in float64 (w = 1: the textbook (K + lambda I)^-1 R).
    Nystrom: with Phi = K_SZ V s^-1/2 (K_ZZ = V s V^T, tiny s dropped) the restricted KRR is
    ridge regression on Phi, c = V s^-1/2 (Phi^T W Phi + lambda I)^-1 Phi^T W R; the N x m
    products run in float32 (the one cost that grows with N), the m x m algebra in float64."""

    def __init__(self, Z: np.ndarray, R: np.ndarray, w: np.ndarray, beta: float,
                 gram_sz: np.ndarray, exact: bool) -> None:
        k_sz = np.exp(beta * (gram_sz - 1.0))
        sw = np.sqrt(w)
        self.left: np.ndarray | None = None
        self.proj: np.ndarray | None = None
        if exact:
            k = k_sz.astype(np.float64) * sw[:, None] * sw[None, :]
            self.e, self.U = eigh(k)
            self.left = sw
            self.Ut_b = self.U.T @ (R.astype(np.float64) * sw[:, None])
        else:
            k_zz = affinity(Z.astype(np.float64), Z.astype(np.float64), beta)
            s, V = eigh(k_zz)
            keep = s > EIG_RTOL * max(float(s.max()), 1e-300)
            self.proj = V[:, keep] / np.sqrt(s[keep])  # [m, r]: V s^-1/2
            ks = k_sz * sw[:, None].astype(np.float32)
            G = (ks.T @ ks).astype(np.float64)  # [m, m]: K_ZS W K_SZ (one N x m^2 product)
            H = self.proj.T @ G @ self.proj  # Phi^T W Phi, [r, r]
            self.e, self.U = eigh(H)
            rs = (R * sw[:, None]).astype(np.float32)
            self.Ut_b = self.U.T @ (self.proj.T @ (ks.T @ rs).astype(np.float64))
        self.e = np.maximum(self.e, 0.0)

    def coef(self, lam: float) -> np.ndarray:
        """c [m, C] for ridge lambda."""
        w = self.U @ (self.Ut_b / (self.e + lam)[:, None])
        if self.proj is not None:
            return self.proj @ w
        assert self.left is not None
        return w * self.left[:, None]


def sample_weights(y: np.ndarray, n_classes: int, balance: bool) -> np.ndarray:
    """1 per row, or with `balance` N / (C_present n_c): every class the same total weight,
    mean 1 (on a balanced K-shot draw: all 1, the paper's unweighted fit)."""
    if not balance:
        return np.ones(len(y))
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return len(y) / ((counts > 0).sum() * counts[y])


@register_head("proker")
class ProKeRHead(Head):
    """Kernel ridge regression pulled towards zero-shot (ProKeR); closed form, Nystrom at scale.

    beta, lam: kernel sharpness and ridge; None searches them on validation over `n_beta`
    log-spaced values in `beta_range` x `n_lambda` in `lambda_range` (without validation: 5.5
    and 1). use_views: the cached views as extra support samples. balance: weight the squared
    errors so every class counts the same (see the module doc). n_landmarks: the exact solve
    up to this many support rows, Nystrom with this many landmarks above (seeded by `seed`).
    """

    _fitted_arrays = ("weights_", "support_", "dual_coef_")
    _fitted_scalars = ("mode_", "exact_", "beta_", "lambda_", "logit_scale_", "n_support_",
                       "val_score_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar)
    param_constraints = {"beta": ">0", "lam": ">0", "beta_range": ">0", "n_beta": ">=1",
                         "lambda_range": ">0", "n_lambda": ">=1", "n_landmarks": ">=1"}

    def __init__(
        self,
        beta: float | None = None,
        lam: float | None = None,
        beta_range: tuple[float, float] = (0.05, 20.0),
        n_beta: int = 6,
        lambda_range: tuple[float, float] = (1e-3, 1e5),
        n_lambda: int = 17,
        use_views: bool = True,
        balance: bool = True,
        n_landmarks: int = 512,
        seed: int = 0,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.beta = beta
        self.lam = lam
        self.beta_range = beta_range
        self.n_beta = n_beta
        self.lambda_range = lambda_range
        self.n_lambda = n_lambda
        self.use_views = use_views
        self.balance = balance
        self.n_landmarks = n_landmarks
        self.seed = seed
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _grid(self, fixed: float | None, rng: tuple[float, float], n: int, default: float,
              has_val: bool) -> list[float]:
        if fixed is not None:
            return [float(fixed)]
        if not has_val:
            return [default]
        return [float(v) for v in np.geomspace(*rng, int(n))]

    def _fit(self, data: FitData) -> None:
        c = data.n_classes
        S, ys = training_samples(data.X, data.y, data.views, self.use_views)
        fused = data.text is not None
        self.mode_ = "fused" if fused else "vision"
        self.logit_scale_ = float(data.logit_scale)
        self.weights_ = (zeroshot_prototypes(data.text) if fused
                         else np.zeros((c, data.n_features), np.float32))
        R = np.eye(c, dtype=np.float32)[ys] - S @ self.weights_.T  # Y - f_zs(S)
        w = sample_weights(ys, c, self.balance)
        self.exact_ = bool(len(S) <= int(self.n_landmarks))
        if self.exact_:
            Z = S
        else:
            Z = l2_normalize(data.X)[balanced_landmarks(data.y, int(self.n_landmarks), c,
                                                        int(self.seed))]
        self.support_ = np.ascontiguousarray(Z, dtype=np.float32)
        self.n_support_ = int(len(S))
        betas = self._grid(self.beta, self.beta_range, self.n_beta, DEFAULT_BETA, data.has_val)
        lams = self._grid(self.lam, self.lambda_range, self.n_lambda, DEFAULT_LAMBDA,
                          data.has_val)
        # S Z^T once for every beta (float64 when exact: an N x N problem that is small)
        gram = S.astype(np.float64) @ S.T.astype(np.float64) if self.exact_ else S @ Z.T
        self.val_score_ = None
        best = (betas[0], lams[0])
        best_system: KernelSystem | None = None
        if data.has_val and len(betas) * len(lams) > 1:
            assert data.X_val is not None
            xv = l2_normalize(data.X_val)
            zs_val = xv.astype(np.float64) @ self.weights_.T.astype(np.float64)
            gram_val = xv @ Z.T
            score, best_score = self._val_score(data), -1.0
            for beta in betas:
                system = KernelSystem(Z, R, w, beta, gram, self.exact_)
                k_val = np.exp(beta * (gram_val - 1.0)).astype(np.float64)
                for lam in lams:
                    s = score(self.logit_scale_ * (zs_val + k_val @ system.coef(lam)))
                    if s > best_score + 1e-12:  # ties keep the first: smallest beta, lambda
                        best_score, best, best_system = s, (beta, lam), system
            self.val_score_ = float(best_score)
        self.beta_, self.lambda_ = best
        system = best_system or KernelSystem(Z, R, w, self.beta_, gram, self.exact_)
        self.dual_coef_ = system.coef(self.lambda_).astype(np.float64)

    def decision(self, X: np.ndarray) -> np.ndarray:
        """f(x) [N, C]: the regression output (zero-shot cosine plus the kernel correction)."""
        x = l2_normalize(X)
        k = affinity(x, self.support_, self.beta_).astype(np.float64)
        return x.astype(np.float64) @ self.weights_.T.astype(np.float64) + k @ self.dual_coef_

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        out = np.empty((len(X), self.n_classes_))
        for i in range(0, len(X), 4096):  # [block, m] kernel rows at a time
            out[i:i + 4096] = softmax(self.logit_scale_ * self.decision(X[i:i + 4096]))
        return out

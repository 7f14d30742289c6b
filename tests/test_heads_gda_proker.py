"""`gda` and `proker` against their papers' formulas, written here in plain numpy from the
equations (not from the heads' code), on a small problem; the validation search, the no-text
form, save/load and few shots."""

from __future__ import annotations

import numpy as np
import pytest

from skincache.heads import create_head, load_head

N, D, C = 30, 5, 3
#: the heads' raw probabilities, no post-hoc step: what the formulas give
RAW = {"logit_adjust": None, "calibrate": False}


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Tiny matrices: BLAS threads only spin on a shared 2-core machine (an eigh of 90 x 90
    took 0.3 s under load with them, 1 ms without). Scoped to this module."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def problem(seed: int = 0, n: int = N, n_views: int = 2, spread: float = 0.6) -> dict:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((C, D))

    def draw(m: int):
        y = np.arange(m) % C
        return (means[y] + spread * rng.standard_normal((m, D))).astype(np.float32), y

    X, y = draw(n)
    Xv, yv = draw(24)
    Xt, _ = draw(12)
    views = (X[:, None, :] + 0.2 * rng.standard_normal((n, n_views, D))).astype(np.float32)
    text = (means[:, None, :] + 0.3 * rng.standard_normal((C, 2, D))).astype(np.float32)
    return dict(X=X, y=y, views=views, X_val=Xv, y_val=yv, X_test=Xt, text=text)


def prototypes(text: np.ndarray) -> np.ndarray:
    return unit(unit(text).mean(axis=1))


# ----------------------------------------------------------------------------- gda


def gda_reference(Z: np.ndarray, y: np.ndarray, g: float) -> tuple[np.ndarray, np.ndarray]:
    """W = P mu, b = log pi - mu P mu / 2, P = ((1-g) S + g tr(S)/D I)^-1, S pooled."""
    dim = Z.shape[1]
    mus = np.stack([Z[y == c].mean(axis=0) for c in range(C)])
    centered = Z - mus[y]
    S = centered.T @ centered / (len(Z) - 1)
    P = np.linalg.inv((1 - g) * S + g * np.trace(S) / dim * np.eye(dim))
    log_pi = np.log((np.bincount(y, minlength=C) + 1.0) / (len(y) + C))
    W = mus @ P
    b = log_pi - 0.5 * np.einsum("cd,de,ce->c", mus, P, mus)
    return W, b


@pytest.mark.parametrize("with_text", [True, False])
def test_gda_is_the_shared_covariance_bayes_rule(with_text):
    d = problem()
    g, alpha = 0.3, 0.7
    head = create_head("gda", shrinkage=g, alpha=alpha, **RAW).fit(
        d["X"], d["y"], views=d["views"], text=d["text"] if with_text else None)
    # the clean rows and every view, each a sample of its image's class, L2-normalised
    Z = unit(np.concatenate([d["X"], d["views"][:, 0], d["views"][:, 1]]).astype(np.float64))
    yz = np.concatenate([d["y"]] * 3)
    W, b = gda_reference(Z, yz, g)
    zt = unit(d["X_test"].astype(np.float64))
    if with_text:
        logits = 100.0 * zt @ prototypes(d["text"]).T + alpha * (zt @ W.T + b)
    else:
        logits = zt @ W.T + b
    assert head.mode_ == ("fused" if with_text else "vision")
    np.testing.assert_allclose(head.predict_proba(d["X_test"]), softmax(logits), atol=1e-6)
    A, c = head.linear_form()
    np.testing.assert_allclose(softmax(zt @ A.T + c), softmax(logits), atol=1e-6)


def test_gda_with_fewer_samples_than_dimensions():
    """N < D (every few-shot draw of 1280-d features): S is singular; the head works in its
    rank-N eigenbasis and the formula must still hold exactly."""
    rng = np.random.default_rng(5)
    dim, n = 40, 12
    X = (rng.standard_normal((n, dim)) + np.eye(C, dim)[np.arange(n) % C] * 2).astype(
        np.float32)
    y = np.arange(n) % C
    Xt = rng.standard_normal((9, dim)).astype(np.float32)
    for g in (0.05, 0.6):
        head = create_head("gda", shrinkage=g, use_views=False, **RAW).fit(X, y)
        W, b = gda_reference(unit(X.astype(np.float64)), y, g)
        zt = unit(Xt.astype(np.float64))
        np.testing.assert_allclose(head.coef_, W, rtol=1e-4, atol=1e-6 * np.abs(W).max())
        np.testing.assert_allclose(head.predict_proba(Xt), softmax(zt @ W.T + b), atol=1e-6)


def test_gda_without_val_uses_the_papers_estimator_and_alpha_1():
    d = problem()
    fused = create_head("gda", use_views=False, **RAW).fit(d["X"], d["y"], text=d["text"])
    assert fused.alpha_ == 1.0 and fused.val_score_ is None and fused.n_samples_ == N
    head = create_head("gda", use_views=False, **RAW).fit(d["X"], d["y"])
    assert head.shrinkage_ == pytest.approx(D / (N - 1 + D))
    # the paper's precision, ((N-1) S + tr(S) I)^-1, is ours times (N - 1 + D)
    Z = unit(d["X"].astype(np.float64))
    mus = np.stack([Z[d["y"] == c].mean(axis=0) for c in range(C)])
    cen = Z - mus[d["y"]]
    S = cen.T @ cen / (N - 1)
    P = (N - 1 + D) * np.linalg.inv((N - 1) * S + np.trace(S) * np.eye(D))
    np.testing.assert_allclose(head.coef_, mus @ P, rtol=1e-5, atol=1e-6)
    log_pi = np.log((np.bincount(d["y"]) + 1.0) / (N + C))
    np.testing.assert_allclose(head.intercept_,
                               log_pi - 0.5 * np.einsum("cd,de,ce->c", mus, P, mus), rtol=1e-5)


def test_gda_alpha_follows_what_val_says_about_the_text():
    """Right prototypes and training labels that are noise: val keeps the zero-shot side
    (small alpha); prototypes of the wrong classes: val turns to the GDA side (large alpha)."""
    d = problem(1, n=60, spread=0.9)
    noisy = np.random.default_rng(3).permutation(d["y"])
    good = create_head("gda", shrinkage=0.5).fit(
        d["X"], noisy, X_val=d["X_val"], y_val=d["y_val"], text=d["text"])
    wrong = create_head("gda", shrinkage=0.5).fit(
        d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"], text=d["text"][[1, 2, 0]])
    assert wrong.alpha_ > 10 * good.alpha_, (good.alpha_, wrong.alpha_)
    assert good.val_score_ is not None and wrong.val_score_ is not None


def test_gda_shrinkage_is_chosen_on_val():
    """Classes apart along a low-noise direction and drowned along a high-noise one: only the
    whitened rule (little shrinkage) separates them. Isotropic noise and 8 samples a class in
    20 dimensions: the raw covariance is noise, and val wants it shrunk."""
    rng = np.random.default_rng(0)
    dim = 20

    def anisotropic(m):
        y = np.arange(m) % C
        mu = np.zeros((C, dim))
        mu[:, 0], mu[:, 1] = [0, 1, 2], [0, 0.3, 0.6]
        sd = np.full(dim, 0.3)
        sd[0], sd[1] = 3.0, 0.05
        x = mu[y] + rng.standard_normal((m, dim)) * sd
        x[:, 2] += 10.0
        return x.astype(np.float32), y

    def isotropic(m):
        y = np.arange(m) % C
        x = np.eye(C, dim)[y] + 0.5 * rng.standard_normal((m, dim))
        x[:, 5] += 3.0
        return x.astype(np.float32), y

    (X, y), (Xv, yv) = anisotropic(600), anisotropic(300)
    whiten = create_head("gda", use_views=False).fit(X, y, X_val=Xv, y_val=yv)
    (X, y), (Xv, yv) = isotropic(24), isotropic(300)
    shrunk = create_head("gda", use_views=False).fit(X, y, X_val=Xv, y_val=yv)
    assert whiten.mode_ == "vision" and whiten.alpha_ == 1.0
    assert whiten.shrinkage_ < 0.01 < 0.1 < shrunk.shrinkage_, (whiten.shrinkage_,
                                                                shrunk.shrinkage_)
    # the choice is the val argmax: no fixed value on the grid scores better on val
    for g in (0.001, 0.01, 0.9):
        fixed = create_head("gda", use_views=False, shrinkage=g).fit(X, y, X_val=Xv, y_val=yv)
        assert (fixed.predict(Xv) == yv).mean() <= shrunk.val_score_ + 1e-9


# ----------------------------------------------------------------------------- proker


def rbf(A, B, beta):
    return np.exp(-beta * (1.0 - A @ B.T))


@pytest.mark.parametrize("with_text", [True, False])
def test_proker_exact_is_proximal_kernel_ridge_regression(with_text):
    d = problem()
    beta, lam = 4.0, 0.3
    head = create_head("proker", beta=beta, lam=lam, use_views=False, **RAW).fit(
        d["X"], d["y"], text=d["text"] if with_text else None)
    S = unit(d["X"].astype(np.float64))
    W = prototypes(d["text"]) if with_text else np.zeros((C, D))
    Y = np.eye(C)[d["y"]]
    alpha = np.linalg.solve(rbf(S, S, beta) + lam * np.eye(N), Y - S @ W.T)
    xt = unit(d["X_test"].astype(np.float64))
    f = xt @ W.T + rbf(xt, S, beta) @ alpha
    assert head.exact_ and head.mode_ == ("fused" if with_text else "vision")
    np.testing.assert_allclose(head.decision(d["X_test"]), f, atol=1e-5)
    np.testing.assert_allclose(head.predict_proba(d["X_test"]), softmax(100.0 * f), atol=1e-5)


def test_proker_balance_weights_the_squared_errors_by_class():
    """Imbalanced support set: minimise sum_i w_i ||r_i - f(x_i)||^2 + lambda ||f - f_zs||^2,
    w_i = N / (C n_c): alpha = (W K + lambda I)^-1 W R; balance=False is the plain solve."""
    d = problem()
    keep = np.r_[np.flatnonzero(d["y"] == 0), np.flatnonzero(d["y"] == 1)[:4],
                 np.flatnonzero(d["y"] == 2)[:2]]
    X, y = d["X"][keep], d["y"][keep]
    beta, lam = 4.0, 0.3
    S = unit(X.astype(np.float64))
    W = prototypes(d["text"])
    R = np.eye(C)[y] - S @ W.T
    K = rbf(S, S, beta)
    xt = unit(d["X_test"].astype(np.float64))
    counts = np.bincount(y, minlength=C)
    w = len(y) / (C * counts[y])
    for balance, weights in ((True, w), (False, np.ones(len(y)))):
        head = create_head("proker", beta=beta, lam=lam, use_views=False, balance=balance,
                           **RAW).fit(X, y, text=d["text"])
        alpha = np.linalg.solve(weights[:, None] * K + lam * np.eye(len(y)),
                                weights[:, None] * R)
        np.testing.assert_allclose(head.decision(d["X_test"]),
                                   xt @ W.T + rbf(xt, S, beta) @ alpha, atol=1e-5)


def test_proker_large_lambda_is_zero_shot_clip():
    d = problem()
    head = create_head("proker", beta=4.0, lam=1e9, **RAW).fit(d["X"], d["y"],
                                                              views=d["views"], text=d["text"])
    zs = softmax(100.0 * unit(d["X_test"].astype(np.float64)) @ prototypes(d["text"]).T)
    np.testing.assert_allclose(head.predict_proba(d["X_test"]), zs, atol=1e-6)


def test_proker_nystrom_is_the_subset_of_regressors_solution():
    """Above n_landmarks support rows: f = f_zs + k(x, Z) c,
    c = (K_ZS K_SZ + lambda K_ZZ)^-1 K_ZS (Y - f_zs(S)), Z class-balanced clean rows."""
    d = problem(n=60)
    beta, lam, m = 3.0, 0.5, 12
    head = create_head("proker", beta=beta, lam=lam, n_landmarks=m, seed=1, **RAW).fit(
        d["X"], d["y"], views=d["views"], text=d["text"])
    assert not head.exact_ and head.n_support_ == 180 and head.support_.shape == (m, D)
    clean = unit(d["X"].astype(np.float64))
    rows = [int(np.argmin(np.linalg.norm(clean - z, axis=1))) for z in head.support_]
    np.testing.assert_allclose(clean[rows], head.support_, atol=1e-6)  # landmarks: clean rows
    assert np.bincount(d["y"][rows], minlength=C).tolist() == [4, 4, 4]  # m / C per class
    Z = head.support_.astype(np.float64)
    S = unit(np.concatenate([d["X"], d["views"][:, 0], d["views"][:, 1]]).astype(np.float64))
    ys = np.concatenate([d["y"]] * 3)
    W = prototypes(d["text"])
    R = np.eye(C)[ys] - S @ W.T
    k_sz, k_zz = rbf(S, Z, beta), rbf(Z, Z, beta)
    c = np.linalg.solve(k_sz.T @ k_sz + lam * k_zz, k_sz.T @ R)
    xt = unit(d["X_test"].astype(np.float64))
    np.testing.assert_allclose(head.decision(d["X_test"]), xt @ W.T + rbf(xt, Z, beta) @ c,
                               atol=1e-4)
    again = create_head("proker", beta=beta, lam=lam, n_landmarks=m, seed=2, **RAW).fit(
        d["X"], d["y"], views=d["views"], text=d["text"])
    assert not np.array_equal(again.support_, head.support_)  # the seed draws the landmarks


def test_proker_lambda_follows_what_val_says_about_the_text():
    """Right prototypes, training labels mostly noise: val stays near zero-shot (large
    lambda); wrong prototypes, clean labels: val fits the data (small lambda)."""
    d = problem(1, n=60, spread=0.9)
    rng = np.random.default_rng(3)
    noisy = np.where(rng.random(60) < 0.8, rng.integers(0, C, 60), d["y"])
    kw = {"beta": 4.0}
    good = create_head("proker", **kw).fit(d["X"], noisy, X_val=d["X_val"], y_val=d["y_val"],
                                           text=d["text"])
    wrong = create_head("proker", **kw).fit(d["X"], d["y"], X_val=d["X_val"],
                                            y_val=d["y_val"], text=d["text"][[1, 2, 0]])
    assert good.lambda_ > 10 * wrong.lambda_, (good.lambda_, wrong.lambda_)


def test_proker_defaults_without_val():
    d = problem()
    head = create_head("proker").fit(d["X"], d["y"], views=d["views"])
    assert (head.beta_, head.lambda_, head.val_score_) == (5.5, 1.0, None)
    assert head.mode_ == "vision" and not head.weights_.any()


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("name,params", [
    ("gda", {}), ("gda", {"use_views": False}), ("proker", {}),
    ("proker", {"n_landmarks": 9}),
])
@pytest.mark.parametrize("with_text", [True, False])
def test_save_load_round_trip(name, params, with_text, tmp_path):
    d = problem()
    head = create_head(name, **params).fit(
        d["X"], d["y"], views=d["views"], X_val=d["X_val"], y_val=d["y_val"],
        text=d["text"] if with_text else None)
    back = load_head(head.save(tmp_path / "h"))
    np.testing.assert_array_equal(back.predict_proba(d["X_test"]),
                                  head.predict_proba(d["X_test"]))
    np.testing.assert_array_equal(back.predict_proba_tta(d["X_test"], d["views"][:12]),
                                  head.predict_proba_tta(d["X_test"], d["views"][:12]))
    assert back.mode_ == head.mode_


@pytest.mark.parametrize("name", ["gda", "proker"])
@pytest.mark.parametrize("shots,n_views", [(1, 0), (1, 2), (2, 0), (4, 2)])
def test_few_shots(name, shots, n_views):
    """K shots per class (one image each: no within-class spread at 1 shot without views)."""
    d = problem(2, n=C * shots, n_views=max(n_views, 1))
    views = d["views"][:, :n_views]
    head = create_head(name).fit(d["X"], d["y"], views=views, X_val=d["X_val"],
                                 y_val=d["y_val"], text=d["text"])
    p = head.predict_proba(d["X_test"])
    assert np.isfinite(p).all() and p.shape == (12, C)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    if name == "proker":
        assert head.exact_ and len(head.support_) == C * shots * (1 + n_views)


def test_gda_one_shot_without_views_is_the_nearest_class_mean():
    d = problem(2, n=C)
    head = create_head("gda", **RAW).fit(d["X"], d["y"])
    zt, mus = unit(d["X_test"]), unit(d["X"])
    np.testing.assert_array_equal(head.predict(d["X_test"]),
                                  np.argmin(((zt[:, None] - mus[None]) ** 2).sum(-1), axis=1))


@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("name", ["gda", "proker"])
def test_a_class_missing_from_training_is_not_predicted(name, with_text, tmp_path):
    """n_classes = 4 with no sample of class 3 (a rare class missing from a few-shot draw)."""
    d = problem()
    text = np.concatenate([d["text"], d["text"][:1]])  # class 3's prototype = class 0's
    head = create_head(name, **RAW).fit(d["X"], d["y"], views=d["views"], n_classes=C + 1,
                                        text=text if with_text else None, X_val=d["X_val"],
                                        y_val=d["y_val"])
    p = head.predict_proba(d["X_test"])
    assert p.shape == (12, C + 1) and (p[:, C] < 1e-3).all()
    back = load_head(head.save(tmp_path / "h"))  # finite arrays: it saves and loads
    np.testing.assert_array_equal(back.predict_proba(d["X_test"]), p)

"""lp++ and clap against direct numpy computations of what their papers define exactly: LP++'s
data-driven initialisation, its Lipschitz step sizes and one block-coordinate step; CLAP's
class-adaptive multipliers and its pull towards the prototypes when shots are few."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skincache.errors import UsageError
from skincache.heads import create_head, load_head
from skincache.heads.base import l2_normalize
from skincache.heads.clap import clap_multipliers, clap_prototypes
from skincache.heads.lpp import lpp_init, lpp_step_sizes
from skincache.heads.zeroshot import zeroshot_prototypes

C, D = 4, 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def problem(seed: int, per_class: list[int], text_noise: float = 0.3, views: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.standard_normal((C, D)))
    y = np.concatenate([np.full(k, c) for c, k in enumerate(per_class)])
    X = (2.0 * means[y] + rng.standard_normal((len(y), D)) * 0.6).astype(np.float32)
    V = (X[:, None] + rng.standard_normal((len(y), views, D)) * 0.1).astype(np.float32)
    text = (means[:, None] + rng.standard_normal((C, 3, D)) * text_noise).astype(np.float32)
    Xt = rng.standard_normal((200, D)).astype(np.float32) + 2.0 * means[np.arange(200) % C]
    return {"X": X, "y": y, "views": V, "text": text, "X_test": Xt.astype(np.float32),
            "y_test": np.arange(200) % C}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- LP++


def test_lpp_init_is_scaled_class_means_and_mean_text_similarity():
    p = problem(0, [5, 3, 9, 0])  # imbalanced, one class absent
    X, y = l2_normalize(p["X"]), p["y"]
    t = zeroshot_prototypes(p["text"])
    W0, b0, a0 = lpp_init(X, y, t, C)
    per = len(X) / 3  # N / classes present
    for c in range(3):
        np.testing.assert_allclose(W0[c], per * X[y == c].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(W0[3], 0.0)
    np.testing.assert_array_equal(b0, 0.0)
    big = problem(8, [30, 20, 10, 4])  # N / C = 16 at most: the paper's largest support
    Xb = l2_normalize(big["X"])
    np.testing.assert_allclose(lpp_init(Xb, big["y"], t, C)[0][0],
                               16.0 * Xb[big["y"] == 0].mean(0), rtol=1e-5)
    sims = [[X[y == c].mean(0) @ t[k] for k in range(C)] for c in range(3)]
    assert a0 == pytest.approx(250.0 * np.mean(sims), rel=1e-5)
    # a balanced K-shot support: the authors' class sums exactly
    q = problem(1, [4, 4, 4, 4])
    Xq = l2_normalize(q["X"])
    W0q, _, _ = lpp_init(Xq, q["y"], t, C)
    for c in range(C):
        np.testing.assert_allclose(W0q[c], Xq[q["y"] == c].sum(0), rtol=1e-5)


@pytest.mark.parametrize("n,d", [(40, 16), (520, 515)])  # exact Gram / Lanczos branches
def test_lpp_step_sizes_are_inverse_lipschitz_constants(n, d):
    rng = np.random.default_rng(n)
    X = l2_normalize(rng.standard_normal((n, d)) + 0.5)
    t = l2_normalize(rng.standard_normal((C, d)))
    lr_w, lr_a = lpp_step_sizes(X, t)
    X1 = np.hstack([X, np.ones((n, 1))])
    sigma = np.linalg.svd(X1, compute_uv=False)[0]
    assert lr_w == pytest.approx(4 * n / sigma**2, rel=1e-6)
    assert lr_a == pytest.approx(4 * n / ((X @ t.T) ** 2).sum(0).max(), rel=1e-6)


def test_lpp_one_block_coordinate_step_matches_numpy():
    p = problem(2, [6, 6, 6, 6])
    head = create_head("lp++", epochs=1, alpha_every=1, logit_adjust=None, calibrate=False)
    head.fit(p["X"], p["y"], text=p["text"])
    X, y = l2_normalize(p["X"]).astype(np.float64), p["y"]
    t = zeroshot_prototypes(p["text"]).astype(np.float64)
    W, b, a = lpp_init(X, y, t, C)
    alpha = np.full(C, a)
    lr_w, lr_a = lpp_step_sizes(X, t)
    S, Y, n = X @ t.T, np.eye(C)[y], len(X)

    def residual(W, b, alpha):
        return (softmax(X @ W.T + b + alpha * S) - Y) / n

    G = residual(W, b, alpha)  # the first momentum step is the plain gradient step
    W1, b1 = W - lr_w * G.T @ X, b - lr_w * G.sum(0)
    alpha1 = alpha - lr_a * (residual(W1, b1, alpha) * S).sum(0)  # at the new W
    np.testing.assert_allclose(head.weight_, W1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.bias_, b1, atol=1e-5)
    np.testing.assert_allclose(head.alpha_, alpha1, rtol=1e-4)
    assert not np.allclose(alpha1, alpha)  # the alpha step did move
    assert head.lr_w_ == pytest.approx(lr_w) and head.alpha_init_ == pytest.approx(a)
    # the logits are x.W^T + b + alpha * (x.t): one linear form
    w_eff, b_eff = head.linear_form(posthoc=False)
    np.testing.assert_allclose(w_eff, W1 + alpha1[:, None] * t, rtol=1e-4, atol=1e-4)


def test_lpp_training_lowers_the_loss_and_alpha_every_counts_w_steps():
    p = problem(3, [3, 3, 3, 3])
    X, y = l2_normalize(p["X"]).astype(np.float64), p["y"]
    t = zeroshot_prototypes(p["text"]).astype(np.float64)

    def loss(h):
        w, b = h.linear_form(posthoc=False)
        return -np.log(softmax(X @ w.T + b)[np.arange(len(y)), y]).mean()

    start = create_head("lp++", epochs=1, alpha_every=2, logit_adjust=None).fit(
        p["X"], p["y"], text=p["text"])
    np.testing.assert_allclose(start.alpha_, start.alpha_init_, rtol=1e-6)  # no alpha step yet
    W0, b0, a0 = lpp_init(X, y, t, C)
    init_loss = -np.log(softmax(X @ (W0 + a0 * t).T + b0)[np.arange(len(y)), y]).mean()
    trained = create_head("lp++", epochs=100, logit_adjust=None).fit(p["X"], p["y"],
                                                                      text=p["text"])
    assert loss(trained) < 0.5 * init_loss


# ----------------------------------------------------------------------------- CLAP


def test_clap_multipliers_are_zero_shot_probability_of_the_own_class():
    p = problem(4, [5, 2, 7, 0], text_noise=1.0)
    t = clap_prototypes(p["text"])
    np.testing.assert_allclose(t, p["text"].mean(axis=1), rtol=1e-6)  # raw template mean
    lam = clap_multipliers(p["X"], p["y"], t, 50.0, C)
    Xn = p["X"] / np.linalg.norm(p["X"], axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    prob = softmax(50.0 * Xn @ tn.T)
    for c in range(3):
        assert lam[c] == pytest.approx(prob[p["y"] == c, c].mean(), rel=1e-6)
    assert lam[3] == 1.0  # no rows: held at its prototype
    # the head uses the multipliers of its training rows (clean + every view)
    head = create_head("clap", epochs=2).fit(p["X"], p["y"], views=p["views"],
                                             text=p["text"], logit_scale=50.0, n_classes=C)
    rows = np.concatenate([p["X"], p["views"].reshape(-1, D)])
    ys = np.concatenate([p["y"], np.repeat(p["y"], 2)])
    np.testing.assert_allclose(head.multipliers_, clap_multipliers(rows, ys, t, 50.0, C),
                               rtol=1e-5)
    zslp = create_head("clap", constraint="none", epochs=2).fit(
        p["X"], p["y"], text=p["text"], logit_scale=50.0, n_classes=C)
    np.testing.assert_array_equal(zslp.multipliers_, 0.0)


def test_clap_stays_closer_to_the_prototypes_than_zs_lp_with_few_shots():
    p = problem(5, [2, 2, 2, 2], text_noise=0.6)
    kw = dict(epochs=60, seed=1)
    clap = create_head("clap", **kw).fit(p["X"], p["y"], views=p["views"], text=p["text"])
    free = create_head("clap", constraint="none", **kw).fit(p["X"], p["y"], views=p["views"],
                                                            text=p["text"])
    t = clap_prototypes(p["text"])

    def drift(h):
        return np.linalg.norm(h.weight_ - t, axis=1)

    assert np.all(drift(clap) < drift(free)), (drift(clap), drift(free))
    assert drift(free).mean() > 0.05  # the unconstrained probe did move


def test_clap_refuses_an_unknown_constraint():
    p = problem(6, [2, 2, 2, 2])
    with pytest.raises(UsageError, match="constraint"):
        create_head("clap", constraint="adaptative").fit(p["X"], p["y"], text=p["text"])


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("name", ["lp++", "clap"])
def test_one_shot_with_a_missing_class_fits_saves_and_loads(name, tmp_path):
    p = problem(7, [1, 1, 1, 0])
    head = create_head(name, epochs=20).fit(p["X"], p["y"], views=p["views"], text=p["text"],
                                            X_val=p["X_test"][:40], y_val=p["y_test"][:40])
    proba = head.predict_proba(p["X_test"])
    assert proba.shape == (200, C) and np.isfinite(proba).all()
    assert (head.predict(p["X_test"]) == p["y_test"]).mean() > 0.5  # text + 1 shot: learnable
    loaded = load_head(head.save(tmp_path / name))
    np.testing.assert_array_equal(loaded.predict_proba(p["X_test"]), proba)
    w, b = loaded.linear_form()
    ref = softmax(l2_normalize(p["X_test"]).astype(np.float64) @ w.T + b)
    np.testing.assert_allclose(ref, proba, atol=1e-6)

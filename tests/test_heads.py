"""Heads on synthetic arrays: they learn what is learnable, nothing from noise, agree with
open_clip's zero-shot builder, are reproducible, and save/load without pickle."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss

from skincache.concepts import ConceptBank
from skincache.errors import UsageError
from skincache.heads import (
    HEADS,
    Head,
    create_head,
    list_heads,
    load_head,
)
from skincache.heads import _torch as T
from skincache.heads.base import balanced_accuracy, l2_normalize

ALL_HEADS = [
    "zeroshot", "logreg", "linear", "mlp", "knn", "tip-adapter", "tip-adapter-f", "zs-linear",
    "dermfm-lp", "clip-benchmark-lp", "lp++", "clap", "gda", "proker", "cbm",
]
TEXT_HEADS = ["zeroshot", "tip-adapter", "tip-adapter-f", "zs-linear", "lp++", "clap"]
STOCHASTIC_HEADS = ["linear", "mlp", "tip-adapter-f", "zs-linear", "clap"]
# Small settings so the whole file stays fast on two shared cores.
FAST = {
    "logreg": {"c_range": (1e-2, 1e2), "refine": False},
    "linear": {"epochs": 15},
    "mlp": {"epochs": 15, "hidden": 64},
    "tip-adapter-f": {"epochs": 3, "samples_per_epoch": 256},
    "zs-linear": {"epochs": 15},
    "clip-benchmark-lp": {"epochs": 3},
    "lp++": {"epochs": 60},
    "clap": {"epochs": 20},
}

C, D, K, TEMPLATES = 4, 32, 3, 5


def make_problem(seed: int, n_train: int, n_val: int, n_test: int, *, shuffled: bool = False,
                 random_text: bool = False) -> dict:
    """Four clusters on the sphere with K noisy views per image and text prototypes near the
    class means. With `shuffled`, labels are drawn independently of the features (the clusters
    stay, so a head that predicted clusters would still be at chance)."""
    rng = np.random.default_rng(seed)
    means = l2_normalize(rng.standard_normal((C, D)))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.integers(0, C, n)
        x = 2.0 * means[z] + rng.standard_normal((n, D)) * 0.25
        y = rng.integers(0, C, n) if shuffled else z
        return x.astype(np.float32), y

    X, y = split(n_train)
    X_val, y_val = split(n_val)
    X_test, y_test = split(n_test)
    views = (X[:, None, :] + rng.standard_normal((n_train, K, D)) * 0.1).astype(np.float32)
    if random_text:
        text = rng.standard_normal((C, TEMPLATES, D))
    else:
        text = means[:, None, :] + rng.standard_normal((C, TEMPLATES, D)) * 0.1
    # concepts (for `cbm`): one per class near its mean (random ones with `random_text`), and
    # four unrelated ones; two templates, each with a reference near what all concepts share
    # (the mean of the class means), as "This is dermoscopy image" is for real prompts
    near = rng.standard_normal((C, 2, D)) if random_text else \
        means[:, None, :] + rng.standard_normal((C, 2, D)) * 0.1
    targets = l2_normalize(np.concatenate([near, rng.standard_normal((4, 2, D))]))
    shared = rng.standard_normal(D) if random_text else means.mean(axis=0)
    refs = l2_normalize(shared + rng.standard_normal((2, D)) * 0.05)
    concepts = ConceptBank([f"concept{i}" for i in range(C + 4)], targets.astype(np.float32),
                           refs.astype(np.float32))
    return {"X": X, "y": y, "views": views, "X_val": X_val, "y_val": y_val,
            "X_test": X_test, "y_test": y_test, "text": text.astype(np.float32),
            "concepts": concepts}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These arrays are tiny, so extra threads only add OpenMP spin-waits, and on a shared
    2-core machine those cost 2-7x the file's run time. Scoped to this module and restored."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def separable() -> dict:
    return make_problem(0, 240, 120, 200)


def fit(name: str, data: dict, **params) -> Head:
    head = create_head(name, **{**FAST.get(name, {}), **params})
    return head.fit(data["X"], data["y"], views=data["views"], X_val=data["X_val"],
                    y_val=data["y_val"], text=data["text"], logit_scale=100.0,
                    concepts=data["concepts"])


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_head():
    assert sorted(list_heads()) == sorted(ALL_HEADS)
    for name, cls in HEADS.items():
        assert cls.name == name
        assert isinstance(create_head(name), cls)
    assert {n for n, cls in HEADS.items() if cls.needs_text} == set(TEXT_HEADS)


def test_create_head_rejects_unknown_names_and_params():
    with pytest.raises(ValueError, match="unknown head 'nope'.*mlp"):
        create_head("nope")
    with pytest.raises(TypeError, match="'mlp'"):
        create_head("mlp", not_a_param=1)


def test_params_are_stored_not_validated_in_init():
    head = create_head("mlp", hidden=7, balance="loss")
    assert head.get_params()["hidden"] == 7 and head.get_params()["balance"] == "loss"
    assert not hasattr(head, "module_")
    assert head.set_params(hidden=9).hidden == 9


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name", ALL_HEADS)
def test_learns_separable_problem(name, separable):
    head = fit(name, separable)
    proba = head.predict_proba(separable["X_test"])
    assert proba.shape == (len(separable["X_test"]), C)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    pred = head.predict(separable["X_test"])
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, proba.argmax(axis=1))
    assert balanced_accuracy_score(separable["y_test"], pred) >= 0.95


@pytest.mark.parametrize("name", ALL_HEADS)
def test_chance_on_shuffled_labels(name):
    # Labels independent of features; val (used for model selection) and test are disjoint,
    # so anything above chance on test would be leakage or a broken metric.
    data = make_problem(1, 240, 120, 800, shuffled=True, random_text=True)
    head = fit(name, data)
    score = balanced_accuracy_score(data["y_test"], head.predict(data["X_test"]))
    assert abs(score - 1 / C) < 0.1, score


# ----------------------------------------------------------------------------- zeroshot


def test_zeroshot_matches_open_clip_builder(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }
    (tmp_path / "heads-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "heads-test-tiny.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model("heads-test-tiny").eval()
    tokenizer = open_clip.get_tokenizer("heads-test-tiny")
    classnames = ["melanoma", "nevus", "basal cell carcinoma", "dermatofibroma"]
    templates = ["a photo of {}.", "a dermoscopy image of {}.", "{}", "a close-up of a {}."]

    ref = build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                     num_classes_per_batch=3)  # [D, C], batched like theirs
    with torch.no_grad():  # un-normalised embeddings: the head must normalise per template
        tokens = tokenizer([t.format(c) for c in classnames for t in templates])
        text = model.encode_text(tokens).reshape(len(classnames), len(templates), -1).numpy()
    assert not np.allclose(np.linalg.norm(text, axis=-1), 1.0)

    feats = np.random.default_rng(0).standard_normal((300, cfg["embed_dim"])).astype(np.float32)
    head = create_head("zeroshot").fit(feats, np.zeros(300, int), text=text, logit_scale=100.0)
    np.testing.assert_allclose(head.weights_, ref.numpy().T, atol=1e-5)
    ref_logits = 100.0 * l2_normalize(feats) @ ref.numpy()
    np.testing.assert_array_equal(head.predict(feats), ref_logits.argmax(axis=1))
    ref_proba = torch.softmax(torch.from_numpy(ref_logits).double(), dim=1).numpy()
    np.testing.assert_allclose(head.predict_proba(feats), ref_proba, atol=1e-4)
    # Mean of raw embeddings (the "other" order) would give different prototypes here.
    naive = l2_normalize(text.mean(axis=1))
    assert not np.allclose(naive, head.weights_, atol=1e-3)


def test_zeroshot_uses_the_logit_scale(separable):
    cold = create_head("zeroshot").fit(separable["X"], separable["y"], text=separable["text"],
                                       logit_scale=1.0)
    hot = create_head("zeroshot").fit(separable["X"], separable["y"], text=separable["text"],
                                      logit_scale=100.0)
    x = separable["X_test"]
    np.testing.assert_array_equal(cold.predict(x), hot.predict(x))
    assert hot.predict_proba(x).max(axis=1).mean() > cold.predict_proba(x).max(axis=1).mean()


# ----------------------------------------------------------------------------- text handling


@pytest.mark.parametrize("name", TEXT_HEADS)
def test_text_heads_refuse_missing_text(name, separable):
    head = create_head(name)
    with pytest.raises(ValueError,
                       match=f"'{re.escape(name)}' needs the cache's text features.*re-encode"):
        head.fit(separable["X"], separable["y"], X_val=separable["X_val"],
                 y_val=separable["y_val"])


def test_class_count_resolution(separable):
    X, y, text = separable["X"], separable["y"], separable["text"]
    keep = y < C - 1  # the last class is missing from y
    assert create_head("knn").fit(X[keep], y[keep]).n_classes_ == C - 1
    assert create_head("knn").fit(X[keep], y[keep], n_classes=C + 2).n_classes_ == C + 2
    head = create_head("logreg", C=1.0).fit(X[keep], y[keep], text=text)
    assert head.n_classes_ == C  # from text
    proba = head.predict_proba(separable["X_test"])
    assert proba.shape[1] == C and np.all(proba[:, C - 1] == 0.0)
    with pytest.raises(ValueError, match="n_classes=3 but text has 4"):
        create_head("zeroshot").fit(X, y, text=text, n_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        create_head("knn").fit(X, y, n_classes=2)


def test_bad_inputs_are_refused(separable):
    X, y = separable["X"], separable["y"]
    with pytest.raises(ValueError, match="views must have shape"):
        create_head("mlp").fit(X, y, views=separable["views"][:10])
    with pytest.raises(ValueError, match="X_val and y_val together"):
        create_head("mlp").fit(X, y, X_val=separable["X_val"])
    with pytest.raises(ValueError, match="y must have shape"):
        create_head("knn").fit(X, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        create_head("knn").fit(np.full_like(X, np.nan), y)
    with pytest.raises(ValueError, match="balance must be one of"):
        create_head("linear", balance="oversample").fit(X, y)
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        create_head("mlp").predict(X)
    head = create_head("knn").fit(X, y)
    with pytest.raises(ValueError, match="features"):
        head.predict(X[:, :5])


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("name", ALL_HEADS)
def test_same_seed_same_probabilities(name, separable):
    before = torch.get_rng_state()
    a = fit(name, separable, **({"seed": 3} if name in STOCHASTIC_HEADS else {}))
    assert torch.equal(torch.get_rng_state(), before), "fit changed torch's global RNG"
    b = fit(name, separable, **({"seed": 3} if name in STOCHASTIC_HEADS else {}))
    x = separable["X_test"]
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))


def fit_without_val(name: str, data: dict, **params) -> Head:
    """No validation split: training runs to the end, nothing is undone by early stopping."""
    head = create_head(name, **{**FAST.get(name, {}), **params})
    return head.fit(data["X"], data["y"], views=data["views"], text=data["text"])


@pytest.mark.parametrize("name", STOCHASTIC_HEADS)
def test_different_seed_different_probabilities(name, separable):
    x = separable["X_test"]
    a = fit_without_val(name, separable, seed=1).predict_proba(x)
    b = fit_without_val(name, separable, seed=2).predict_proba(x)
    assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("name", ALL_HEADS)
def test_save_load_round_trip_without_pickle(name, separable, tmp_path, monkeypatch):
    head = fit(name, separable)
    head.save(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json",
                                                                  "head.safetensors"]
    config = json.loads((tmp_path / "h" / "head.json").read_text())
    assert config["name"] == name and config["n_classes"] == C
    assert config["params"] == json.loads(json.dumps(head.get_params()))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load_head must never unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = load_head(tmp_path / "h")
    assert type(loaded) is type(head) and loaded.n_classes_ == C
    x = separable["X_test"]
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))


def test_load_head_refuses_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved head"):
        load_head(tmp_path)
    (tmp_path / "head.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a skincache head"):
        load_head(tmp_path)


# ----------------------------------------------------------------------------- per-head behaviour


def test_views_change_what_the_mlp_sees(separable):
    x = separable["X_test"]
    with_views = fit("mlp", separable, use_views=True, patience=None).predict_proba(x)
    without = fit("mlp", separable, use_views=False, patience=None).predict_proba(x)
    assert not np.array_equal(with_views, without)
    # K = 0 (an empty views array) means the clean view, same as use_views=False
    empty = {**separable, "views": separable["views"][:, :0]}
    np.testing.assert_array_equal(fit("mlp", empty, patience=None).predict_proba(x), without)


def test_early_stopping_restores_the_best_epoch(separable):
    head = fit("mlp", separable, epochs=15, patience=3, lr=3e-2)
    assert 1 <= head.best_epoch_ <= head.epochs_run_
    assert head.best_val_score_ == max(head.val_scores_)
    restored = balanced_accuracy(separable["y_val"], head.predict(separable["X_val"]))
    assert restored == pytest.approx(head.best_val_score_)


def test_balanced_sampler_and_loss_weights():
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    draws = torch.cat([T.epoch_indices(y, 3, "sampler", torch.Generator().manual_seed(s))
                       for s in range(20)])
    share = torch.bincount(y[draws], minlength=3).double() / len(draws)
    assert torch.all((share - 1 / 3).abs() < 0.05), share
    plain = T.epoch_indices(y, 3, None, torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(100))
    from skincache.heads.base import balanced_class_weights
    np.testing.assert_allclose(balanced_class_weights(y.numpy(), 4),
                               [100 / 270, 100 / 27, 100 / 3, 0.0])


def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))


def test_logreg_c_choice(separable):
    X, y = separable["X"], separable["y"]
    assert create_head("logreg").fit(X, y).C_ == 1.0  # no validation split: documented default
    assert create_head("logreg", C=0.3).fit(X, y, X_val=separable["X_val"],
                                            y_val=separable["y_val"]).C_ == 0.3
    swept = fit("logreg", separable, c_range=(1e-3, 1e2), refine=True, logit_adjust=None)
    assert len(swept.sweep_) == 6 + 4 and swept.C_ in swept.sweep_
    assert swept.sweep_[swept.C_] == max(swept.sweep_.values())
    assert swept.sweep_[1e-3] < swept.sweep_[swept.C_]  # the sweep saw a difference
    # larger C really fits more tightly (warm starts must not stop at iteration 0)
    weak, strong = (create_head("logreg", C=c).fit(X, y).coef_ for c in (1.0, 100.0))
    assert np.abs(strong).max() > 2 * np.abs(weak).max()


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize("n_classes", [2, C])
def test_logreg_probabilities_match_sklearn(n_classes, solver, separable):
    """Both solvers minimise scikit-learn's objective: the same C gives the same model."""
    from sklearn.linear_model import LogisticRegression

    keep = separable["y"] < n_classes
    X, y = separable["X"][keep], separable["y"][keep]
    head = create_head("logreg", C=0.5, solver=solver, logit_adjust=None).fit(X, y)
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(l2_normalize(X), y)
    x, y_test = separable["X_test"], separable["y_test"]
    keep_test = y_test < n_classes
    ours, theirs = head.predict_proba(x), ref.predict_proba(l2_normalize(x))
    # float32 L-BFGS vs float64 scipy: the same optimum to within float32 round-off
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99
    assert abs(log_loss(y_test[keep_test], ours[keep_test], labels=range(n_classes))
               - log_loss(y_test[keep_test], theirs[keep_test], labels=range(n_classes))) < 1e-3


def test_device_choice(separable):
    head = fit("linear", separable, device="auto")
    assert next(head.module_.parameters()).device.type == (
        "cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is available"):
            fit("linear", separable, device="cuda")


def test_knn_neighbours_and_view_keys(separable):
    X, y, views = separable["X"], separable["y"], separable["views"]
    head = create_head("knn", k=5).fit(X, y, views=views)
    sims, idx = head.kneighbors(X[:10])
    assert sims.shape == idx.shape == (10, 5)
    np.testing.assert_array_equal(idx[:, 0], np.arange(10))  # each image is its own nearest
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # most similar first
    assert head.kneighbors(X[:2], k=3)[1].shape == (2, 3)
    with_views = create_head("knn", k=5, use_views=True).fit(X, y, views=views)
    assert with_views.index_.ntotal == len(X) * (K + 1)
    idx_v = with_views.kneighbors(X[:10])[1]
    assert idx_v.max() < len(X)  # view keys map back to their image's row
    uniform = create_head("knn", k=5, weights="uniform").fit(X, y)
    assert set(np.unique(uniform.predict_proba(X) * 5)) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_knn_balanced_votes():
    rng = np.random.default_rng(0)
    X = l2_normalize(rng.standard_normal((10, 8)))
    y = np.array([0] * 9 + [1])
    q = X[:3]
    plain = create_head("knn", k=10, weights="uniform", logit_adjust=None).fit(X, y)
    np.testing.assert_allclose(plain.predict_proba(q), [[0.9, 0.1]] * 3)
    fair = create_head("knn", k=10, weights="uniform", class_weight="balanced",
                       logit_adjust=None).fit(X, y)
    np.testing.assert_allclose(fair.predict_proba(q), [[0.5, 0.5]] * 3)


def test_tip_adapter_cache_values():
    from skincache.heads.tip_adapter import cache_values

    rng = np.random.default_rng(0)
    X, text = rng.standard_normal((12, 8)), rng.standard_normal((3, 2, 8))

    def values_of(head):
        return cache_values(head.key_labels_, head.n_classes_, head.balance_cache)

    balanced_y = np.repeat([0, 1, 2], 4)
    head = create_head("tip-adapter").fit(X, balanced_y, text=text)
    # a balanced cache gives exactly the paper's one-hot values
    np.testing.assert_array_equal(values_of(head).numpy(), np.eye(3)[balanced_y])
    skewed_y = np.array([0] * 8 + [1] * 3 + [2])
    values = values_of(create_head("tip-adapter").fit(X, skewed_y, text=text))
    np.testing.assert_allclose(values.sum(dim=0).numpy(), [4.0, 4.0, 4.0], rtol=1e-6)
    raw = create_head("tip-adapter", balance_cache=False).fit(X, skewed_y, text=text)
    np.testing.assert_array_equal(values_of(raw).numpy(), np.eye(3)[skewed_y])


def test_tip_adapter_keys_and_fallback(separable):
    X, y, views = separable["X"], separable["y"], separable["views"]
    head = create_head("tip-adapter").fit(X, y, views=views, text=separable["text"])
    expected = l2_normalize(l2_normalize(views).mean(axis=1))
    np.testing.assert_allclose(head.keys_, expected, atol=1e-6)
    assert (head.alpha_, head.beta_) == (1.0, 5.5)  # no validation split
    no_views = create_head("tip-adapter").fit(X, y, text=separable["text"])
    np.testing.assert_allclose(no_views.keys_, l2_normalize(X), atol=1e-6)
    searched = fit("tip-adapter", separable)
    assert searched.val_score_ is not None and searched.val_score_ >= 0.95
    fixed = fit("tip-adapter", separable, alpha=2.0, beta=3.0)
    assert (fixed.alpha_, fixed.beta_) == (2.0, 3.0)


def test_tip_adapter_f_moves_the_keys():
    # Uninformative text: with good prototypes and logit scale 100 the softmax saturates and
    # the keys get no gradient at all.
    data = make_problem(2, 240, 120, 200, random_text=True)
    head = fit_without_val("tip-adapter-f", data, epochs=3)
    start = l2_normalize(l2_normalize(data["views"]).mean(axis=1))
    assert not np.allclose(head.keys_, start, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(head.keys_, axis=1), 1.0, atol=1e-5)


def test_zs_linear_anchor_holds_weights_near_prototypes(separable):
    free = fit_without_val("zs-linear", separable, anchor=0.0, lr=1e-3)
    held = fit_without_val("zs-linear", separable, anchor=100.0, lr=1e-3)

    def drift(h):
        return float((h.module_.weight - h.module_.w0).detach().norm())

    assert drift(free) > 0.01

    assert drift(held) < 0.5 * drift(free)
    np.testing.assert_allclose(free.module_.w0.numpy(),
                               create_head("zeroshot").fit(separable["X"], separable["y"],
                                                           text=separable["text"]).weights_,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "knn", "zeroshot"])
def test_an_unfitted_head_refuses_every_use(name, tmp_path, separable):
    """check_is_fitted, not a default temperature: predict, predict_proba, linear_form and
    save all raise scikit-learn's NotFittedError as skincache's own error (one CLI line)."""
    from sklearn.exceptions import NotFittedError

    from skincache.errors import SkincacheError
    from skincache.heads import HeadNotFittedError

    head = create_head(name)
    X = separable["X"][:4]
    for use in (lambda: head.predict(X), lambda: head.predict_proba(X),
                lambda: head.predict_proba_pair(X), lambda: head.linear_form(),
                lambda: head.save(tmp_path / name)):
        with pytest.raises(HeadNotFittedError, match="not fitted") as info:
            use()
        assert isinstance(info.value, NotFittedError) and isinstance(info.value, SkincacheError)
    assert not (tmp_path / name).exists()


def test_fit_sets_the_posthoc_attributes_only_once_chosen(separable, monkeypatch):
    """A `_fit` that raises leaves no temperature or logit adjustment behind."""
    from skincache.heads import LinearHead

    head = create_head("linear", epochs=1)

    def boom(self, data):
        assert not hasattr(self, "temperature_") and not hasattr(self, "logit_adjust_")
        raise RuntimeError("boom")

    monkeypatch.setattr(LinearHead, "_fit", boom)
    with pytest.raises(RuntimeError, match="boom"):
        head.fit(separable["X"], separable["y"])
    assert not hasattr(head, "temperature_")


def test_head_config_is_every_torch_heads_train_config(separable):
    from skincache.heads import _torch as T
    from skincache.heads.base import check_fit_inputs

    data = check_fit_inputs(separable["X"], separable["y"], X_val=separable["X_val"],
                            y_val=separable["y_val"])
    head = create_head("zs-linear", epochs=3, batch_size=7, lr=0.5, patience=None, seed=4)
    head.log_prior_ = np.zeros(data.n_classes, np.float32)  # what fit sets before _fit
    cfg = T.head_config(head, data, eval_init=True)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.patience, cfg.seed, cfg.name) == (
        3, 7, 0.5, None, 4, "zs-linear")
    assert cfg.eval_init and callable(cfg.val_score)
    no_val = check_fit_inputs(separable["X"], separable["y"])
    assert T.head_config(head, no_val).val_score is None

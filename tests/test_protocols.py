"""The published protocols as heads: `dermfm-lp` (DermFM-Zero's linear probe) and
`clip-benchmark-lp` (CLIP_benchmark's), and how every table treats a head that trained on val."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from skincache.bench import VAL_KEY, aggregate, format_cell, markdown_table
from skincache.cli import app
from skincache.heads import create_head, load_head
from skincache.heads.base import l2_normalize
from skincache.heads.clip_benchmark_lp import COARSE, WD_GRID, CLIPBenchmarkLinearProbeHead
from skincache.runs import RunResult, chosen_by_val

REPO = Path(__file__).resolve().parents[1]
REAL_NPZ = REPO.parent / "shared/data/features/ham10000-effnetlite0.npz"
runner = CliRunner()

N_CLASSES, D = 5, 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny arrays: extra threads only spin on a shared 2-core machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem() -> dict:
    """Overlapping Gaussian classes with an offset (raw, un-normalised features, as DermFM-Zero
    feeds them), so the regulariser matters and the solvers have something to disagree on."""
    rng = np.random.default_rng(0)
    means = rng.standard_normal((N_CLASSES, D)) + 2.0

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        return (means[y] + 1.5 * rng.standard_normal((n, D))).astype(np.float32), y

    (X, y), (Xv, yv), (Xt, yt) = draw(600), draw(200), draw(1000)
    return dict(X=X, y=y, X_val=Xv, y_val=yv, X_test=Xt, y_test=yt)


def _fit(name: str, p: dict, with_val: bool = True, **params):
    val = dict(X_val=p["X_val"], y_val=p["y_val"]) if with_val else {}
    return create_head(name, **params).fit(p["X"], p["y"], n_classes=N_CLASSES, **val)


# ----------------------------------------------------------------------------- dermfm-lp


def test_dermfm_cost_is_dimension_times_classes_over_100(problem):
    head = _fit("dermfm-lp", problem)
    assert head.C_ == pytest.approx(D * N_CLASSES / 100)
    # their n_classes is the labels the fit sees: drop class 4 from train
    keep = problem["y"] != 4
    part = create_head("dermfm-lp").fit(problem["X"][keep], problem["y"][keep],
                                        n_classes=N_CLASSES)
    assert part.C_ == pytest.approx(D * (N_CLASSES - 1) / 100)
    assert np.all(part.predict_proba(problem["X_test"])[:, 4] == 0)


def test_dermfm_sklearn_objective_predicts_as_scikit_learn(problem):
    head = _fit("dermfm-lp", problem, objective="sklearn")
    ref = LogisticRegression(C=D * N_CLASSES / 100, max_iter=1000).fit(problem["X"], problem["y"])
    agree = (head.predict(problem["X_test"]) == ref.predict(problem["X_test"])).mean()
    assert agree >= 0.99, agree
    np.testing.assert_allclose(head.predict_proba(problem["X_test"]),
                               ref.predict_proba(problem["X_test"]), atol=0.03)


def _dermfm_objective(X: np.ndarray, y: np.ndarray, C: float):
    """DermFM-Zero's loss, written out in numpy: mean cross-entropy + ||W||_F / (2C)."""
    n, d = X.shape
    onehot = np.eye(N_CLASSES)[y]

    def value_and_grad(p: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = p[:N_CLASSES * d].reshape(N_CLASSES, d), p[N_CLASSES * d:]
        z = X @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        norm = np.linalg.norm(W)
        g = (np.exp(logp) - onehot) / n
        gW = g.T @ X + W / (2 * C * max(norm, 1e-300))
        return float(-(onehot * logp).sum() / n + norm / (2 * C)), np.concatenate(
            [gW.ravel(), g.sum(axis=0)])

    return value_and_grad


def test_dermfm_objective_is_minimised_as_documented(problem):
    """The default objective is theirs (not scikit-learn's): an independent scipy solve of the
    written-out loss reaches the same weights and no lower a value."""
    head = _fit("dermfm-lp", problem)
    X, y = problem["X"].astype(np.float64), problem["y"]
    f = _dermfm_objective(X, y, head.C_)
    ref = minimize(f, np.full(N_CLASSES * (D + 1), 0.01), jac=True, method="L-BFGS-B",
                   options={"maxiter": 10_000, "gtol": 1e-10, "ftol": 1e-15})
    ours = f(np.concatenate([head.coef_.ravel(), head.intercept_]).astype(np.float64))[0]
    assert ours <= ref.fun + 1e-6
    np.testing.assert_allclose(head.coef_, ref.x[:N_CLASSES * D].reshape(N_CLASSES, D),
                               atol=1e-3)
    # and it is not scikit-learn's minimiser: the two objectives differ
    sk = _fit("dermfm-lp", problem, objective="sklearn")
    assert np.abs(sk.coef_ - head.coef_).max() > 0.05


def test_dermfm_fits_train_only_as_their_script_and_merges_val_on_request(problem):
    with_val, without = _fit("dermfm-lp", problem), _fit("dermfm-lp", problem, with_val=False)
    np.testing.assert_array_equal(with_val.coef_, without.coef_)  # val unused
    assert not with_val.trains_on_val
    merged = _fit("dermfm-lp", problem, merge_val=True)
    assert merged.trains_on_val
    both = create_head("dermfm-lp").fit(np.concatenate([problem["X"], problem["X_val"]]),
                                        np.concatenate([problem["y"], problem["y_val"]]),
                                        n_classes=N_CLASSES)
    np.testing.assert_allclose(merged.coef_, both.coef_, atol=1e-5)
    assert np.abs(merged.coef_ - with_val.coef_).max() > 1e-3
    assert merged.logit_adjust_ == 0.0 and merged.temperature_ == 1.0  # no post-hoc step


# ----------------------------------------------------------------------------- clip-benchmark-lp


def test_clip_benchmark_chooses_wd_on_val_then_refits_on_train_and_val(problem, monkeypatch,
                                                                       tmp_path):
    calls: list[tuple[np.ndarray, float]] = []
    train = CLIPBenchmarkLinearProbeHead._train

    def spy(self, X, y, n_out, wd):
        calls.append((X.copy(), wd))
        return train(self, X, y, n_out, wd)

    monkeypatch.setattr(CLIPBenchmarkLinearProbeHead, "_train", spy)
    head = _fit("clip-benchmark-lp", problem)
    n, n_val = len(problem["X"]), len(problem["X_val"])
    *sweep, (final_X, final_wd) = calls
    # the sweep: train rows only, CLIP_benchmark's grid, its 7 coarse points all tried
    assert all(len(X) == n for X, _ in sweep)
    assert {WD_GRID[i] for i in COARSE} <= {wd for _, wd in sweep} <= set(WD_GRID)
    assert len({wd for _, wd in sweep}) == len(sweep)  # each grid point fit once
    # the choice is the best val accuracy among them, and the refit used it on train+val
    assert head.sweep_[head.weight_decay_] == max(head.sweep_.values())
    assert final_wd == head.weight_decay_
    assert len(final_X) == n + n_val
    np.testing.assert_allclose(final_X[n:], l2_normalize(problem["X_val"]))
    assert head.trains_on_val and load_head(head.save(tmp_path / "h")).trains_on_val


def test_clip_benchmark_without_val_uses_no_weight_decay_and_train_only(problem):
    head = _fit("clip-benchmark-lp", problem, with_val=False, epochs=2)
    assert head.weight_decay_ == 0.0 and not head.trains_on_val


# ----------------------------------------------------------------------------- val's pick


def _run(variant: str, val: float, fit_on_val: bool) -> dict:
    return {"variant": variant, "head": variant, "shots": None, "seed": 0, VAL_KEY: val,
            "balanced_accuracy": val - 0.1, "fit_seconds": 1.0, "trains_on_val": fit_on_val}


def test_trains_on_val_heads_are_never_vals_pick():
    rows = aggregate([_run("clip-benchmark-lp", 0.99, True), _run("logreg", 0.70, False),
                      _run("knn", 0.60, False)])
    picked = [r["variant"] for r in rows if r.get("chosen_by_val")]
    assert picked == ["logreg"]
    top = rows[0]
    assert format_cell(top, VAL_KEY).endswith("(fit)")
    assert not format_cell(rows[1], VAL_KEY).endswith("(fit)")
    assert "(fit)" in markdown_table(rows)

    def result(head: str, val: float, fit_on_val: bool) -> RunResult:
        return RunResult(Path(head), head, {}, 1.0, {"val": {"balanced_accuracy": val}},
                         trains_on_val=fit_on_val)

    results = [result("clip-benchmark-lp", 0.99, True), result("logreg", 0.7, False)]
    assert chosen_by_val(results) == 1
    assert chosen_by_val(results[:1]) is None  # nothing fair to pick


def test_bench_heads_marks_the_train_val_protocol_and_picks_another(demo_cache, tmp_path):
    r = runner.invoke(app, ["bench-heads", "--cache", str(demo_cache), "--variants",
                            "logreg,dermfm-lp-trainval", "--seeds", "1",
                            "--out-dir", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    rows = {row["variant"]: row for row in
            json.loads((tmp_path / "b" / "results.json").read_text())["rows"]}
    assert rows["dermfm-lp-trainval"].get("trains_on_val") is True
    assert not rows["dermfm-lp-trainval"].get("chosen_by_val")
    assert rows["logreg"].get("chosen_by_val")
    assert "(fit)" in (tmp_path / "b" / "results.md").read_text()


def test_fit_head_labels_val_of_a_train_val_protocol_as_fit(demo_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "dermfm-lp",
                            "-p", "merge_val=true", "--runs-dir", str(tmp_path),
                            "--bootstrap", "0", "--no-plots", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "val (fit)" in r.output
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "dermfm-lp",
                            "--runs-dir", str(tmp_path), "--bootstrap", "0", "--no-plots",
                            "--quiet", "--name", "train-only"])
    assert r.exit_code == 0, r.output
    assert "val (fit)" not in r.output and "val" in r.output


# ----------------------------------------------------------------------------- real features


def _real_heads_module():
    spec = importlib.util.spec_from_file_location("real_heads", REPO / "benchmarks/real_heads.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not REAL_NPZ.is_file(), reason="../shared/data features are absent")
def test_dermfm_lp_end_to_end_through_fit_head_on_real_features(tmp_path):
    cache = _real_heads_module().build_cache(REAL_NPZ, tmp_path / "real.h5")
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--head", "dermfm-lp",
                            "--runs-dir", str(tmp_path / "runs"), "--name", "dermfm",
                            "--bootstrap", "0", "--no-plots", "--quiet"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "dermfm"
    head = json.loads((run / "head" / "head.json").read_text())
    assert head["name"] == "dermfm-lp"
    assert head["fitted"]["C_"] == pytest.approx(1280 * 7 / 100)
    test = json.loads((run / "metrics" / "test.json").read_text())
    assert test["balanced_accuracy"] > 0.4  # chance is 1/7; a real probe on real features
    assert "val (fit)" not in r.output  # train only: val stays a validation score

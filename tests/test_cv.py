"""Grouped cross-validation (`skincache.study.cv`, fit-head --cv, bench-heads --cv): folds are
lesion-disjoint and never hold a test image, each fold's selection sees only its inner val,
and the CLI writes and prints what it says, on a synthetic cache and on the real features."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, synthetic_cache
from typer.testing import CliRunner

from skincache.cache import FeatureCache
from skincache.cli import app
from skincache.metrics import ci95_half_width, metrics
from skincache.study import cv

runner = CliRunner()
REAL_NPZ = SHARED_DATA / "features" / "ham10000-effnetlite0.npz"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("cv") / "synthetic.h5")


def test_folds_are_lesion_disjoint_and_never_hold_test_rows(synth):
    fc = FeatureCache.open(synth)
    pool = cv.make_pool(fc)
    test_ids = set(fc.split("test").image_id)
    assert len(pool) == len(fc.split("train")) + len(fc.split("val"))
    assert not test_ids & set(pool.image_id)
    folds = cv.make_folds(pool, 3, seed=0)
    held = np.concatenate([f.held_out for f in folds])
    assert sorted(held) == list(range(len(pool)))  # every pool row held out exactly once
    for f in folds:
        parts = [f.fit, f.inner_val, f.held_out]
        assert sum(map(len, parts)) == len(pool)
        assert len(np.unique(np.concatenate(parts))) == len(pool)  # a partition
        for a in range(3):
            for b in range(a + 1, 3):  # no lesion on two sides
                assert not set(pool.groups[parts[a]]) & set(pool.groups[parts[b]])
        for part in parts:  # stratified: every class on every side
            assert set(pool.labels[part]) == {0, 1, 2}
    refit = cv.refit_fold(pool, 0)
    assert len(refit.held_out) == 0 and len(refit.fit) + len(refit.inner_val) == len(pool)
    assert not set(pool.groups[refit.fit]) & set(pool.groups[refit.inner_val])


def test_an_image_without_a_lesion_is_its_own_group():
    g = cv.lesion_groups(np.array(["a", "", "a", "", "b"]))
    assert g[0] == g[2] and len({g[1], g[3], g[0], g[4]}) == 4


def test_each_fold_selects_on_its_inner_val_only(synth, monkeypatch):
    """Spy on every Head.fit: the X_val it gets is the fold's inner val and nothing else, and
    logreg's chosen C follows the fold's data."""
    from skincache.heads.logreg import LogRegHead

    seen: list[dict] = []
    original = LogRegHead.fit

    def spy(self, X, y, **kw):
        seen.append({"X": np.asarray(X).copy(), "X_val": np.asarray(kw["X_val"]).copy()})
        return original(self, X, y, **kw)

    monkeypatch.setattr(LogRegHead, "fit", spy)
    fc = FeatureCache.open(synth)
    res = cv.cross_validate(fc, "logreg", k=3, seed=0, n_bootstrap=0)
    pool = cv.make_pool(fc)
    folds = cv.make_folds(pool, 3, seed=0) + [cv.refit_fold(pool, 0)]
    assert len(seen) == len(folds)
    for call, fold in zip(seen, folds, strict=True):
        np.testing.assert_array_equal(call["X_val"], pool.features16[fold.inner_val])
        np.testing.assert_array_equal(call["X"], pool.features16[fold.fit])
    test16 = fc.split("test").features16
    for call in seen:  # no test image in any fit or selection
        both = np.concatenate([call["X"], call["X_val"]])
        assert not (both[:, None, :] == test16[None, :, :]).all(-1).any()
    assert [f.n_inner_val for f in res.folds] == [len(f.inner_val) for f in folds[:-1]]
    assert all("C_" in f.selection for f in res.folds)


def test_summary_is_mean_and_student_t_over_folds_for_every_registered_metric(synth):
    res = cv.cross_validate(synth, "knn", {"k": 5}, k=3, seed=1, n_bootstrap=0)
    assert set(res.mean) == {m.name for m in metrics()}
    for m in metrics():
        vals = np.array([f.metrics[m.name] for f in res.folds], dtype=float)
        assert res.mean[m.name] == pytest.approx(vals.mean())
        assert res.ci95[m.name] == pytest.approx(float(ci95_half_width(vals.std(), 3)))
    assert res.refit is not None and res.refit["n_samples"] == len(
        FeatureCache.open(synth).split("test"))


def test_too_few_lesions_for_k_is_one_line(synth):
    from skincache.errors import UsageError

    pool = cv.make_pool(FeatureCache.open(synth))
    with pytest.raises(UsageError, match="lesion group"):
        cv.make_folds(pool, len(np.unique(pool.groups)) + 1)
    with pytest.raises(UsageError, match="at least 2"):
        cv.make_folds(pool, 1)


def test_fit_head_cv_cli_writes_cv_json_and_plot(synth, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(synth), "--head", "logreg", "--cv", "3",
                            "--runs-dir", str(tmp_path), "--name", "lr", "--bootstrap", "50",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "lr"
    data = json.loads((run / "cv.json").read_text())
    assert data["k"] == 3 and len(data["folds"]) == 3
    assert set(data["mean"]) == {m.name for m in metrics()}
    assert data["refit"]["split"] == "test" and data["refit"]["ci"]
    assert (run / "plots" / "cv_folds.png").stat().st_size > 0
    assert (run / "run.json").is_file()  # the normal run is still there
    assert "3-fold lesion-grouped CV" in r.output and "fold 3" in r.output


def test_cv_refuses_shots_tta_and_one_fold(synth, tmp_path):
    for extra in (["--cv", "1"], ["--cv", "3", "--shots", "2"], ["--cv", "3", "--tta"]):
        r = runner.invoke(app, ["fit-head", "--cache", str(synth), "--head", "logreg",
                                "--runs-dir", str(tmp_path), *extra])
        assert r.exit_code != 0 and "error:" in r.output and "Traceback" not in r.output
    assert not any(tmp_path.iterdir())


def test_bench_heads_cv_cli_one_json_per_fold_and_resume(synth, tmp_path):
    args = ["bench-heads", "--cache", str(synth), "--cv", "3", "--variants", "logreg,knn-k5",
            "--out-dir", str(tmp_path / "b"), "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "b" / "runs").iterdir())
    assert names == sorted(f"{v}_cv3_{t}.json" for v in ("logreg", "knn-k5")
                           for t in ("f0", "f1", "f2", "refit"))
    rows = json.loads((tmp_path / "b" / "cv_results.json").read_text())["rows"]
    assert [row["variant"] for row in rows] == ["logreg", "knn-k5"]
    for row in rows:
        runs = [json.loads((tmp_path / "b" / "runs" / f"{row['variant']}_cv3_f{i}.json")
                .read_text()) for i in range(3)]
        vals = np.array([run["balanced_accuracy"] for run in runs])
        assert row["n_folds"] == 3
        assert row["balanced_accuracy_mean"] == pytest.approx(vals.mean())
        assert row["balanced_accuracy_ci95"] == pytest.approx(
            float(ci95_half_width(vals.std(), 3)))
        assert row["refit_balanced_accuracy"] is not None
    best = max(rows, key=lambda row: row["balanced_accuracy_mean"])
    assert [row["variant"] for row in rows if row.get("chosen_by_val")] == [best["variant"]]
    assert "±" in r.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "8 fit(s) kept" in again.output


def test_real_features_fit_head_logreg_cv5(tmp_path):
    if not REAL_NPZ.is_file():
        pytest.skip(f"real data not available: {REAL_NPZ} is absent")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from real_heads import build_cache

    cache = build_cache(REAL_NPZ, tmp_path / "real.h5")
    r = runner.invoke(app, ["fit-head", "--cache", str(cache), "--head", "logreg", "--cv", "5",
                            "--runs-dir", str(tmp_path), "--name", "lr", "--bootstrap", "200",
                            "--no-plots", "--quiet"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "lr" / "cv.json").read_text())
    fc = FeatureCache.open(cache)
    assert data["n_pool"] == len(fc.split("train")) + len(fc.split("val"))
    assert sum(f["n_held_out"] for f in data["folds"]) == data["n_pool"]
    # real, long-tailed features: far above chance (1/7), and the folds agree within reason
    assert data["mean"]["balanced_accuracy"] > 0.4
    assert data["ci95"]["balanced_accuracy"] < 0.1
    assert data["refit"]["n_samples"] == len(fc.split("test"))


def test_cv_on_the_demo_cache_with_text_heads(demo_cache, tmp_path):
    """Text heads get the cache's prompt embeddings in every fold (the synthetic cache has
    none); the refit is scored on the demo's test split."""
    res = cv.bench_cv(demo_cache, k=3, variants=["zeroshot", "tip-adapter"],
                      out_dir=tmp_path / "b")
    assert [r["variant"] for r in res.rows] == ["zeroshot", "tip-adapter"]
    assert len(res.runs) == 2 * 4
    assert all(r["refit_balanced_accuracy"] is not None for r in res.rows)
    fc = FeatureCache.open(demo_cache)
    n_pool = len(fc.split("train")) + len(fc.split("val"))
    assert all(sum(r["n_held_out"] for r in res.runs
                   if r["variant"] == v and r["fold"] >= 0) == n_pool
               for v in ("zeroshot", "tip-adapter"))

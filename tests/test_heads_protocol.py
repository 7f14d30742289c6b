"""The protocol around the heads: logit adjustment, temperature scaling, TTA, few-shot sampling,
the estimator contract, `skincache heads` and typed `-p` parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone
from typer.testing import CliRunner

from skincache.cli import app
from skincache.errors import UsageError
from skincache.heads import create_head, describe_heads, list_heads, load_head, parse_params
from skincache.heads._posthoc import choose_tau, fit_temperature, log_prior, nll
from skincache.heads.base import l2_normalize, softmax
from skincache.runs import few_shot_indices

runner = CliRunner()


@pytest.fixture(scope="module")
def long_tail():
    """A long-tailed problem (one class 80%) with overlapping classes: the plain argmax
    favours the head class, so balanced accuracy has room to gain from adjustment."""
    rng = np.random.default_rng(0)
    d, counts = 16, np.array([800, 100, 60, 40])
    means = rng.standard_normal((4, d)) * 0.9

    def draw(scale: float):
        y = np.repeat(np.arange(4), np.maximum(1, (counts * scale).astype(int)))
        return (means[y] + rng.standard_normal((len(y), d))).astype(np.float32), y

    (X, y), (Xv, yv), (Xt, yt) = draw(1.0), draw(0.5), draw(0.5)
    views = (X[:, None, :] + 0.3 * rng.standard_normal((len(X), 2, d))).astype(np.float32)
    return dict(X=X, y=y, views=views, X_val=Xv, y_val=yv, X_test=Xt, y_test=yt)


def _bacc(y, p):
    from sklearn.metrics import balanced_accuracy_score

    return balanced_accuracy_score(y, p.argmax(1))


# ----------------------------------------------------------------------------- logit adjustment


def test_auto_logit_adjustment_is_chosen_on_val_and_beats_the_plain_argmax(long_tail):
    d = long_tail
    kw = dict(X_val=d["X_val"], y_val=d["y_val"])
    plain = create_head("logreg", logit_adjust=None).fit(d["X"], d["y"], **kw)
    auto = create_head("logreg").fit(d["X"], d["y"], **kw)
    assert plain.logit_adjust_ == 0.0 and auto.logit_adjust_ > 0.0
    assert _bacc(d["y_val"], auto.predict_proba(d["X_val"])) > _bacc(
        d["y_val"], plain.predict_proba(d["X_val"]))
    assert _bacc(d["y_test"], auto.predict_proba(d["X_test"])) > _bacc(
        d["y_test"], plain.predict_proba(d["X_test"]))


def test_fixed_tau_shifts_scores_by_the_log_prior_exactly(long_tail):
    d = long_tail
    head = create_head("logreg", C=1.0, logit_adjust=1.5, calibrate=False).fit(d["X"], d["y"])
    raw = softmax(l2_normalize(d["X_test"]) @ head.coef_.T + head.intercept_)
    want = softmax(np.log(raw) - 1.5 * log_prior(d["y"], 4))
    np.testing.assert_allclose(head.predict_proba(d["X_test"]), want, atol=1e-6)


def test_choose_tau_prefers_the_smaller_tau_on_ties():
    scores = np.array([[2.0, 0.0], [0.0, 2.0]])
    tau, score = choose_tau(scores, np.array([0, 1]), np.log([0.5, 0.5]))
    assert (tau, score) == (0.0, 1.0)


@pytest.mark.parametrize("bad", ["sometimes", -1, float("nan")])
def test_bad_logit_adjust_is_refused(long_tail, bad):
    with pytest.raises(ValueError, match="logit_adjust"):
        create_head("linear", logit_adjust=bad).fit(long_tail["X"], long_tail["y"])


@pytest.mark.parametrize("name", ["linear", "mlp", "knn"])
def test_every_trained_head_defaults_to_val_chosen_adjustment(name, long_tail):
    d = long_tail
    head = create_head(name, **({"epochs": 3} if name != "knn" else {}))
    assert head.get_params()["logit_adjust"] == "auto" and head.get_params()["calibrate"]
    head.fit(d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"])
    assert head.logit_adjust_ in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def test_class_balanced_loss_raises_minority_recall(long_tail):
    d = long_tail
    plain = create_head("logreg", C=1.0, logit_adjust=None).fit(d["X"], d["y"])
    bal = create_head("logreg", C=1.0, logit_adjust=None, class_weight="balanced").fit(
        d["X"], d["y"])
    minority = d["y_test"] != 0
    assert (bal.predict(d["X_test"])[minority] == d["y_test"][minority]).mean() > (
        plain.predict(d["X_test"])[minority] == d["y_test"][minority]).mean()


# ----------------------------------------------------------------------------- calibration


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4000, 5)) * 3
    p = softmax(z / 2.5)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.1)
    assert nll(z, y, t) < nll(z, y, 1.0)


def test_temperature_changes_calibration_not_predictions(long_tail):
    d = long_tail
    head = create_head("mlp", epochs=5).fit(d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"])
    assert head.temperature_ != 1.0
    cal, raw = head.predict_proba(d["X_test"]), head.predict_proba_uncalibrated(d["X_test"])
    np.testing.assert_array_equal(cal.argmax(1), raw.argmax(1))
    assert not np.allclose(cal, raw)
    off = create_head("mlp", epochs=5, calibrate=False).fit(
        d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"])
    assert off.temperature_ == 1.0


def test_posthoc_state_survives_save_and_load(long_tail, tmp_path):
    d = long_tail
    head = create_head("logreg").fit(d["X"], d["y"], X_val=d["X_val"], y_val=d["y_val"])
    head.save(tmp_path / "h")
    back = load_head(tmp_path / "h")
    assert (back.logit_adjust_, back.temperature_) == (head.logit_adjust_, head.temperature_)
    np.testing.assert_allclose(back.predict_proba(d["X_test"]), head.predict_proba(d["X_test"]))


# ----------------------------------------------------------------------------- TTA


def test_tta_is_the_mean_over_clean_and_cached_views(long_tail):
    d = long_tail
    head = create_head("knn", k=5).fit(d["X"], d["y"])
    x, v = d["X"][:20], d["views"][:20]
    want = (head.predict_proba(x) + head.predict_proba(v[:, 0]) + head.predict_proba(v[:, 1])) / 3
    np.testing.assert_allclose(head.predict_proba_tta(x, v), want)
    np.testing.assert_array_equal(head.predict_proba_tta(x, v[:, :0]), head.predict_proba(x))


# ----------------------------------------------------------------------------- few-shot


def test_few_shot_draws_exactly_k_per_class_seeded():
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    idx = few_shot_indices(y, 8, seed=0)
    assert np.bincount(y[idx]).tolist() == [8, 8, 3]  # a class with fewer gives all it has
    assert len(set(idx)) == len(idx)
    np.testing.assert_array_equal(idx, few_shot_indices(y, 8, seed=0))
    assert not np.array_equal(idx, few_shot_indices(y, 8, seed=1))
    with pytest.raises(ValueError):
        few_shot_indices(y, 0)


# ----------------------------------------------------------------------------- estimators


def test_heads_are_scikit_learn_estimators(long_tail):
    head = create_head("mlp", hidden=32, epochs=2)
    twin = clone(head)
    assert twin.get_params() == head.get_params() and twin is not head
    assert "hidden=32" in repr(head)
    with pytest.raises(ValueError):
        head.set_params(hiden=3)
    d = long_tail
    head.fit(d["X"], d["y"])
    assert head.score(d["X_test"], d["y_test"]) == pytest.approx(  # ClassifierMixin's accuracy
        np.mean(head.predict(d["X_test"]) == d["y_test"]))


def test_describe_heads_lists_every_head_with_typed_params():
    specs = {h.name: h for h in describe_heads()}
    assert set(specs) == set(list_heads())
    logreg = {p.name: p for p in specs["logreg"].params}
    assert logreg["C"].type == "float | None" and logreg["C"].default is None
    assert logreg["c_range"].type == "tuple[float, float]"
    assert specs["zeroshot"].needs_text and not specs["knn"].needs_text
    assert all(h.summary for h in specs.values())


def test_parse_params_types_values_and_names_the_valid_ones():
    assert parse_params("logreg", {"C": "10", "logit_adjust": "auto", "calibrate": "false",
                                   "c_range": "0.01,100"}) == {
        "C": 10.0, "logit_adjust": "auto", "calibrate": False, "c_range": (0.01, 100.0)}
    assert parse_params("mlp", {"hidden": "256", "balance": "none"}) == {"hidden": 256,
                                                                         "balance": None}
    with pytest.raises(UsageError, match="no parameter 'hiden'.*hidden, depth"):
        parse_params("mlp", {"hiden": "3"})
    with pytest.raises(UsageError, match="hidden=big is not of type int"):
        parse_params("mlp", {"hidden": "big"})


# ----------------------------------------------------------------------------- CLI


def test_cli_heads_lists_heads_and_parameters():
    r = runner.invoke(app, ["heads"])
    assert r.exit_code == 0
    for name in list_heads():
        assert name in r.output
    assert "logit_adjust" in r.output
    r = runner.invoke(app, ["heads", "knn", "--json"])
    [knn] = json.loads(r.output)
    assert knn["name"] == "knn" and {p["name"] for p in knn["params"]} >= {"k", "weights"}
    assert runner.invoke(app, ["heads", "nothing-like-this"]).exit_code == 1


def test_cli_bad_param_is_one_line_before_any_fit(demo_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "mlp", "-p",
                            "hiden=3", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no parameter 'hiden'" in r.output
    assert "skincache heads mlp" in r.output and not any(tmp_path.iterdir())
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "mlp", "-p",
                            "epochs=many", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 1 and "is not of type int" in r.output


def test_cli_fit_head_typed_params_tta_and_shots(demo_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "logreg", "-p",
                            "C=10", "-p", "logit_adjust=none", "--tta", "--shots", "4",
                            "--runs-dir", str(tmp_path), "--name", "x", "--bootstrap", "20",
                            "--no-plots", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "x" / "run.json").read_text())
    assert cfg["params"]["C"] == 10.0 and cfg["params"]["logit_adjust"] is None
    assert cfg["tta"] is True and cfg["shots"] == 4 and cfg["train_images"] <= 4 * 7
    test = json.loads((tmp_path / "x" / "metrics" / "test.json").read_text())
    assert test["posthoc"]["tta"] is True and "ece_uncalibrated" in test


def test_cli_fit_head_all_shows_val_and_marks_the_val_pick(demo_cache, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "all",
                            "--runs-dir", str(tmp_path), "--bootstrap", "10", "--no-plots",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    assert "chosen on val" in r.output and "val's pick (best val balanced accuracy)" in r.output


def test_cli_bench_heads_shots_plot_and_unknown_variant(demo_cache, tmp_path):
    r = runner.invoke(app, ["bench-heads", "--cache", str(demo_cache), "--variants", "logreg,foo"])
    assert r.exit_code == 1 and "foo" in r.output and "bench heads" not in r.output
    out = tmp_path / "b"
    r = runner.invoke(app, ["bench-heads", "--cache", str(demo_cache), "--variants",
                            "logreg,knn-k5", "--seeds", "2", "--shots", "1,4", "--tta",
                            "--out-dir", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    keys = {(row["variant"], row["shots"]) for row in res["rows"]}
    assert keys == {(v, k) for v in ("logreg", "logreg+tta", "knn-k5", "knn-k5+tta")
                    for k in (1, 4)}
    assert all(row["n_seeds"] == 2 for row in res["rows"])
    assert (out / "shots.png").stat().st_size > 0
    assert len(list((out / "runs").glob("*.json"))) == 2 * 2 * 2 * 2


def test_reliability_plot_shows_before_and_after_calibration(demo_cache, tmp_path):
    from skincache.plots import reliability_figure
    from skincache.runs import fit_head_run

    res = fit_head_run(demo_cache, "mlp", runs_dir=tmp_path, name="m", n_bootstrap=0)
    test = res.metrics["test"]
    assert test["ece_uncalibrated"] is not None and test["calibration_uncalibrated"]["count"]
    fig = reliability_figure(test["calibration"], ece=test["ece"],
                             before=test["calibration_uncalibrated"],
                             ece_before=test["ece_uncalibrated"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(lbl.startswith("Before temperature scaling") for lbl in labels)
    assert "→" in fig.axes[0].get_title()
    assert (tmp_path / "m" / "plots" / "test_reliability.png").stat().st_size > 0


def test_evaluate_follows_the_runs_tta(demo_cache, tmp_path):
    from skincache.runs import evaluate, fit_head_run

    fit = fit_head_run(demo_cache, "knn", runs_dir=tmp_path, name="k", n_bootstrap=20,
                       tta=True, plots=False)
    ev = evaluate(tmp_path / "k", "test", n_bootstrap=20, plots=False)
    assert ev.report["posthoc"]["tta"] is True and ev.status == "unchanged"
    assert ev.report["balanced_accuracy"] == fit.metrics["test"]["balanced_accuracy"]
    plain = evaluate(tmp_path / "k", "test", n_bootstrap=20, plots=False, tta=False)
    assert plain.report["posthoc"]["tta"] is False

"""skincache.metrics against scikit-learn's own functions, on random data and edge cases."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from skincache.metrics import (
    _resample_chunks,
    bootstrap_distribution,
    calibration_bins,
    ci_metrics,
    classification_report,
    expected_calibration_error,
    headline,
    predictions_table,
    write_predictions_csv,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HAM_FREQ = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _problem(n: int, seed: int, signal: float = 1.5, freq: np.ndarray = HAM_FREQ):
    """Imbalanced labels and informative but imperfect probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(freq), size=n, p=freq)
    z = rng.normal(size=(n, len(freq)))
    z[np.arange(n), y] += signal
    return y, _softmax(z)


def _sk(y, pred):
    """scikit-learn's numbers, its warnings about undefined cases silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "balanced_accuracy": balanced_accuracy_score(y, pred),
            "accuracy": accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro", zero_division=0),
        }


def _assert_matches_sklearn(report: dict, y: np.ndarray, p: np.ndarray) -> None:
    pred = p.argmax(axis=1)
    labels = list(range(p.shape[1]))
    for key, value in _sk(y, pred).items():
        assert report[key] == pytest.approx(value, abs=1e-12), key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, sup = precision_recall_fscore_support(
            y, pred, labels=labels, zero_division=0
        )
    for k, name in enumerate(report["classes"]):
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(prec[k])
        assert row["recall"] == pytest.approx(rec[k])
        assert row["f1"] == pytest.approx(f1[k])
        assert row["support"] == sup[k]
        assert row["predicted"] == int(np.sum(pred == k))
    assert report["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert report["log_loss"] == pytest.approx(log_loss(y, p, labels=labels))


def test_random_problem_matches_sklearn():
    y, p = _problem(600, seed=1)
    report = classification_report(y, p, CLASSES, n_bootstrap=50)
    assert set(np.unique(y)) == set(range(7))  # every class present: sklearn's OvR is defined
    _assert_matches_sklearn(report, y, p)
    expected_auroc = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert report["auroc"] == pytest.approx(expected_auroc, abs=1e-12)
    assert report["auroc_excluded"] == [] and report["notes"] == []
    for k, name in enumerate(CLASSES):
        assert report["per_class"][name]["auroc"] == pytest.approx(roc_auc_score(y == k, p[:, k]))


def test_report_is_json_and_headline_leads_with_balanced_accuracy():
    y, p = _problem(300, seed=2)
    report = classification_report(y, p, CLASSES, n_bootstrap=20)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    keys = list(report)
    order = ["balanced_accuracy", "accuracy", "macro_f1", "auroc", "ece", "log_loss"]
    assert [keys.index(k) for k in order] == sorted(keys.index(k) for k in order)
    rows = headline(report)
    assert [r[0] for r in rows][:4] == [
        "Balanced accuracy",
        "Accuracy",
        "Macro-F1",
        "AUROC (OvR macro)",
    ]
    assert rows[0][1:] == (report["balanced_accuracy"], *report["ci"]["balanced_accuracy"])
    ece_row = next(r for r in rows if r[0].startswith("ECE"))
    assert ece_row[1] == report["ece"] and np.isnan(ece_row[2]) and np.isnan(ece_row[3])


def test_string_labels_equal_integer_labels():
    y, p = _problem(200, seed=3)
    by_int = classification_report(y, p, CLASSES, n_bootstrap=10)
    by_name = classification_report([CLASSES[i] for i in y], p, CLASSES, n_bootstrap=10)
    assert by_int == by_name
    with pytest.raises(ValueError, match="melanoma"):
        classification_report(["melanoma"] + [CLASSES[i] for i in y[1:]], p, CLASSES)


def test_class_never_predicted():
    y, p = _problem(400, seed=4, signal=2.0)
    p[:, 3] = 0.0  # df: never the argmax
    p /= p.sum(axis=1, keepdims=True)
    assert (y == 3).any() and not (p.argmax(axis=1) == 3).any()
    report = classification_report(y, p, CLASSES, n_bootstrap=20)
    _assert_matches_sklearn(report, y, p)
    df = report["per_class"]["df"]
    assert df["predicted"] == 0 and df["precision"] == 0.0 and df["recall"] == 0.0
    assert any("never predicted" in note and "df" in note for note in report["notes"])


def test_class_absent_from_y_true_does_not_crash_auroc():
    y, p = _problem(500, seed=5)
    y[y == 6] = 5  # no vasc in y_true, but vasc still gets probability mass
    # scikit-learn's OvR here raises (older) or warns and returns NaN (1.9): the report must
    # instead give a number over the present classes, without warning noise.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(y, p, CLASSES, n_bootstrap=50)
    _assert_matches_sklearn(report, y, p)
    present = [k for k in range(7) if k != 6]
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in present])
    assert report["auroc"] == pytest.approx(expected)
    assert report["auroc_excluded"] == ["vasc"]
    assert report["auroc_classes"] == [CLASSES[k] for k in present]
    assert report["per_class"]["vasc"]["auroc"] is None
    assert any("vasc" in note and "AUROC" in note for note in report["notes"])
    assert report["ci"]["auroc"] is not None


def test_single_class_in_y_true_has_no_auroc():
    y, p = _problem(100, seed=6)
    y[:] = 5
    report = classification_report(y, p, CLASSES, n_bootstrap=20)
    assert report["auroc"] is None and report["ci"]["auroc"] is None
    assert report["balanced_accuracy"] == pytest.approx(np.mean(p.argmax(1) == 5))
    json.dumps(report, allow_nan=False)
    assert np.isnan(headline(report)[3][1])


def test_perfect_predictions():
    y = np.repeat(np.arange(7), 10)
    p = np.eye(7)[y]
    report = classification_report(y, p, CLASSES, n_bootstrap=100)
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        assert report[key] == 1.0
        assert report["ci"][key] == [1.0, 1.0]
    assert report["ece"] == 0.0
    assert report["log_loss"] == pytest.approx(0.0, abs=1e-9)
    assert report["confusion_matrix"] == (np.eye(7, dtype=int) * 10).tolist()


def test_ece_hand_checked():
    # 3 predictions at confidence 0.9, 2 right: |2/3 - 0.9| with weight 3/5;
    # 2 at confidence 0.6, 1 right: |1/2 - 0.6| with weight 2/5.
    p = np.array([[0.9, 0.1]] * 3 + [[0.6, 0.4]] * 2)
    y = np.array([0, 0, 1, 0, 1])
    expected = 3 / 5 * abs(2 / 3 - 0.9) + 2 / 5 * abs(1 / 2 - 0.6)
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert classification_report(y, p, ["a", "b"], n_bootstrap=0)["ece"] == pytest.approx(expected)


def test_ece_zero_for_calibrated_one_hot_and_bins_right_inclusive():
    y = np.array([0, 1, 2, 2])
    assert expected_calibration_error(y, np.eye(3)[y]) == 0.0
    # Confidence 1.0 belongs to the last bin; 1/3 exactly to the bin ending at 5/15 = 1/3.
    bins = calibration_bins([0, 0], np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert bins["count"][14] == 1 and bins["count"][4] == 1 and sum(bins["count"]) == 2
    assert bins["accuracy"][14] == 1.0 and bins["confidence"][0] is None


def test_bootstrap_resamples_agree_with_sklearn():
    """The vectorised per-resample numbers are exactly scikit-learn's on the same resample,
    including resamples where the rare class vanishes and probability ties."""
    freq = np.array([0.02, 0.18, 0.3, 0.5])
    y, p = _problem(80, seed=7, signal=1.0, freq=freq)
    p = np.round(p, 1)  # ties, as float16 caches produce
    p[:, 0] += 1.0 - p.sum(axis=1)
    p = np.clip(p, 0, None)
    p /= p.sum(axis=1, keepdims=True)
    pred = p.argmax(axis=1)
    assert 0 < np.sum(y == 0) <= 3
    dist = bootstrap_distribution(y, p, n_bootstrap=40, seed=11)
    idx = next(_resample_chunks(len(y), 40, 11))
    vanished = 0
    for r in range(len(idx)):
        yr, pr, predr = y[idx[r]], p[idx[r]], pred[idx[r]]
        for key, value in _sk(yr, predr).items():
            assert dist[key][r] == pytest.approx(value, abs=1e-12), (key, r)
        defined = [k for k in range(4) if 0 < np.sum(yr == k) < len(yr)]
        vanished += len(defined) < 4
        auc = np.mean([roc_auc_score(yr == k, pr[:, k]) for k in defined])
        assert dist["auroc"][r] == pytest.approx(auc, abs=1e-12), r
    assert vanished > 0  # the edge case was exercised


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
    y, p = _problem(400, seed=8)
    a = classification_report(y, p, CLASSES, n_bootstrap=200, seed=3)
    b = classification_report(y, p, CLASSES, n_bootstrap=200, seed=3)
    c = classification_report(y, p, CLASSES, n_bootstrap=200, seed=4)
    assert a["ci"] == b["ci"]
    assert a["ci"] != c["ci"]
    for key in (m.name for m in ci_metrics()):
        lo, hi = a["ci"][key]
        assert lo < a[key] < hi, key
    y_big, p_big = _problem(4000, seed=8)
    big = classification_report(y_big, p_big, CLASSES, n_bootstrap=200, seed=3)
    for key in (m.name for m in ci_metrics()):
        width, width_big = np.diff(a["ci"][key])[0], np.diff(big["ci"][key])[0]
        assert width_big < 0.6 * width, key  # ~1/sqrt(10) expected


def test_ci_level_and_no_bootstrap():
    y, p = _problem(300, seed=9)
    wide = classification_report(y, p, CLASSES, n_bootstrap=200, ci=0.99)["ci"]
    narrow = classification_report(y, p, CLASSES, n_bootstrap=200, ci=0.5)["ci"]
    for key in (m.name for m in ci_metrics()):
        assert wide[key][0] < narrow[key][0] < narrow[key][1] < wide[key][1]
    none = classification_report(y, p, CLASSES, n_bootstrap=0)
    assert all(v is None for v in none["ci"].values())


def test_invalid_inputs_raise():
    y, p = _problem(50, seed=10)
    with pytest.raises(ValueError, match="logits"):
        classification_report(y, np.log(p), CLASSES)
    with pytest.raises(ValueError, match="shape"):
        classification_report(y, p[:, :6], CLASSES)
    with pytest.raises(ValueError, match="rows"):
        classification_report(y[:-1], p, CLASSES)
    with pytest.raises(ValueError, match="outside"):
        classification_report(np.full(50, 7), p, CLASSES)


def test_predictions_table_and_csv(tmp_path):
    y, p = _problem(20, seed=12)
    p32 = p.astype(np.float32)
    ids = [f"ISIC_{i:07d}" for i in range(20)]
    rows = predictions_table(ids, y, p32, CLASSES)
    assert list(rows[0]) == ["image_id", "true", "predicted", *(f"p_{c}" for c in CLASSES)]
    assert [r["predicted"] for r in rows] == [CLASSES[k] for k in p32.argmax(1)]
    assert [r["true"] for r in rows] == [CLASSES[k] for k in y]
    path = write_predictions_csv(tmp_path / "run" / "predictions.csv", ids, y, p32, CLASSES)
    with path.open(newline="") as fh:
        back = list(csv.DictReader(fh))
    assert [r["image_id"] for r in back] == ids
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in back], dtype=np.float32)
    np.testing.assert_array_equal(got, p32)  # exact at the input's precision
    assert all(len(r["p_nv"]) <= 15 for r in back)  # shortest float32 repr, not float64 noise
    unlabelled = predictions_table(ids[:2], None, p32[:2], CLASSES)
    assert unlabelled[0]["true"] is None


@pytest.fixture
def error_rate():
    """A throwaway metric registered in one place (and removed afterwards): the proof that
    adding a metric needs no edit anywhere else. No `resample`: the bootstrap falls back to
    computing it on each resample."""
    from skincache.metrics import Metric, register, unregister

    metric = register(Metric("error_rate", "Error rate", "err",
                             lambda y, pred, p, c: float(np.mean(y != pred)),
                             higher_is_better=False, in_ci=True))
    yield metric
    unregister(metric.name)


def test_a_registered_metric_reaches_report_ci_bench_and_tables(error_rate):
    from skincache import render
    from skincache.bench import VAL_KEY, aggregate, markdown_table
    from skincache.metrics import compute_metrics, metrics

    y, p = _problem(300, seed=12)
    pred = p.argmax(axis=1)
    assert compute_metrics(y, pred, p, 7)["error_rate"] == pytest.approx(np.mean(y != pred))
    report = classification_report(y, p, CLASSES, n_bootstrap=100, seed=5)
    assert report["error_rate"] == pytest.approx(1 - report["accuracy"])
    assert error_rate in ci_metrics()
    # the same resamples as accuracy, so its interval is accuracy's mirrored
    lo, hi = report["ci"]["error_rate"]
    acc_lo, acc_hi = report["ci"]["accuracy"]
    assert (lo, hi) == pytest.approx((1 - acc_hi, 1 - acc_lo), abs=1e-12)
    assert ("Error rate", report["error_rate"], lo, hi) in headline(report)

    with render.out.capture() as cap:
        render.metrics_table({"test": report}, "scores")
    assert "err %" in cap.get() and f"{100 * report['error_rate']:.1f}" in cap.get()

    runs = [{"variant": "v", "head": "h", "shots": None, "fit_seconds": 0.1, VAL_KEY: 0.5,
             **{m.name: r[m.name] for m in metrics()}}
            for r in (report, classification_report(y[:200], p[:200], CLASSES, n_bootstrap=0))]
    row = aggregate(runs)[0]
    assert row["error_rate_mean"] == pytest.approx(np.mean([r["error_rate"] for r in runs]))
    assert "| err % |" in markdown_table([row])
    older = [{k: v for k, v in r.items() if k != "error_rate"} for r in runs]  # before it existed
    assert aggregate(older)[0]["error_rate_mean"] is None
    assert markdown_table(aggregate(older)).rstrip().endswith("| n/a | 0.10 |")
    with render.out.capture() as cap:
        render.bench_table([row], "bench")
    assert "err %" in cap.get()


def test_balanced_accuracy_is_one_definition():
    """The heads' selection score is the report's, which is scikit-learn's."""
    from skincache.heads.base import balanced_accuracy as heads_balanced_accuracy
    from skincache.metrics import balanced_accuracy

    assert heads_balanced_accuracy is balanced_accuracy
    y, p = _problem(500, seed=13, freq=np.array([0.0, 0.1, 0.3, 0.6]))
    pred = p.argmax(axis=1)
    assert 0 not in y and 0 in pred  # an absent class that is still predicted
    assert balanced_accuracy(y, pred) == pytest.approx(_sk(y, pred)["balanced_accuracy"],
                                                       abs=1e-15)
    with pytest.raises(ValueError, match="integer class indices"):
        balanced_accuracy(np.array([0.5, 1.0]), np.array([0, 1]))

"""skincache.study: predictions files read, scored and compared (`skincache score` / `compare`).

On the published DermFM-Zero files in ../shared/data/published (skipped when absent): the point
estimates are scikit-learn's on the file's columns, and our seeded bootstrap lands within 0.01 of
their published percentiles. On synthetic arrays: the paired bootstrap equals a direct loop over
the same resamples, McNemar equals the binomial sum, and every bad input is one line.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)
from typer.testing import CliRunner

from skincache.cli import app
from skincache.errors import InputFileError, NotFoundError
from skincache.metrics import classification_report, write_predictions_csv
from skincache.study import ColumnMap, compare_inputs, read_predictions, score_file
from skincache.study.compare import align, mcnemar, paired_bootstrap

PUBLISHED = ("lp-HAM-DINOv3-L16.csv", "lp-HAM-MONET.csv")
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# their table's column -> our report key
TABLE = {"BALANCED_ACCURACY": "balanced_accuracy", "ACCURACY": "accuracy",
         "MACRO_F1": "macro_f1", "AUROC": "auroc"}


def _columns(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """true, predicted and probabilities straight from a DermFM-Zero file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["true_label"]) for r in rows])
    pred = np.array([int(r["predicted_label"]) for r in rows])
    p = np.array([[float(r[f"probability_class_{k}"]) for k in range(7)] for r in rows])
    return y, pred, p


def _published(folder: Path, model: str) -> dict[str, tuple[float, float]]:
    """Their HAM row for `model`: metric -> (2.5%, 97.5%) from "mean (lo-hi)"."""
    with open(folder / "lp_results_100percent_bootstrap.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["Dataset"] == "HAM" and r["Model"] == model)
    out = {}
    for col, key in TABLE.items():
        lo, hi = re.fullmatch(r"[\d.]+ \(([\d.]+)-([\d.]+)\)", row[col]).groups()
        out[key] = (float(lo), float(hi))
    return out


@pytest.mark.parametrize("name", PUBLISHED)
def test_score_on_published_files_matches_sklearn_and_their_percentiles(name):
    folder = shared_data("published")
    report = score_file(folder / name)
    y, pred, p = _columns(folder / name)
    expected = {"balanced_accuracy": balanced_accuracy_score(y, pred),
                "accuracy": accuracy_score(y, pred),
                "macro_f1": f1_score(y, pred, average="macro"),
                "auroc": roc_auc_score(y, p, multi_class="ovr", average="macro")}
    assert report["source"]["format"] == "dermfm-zero" and report["n_samples"] == 1503
    assert report["classes"] == CLASSES  # their class2label/HAM.csv
    for key, value in expected.items():
        assert round(report[key], 4) == round(value, 4), key
    model = name.removeprefix("lp-HAM-").removesuffix(".csv")
    for key, (lo, hi) in _published(folder, model).items():
        ours = report["ci"][key]
        assert abs(ours[0] - lo) < 0.01 and abs(ours[1] - hi) < 0.01, (key, ours, (lo, hi))


def test_compare_of_published_files_prints_difference_ci_and_mcnemar(tmp_path):
    folder = shared_data("published")
    a, b = (str(folder / n) for n in PUBLISHED)
    res = CliRunner().invoke(app, ["compare", a, b, "--json", str(tmp_path / "c.json"),
                                   "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    assert "lp-HAM-MONET.csv minus lp-HAM-DINOv3-L16.csv on 1,503 shared images" in res.output
    assert re.search(r"balanced accuracy\s.*0\.7480\s.*0\.6620\s.*-0\.0860\s.*-0\.\d{4} to "
                     r"-0\.\d{4}", res.output), res.output
    assert re.search(r"McNemar \(exact\): \d+ images only .* p = 0\.\d+", res.output)
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "c.json").is_file()


# ------------------------------------------------------------------------ synthetic data


def _synthetic(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels over 3 classes and two models' probabilities, B a little better than A."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(2, n, 3))
    logits[0, np.arange(n), y] += 0.8
    logits[1, np.arange(n), y] += 1.4
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return y, p[0], p[1]


def _direct(y: np.ndarray, p: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """The four metrics of one resample, by scikit-learn (AUROC: macro over the classes with
    positives and negatives in the resample)."""
    yy, pp = y[idx], p[idx]
    pred = pp.argmax(axis=1)
    aucs = [roc_auc_score(yy == k, pp[:, k]) for k in range(p.shape[1])
            if 0 < np.sum(yy == k) < len(yy)]
    return {"balanced_accuracy": balanced_accuracy_score(yy, pred),
            "accuracy": accuracy_score(yy, pred),
            "macro_f1": f1_score(yy, pred, average="macro", zero_division=0),
            "auroc": float(np.mean(aucs))}


def test_paired_bootstrap_equals_a_direct_loop_over_the_same_resamples():
    y, pa, pb = _synthetic()
    n_boot, seed = 100, 7  # more than one chunk of resamples
    diffs = paired_bootstrap(y, pa, pb, n_bootstrap=n_boot, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    for m in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        direct = np.array([_direct(y, pb, i)[m] - _direct(y, pa, i)[m] for i in idx])
        np.testing.assert_allclose(diffs[m], direct, atol=1e-12, err_msg=m)
    assert np.std(diffs["accuracy"]) > 0  # the resamples differ


def test_paired_interval_is_the_percentiles_of_the_direct_differences(tmp_path):
    y, pa, pb = _synthetic(seed=3)
    ids = [f"img{i}" for i in range(len(y))]
    write_predictions_csv(tmp_path / "a.csv", ids, y, pa, ["x", "y", "z"])
    write_predictions_csv(tmp_path / "b.csv", ids[::-1], y[::-1], pb[::-1], ["x", "y", "z"])
    res = compare_inputs([tmp_path / "a.csv", tmp_path / "b.csv"], n_bootstrap=200, seed=1)
    comp = res["comparisons"][0]
    idx = np.random.default_rng(1).integers(0, len(y), size=(200, len(y)))
    direct = np.array([_direct(y, pb, i)["balanced_accuracy"]
                       - _direct(y, pa, i)["balanced_accuracy"] for i in idx])
    got = comp["metrics"]["balanced_accuracy"]
    np.testing.assert_allclose(got["ci"], np.percentile(direct, [2.5, 97.5]), atol=1e-12)
    assert got["difference"] == pytest.approx(balanced_accuracy_score(y, pb.argmax(1))
                                              - balanced_accuracy_score(y, pa.argmax(1)))
    right_a, right_b = pa.argmax(1) == y, pb.argmax(1) == y
    assert comp["mcnemar"]["a_right_b_wrong"] == int(np.sum(right_a & ~right_b))
    assert comp["n_shared"] == len(y) and comp["notes"] == []


def test_mcnemar_exact_is_the_two_sided_binomial_sum():
    a = np.array([True] * 10 + [False] * 3 + [True] * 20)
    b = np.array([False] * 10 + [True] * 3 + [True] * 20)
    k, m = 3, 13
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    res = mcnemar(a, b)
    assert (res["a_right_b_wrong"], res["a_wrong_b_right"]) == (10, 3)
    assert res["p_value"] == pytest.approx(min(1.0, 2 * tail))
    assert mcnemar(a, a)["p_value"] == 1.0


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


DERM_HEADER = "filename,true_label,predicted_label," + ",".join(
    f"probability_class_{k}" for k in range(7))


def _derm_row(name: str, true: int, p: list[float]) -> str:
    return f"/x/{name}.jpg,{true},{int(np.argmax(p))}," + ",".join(map(str, p))


ONEHOT = [[1.0 if j == k else 0.0 for j in range(7)] for k in range(7)]


def test_align_keeps_shared_ids_and_says_when_fewer(tmp_path):
    a = _write(tmp_path / "a.csv", "\n".join([DERM_HEADER] + [
        _derm_row(f"i{k}", k, ONEHOT[k]) for k in range(7)]) + "\n")
    b = _write(tmp_path / "b.csv", "\n".join([DERM_HEADER] + [
        _derm_row(f"i{k}", k, ONEHOT[(k + 1) % 7]) for k in range(2, 9) if k < 7]) + "\n")
    sa, sb, notes = align(read_predictions(a), read_predictions(b), ("a", "b"))
    assert sa.ids == sb.ids == tuple(f"i{k}" for k in range(2, 7))
    assert len(notes) == 1 and "only 5 images are in both: a has 7, b has 5" in notes[0]


def test_compare_refuses_no_shared_id_and_disagreeing_labels(tmp_path):
    a = _write(tmp_path / "a.csv", "\n".join([DERM_HEADER] + [
        _derm_row(f"i{k}", k, ONEHOT[k]) for k in range(7)]) + "\n")
    other = _write(tmp_path / "o.csv", "\n".join([DERM_HEADER] + [
        _derm_row(f"j{k}", k, ONEHOT[k]) for k in range(7)]) + "\n")
    relabel = _write(tmp_path / "r.csv", "\n".join([DERM_HEADER] + [
        _derm_row(f"i{k}", (k + 1) % 7 if k == 3 else k, ONEHOT[k]) for k in range(7)]) + "\n")
    with pytest.raises(InputFileError, match="share no image id"):
        compare_inputs([a, other], n_bootstrap=10)
    with pytest.raises(InputFileError, match=r"disagree on the true label of 1 shared image\(s\)"
                                             r", e.g. i3: df in a.csv, mel in r.csv"):
        compare_inputs([a, relabel], n_bootstrap=10)


def test_compare_reads_a_run_folder_split_and_reorders_classes(tmp_path):
    y, pa, pb = _synthetic(n=30)
    ids = [f"img{i}" for i in range(30)]
    run = tmp_path / "run"
    write_predictions_csv(run / "predictions" / "test.csv", ids, y, pa, ["x", "y", "z"])
    # the same model, classes in another column order: every difference is 0
    write_predictions_csv(tmp_path / "same.csv", ids, np.array(["x", "y", "z"])[y],
                          pa[:, [2, 0, 1]], ["z", "x", "y"])
    res = compare_inputs([run, tmp_path / "same.csv"], n_bootstrap=50)
    comp = res["comparisons"][0]
    assert comp["a"] == "run" and res["inputs"][0]["format"] == "skincache"
    for m in comp["metrics"].values():
        assert m["difference"] == 0.0 and m["ci"] == [0.0, 0.0]
    with pytest.raises(NotFoundError, match=r"no predictions/val.csv \(this folder has test\)"):
        compare_inputs([run, tmp_path / "same.csv"], split="val")


def test_skincache_file_scores_as_the_run_folder_does(tmp_path):
    y, pa, _ = _synthetic(n=60)
    names = ["x", "y", "z"]
    path = write_predictions_csv(tmp_path / "test.csv", [f"i{k}" for k in range(60)], y, pa,
                                 names)
    report = score_file(path, n_bootstrap=200, seed=4, plots_dir=tmp_path / "plots")
    direct = classification_report(y, pa.astype(np.float64), names, n_bootstrap=200, seed=4)
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "ece", "log_loss"):
        assert report[key] == pytest.approx(direct[key], abs=1e-9), key
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        np.testing.assert_allclose(report["ci"][key], direct["ci"][key], atol=1e-9)
    assert sorted(Path(p).name for p in report["plots"]) == [
        "test_classwise.png", "test_confusion_matrix_counts.png",
        "test_confusion_matrix_normalized.png", "test_reliability.png"]


def test_column_map_with_integer_labels_and_labels_only(tmp_path):
    rows = ["id,gt,guess,s0,s1"] + [f"r{i},{i % 2},{(i // 3) % 2},{0.3},{0.7}"
                                    for i in range(12)]
    path = _write(tmp_path / "other.csv", "\n".join(rows) + "\n")
    with pytest.raises(InputFileError, match="neither skincache's"):
        read_predictions(path)
    with pytest.raises(InputFileError, match="numbered .*--classes"):
        read_predictions(path, ColumnMap(id="id", true="gt", proba="s"))
    pred = read_predictions(path, ColumnMap(id="id", true="gt", pred="guess",
                                            classes=("benign", "malignant")))
    assert pred.format == "columns" and pred.proba is None and pred.ids[0] == "r0"
    report = score_file(path, ColumnMap(id="id", true="gt", pred="guess",
                                        classes=("benign", "malignant")), n_bootstrap=20)
    y = np.arange(12) % 2
    guess = (np.arange(12) // 3) % 2
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, guess))
    assert report["auroc"] is None and report["ci"]["auroc"] is None
    assert any("no probabilities" in n for n in report["notes"])


@pytest.mark.parametrize("content, extra, needle", [
    ("", {}, "is empty"),
    (DERM_HEADER + "\n", {}, "has a header but no rows"),
    (b"image_id,true,predicted,p_a,p_b\n\xff\xfe,a,a,1,0\n", {}, "is not UTF-8 text"),
    ("image_id,true,p_a,p_b\ni1,a,1,0\n", {}, "neither skincache's"),
    ("image_id,true,predicted,p_a,p_b\ni1,a,a,1,0\n", {"true": "label"},
     "missing column.* label"),
    ("image_id,true,predicted,p_a,p_b\ni1,a,a,1,0\ni1,b,b,0,1\n", {},
     r"1 image id\(s\) appear more than once: i1 \(2x\)"),
    ("image_id,true,predicted,p_a,p_b\ni1,a,a,0.9,0.3\ni2,b,b,0,1\n", {},
     r"1 of 2 rows' probabilities do not sum to 1 \(line 2 sums to 1.2\).*--renormalize"),
    ("image_id,true,predicted,p_a,p_b\ni1,a,a,1,0\ni2,c,b,0,1\n", {},
     r"labels outside the classes a,b: 'c' \(line 3\)"),
    (DERM_HEADER + "\n" + _derm_row("i1", 9, ONEHOT[0]) + "\n", {},
     r"labels outside the classes akiec,.*'9' \(line 2\)"),
    ("image_id,true,predicted,p_a,p_b\ni1,a,a,x,0\n", {}, r"line 2: p_a 'x' is not a number"),
])
def test_bad_predictions_files_are_one_line_naming_the_file(tmp_path, content, extra, needle):
    path = _write(tmp_path / "bad.csv", content)
    with pytest.raises(InputFileError, match=needle) as exc:
        read_predictions(path, ColumnMap(**extra))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_renormalize_divides_and_notes(tmp_path):
    path = _write(tmp_path / "s.csv", "image_id,true,predicted,p_a,p_b\ni1,a,a,0.9,0.3\n"
                                      "i2,b,b,0,1\n")
    pred = read_predictions(path, renormalize=True)
    np.testing.assert_allclose(pred.proba[0], [0.75, 0.25])
    assert any("divided by their sum (--renormalize)" in n for n in pred.notes)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "preds.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="not a regular file"):
        read_predictions(fifo)


def test_cli_score_writes_json_and_bad_input_is_one_error_line(tmp_path):
    y, pa, _ = _synthetic(n=40)
    path = write_predictions_csv(tmp_path / "test.csv", [f"i{k}" for k in range(40)], y, pa,
                                 ["x", "y", "z"])
    res = CliRunner().invoke(app, ["score", str(path), "--json", str(tmp_path / "s.json"),
                                   "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    assert "test.csv" in res.output and "skincache" in res.output
    assert (tmp_path / "s.json").read_text().count('"balanced_accuracy"') >= 1
    bad = _write(tmp_path / "bad.csv", "a,b\n1,2\n")
    res = CliRunner().invoke(app, ["score", str(bad)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: predictions file") and "Traceback" \
        not in res.output


def test_compare_two_real_run_folders_and_score_their_predictions(demo_cache, tmp_path):
    """Run folders as fit-head writes them: compare finds predictions/<split>.csv, and score
    of that file gives the numbers of the run's own metrics/<split>.json."""
    import json

    from skincache.runs import fit_head_run

    for head in ("logreg", "knn"):
        fit_head_run(demo_cache, head, runs_dir=tmp_path, name=head, n_bootstrap=50,
                     plots=False)
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "logreg"), str(tmp_path / "knn"),
                                   "--split", "val", "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    assert "knn minus logreg on" in res.output and "McNemar (exact)" in res.output
    stored = json.loads((tmp_path / "logreg" / "metrics" / "test.json").read_text())
    report = score_file(tmp_path / "logreg" / "predictions" / "test.csv", n_bootstrap=50)
    for key in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
        assert report[key] == pytest.approx(stored[key], abs=1e-6), key
        np.testing.assert_allclose(report["ci"][key], stored["ci"][key], atol=1e-6)
    res = CliRunner().invoke(app, ["score", str(tmp_path / "knn"), "--split", "val",
                                   "--bootstrap", "50", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output  # score takes a run folder too, as compare does
    val = json.loads((tmp_path / "knn" / "metrics" / "val.json").read_text())
    got = json.loads((tmp_path / "s.json").read_text())["reports"][0]
    assert got["balanced_accuracy"] == pytest.approx(val["balanced_accuracy"], abs=1e-6)
    res = CliRunner().invoke(app, ["score", str(tmp_path / "knn"), "--split", "tset"])
    assert res.exit_code == 1 and "no predictions/tset.csv" in res.output


def test_score_numbers_plots_of_files_with_the_same_name(tmp_path):
    from skincache.study import score_files

    y, pa, pb = _synthetic(n=30)
    ids = [f"i{k}" for k in range(30)]
    files = [write_predictions_csv(tmp_path / d / "test.csv", ids, y, p, ["x", "y", "z"])
             for d, p in (("a", pa), ("b", pb))]
    reports = score_files(files, n_bootstrap=10, plots_dir=tmp_path / "plots")
    names = [Path(p).name for r in reports for p in r["plots"]]
    assert len(set(names)) == 8 and {n.split("_")[0] for n in names} == {"1-test", "2-test"}


def test_cli_score_with_a_column_mapping(tmp_path):
    rows = ["name,gt,guess,s0,s1"] + [f"r{i},{i % 2},{(i // 3) % 2},0.25,0.75"
                                      for i in range(12)]
    path = _write(tmp_path / "other.csv", "\n".join(rows) + "\n")
    args = ["score", str(path), "--id", "name", "--true", "gt", "--pred", "guess",
            "--classes", "benign,malignant", "--bootstrap", "10", "--json",
            str(tmp_path / "s.json")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    import json

    report = json.loads((tmp_path / "s.json").read_text())["reports"][0]
    assert report["classes"] == ["benign", "malignant"] and report["source"]["format"] == "columns"
    assert report["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(np.arange(12) % 2, (np.arange(12) // 3) % 2))
    # --proba s: every row predicts class 1 (0.75), whatever `guess` says
    res = CliRunner().invoke(app, args[:-2] + ["--proba", "s"])
    assert res.exit_code == 0 and "most probable class" in res.output
    res = CliRunner().invoke(app, ["score", str(path), "--classes", "benign"])
    assert res.exit_code == 1 and "--classes 'benign'" in res.output

"""skincache.plots: files are real PNGs, and what is drawn is the numbers it should be."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skincache import plots
from skincache.metrics import calibration_bins, classification_report
from skincache.plots import (
    classwise_figure,
    confusion_figure,
    curves_figure,
    plot_curves,
    plot_reliability,
    reliability_figure,
    write_report_plots,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    freq = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015
    y = rng.choice(7, size=700, p=freq)
    z = rng.normal(size=(700, 7))
    z[np.arange(700), y] += 2.0
    p = np.exp(z)
    return y, p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def report(predictions):
    y, p = predictions
    return classification_report(y, p, CLASSES, n_bootstrap=0)


def _assert_png(path, min_bytes: int = 10_000, min_side: int = 400) -> None:
    """A decodable PNG with real content, not an empty canvas."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # something drawn


def _cell_texts(fig) -> dict[tuple[int, int], str]:
    ax = fig.axes[0]
    return {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }


def test_normalised_confusion_diagonal_is_recall(report):
    cm = np.array(report["confusion_matrix"])
    fig = confusion_figure(cm, CLASSES, normalize=True)
    texts = _cell_texts(fig)
    assert len(texts) == 49
    for k, name in enumerate(CLASSES):
        assert float(texts[(k, k)]) == pytest.approx(report["per_class"][name]["recall"], abs=0.005)
    rows = np.array([[float(texts[(i, j)]) for j in range(7)] for i in range(7)])
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=0.04)  # rows, not columns, sum to 1
    assert "Predicted" in fig.axes[0].get_xlabel() and "True" in fig.axes[0].get_ylabel()


def test_count_confusion_annotates_counts_and_empty_rows(report):
    cm = np.array(report["confusion_matrix"])
    texts = _cell_texts(confusion_figure(cm, CLASSES, normalize=False))
    assert all(texts[(i, j)] == str(cm[i, j]) for i in range(7) for j in range(7))
    cm_empty = cm.copy()
    cm_empty[3] = 0  # a class with no true samples has no recall: shown as a dash, not 0.00
    texts = _cell_texts(confusion_figure(cm_empty, CLASSES, normalize=True))
    assert all(texts[(3, j)] == "–" for j in range(7))
    with pytest.raises(ValueError, match="shape"):
        confusion_figure(cm[:6], CLASSES, normalize=True)


def test_classwise_bars_are_totals_and_correct(report):
    cm = np.array(report["confusion_matrix"])
    ax = classwise_figure(cm, CLASSES).axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights[:7] == cm.sum(axis=1).tolist()
    assert heights[7:] == np.diagonal(cm).tolist()
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == CLASSES


def test_curves_split_losses_from_scores():
    history = {
        "train_loss": [2.0, 1.5, 1.1],
        "val_loss": [2.1, 1.7, 1.6],
        "val_balanced_accuracy": [0.3, 0.5, 0.6],
        "empty": [],
    }
    fig = curves_figure(history, title="mlp")
    loss_ax, metric_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["Training loss", "Validation loss"]
    (line,) = metric_ax.lines
    assert line.get_xdata().tolist() == [1, 2, 3]
    assert line.get_ydata().tolist() == [0.3, 0.5, 0.6]
    assert len(curves_figure({"acc": [0.1, 0.2]}).axes) == 1
    with pytest.raises(ValueError):
        curves_figure({"loss": []})


def test_reliability_bars_follow_bins(predictions):
    y, p = predictions
    bins = calibration_bins(y, p)
    ax = reliability_figure(bins, ece=0.1).axes[0]
    filled = [k for k, c in enumerate(bins["count"]) if c]
    acc_bars = ax.patches[: len(filled)]
    assert [b.get_height() for b in acc_bars] == pytest.approx(
        [bins["accuracy"][k] for k in filled]
    )
    assert "ECE = 0.100" in ax.get_title()


def test_plot_functions_write_pngs(tmp_path, predictions):
    # The confusion matrix and class-wise plots are written by test_write_report_plots.
    y, p = predictions
    written = [
        plot_curves({"loss": [1.0, 0.5], "accuracy": [0.5, 0.7]}, tmp_path / "a" / "curves.png"),
        plot_reliability(y, p, tmp_path / "reliability.png"),
    ]
    assert written == [tmp_path / "a" / "curves.png", tmp_path / "reliability.png"]
    for path in written:
        _assert_png(path)


def test_write_report_plots(tmp_path, report):
    paths = write_report_plots(report, tmp_path / "run", prefix="test_")
    assert [p.name for p in paths] == [
        "test_confusion_matrix_counts.png",
        "test_confusion_matrix_normalized.png",
        "test_classwise.png",
        "test_reliability.png",
    ]
    for path in paths:
        _assert_png(path)


def test_write_report_plots_without_calibration(tmp_path, report, monkeypatch):
    # Rendering is covered above; here only which plots a report without bins gets.
    monkeypatch.setattr(plots, "_save", lambda fig, path: path)
    bare = {k: v for k, v in report.items() if k != "calibration"}
    names = [p.name for p in write_report_plots(bare, tmp_path)]
    assert names == [
        "confusion_matrix_counts.png",
        "confusion_matrix_normalized.png",
        "classwise.png",
    ]


def test_figures_stay_out_of_pyplot(tmp_path, report):
    """Figures are never registered with pyplot's figure manager: a loop over many runs must
    not accumulate open figures (pyplot's memory-leak warning after 20)."""
    from matplotlib._pylab_helpers import Gcf

    before = Gcf.get_num_fig_managers()
    fig = confusion_figure(report["confusion_matrix"], CLASSES, normalize=True)
    assert fig.canvas.manager is None
    assert Gcf.get_num_fig_managers() == before

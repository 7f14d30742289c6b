"""Plots for runs: confusion matrices, class-wise bars, training curves, reliability diagrams.

Figures are built on `matplotlib.figure.Figure` directly and saved through its Agg canvas; pyplot
is never imported, so nothing here touches matplotlib's global state (current figure, backend,
rcParams), plots work headless and in threads, and figures are freed when they go out of scope
instead of piling up in pyplot's registry.

Each `plot_*` function writes one PNG (dpi 150, tight bounding box) and returns its Path; the
matching `*_figure` function returns the Figure unsaved, for notebooks and for tests that check
what is drawn (annotation texts, bar heights) rather than pixels.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from skincache.data.classes import DX_NAMES
from skincache.metrics import (
    ECE_BINS,
    PRIMARY,
    calibration_bins,
    expected_calibration_error,
    get_metric,
)

__all__ = [
    "DPI",
    "classwise_figure",
    "concept_heatmap_figure",
    "confusion_figure",
    "curves_figure",
    "plot_classwise",
    "plot_concept_heatmap",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_reliability",
    "reliability_figure",
    "row_normalize",
    "series_label",
    "write_report_plots",
]

DPI = 150

_TOTAL_COLOR = "#9ecae1"
_CORRECT_COLOR = "#08519c"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as PNG (creating parent folders: run folders are made lazily) and return the
    path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", format="png")
    return out


def _check_cm(cm: Any, class_names: Sequence[str]) -> np.ndarray:
    """A square count matrix matching the class list; a mismatch would silently mislabel
    cells, so it is an error."""
    m = np.asarray(cm)
    c = len(class_names)
    if m.shape != (c, c):
        raise ValueError(
            f"confusion matrix has shape {m.shape}, expected ({c}, {c}) for classes "
            f"{list(class_names)}"
        )
    if np.any(m < 0):
        raise ValueError("confusion matrix counts must be non-negative")
    return m


def _full_name(code: str, width: int) -> str:
    """The full diagnosis name of a HAM10000 / ISIC code, wrapped to `width` characters; ''
    for labels that are already words. A reader outside dermatology does not know 'akiec'."""
    name = DX_NAMES.get(code.lower(), "")
    return "\n".join(textwrap.wrap(name, width, break_long_words=False)) if name else ""


def row_normalize(cm: Any) -> np.ndarray:
    """Rows divided by their sums (recall per class on the diagonal); NaN rows for classes
    with no true samples, which have no recall to show."""
    m = np.asarray(cm, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, m / np.where(sums > 0, sums, 1.0), np.nan)


# ---------------------------------------------------------------------- confusion matrix


def confusion_figure(cm: Any, class_names: Sequence[str], *, normalize: bool) -> Figure:
    """The confusion matrix as an annotated heatmap (rows = true class, columns = predicted).

    Cells are coloured by the row fraction in both views: with HAM10000's ~67% nevi a colour
    scale on counts leaves every rare class white. `normalize=False` annotates counts;
    `normalize=True` annotates row fractions to two decimals (recall on the diagonal) and adds
    each class's support to its row label. Rows with no true samples show "–".
    """
    m = _check_cm(cm, class_names)
    frac = row_normalize(m)
    c = len(class_names)
    side = max(4.5, 0.75 * c + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(frac), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    cbar = fig.colorbar(image, ax=ax, shrink=0.85)
    cbar.set_label("Fraction of the true class")

    fontsize = 10 if c <= 8 else 8
    for i in range(c):
        for j in range(c):
            if normalize:
                text = "–" if np.isnan(frac[i, j]) else f"{frac[i, j]:.2f}"
            else:
                text = f"{int(m[i, j])}"
            dark = not np.isnan(frac[i, j]) and frac[i, j] > 0.5
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
                fontweight="bold" if i == j else "normal",
            )

    support = m.sum(axis=1)
    ylabels = []
    for name, n in zip(class_names, support, strict=True):
        label = f"{name} (n={int(n)})" if normalize else name
        full = _full_name(name, 28)
        ylabels.append(f"{label}\n{full}" if full else label)
    ax.set_xticks(
        range(c), labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor"
    )
    ax.set_yticks(range(c), labels=ylabels, fontsize=8 if any("\n" in y for y in ylabels)
                  else None)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if normalize:
        ax.set_title("Confusion matrix, row-normalised (recall on the diagonal)")
    else:
        ax.set_title(f"Confusion matrix, counts (n={int(m.sum()):,})")
    return fig


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str], path: str | os.PathLike[str], *, normalize: bool
) -> Path:
    """Write `confusion_figure` to `path` (PNG) and return the path."""
    return _save(confusion_figure(cm, class_names, normalize=normalize), path)


# ------------------------------------------------------------------------ class-wise bars


def classwise_figure(cm: Any, class_names: Sequence[str]) -> Figure:
    """Per class, total images next to correctly classified ones (grouped bars), each bar
    labelled with its count and the correct bar with the recall, so the small classes that
    a linear axis squeezes flat stay readable."""
    m = _check_cm(cm, class_names)
    total = m.sum(axis=1)
    correct = np.diagonal(m)
    c = len(class_names)
    x = np.arange(c)
    width = 0.4
    fig = Figure(figsize=(max(6.0, 1.1 * c + 1.5), 4.8), layout="constrained")
    ax = fig.add_subplot()
    bars_total = ax.bar(x - width / 2, total, width, label="Total images", color=_TOTAL_COLOR)
    bars_correct = ax.bar(
        x + width / 2, correct, width, label="Correctly classified", color=_CORRECT_COLOR
    )
    ax.bar_label(bars_total, labels=[f"{int(t)}" for t in total], padding=2, fontsize=8)
    recall_labels = [
        f"{int(k)}\n({k / t:.0%})" if t > 0 else f"{int(k)}"
        for k, t in zip(correct, total, strict=True)
    ]
    ax.bar_label(bars_correct, labels=recall_labels, padding=2, fontsize=8)
    xlabels = [f"{n}\n{_full_name(n, 15)}".rstrip() for n in class_names]
    ax.set_xticks(x, labels=xlabels, fontsize=8 if any("\n" in t for t in xlabels) else None)
    ax.set_xlabel("Class")
    ax.set_ylabel("Images")
    ax.set_ylim(0, max(1.0, float(total.max())) * 1.18)
    ax.set_title("Class-wise results: total vs correctly classified")
    ax.legend(loc="upper left", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_classwise(cm: Any, class_names: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write `classwise_figure` to `path` (PNG) and return the path."""
    return _save(classwise_figure(cm, class_names), path)


# -------------------------------------------------------------------------------- curves


def _is_loss(name: str) -> bool:
    return "loss" in name.lower()


#: Words for the history keys a reader sees in a legend.
SERIES_LABELS = {
    "train_loss": "Training loss",
    "val_loss": "Validation loss",
    "train_accuracy": "Training accuracy",
    "val_accuracy": "Validation accuracy",
    "val_balanced_accuracy": "Validation balanced accuracy",
}


def series_label(name: str) -> str:
    """A history key as words: `val_balanced_accuracy` -> "Validation balanced accuracy"."""
    if name in SERIES_LABELS:
        return SERIES_LABELS[name]
    words = name.replace("_", " ").replace("val ", "validation ").replace("train ", "training ")
    return words[:1].upper() + words[1:]


def curves_figure(
    history: Mapping[str, Sequence[float | None]], *, title: str = "Training curves",
    subtitle: str = "", first_epoch: int = 1,
) -> Figure:
    """Training curves per epoch: series whose name contains "loss" on the left panel,
    everything else (accuracies, balanced accuracy, F1...) on the right, since losses and
    [0, 1] scores share no useful axis. One panel when only one kind is present.

    Value i is epoch `first_epoch + i`; pass `first_epoch=0` with the model before training
    as the first value (None where a series has none, e.g. training loss), so the start
    point shows. Legends sit below the panels, off the data; epoch ticks are integers;
    `subtitle` (run, model, dataset) goes under the title."""
    series = {k: np.array([np.nan if x is None else x for x in v], dtype=np.float64)
              for k, v in history.items() if len(v) > 0}
    series = {k: v for k, v in series.items() if np.isfinite(v).any()}
    if not series:
        raise ValueError("history has no series with values to plot")
    groups = [
        ("Loss", {k: v for k, v in series.items() if _is_loss(k)}),
        ("Score", {k: v for k, v in series.items() if not _is_loss(k)}),
    ]
    groups = [(label, g) for label, g in groups if g]
    fig = Figure(figsize=(5.0 * len(groups) + 0.5, 4.4), layout="constrained")
    axes: list[Axes] = [fig.add_subplot(1, len(groups), i + 1) for i in range(len(groups))]
    last = first_epoch
    for ax, (label, group) in zip(axes, groups, strict=True):
        for name, values in group.items():
            epochs = np.arange(first_epoch, first_epoch + len(values))
            last = max(last, int(epochs[-1]))
            ax.plot(epochs, values, marker="o" if len(values) <= 30 else None, markersize=3,
                    label=series_label(name))
        ax.set_xlabel("Epoch (0 = before training)" if first_epoch == 0 else "Epoch")
        ax.set_ylabel(label)
        if label == "Score":
            low = min(float(np.nanmin(v)) for v in group.values())
            ax.set_ylim(min(0.0, math.floor(low * 10) / 10), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False,
                  fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(first_epoch - 0.3, last + 0.3)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    return fig


def plot_curves(
    history: Mapping[str, Sequence[float | None]],
    path: str | os.PathLike[str],
    *,
    title: str = "Training curves",
    subtitle: str = "",
    first_epoch: int = 1,
) -> Path:
    """Write `curves_figure` to `path` (PNG) and return the path."""
    return _save(curves_figure(history, title=title, subtitle=subtitle,
                               first_epoch=first_epoch), path)


# --------------------------------------------------------------------------- reliability


def reliability_figure(bins: Mapping[str, Any], *, ece: float | None = None,
                       before: Mapping[str, Any] | None = None,
                       ece_before: float | None = None) -> Figure:
    """Reliability diagram from `skincache.metrics.calibration_bins` output (also stored in a
    report's `calibration`): accuracy per confidence bin against the diagonal of perfect
    calibration, the gap shaded, and below it how many predictions fall in each bin (a large
    gap in a near-empty bin matters little to the ECE, which weights bins by size).

    `before` / `ece_before`: the same bins before temperature scaling, drawn as a line, so the
    diagram shows what calibration changed."""
    edges = np.asarray(bins["edges"], dtype=np.float64)
    count = np.asarray(bins["count"], dtype=np.float64)
    acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=np.float64)
    conf = np.array([np.nan if c is None else c for c in bins["confidence"]], dtype=np.float64)
    left = edges[:-1]
    width = np.diff(edges)

    fig = Figure(figsize=(5.5, 6.0), layout="constrained")
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = count > 0
    ax.bar(
        left[filled],
        acc[filled],
        width[filled],
        align="edge",
        color=_CORRECT_COLOR,
        edgecolor="white",
        label="Accuracy" if before is None else "Accuracy (after temperature scaling)",
    )
    # Hatched, unfilled: when the model is under-confident the gap lies inside the accuracy
    # bar, and a filled overlay would blend into an unreadable colour.
    ax.bar(
        left[filled],
        (conf - acc)[filled],
        width[filled],
        bottom=acc[filled],
        align="edge",
        facecolor="none",
        edgecolor="#de2d26",
        hatch="///",
        linewidth=0.8,
        label="Gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="Perfect calibration")
    if before is not None:
        b_acc = np.array([np.nan if a is None else a for a in before["accuracy"]], dtype=float)
        b_conf = np.array([np.nan if c is None else c for c in before["confidence"]],
                          dtype=float)
        ok = np.asarray(before["count"]) > 0
        label = "Before temperature scaling"
        if ece_before is not None:
            label += f" (ECE {ece_before:.3f})"
        ax.plot(b_conf[ok], b_acc[ok], marker="o", markersize=3, color="#636363", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    title = "Reliability diagram"
    if ece is not None:
        title += f" (ECE = {ece:.3f}, {len(count)} bins)"
        if ece_before is not None:
            title = f"Reliability (ECE {ece_before:.3f} → {ece:.3f} after T-scaling)"
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax_hist.bar(left, count, width, align="edge", color=_TOTAL_COLOR, edgecolor="white")
    ax_hist.set_xlabel("Confidence (max probability)")
    ax_hist.set_ylabel("Predictions")
    return fig


def plot_reliability(
    y_true: Any, proba: Any, path: str | os.PathLike[str], *, n_bins: int = ECE_BINS
) -> Path:
    """Reliability diagram of `proba` against integer labels `y_true`, with the ECE (same
    binning as `skincache.metrics.expected_calibration_error`) in the title."""
    bins = calibration_bins(y_true, proba, n_bins)
    ece = expected_calibration_error(y_true, proba, n_bins)
    return _save(reliability_figure(bins, ece=ece), path)


# -------------------------------------------------------------------------------- report


def write_report_plots(
    report: Mapping[str, Any], out_dir: str | os.PathLike[str], *, prefix: str = "",
    label: str = "",
) -> list[Path]:
    """The standard plots of a `skincache.metrics.classification_report` into `out_dir`:
    `confusion_matrix_counts.png`, `confusion_matrix_normalized.png`, `classwise.png`, and
    `reliability.png` when the report carries its calibration bins. `prefix` (e.g. "test_")
    keeps several splits' plots apart in one run folder; `label` (e.g. "mlp run x, test
    split") goes above each plot so that a figure shared on its own still says what it shows."""
    out = Path(out_dir)
    classes = list(report["classes"])
    cm = np.asarray(report["confusion_matrix"])
    figures = [
        (confusion_figure(cm, classes, normalize=False), "confusion_matrix_counts.png"),
        (confusion_figure(cm, classes, normalize=True), "confusion_matrix_normalized.png"),
        (classwise_figure(cm, classes), "classwise.png"),
    ]
    if report.get("calibration"):
        figures.append((reliability_figure(report["calibration"], ece=report.get("ece"),
                                           before=report.get("calibration_uncalibrated"),
                                           ece_before=report.get("ece_uncalibrated")),
                        "reliability.png"))
    paths = []
    for fig, name in figures:
        if label:
            fig.suptitle(label, fontsize=9, color="0.35")
        paths.append(_save(fig, out / f"{prefix}{name}"))
    return paths


def plot_shots(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *,
               title: str = "") -> Path:
    """Few-shot curve: balanced accuracy (mean and 95% CI over seeds, Student's t: see
    `metrics.ci95_half_width`) against training images per class, one line per head variant
    (log2 x axis, as in CoOp / Tip-Adapter)."""
    from skincache.metrics import ci95_half_width

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows if r.get("shots") is not None))
    # 20 distinct colours, then a second line style: no two variants look alike
    colours = [matplotlib.colormaps["tab20"](i % 20) for i in range(len(variants))]
    styles = ["-", "--", ":", "-."]
    for i, v in enumerate(variants):
        pts = sorted((r["shots"], r[f"{PRIMARY}_mean"], r[f"{PRIMARY}_std"], r["n_seeds"])
                     for r in rows if r["variant"] == v and r.get("shots") is not None
                     and r[f"{PRIMARY}_mean"] is not None)
        if not pts:
            continue
        k = np.array([p[0] for p in pts], dtype=float)
        m = 100 * np.array([p[1] for p in pts])
        half = 100 * ci95_half_width([p[2] for p in pts], [p[3] for p in pts])
        line = ax.plot(k, m, marker="o", label=v, color=colours[i],
                       linestyle=styles[(i // 20) % len(styles)])[0]
        # a t interval over 2 seeds is wide: drawn within the scale's 0-100%
        ax.fill_between(k, np.clip(m - half, 0, 100), np.clip(m + half, 0, 100),
                        color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ks = sorted({r["shots"] for r in rows if r.get("shots") is not None})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("training images per class (shots)")
    ax.set_ylabel(f"{get_metric(PRIMARY).label.lower()} % (mean, 95% CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def concept_heatmap_figure(means: Any, concepts: Sequence[str], class_names: Sequence[str],
                           counts: Sequence[int], *, label: str = "") -> Figure:
    """Per-class mean concept score (rows = concepts, columns = classes) as an annotated,
    diverging heatmap centred on 0: a z-score above 0 means the class's images score the
    concept higher than the average training image. `counts`: images per class (columns)."""
    m = np.asarray(means, dtype=float).T  # [K, C]
    k, c = m.shape
    if k != len(concepts) or c != len(class_names) or len(counts) != c:
        raise ValueError(f"means {m.T.shape} do not match {c} classes x {k} concepts")
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
    fig = Figure(figsize=(1.0 * c + 4.5, 0.32 * k + 2.2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-lim, vmax=lim,
                      aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("mean z-score (vs. the train split)")
    for i in range(k):
        for j in range(c):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(m[i, j]) > 0.6 * lim else "black")
    ax.set_xticks(range(c), labels=[f"{n}\n(n={int(x)})" for n, x in
                                    zip(class_names, counts, strict=True)], fontsize=8)
    ax.set_yticks(range(k), labels=list(concepts), fontsize=8)
    ax.set_title("Mean concept score per class (MONET-style, z-scored)"
                 + (f"\n{label}" if label else ""), fontsize=9)
    return fig


def plot_concept_heatmap(means: Any, concepts: Sequence[str], class_names: Sequence[str],
                         counts: Sequence[int], path: str | os.PathLike[str], *,
                         label: str = "") -> Path:
    return _save(concept_heatmap_figure(means, concepts, class_names, counts, label=label),
                 path)

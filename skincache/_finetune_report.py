"""A finished fine-tuning run's outputs, the same ones `fit-head` writes for a head:
`metrics/<split>.json` (skincache.metrics' report: balanced accuracy first, bootstrap CIs,
confusion matrix, calibration), `predictions/<split>.csv`, the report plots per split, plus the
training curves and, with WiSE-FT, the alpha curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skincache._finetune_state import write_json
from skincache.metrics import classification_report, write_predictions_csv


def write_outputs(run_dir: Path, result, stores: dict, probas: dict[str, np.ndarray],
                  classes: list[str], cfg) -> None:
    """Fill `result.metrics` and write every file under `run_dir`."""
    for split, proba in probas.items():
        store = stores[split]
        y = store.labels.cpu().numpy()
        rep = classification_report(y, proba, classes, n_bootstrap=cfg.n_bootstrap,
                                    seed=cfg.seed)
        rep["model"] = {"best_epoch": result.best_epoch, "wise_alpha": result.wise_alpha}
        result.metrics[split] = rep
        write_json(run_dir / "metrics" / f"{split}.json", rep)
        write_predictions_csv(run_dir / "predictions" / f"{split}.csv", store.image_ids, y,
                              proba, classes)
    if result.wise_curve is not None:
        write_json(run_dir / "metrics" / "wise_curve.json", result.wise_curve)
    if not cfg.plots:
        return
    from skincache.plots import plot_curves, write_report_plots

    plots = run_dir / "plots"
    for split, rep in result.metrics.items():
        write_report_plots(rep, plots, prefix=f"{split}_")
    series = curve_series(result.history)
    if series:
        plot_curves(series, plots / "curves.png", title=f"Fine-tuning ({cfg.setup})")
    if result.wise_curve:
        plot_wise_curve(result.wise_curve, plots / "wise_curve.png", result.wise_alpha)


def curve_series(history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-epoch series for `plot_curves` (losses left, accuracies right)."""
    keys = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_balanced_accuracy")
    return {k: [r[k] for r in history] for k in keys if history and all(k in r for r in history)}


def plot_wise_curve(curve: list[dict[str, float]], path: Path, chosen: float | None) -> Path:
    """Validation balanced accuracy and accuracy against the WiSE-FT alpha."""
    from matplotlib.figure import Figure

    alphas = [r["alpha"] for r in curve]
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(alphas, [r["balanced_accuracy"] for r in curve], marker="o",
            label="val balanced accuracy")
    ax.plot(alphas, [r["accuracy"] for r in curve], marker="s", label="val accuracy")
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle="--", label=f"chosen alpha = {chosen:g}")
    ax.set_xlabel("alpha (0 = initial / zero-shot weights, 1 = fine-tuned)")
    ax.set_ylabel("Score")
    ax.set_title("WiSE-FT weight interpolation")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path

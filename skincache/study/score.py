"""`skincache score`: the run folder's metrics, bootstrap CIs and plots for any predictions file.

No second metrics path: the numbers are `metrics.classification_report` (scikit-learn's point
estimates, the seeded percentile bootstrap every run folder uses) and the plots are
`plots.write_report_plots`, exactly what `runs.write_split_outputs` writes for a split. A file
without probabilities is scored on one-hot rows, and the numbers that need probabilities
(AUROC, ECE, log loss, the reliability diagram) are then reported as undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import write_json
from skincache.errors import UsageError
from skincache.metrics import classification_report
from skincache.plots import write_report_plots
from skincache.study.predictions import (
    ColumnMap,
    Predictions,
    predictions_path,
    read_predictions,
)

__all__ = ["model_proba", "score_file", "score_files", "score_predictions"]

_NEEDS_PROBA = ("auroc", "ece", "log_loss")


def model_proba(pred: Predictions) -> np.ndarray:
    """The probabilities to score: the file's, or one-hot rows of its predicted labels."""
    if pred.proba is not None:
        return pred.proba
    return np.eye(len(pred.classes))[pred.y_pred]


def score_predictions(pred: Predictions, *, n_bootstrap: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict[str, Any]:
    """`classification_report` of `pred` (seed and resamples as a run folder's default: 1,000,
    seed 0), plus `source` (the file, its layout and the reader's notes)."""
    report = classification_report(pred.y_true, model_proba(pred), list(pred.classes),
                                   n_bootstrap=n_bootstrap, seed=seed, ci=ci)
    if pred.proba is None:
        for key in _NEEDS_PROBA:
            report[key] = None
        report["ci"]["auroc"] = None
        report["calibration"] = None
        for c in report["per_class"].values():
            c["auroc"] = None
        report["notes"].append("no probabilities in the file: AUROC, ECE and log loss are "
                               "undefined")
    report["source"] = pred.describe()
    return report


def score_file(path: str | Path, columns: ColumnMap | None = None, *,
               renormalize: bool = False, n_bootstrap: int = 1000, seed: int = 0,
               plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Read and score one predictions file; with `plots_dir`, the run folder's plots go there as
    `<file stem>_*.png` (their paths in the report's `plots`)."""
    pred = read_predictions(path, columns, renormalize=renormalize)
    return _score_and_plot(pred, n_bootstrap, seed, plots_dir, pred.source_path.stem)


def _score_and_plot(pred: Predictions, n_bootstrap: int, seed: int,
                    plots_dir: str | Path | None, stem: str) -> dict[str, Any]:
    report = score_predictions(pred, n_bootstrap=n_bootstrap, seed=seed)
    if plots_dir is not None:
        label = f"{pred.source_path.name} ({pred.format}, n={len(pred):,})"
        paths = write_report_plots(report, plots_dir, prefix=f"{stem}_",
                                   label=label)
        report["plots"] = [str(p) for p in paths]
    return report


def score_files(paths: Sequence[str | Path], columns: ColumnMap | None = None, *,
                renormalize: bool = False, n_bootstrap: int = 1000, seed: int = 0,
                plots_dir: str | Path | None = None, json_path: str | Path | None = None,
                split: str = "test") -> list[dict[str, Any]]:
    """`score_file` for each path (a predictions file, or a run folder: its
    `predictions/<split>.csv`), in order (every file read before any is scored, so a bad
    last file costs no bootstrap time; plots of files with the same name are numbered
    `1-test_*.png`, `2-test_*.png`); with `json_path`, {"reports": [...]} is written there."""
    if not paths:
        raise UsageError("score needs at least one predictions file")
    if n_bootstrap < 0:
        raise UsageError(f"--bootstrap {n_bootstrap}: must be >= 0 (0: no intervals)")
    preds = [read_predictions(predictions_path(p, split), columns, renormalize=renormalize)
             for p in paths]
    stems = [p.source_path.stem for p in preds]
    if len(set(stems)) < len(stems):  # test.csv of two runs: number them, never overwrite
        stems = [f"{i}-{s}" for i, s in enumerate(stems, 1)]
    reports = [_score_and_plot(p, n_bootstrap, seed, plots_dir, stem)
               for p, stem in zip(preds, stems, strict=True)]
    if json_path is not None:
        write_json(json_path, {"reports": reports})
    return reports

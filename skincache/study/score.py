"""`skincache score`: the run folder's metrics, bootstrap CIs and plots for any predictions file.

No second metrics path: the numbers are `metrics.classification_report` (scikit-learn's point
estimates, the seeded percentile bootstrap every run folder uses) and the plots are
`plots.write_report_plots`, exactly what `runs.write_split_outputs` writes for a split. A file
without probabilities is scored on one-hot rows, and the numbers that need probabilities
(AUROC, ECE, log loss, the reliability diagram) are then reported as undefined.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import write_json
from skincache.metrics import classification_report
from skincache.plots import write_report_plots
from skincache.study.predictions import ColumnMap, Predictions, read_predictions

__all__ = ["model_proba", "score_file", "score_predictions"]

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
    report = score_predictions(pred, n_bootstrap=n_bootstrap, seed=seed)
    if plots_dir is not None:
        label = f"{pred.source_path.name} ({pred.format}, n={len(pred):,})"
        paths = write_report_plots(report, plots_dir, prefix=f"{pred.source_path.stem}_",
                                   label=label)
        report["plots"] = [str(p) for p in paths]
    return report


def write_reports(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """The `--json` file of `skincache score`: {"reports": [...]} in the order of the inputs."""
    return write_json(path, {"reports": reports})

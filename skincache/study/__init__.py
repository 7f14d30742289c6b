"""Scoring and comparing predictions files: skincache's own `predictions/<split>.csv`, another
tool's CSV (the DermFM-Zero format recognised as it is, any other through a column mapping), and
a paired comparison of several models on the images they share.

The public face, for the CLI and notebooks; the modules below import each other, never this file:
`predictions.py` (reading a file into `Predictions`), `score.py` (the run folder's metrics, CIs
and plots for one file), `compare.py` (paired bootstrap differences and McNemar's test).
"""

from __future__ import annotations

from skincache.study.compare import compare_inputs, load_input
from skincache.study.predictions import ColumnMap, Predictions, read_predictions
from skincache.study.score import score_file, score_files, score_predictions

__all__ = ["ColumnMap", "Predictions", "compare_inputs", "load_input", "read_predictions",
           "score_file", "score_files", "score_predictions"]

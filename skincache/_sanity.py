"""Warnings for numbers that look like results but mean nothing.

A newcomer trying the shipped random-initialised `skincache-tiny`, or a head that learned to
answer "nv" for everything on HAM10000 (67% nevi), gets tables full of plausible numbers. Each
function here returns the one warning line to print, or None; they read cache attributes and
metric reports only (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: A head that gives one class to at least this share of a split is flagged.
ONE_CLASS_SHARE = 0.95


#: the weights label of a model with no pretrained tag, checkpoint or hub weights
RANDOM_INIT = "random init"


def weights_label(model: str, pretrained: str | None = None,
                  checkpoint: str | Path | None = None) -> str:
    """Which weights a model had, in the one wording every plot, table and warning uses: the
    checkpoint's file name, else the pretrained tag, "" for an `hf-hub:` model (its name says
    it), else "random init"."""
    if checkpoint:
        return Path(str(checkpoint)).name
    if pretrained:
        return str(pretrained)
    return "" if str(model).startswith("hf-hub:") else RANDOM_INIT


def model_label(model: str, pretrained: str | None = None,
                checkpoint: str | Path | None = None) -> str:
    """`ViT-B-32 (openai)`: architecture and weights, as a reader of a plot needs them."""
    weights = weights_label(model, pretrained, checkpoint)
    return f"{model}" + (f" ({weights})" if weights else "")


def is_random_init(attrs: Mapping[str, Any]) -> bool:
    """True for a cache (or run) whose model had no pretrained tag, checkpoint or hub
    weights: its features are those of random weights."""
    return not attrs.get("checkpoint_sha256") and weights_label(
        str(attrs.get("model", "")), attrs.get("pretrained"), attrs.get("checkpoint")
    ) == RANDOM_INIT


def random_init_warning(attrs: Mapping[str, Any], what: str = "these numbers") -> str | None:
    """The warning for results computed on a random-initialised model's features."""
    if not is_random_init(attrs):
        return None
    return (f"{attrs.get('model', 'the model')} has random weights here (no --pretrained, no "
            f"--checkpoint): {what} check the pipeline only and say nothing about a real "
            "model; use pretrained weights for that (e.g. --model ViT-B-32 --pretrained "
            "openai)")


def one_class_share(report: Mapping[str, Any]) -> tuple[str, float, int, int] | None:
    """(class, share, count, total) when one class gets >= 95% of the predictions, else None."""
    cm = report.get("confusion_matrix")
    classes = report.get("classes")
    if not cm or not classes:
        return None
    predicted = [sum(row[j] for row in cm) for j in range(len(classes))]
    total = sum(predicted)
    if total == 0:
        return None
    j = max(range(len(classes)), key=lambda k: predicted[k])
    share = predicted[j] / total
    return (classes[j], share, predicted[j], total) if share >= ONE_CLASS_SHARE else None


def one_class_warning(reports: Mapping[str, Mapping[str, Any]], who: str = "the head",
                      advice: str = "try another head or --param") -> str | None:
    """One warning line for a classifier that predicts one class for >= 95% of a split
    (`reports`: split or evaluation name -> classification report): whatever its accuracy,
    it has learned nothing that tells the images apart."""
    found = [(name, hit) for name, rep in reports.items() if (hit := one_class_share(rep))]
    if not found:
        return None
    where = " and ".join(f"'{c}' for {share:.0%} of {name} ({k:,} of {n:,})"
                         for name, (c, share, k, n) in found)
    return (f"{who} predicts {where}: one answer for nearly everything tells no images apart, "
            f"whatever the accuracy; read balanced accuracy and per-class recall, or {advice}")


def cache_attrs(path) -> dict:
    """A cache file's root attributes, without reading its arrays (for the warnings above)."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def run_cache_attrs(run) -> dict:
    """The attributes of the cache a run folder was fit on (run.json read by `read_run`)."""
    from pathlib import Path

    from skincache.run_record import read_run

    return cache_attrs(Path(str(read_run(run).cache)))

"""`skincache compare`: is model B better than model A on the same images, and is it real?

On the images both scored (matched by image id; refused when they share none or disagree on a
true label), for balanced accuracy, accuracy, macro-F1 and AUROC:

- the point difference B - A, each side computed by `metrics.classification_report`
  (scikit-learn's functions, as every run folder);
- a **paired** percentile bootstrap of that difference: `metrics.bootstrap_distribution` is run
  for A and for B with the same seed on the same number of images, so both see the *same*
  resampled images (its resamples depend only on n, the count and the seed) and the differences
  are taken resample by resample. Pairing removes the between-image variance the two models
  share, so the interval is far narrower than two separate CIs side by side;
- McNemar's exact test on correctness (binomial on the discordant images: A right and B wrong
  against A wrong and B right; `scipy.stats.binomtest`, two-sided).

Several inputs: every one against the first. A plot shows each difference with its interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from skincache._io import write_json
from skincache.errors import InputFileError, UsageError
from skincache.metrics import _percentile_ci, bootstrap_distribution, classification_report
from skincache.plots import _save
from skincache.study.predictions import Predictions, predictions_path, read_predictions
from skincache.study.score import model_proba

__all__ = ["COMPARED", "align", "compare_inputs", "compare_pair", "load_input", "mcnemar",
           "paired_bootstrap", "plot_differences"]

COMPARED: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "balanced accuracy"),
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("auroc", "AUROC (OvR macro)"),
)


def input_name(path: str | Path) -> str:
    """What a table calls an input: the run folder's name, or the file's."""
    return Path(path).resolve().name


def load_input(path: str | Path, split: str = "test") -> Predictions:
    """A run folder's `predictions/<split>.csv`, or a predictions file as it is."""
    return read_predictions(predictions_path(path, split))


def _same_class_order(a: Predictions, b: Predictions, names: tuple[str, str]) -> Predictions:
    """`b` with its classes in `a`'s order (refused when the class sets differ)."""
    if b.classes == a.classes:
        return b
    if sorted(b.classes) != sorted(a.classes):
        raise InputFileError(f"{names[1]} has classes {','.join(b.classes)} but {names[0]} has "
                             f"{','.join(a.classes)}: a comparison needs the same classes")
    order = np.array([b.classes.index(c) for c in a.classes])
    inverse = np.argsort(order)  # b's index -> a's index
    return Predictions(b.ids, inverse[b.y_true], inverse[b.y_pred],
                       None if b.proba is None else b.proba[:, order], a.classes,
                       b.source_path, b.format, b.notes, b.version)


def align(a: Predictions, b: Predictions, names: tuple[str, str] = ("A", "B")
          ) -> tuple[Predictions, Predictions, list[str]]:
    """`a` and `b` restricted to their shared image ids, in `a`'s order, and a note when that
    leaves out images of either. Refuses (InputFileError, one line) when they share no id or
    disagree on a true label."""
    b = _same_class_order(a, b, names)
    in_b = set(b.ids)
    shared = [i for i in a.ids if i in in_b]
    if not shared:
        raise InputFileError(f"{names[0]} and {names[1]} share no image id ({names[0]}'s look "
                             f"like {', '.join(a.ids[:2])}; {names[1]}'s like "
                             f"{', '.join(b.ids[:2])}): compare needs predictions on the same "
                             "images")
    sa, sb = a.subset(shared), b.subset(shared)
    differ = np.flatnonzero(sa.y_true != sb.y_true)
    if differ.size:
        i = int(differ[0])
        raise InputFileError(f"{names[0]} and {names[1]} disagree on the true label of "
                             f"{differ.size} shared image(s), e.g. {shared[i]}: "
                             f"{a.classes[sa.y_true[i]]} in {names[0]}, "
                             f"{a.classes[sb.y_true[i]]} in {names[1]}; they cannot be "
                             "compared")
    notes = []
    if len(shared) < max(len(a), len(b)):
        notes.append(f"only {len(shared):,} images are in both: {names[0]} has {len(a):,}, "
                     f"{names[1]} has {len(b):,}; every number here is on the "
                     f"{len(shared):,} shared images")
    return sa, sb, notes


def paired_bootstrap(y: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray, *,
                     n_bootstrap: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """B - A of each compared metric on each of `n_bootstrap` resamples [n_bootstrap]; the two
    models see the same resampled images (the same seed and n give the same resamples)."""
    da = bootstrap_distribution(y, proba_a, n_bootstrap=n_bootstrap, seed=seed)
    db = bootstrap_distribution(y, proba_b, n_bootstrap=n_bootstrap, seed=seed)
    return {m: db[m] - da[m] for m, _ in COMPARED}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: under "equally often right", the images where exactly one model is
    right split 50:50; p is the two-sided binomial probability of a split this uneven."""
    from scipy.stats import binomtest

    a_only = int(np.count_nonzero(correct_a & ~correct_b))
    b_only = int(np.count_nonzero(~correct_a & correct_b))
    p = 1.0 if a_only + b_only == 0 else float(binomtest(b_only, a_only + b_only, 0.5).pvalue)
    return {"a_right_b_wrong": a_only, "a_wrong_b_right": b_only, "p_value": p,
            "test": "exact (binomial, two-sided)"}


def compare_pair(a: Predictions, b: Predictions, names: tuple[str, str] = ("A", "B"), *,
                 n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Point values, B - A with its paired-bootstrap interval, and McNemar, on shared images."""
    if n_bootstrap < 1:
        raise UsageError(f"--bootstrap {n_bootstrap}: a paired bootstrap needs >= 1 resample")
    sa, sb, notes = align(a, b, names)
    pa, pb = model_proba(sa), model_proba(sb)
    classes = list(a.classes)
    ra = classification_report(sa.y_true, pa, classes, n_bootstrap=0)
    rb = classification_report(sb.y_true, pb, classes, n_bootstrap=0)
    diffs = paired_bootstrap(sa.y_true, pa, pb, n_bootstrap=n_bootstrap, seed=seed)
    no_proba = [n for n, p in zip(names, (sa, sb), strict=True) if p.proba is None]
    if no_proba:
        notes.append(f"{' and '.join(no_proba)} without probabilities: no AUROC difference")
    metrics = {}
    for m, _ in COMPARED:
        defined = ra[m] is not None and rb[m] is not None and not (m == "auroc" and no_proba)
        metrics[m] = {"a": ra[m] if defined else None, "b": rb[m] if defined else None,
                      "difference": rb[m] - ra[m] if defined else None,
                      "ci": _percentile_ci(diffs[m], ci) if defined else None}
    return {"a": names[0], "b": names[1], "n_shared": len(sa), "n_a": len(a), "n_b": len(b),
            "metrics": metrics,
            "mcnemar": mcnemar(sa.y_pred == sa.y_true, sb.y_pred == sb.y_true),
            "notes": notes}


def plot_differences(result: dict[str, Any], path: str | Path) -> Path:
    """Each compared metric's B - A (percentage points) with its paired-bootstrap interval, one
    colour per comparison; the zero line is "no difference"."""
    comps = result["comparisons"]
    fig = Figure(figsize=(7.0, 1.2 + 0.55 * len(COMPARED) * max(1, len(comps))),
                 layout="constrained")
    ax = fig.add_subplot()
    step = 0.7 / max(1, len(comps))
    for j, comp in enumerate(comps):
        ys, xs, lo, hi = [], [], [], []
        for i, (m, _) in enumerate(COMPARED):
            d = comp["metrics"][m]
            if d["difference"] is None:
                continue
            ys.append(i + (j - (len(comps) - 1) / 2) * step)
            xs.append(100 * d["difference"])
            lo.append(100 * (d["difference"] - d["ci"][0]))
            hi.append(100 * (d["ci"][1] - d["difference"]))
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=4,
                    label=f"{comp['b']} − {comp['a']} (n={comp['n_shared']:,}, McNemar p="
                          f"{comp['mcnemar']['p_value']:.2g})")
    ax.axvline(0, color="0.4", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(COMPARED)), [label for _, label in COMPARED])
    ax.invert_yaxis()
    level = round(100 * result["bootstrap"]["level"])
    ax.set_xlabel(f"difference, percentage points ({level}% paired bootstrap CI, "
                  f"{result['bootstrap']['n_resamples']:,} resamples)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(comps) < 3 else -0.18),
              fontsize=8, frameon=False)
    return _save(fig, path)


def compare_inputs(inputs: Sequence[str | Path], *, split: str = "test", n_bootstrap: int = 1000,
                   seed: int = 0, ci: float = 0.95, plot: str | Path | None = None,
                   json_path: str | Path | None = None) -> dict[str, Any]:
    """Every input against the first (run folders' `predictions/<split>.csv` or predictions
    files); JSON-ready. With `plot`, the differences are drawn there (`plot` in the result);
    with `json_path`, the result is written there too."""
    if len(inputs) < 2:
        raise UsageError("compare needs at least two inputs (run folders or predictions files)")
    names = [input_name(p) for p in inputs]
    if len(set(names)) < len(names):
        names = [str(p) for p in inputs]
    preds = [load_input(p, split) for p in inputs]
    result: dict[str, Any] = {
        "reference": names[0],
        "difference": "each input minus the reference (the first input)",
        "inputs": [dict(p.describe(), name=n) for n, p in zip(names, preds, strict=True)],
        "bootstrap": {"n_resamples": int(n_bootstrap), "seed": int(seed), "level": float(ci),
                      "method": "paired percentile"},
        "comparisons": [compare_pair(preds[0], p, (names[0], n), n_bootstrap=n_bootstrap,
                                     seed=seed, ci=ci)
                        for n, p in zip(names[1:], preds[1:], strict=True)],
    }
    if plot is not None:
        result["plot"] = str(plot_differences(result, plot))
    if json_path is not None:
        write_json(json_path, result)
    return result

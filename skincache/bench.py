"""`bench-heads`: every head variant x seeds on one cache, one JSON per run, then an aggregate
(the CLIP_benchmark way: raw results stay, tables are derived from them).

Heads without a seed are deterministic: they run once, and the table says so, rather than
repeating an identical fit N times to fake a standard deviation.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import atomic_write_text, now_iso, write_json
from skincache.cache import FeatureCache
from skincache.errors import UsageError
from skincache.heads import get_head_class
from skincache.heads._protocols import trains_on_val
from skincache.heads.base import tta_mean
from skincache.metrics import PRIMARY, classification_report, get_metric, metrics, table_metrics
from skincache.runs import ALL_TEMPLATES, fit_inputs, is_seeded, make_head

#: (variant name, head name, params): every head plus the variants worth comparing.
#: Defaults are balanced-accuracy-first (logit adjustment chosen on val); "-plain" variants
#: are the unadjusted objective, one parameter away.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("zeroshot", "zeroshot", {}),
    ("logreg", "logreg", {}),
    ("logreg-plain", "logreg", {"logit_adjust": None}),
    ("logreg-balanced", "logreg", {"class_weight": "balanced", "logit_adjust": None}),
    ("linear", "linear", {}),
    ("mlp", "mlp", {}),
    ("mlp-plain", "mlp", {"logit_adjust": None}),
    ("mlp-noviews", "mlp", {"use_views": False}),
    ("knn-k1", "knn", {"k": 1}),
    ("knn-k5", "knn", {"k": 5}),
    ("knn-k20", "knn", {"k": 20}),
    ("tip-adapter", "tip-adapter", {}),
    ("tip-adapter-f", "tip-adapter-f", {}),
    ("zs-linear", "zs-linear", {}),
    # published protocols, unchanged (README "Published protocols"): beside their tables
    ("dermfm-lp", "dermfm-lp", {}),
    ("dermfm-lp-trainval", "dermfm-lp", {"merge_val": True}),
    ("clip-benchmark-lp", "clip-benchmark-lp", {}),
]

#: The run key of the selection score: the primary metric on val (`val_balanced_accuracy`).
VAL_KEY = f"val_{PRIMARY}"


def _aggregated() -> tuple[str, ...]:
    """The run keys averaged over seeds: every registered metric, the val score, fit time."""
    return (*(m.name for m in metrics()), VAL_KEY, "fit_seconds")


@dataclass
class BenchResult:
    out_dir: Path
    rows: list[dict]  # aggregate, one per variant
    runs: list[dict]  # one per (variant, seed)


def bench_heads(
    cache: FeatureCache | str | Path,
    *,
    seeds: int = 5,
    variants: list[str] | None = None,
    eval_split: str | None = None,
    template_set: str = ALL_TEMPLATES,
    out_dir: str | Path | None = None,
    progress=None,
    shots: list[int] | None = None,
    tta: bool = False,
) -> BenchResult:
    """Fit each variant on train (val for selection), score it on val and on `eval_split`
    (test when the cache has one, else val) and write runs/*.json, results.json, results.csv,
    results.md. `shots`: repeat for K training images per class, each seed drawing its own
    subset (so every head runs `seeds` times) and plot balanced accuracy against K. `tta`:
    also score each fit with test-time augmentation (rows `<variant>+tta`, no extra fit)."""
    chosen = check_variants(variants)
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    split = eval_split or ("test" if "test" in fc.splits else "val")
    if split not in fc.splits:
        raise UsageError(f"{fc.path}: no split '{split}' (has {sorted(fc.splits)})")
    evald, val = fc.split(split), fc.splits.get("val")
    full = fit_inputs(fc, template_set=template_set)
    if full["text"] is None:
        chosen = [v for v in chosen if not get_head_class(v[1]).needs_text]
    out = Path(out_dir or Path("runs") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for k in shots or [None]:
        for variant, head_name, params in chosen:
            n_seeds = seeds if (k is not None or is_seeded(head_name)) else 1
            for seed in range(n_seeds):
                inputs = full if k is None else fit_inputs(fc, template_set=template_set,
                                                           shots=k, seed=seed)
                head = make_head(head_name, params, seed)
                t0 = time.perf_counter()
                head.fit(**inputs)
                fit_s = time.perf_counter() - t0
                probas = {"eval": _split_probas(head, evald, tta)}
                if val is not None:  # scored on val already when there is no test split
                    probas["val"] = (probas["eval"] if val is evald
                                     else _split_probas(head, val, tta))
                for with_tta in (False, True) if tta else (False,):
                    report = classification_report(evald.labels, probas["eval"][with_tta],
                                                   fc.classes, n_bootstrap=0)
                    val_score = (get_metric(PRIMARY).score(val.labels, probas["val"][with_tta])
                                 if val is not None else None)
                    name = variant + ("+tta" if with_tta else "")
                    run = {"variant": name, "head": head_name, "params": params, "seed": seed,
                           "shots": k, "split": split, "fit_seconds": fit_s,
                           "cache_key": fc.key, VAL_KEY: val_score,
                           "trains_on_val": trains_on_val(head),
                           **{m.name: report[m.name] for m in metrics()},
                           "per_class_recall": {c: v["recall"]
                                                for c, v in report["per_class"].items()}}
                    tag = f"{name}_k{k}" if k is not None else name
                    write_json(out / "runs" / f"{tag}_s{seed}.json", run)
                    runs.append(run)
                if progress:
                    progress(1)
    rows = aggregate(runs)
    _write_tables(out, rows, fc, split)
    if shots:
        from skincache.plots import plot_shots

        plot_shots(rows, out / "shots.png",
                   title=f"{fc.attrs['model']} · {fc.attrs.get('dataset', '')} · {split}")
    return BenchResult(out, rows, runs)


def _split_probas(head, data, tta: bool) -> dict[bool, np.ndarray]:
    """{False: clean-view probabilities, True: the TTA mean} with one pass over each view."""
    clean = head.predict_proba(data.features)
    out = {False: clean}
    n, k, d = data.views.shape
    if tta:
        out[True] = clean if k == 0 else tta_mean(
            clean, head.predict_proba(np.asarray(data.views, np.float32).reshape(n * k, d)))
    return out


def check_variants(variants: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """The chosen variants; unknown names are an error before any work starts."""
    unknown = sorted(set(variants or []) - {v[0] for v in VARIANTS})
    if unknown:
        raise UsageError(f"--variants: unknown variants {', '.join(unknown)}; known: "
                         f"{', '.join(v[0] for v in VARIANTS)}")
    return [v for v in VARIANTS if variants is None or v[0] in variants]


def n_fits(seeds: int, variants: list[str] | None = None, shots: list[int] | None = None
           ) -> int:
    per_k = [sum(seeds if (k is not None or is_seeded(h)) else 1 for v, h, _ in VARIANTS
                 if variants is None or v in variants) for k in (shots or [None])]
    return sum(per_k)


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (variant, shots), in the order they first appear; the row
    with the best mean val balanced accuracy (`PRIMARY`, per shots) is marked `chosen_by_val`,
    among the rows whose head kept val out of its training rows (`trains_on_val` rows are
    marked and never chosen: their val score is a training score).
    A metric a run predates (registered since) aggregates to None."""
    order = list(dict.fromkeys((r["variant"], r.get("shots")) for r in runs))
    rows = []
    for v, k in order:
        rs = [r for r in runs if r["variant"] == v and r.get("shots") == k]
        row: dict[str, Any] = {"variant": v, "head": rs[0]["head"], "shots": k,
                               "n_seeds": len(rs)}
        if any(r.get("trains_on_val") for r in rs):
            row["trains_on_val"] = True
        for m in _aggregated():
            vals = np.array([np.nan if r.get(m) is None else r[m] for r in rs], dtype=float)
            row[f"{m}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
            row[f"{m}_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else None
        rows.append(row)
    for k in dict.fromkeys(r["shots"] for r in rows):
        group = [r for r in rows if r["shots"] == k and r[f"{VAL_KEY}_mean"] is not None
                 and not r.get("trains_on_val")]
        if group:
            best = max if get_metric(PRIMARY).higher_is_better else min
            best(group, key=lambda r: r[f"{VAL_KEY}_mean"])["chosen_by_val"] = True
    return rows


def format_cell(row: dict, m: str, pct: bool = True) -> str:
    """`mean ± std` of metric `m` (or `val_<metric>`) in its registered format, percent or a
    fraction (just the mean for a single run); `pct=False`: seconds. The val score of a head
    that trained on val reads "(fit)" after it: not a validation score."""
    mean, std = row[f"{m}_mean"], row[f"{m}_std"]
    if mean is None:
        return "n/a"
    if not pct:
        return f"{mean:.2f}"
    percent = get_metric(m.removeprefix("val_")).fmt == "percent"
    scale, digits = (100, 1) if percent else (1, 3)
    cell = f"{scale * mean:.{digits}f}"
    cell += f" ± {scale * std:.{digits}f}" if row["n_seeds"] > 1 else ""
    return cell + (" (fit)" if m == VAL_KEY and row.get("trains_on_val") else "")


def markdown_table(rows: list[dict]) -> str:
    """results.md: one row per variant, a column per table metric (`table_metrics()`)."""
    shown = table_metrics()
    cols = ["variant", "shots", "seeds", f"val {get_metric(PRIMARY).heading}",
            *(m.heading for m in shown), "fit s"]
    head = "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n"
    lines = []
    for r in rows:
        seeds = r["n_seeds"] if r["n_seeds"] > 1 else "1 (deterministic)"
        name = r["variant"] + (" (val's pick)" if r.get("chosen_by_val") else "")
        cells = [format_cell(r, m) for m in (VAL_KEY, *(m.name for m in shown))]
        cells.append(format_cell(r, "fit_seconds", False))
        shots = "all" if r.get("shots") is None else str(r["shots"])
        lines.append(f"| {name} | {shots} | {seeds} | " + " | ".join(cells) + " |\n")
    return head + "".join(lines)


def _write_tables(out: Path, rows: list[dict], fc: FeatureCache, split: str) -> None:
    meta = {"cache": str(fc.path), "cache_key": fc.key, "model": fc.attrs["model"],
            "split": split, "created": now_iso()}
    write_json(out / "results.json", {**meta, "rows": rows})
    buf = io.StringIO(newline="")
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["variant"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md",
        f"Heads on `{fc.path.name}` ({fc.attrs['model']}), scored on `{split}`; mean ± std "
        "over seeds.\n\n" + markdown_table(rows))

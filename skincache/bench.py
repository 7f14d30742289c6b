"""`bench-heads`: every head variant x seeds on one cache, one JSON per run, then an aggregate
(the CLIP_benchmark way: raw results stay, tables are derived from them).

Heads without a seed are deterministic: they run once, and the table says so, rather than
repeating an identical fit N times to fake a standard deviation.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skincache.cache import FeatureCache
from skincache.errors import UsageError
from skincache.heads import get_head_class
from skincache.metrics import classification_report
from skincache.runs import ALL_TEMPLATES, fit_inputs, is_seeded, make_head

#: (variant name, head name, params): every head plus the variants worth comparing.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("zeroshot", "zeroshot", {}),
    ("logreg", "logreg", {}),
    ("logreg-balanced", "logreg", {"class_weight": "balanced"}),
    ("linear", "linear", {}),
    ("mlp", "mlp", {}),
    ("mlp-noviews", "mlp", {"use_views": False}),
    ("knn-k1", "knn", {"k": 1}),
    ("knn-k5", "knn", {"k": 5}),
    ("knn-k20", "knn", {"k": 20}),
    ("tip-adapter", "tip-adapter", {}),
    ("tip-adapter-f", "tip-adapter-f", {}),
    ("zs-linear", "zs-linear", {}),
]

METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")


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
) -> BenchResult:
    """Fit each variant on train (val for selection), score it on `eval_split` (test when the
    cache has one, else val) and write runs/*.json, results.json, results.csv, results.md."""
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    check_variants(variants)
    chosen = [v for v in VARIANTS if variants is None or v[0] in variants]
    split = eval_split or ("test" if "test" in fc.splits else "val")
    evald = fc.split(split)
    inputs = fit_inputs(fc, template_set=template_set)
    if inputs["text"] is None:
        chosen = [v for v in chosen if not get_head_class(v[1]).needs_text]
    out = Path(out_dir or Path("runs") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    for variant, head_name, params in chosen:
        for seed in range(seeds if is_seeded(head_name) else 1):
            head = make_head(head_name, params, seed)
            t0 = time.perf_counter()
            head.fit(**inputs)
            fit_s = time.perf_counter() - t0
            report = classification_report(evald.labels, head.predict_proba(evald.features),
                                           fc.classes, n_bootstrap=0)
            run = {"variant": variant, "head": head_name, "params": params, "seed": seed,
                   "split": split, "fit_seconds": fit_s, "cache_key": fc.key,
                   **{m: report[m] for m in METRICS},
                   "per_class_recall": {c: v["recall"] for c, v in report["per_class"].items()}}
            (out / "runs" / f"{variant}_s{seed}.json").write_text(json.dumps(run, indent=2))
            runs.append(run)
            if progress:
                progress(1)
    rows = aggregate(runs)
    _write_tables(out, rows, fc, split)
    return BenchResult(out, rows, runs)


def check_variants(variants: list[str] | None) -> None:
    """UsageError naming unknown variants and the known ones: called before anything is
    read or drawn (a progress bar, then an error, reads as a crash)."""
    unknown = sorted(set(variants or []) - {v[0] for v in VARIANTS})
    if unknown:
        raise UsageError(f"--variants: unknown variants {', '.join(unknown)}; known: "
                         f"{', '.join(v[0] for v in VARIANTS)}")


def n_fits(seeds: int, variants: list[str] | None = None) -> int:
    return sum(seeds if is_seeded(h) else 1 for v, h, _ in VARIANTS
               if variants is None or v in variants)


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per variant, in the order variants first appear."""
    order = list(dict.fromkeys(r["variant"] for r in runs))
    rows = []
    for v in order:
        rs = [r for r in runs if r["variant"] == v]
        row: dict[str, Any] = {"variant": v, "head": rs[0]["head"], "n_seeds": len(rs)}
        for m in (*METRICS, "fit_seconds"):
            vals = np.array([np.nan if r[m] is None else r[m] for r in rs], dtype=float)
            row[f"{m}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else None
            row[f"{m}_std"] = float(np.nanstd(vals)) if np.isfinite(vals).any() else None
        rows.append(row)
    return rows


def format_cell(row: dict, m: str, pct: bool = True) -> str:
    """`mean ± std` in percent (just the mean for a single run), or seconds."""
    mean, std = row[f"{m}_mean"], row[f"{m}_std"]
    if mean is None:
        return "n/a"
    if not pct:
        return f"{mean:.2f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if row["n_seeds"] > 1 else f"{100 * mean:.1f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| variant | seeds | balanced acc % | acc % | macro-F1 % | AUROC % | fit s |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        seeds = r["n_seeds"] if r["n_seeds"] > 1 else "1 (deterministic)"
        cells = [format_cell(r, m) for m in METRICS] + [format_cell(r, "fit_seconds", False)]
        lines.append(f"| {r['variant']} | {seeds} | " + " | ".join(cells) + " |\n")
    return head + "".join(lines)


def _write_tables(out: Path, rows: list[dict], fc: FeatureCache, split: str) -> None:
    meta = {"cache": str(fc.path), "cache_key": fc.key, "model": fc.attrs["model"],
            "split": split, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["variant"])
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(
        f"Heads on `{fc.path.name}` ({fc.attrs['model']}), scored on `{split}`; mean ± std "
        "over seeds.\n\n" + markdown_table(rows))

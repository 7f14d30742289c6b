"""`bench-encoders`: which encoder suits this data? The same heads on several caches of one
dataset, one table in the published encoder table's shape (DermFM-Zero's: rows = encoders,
value (95% CI) per metric), here with a column per head.

What runs, exactly:

1. The caches must hold the same images in the same order with the same labels, lesion groups
   and splits (`cache.join.check_aligned`: the first mismatch is the error): a row of the
   table differs from another only by the encoder.
2. Each chosen head variant (`bench.VARIANTS` names; default `logreg`, the DermFM-Zero
   protocol `dermfm-lp`, and `zeroshot` on caches with text) is fit on each cache's train
   split, its selection made on val, and scored once on test with percentile-bootstrap 95% CIs
   (`metrics.classification_report`, as every run folder's metrics are). With `cv=K`: the
   lesion-grouped K-fold CV of `study.cv` over train+val instead (mean and 95% Student t
   interval over folds), its refit's test score kept in the run's JSON.
3. One JSON per (encoder, head) run under `out_dir/runs/`, then `results.json` (the runs and
   the table rows, CLIP_benchmark's way: raw results stay, the tables derive from them),
   `results.md` and `encoders.png`. A rerun into the same folder keeps the runs whose key
   (cache, head, params, seed, protocol) is unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import atomic_write_text, file_safe, now_iso, read_json_file, write_json
from skincache._sanity import model_label
from skincache.bench import VAL_KEY, check_out_dir
from skincache.cache import FeatureCache
from skincache.cache.join import check_aligned
from skincache.errors import InputFileError, UsageError
from skincache.metrics import PRIMARY, get_metric
from skincache.prompts import ALL_TEMPLATES

#: the heads of the encoder table unless told: the plain strong probe, the published
#: protocol, and zero-shot (only on caches with a text tower)
DEFAULT_HEADS = ("logreg", "dermfm-lp", "zeroshot")
#: the metrics of the table, in the published table's order of importance
TABLE_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "auroc")
#: what a per-run JSON must hold, equal, to be kept by a rerun into the same --out-dir
RUN_KEY = ("encoder", "cache_key", "variant", "head", "params", "seed", "n_bootstrap",
           "features", "template_set", "protocol")
RESULTS_JSON, RESULTS_MD, PLOT = "results.json", "results.md", "encoders.png"


@dataclass
class EncoderBenchResult:
    out_dir: Path
    encoders: list[dict]  # one per cache: label, cache path, model, embed_dim, text
    heads: list[str]  # the variant names, the table's columns
    runs: list[dict]  # one per (encoder, head) that ran (text heads skip caches without text)
    protocol: str
    reused: int = 0
    features: str = "projected"  # or "pre": before the image towers' final projection


def encoder_labels(caches: list[FeatureCache]) -> list[str]:
    """A row name per cache: the model and its weights; caches of one model (other views,
    other precision) are told apart by their file name."""
    labels = [model_label(c.header.model, c.header.pretrained or None,
                          c.header.checkpoint or None) for c in caches]
    return [f"{lab} · {c.path.stem}" if labels.count(lab) > 1 else lab
            for lab, c in zip(labels, caches, strict=True)]


def check_heads(heads: list[str] | None) -> list[tuple[str, str, dict[str, Any]]]:
    """The chosen variants (default `DEFAULT_HEADS`), in the order given; unknown names are a
    UsageError listing the known ones, before any cache is read."""
    from skincache.bench import VARIANTS

    names = list(heads or DEFAULT_HEADS)
    known = {v[0]: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--heads: unknown head variants {', '.join(unknown)}; known: "
                         f"{', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def _protocol(cv: int | None, n_bootstrap: int) -> str:
    if cv:
        from skincache.study.cv import protocol

        return protocol(cv)
    return (f"fit on train, selection on val, scored once on test; 95% percentile bootstrap "
            f"CIs ({n_bootstrap:,} resamples)")


def _reusable(path: Path, key: dict) -> dict | None:
    """The run JSON at `path` when an earlier bench wrote it with the same key; None when it
    is absent or unreadable (fit again). Another bench's run is refused, not overwritten."""
    if not path.is_file():
        return None
    try:
        run = read_json_file(path, max_bytes=4 << 20, what="bench-encoders run")
    except InputFileError:
        return None
    if not isinstance(run, dict):
        return None
    differ = [f for f in RUN_KEY if json.dumps(run.get(f), sort_keys=True)
              != json.dumps(key[f], sort_keys=True)]
    if differ:
        raise UsageError(f"{path}: a run of another bench ({differ[0]} {run.get(differ[0])!r} "
                         f"there, {key[differ[0]]!r} now); give another --out-dir, or the "
                         "same options as the bench that wrote it")
    return run


def encode_models(models: list[str], data: str, *, on_encoded=None,
                  **options: Any) -> list[Path]:
    """The cache of each model on `data` through `pipeline.encode_source` (what `skincache
    encode` runs): an existing cache of the same key is found, not rebuilt; an unfinished one
    resumes. `options` pass to `encode_source` (splits, views, device, cache_dir, ...);
    `on_encoded(result)` is called after each model."""
    from skincache.pipeline import encode_source

    paths = []
    for model in models:
        res = encode_source(data, model=model, **options)
        if on_encoded is not None:
            on_encoded(res)
        paths.append(res.path)
    return paths


def bench_encoders(
    caches: list[FeatureCache | str | Path],
    *,
    models: list[str] | None = None,
    data: str | None = None,
    encode_options: dict[str, Any] | None = None,
    heads: list[str] | None = None,
    cv: int | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    template_set: str = ALL_TEMPLATES,
    features: str = "projected",
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> EncoderBenchResult:
    """The encoder table (see the module docstring). `caches`: two or more caches of one
    dataset (one is allowed: a table of one row); `heads`: variant names of `bench.VARIANTS`;
    `cv`: K folds instead of the test split; `progress`: a bar counting the fits.
    `models` (with `data`): encode each model's cache of `data` first (`encode_models`, with
    `encode_options`), then bench them after `caches`. `features="pre"`: fit and score on
    the pre-projection features (every cache must hold them; text heads are skipped)."""
    from skincache.heads import get_head_class

    chosen = check_heads(heads)
    if n_bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {n_bootstrap}")
    if cv and features == "pre":
        raise UsageError("--cv with --features pre is not built yet (the folds read the "
                         "projected features)")
    if models and not data:
        raise UsageError("--models needs --data: the dataset to encode with each model")
    if not caches and not models:
        raise UsageError("bench-encoders needs at least one cache (--cache, or --models)")
    if models:
        caches = [*caches, *encode_models(models, str(data), **(encode_options or {}))]
    fcs = [c if isinstance(c, FeatureCache) else FeatureCache.open(c) for c in caches]
    check_aligned(fcs)
    from skincache.runs import check_features

    for fc in fcs:
        check_features(fc, features)
    for fc in fcs:
        if "train" not in fc.splits or (not cv and "test" not in fc.splits):
            raise UsageError(f"{fc.path}: bench-encoders needs a train and a test split "
                             f"(the cache has {sorted(fc.splits)})")
    labels = encoder_labels(fcs)
    out = check_out_dir(out_dir)
    proto = _protocol(cv, n_bootstrap)
    plan = []
    for label, fc in zip(labels, fcs, strict=True):
        for variant, head, params in chosen:
            if get_head_class(head).needs_text and (not fc.text or features == "pre"):
                continue  # no text tower: the cell reads "no text"
            key = {"encoder": label, "cache_key": fc.key, "variant": variant, "head": head,
                   "params": params, "seed": seed, "protocol": proto,
                   "template_set": template_set, "n_bootstrap": n_bootstrap,
                   "features": features}
            name = f"{file_safe(label)}__{variant}" + (f"_cv{cv}" if cv else "")
            plan.append((fc, key, out / "runs" / f"{name}.json"))
    found = [_reusable(p, key) for _, key, p in plan]  # refuse another bench's before work
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).unlink(missing_ok=True)  # the tables' commit mark: written last
    runs = []
    from skincache._progress import progress_bar

    reused = sum(d is not None for d in found)
    with progress_bar(len(plan) - reused, f"bench encoders ({reused} kept)" if reused
                      else "bench encoders", unit="fit", enabled=progress) as advance:
        for (fc, key, path), done in zip(plan, found, strict=True):
            if done is None:
                done = {**key, "cache": str(fc.path), "model": fc.header.model,
                        **(_cv_run(fc, key, cv) if cv else _test_run(fc, key)),
                        "created": now_iso()}
                write_json(path, done)
                advance(1)
            runs.append(done)
    encoders = [{"encoder": lab, "cache": str(fc.path), "cache_key": fc.key,
                 "model": fc.header.model, "pretrained": fc.header.pretrained,
                 "embed_dim": int(fc.header.embed_dim), "text": bool(fc.text)}
                for lab, fc in zip(labels, fcs, strict=True)]
    result = EncoderBenchResult(out, encoders, [v[0] for v in chosen], runs, proto,
                                reused, features)
    _write_outputs(result, fcs[0], cv)
    return result


def _test_run(fc: FeatureCache, key: dict) -> dict:
    """Fit on train (selection on val), score on test with bootstrap CIs."""
    from skincache.heads._protocols import trains_on_val
    from skincache.metrics import classification_report
    from skincache.runs import fit_inputs, make_head, split_features

    head = make_head(key["head"], key["params"], key["seed"])
    t0 = time.perf_counter()
    head.fit(**fit_inputs(fc, template_set=key["template_set"], features=key["features"]))
    fit_s = time.perf_counter() - t0
    test = fc.split("test")
    rep = classification_report(
        test.labels, head.predict_proba(split_features(test, key["features"])[0]), fc.classes,
        n_bootstrap=key["n_bootstrap"], seed=key["seed"])
    val = fc.splits.get("val")
    val_score = (get_metric(PRIMARY).score(
        val.labels, head.predict_proba(split_features(val, key["features"])[0]))
        if val is not None else None)
    return {"split": "test", "n_samples": rep["n_samples"], "fit_seconds": fit_s,
            VAL_KEY: val_score, "trains_on_val": trains_on_val(head),
            **{m: rep[m] for m in TABLE_METRICS},
            "ci": {m: rep["ci"].get(m) for m in TABLE_METRICS},
            "per_class_recall": {c: v["recall"] for c, v in rep["per_class"].items()}}


def _cv_run(fc: FeatureCache, key: dict, k: int) -> dict:
    """K-fold lesion-grouped CV (`study.cv.cross_validate`): the cell is the mean over folds
    with its 95% t interval; the refit's test score stays in the JSON."""
    from skincache.study.cv import cross_validate

    res = cross_validate(fc, key["head"], key["params"], k=k, seed=key["seed"],
                         template_set=key["template_set"], n_bootstrap=key["n_bootstrap"])
    ci = {m: None if res.mean.get(m) is None or res.ci95.get(m) is None
          else [res.mean[m] - res.ci95[m], res.mean[m] + res.ci95[m]] for m in TABLE_METRICS}
    return {"split": f"cv{k}", "n_samples": res.n_pool, "fit_seconds": res.seconds,
            **{m: res.mean.get(m) for m in TABLE_METRICS}, "ci": ci,
            "folds": [f.metrics for f in res.folds], "refit_test": res.refit}


# ----------------------------------------------------------------------------- the outputs


def table_rows(result: EncoderBenchResult) -> list[dict]:
    """One row per encoder: `{encoder, embed_dim, <variant>: run or None}`."""
    by = {(r["encoder"], r["variant"]): r for r in result.runs}
    return [{"encoder": e["encoder"], "embed_dim": e["embed_dim"], "text": e["text"],
             **{h: by.get((e["encoder"], h)) for h in result.heads}}
            for e in result.encoders]


def cell(run: dict | None, metric: str, text: bool = True) -> str:
    """`0.8101 (0.7709-0.8447)`, the published table's format; `no text` for a text head on
    a cache without a text tower."""
    if run is None:
        return "n/a" if text else "no text"
    v, ci = run.get(metric), (run.get("ci") or {}).get(metric)
    if v is None:
        return "n/a"
    return f"{v:.4f}" + (f" ({ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def markdown(result: EncoderBenchResult) -> str:
    """results.md: one table per metric (balanced accuracy first), rows = encoders, columns =
    heads, each cell `value (95% CI)`."""
    rows = table_rows(result)
    kind = ("pre-projection features (before the final projection)"
            if result.features == "pre" else "projected features (the image towers' output)")
    parts = [f"Encoders x heads on {kind}. Protocol: {result.protocol}.\n"]
    for m in TABLE_METRICS:
        heading = get_metric(m).label
        lines = [f"\n### {heading}\n\n| encoder | dim | " + " | ".join(result.heads) + " |\n",
                 "|---" * (2 + len(result.heads)) + "|\n"]
        for r in rows:
            lines.append(f"| {r['encoder']} | {r['embed_dim']} | "
                         + " | ".join(cell(r[h], m, r["text"]) for h in result.heads) + " |\n")
        parts.append("".join(lines))
    return "".join(parts)


def plot_encoders(result: EncoderBenchResult, path: Path, title: str = "") -> Path:
    """Per metric a panel: each encoder's score (point) and 95% CI (bar) for every head, one
    colour per head, encoders along x."""
    import textwrap

    from matplotlib.figure import Figure

    from skincache.plots import _save

    rows = table_rows(result)
    names = ["\n".join(textwrap.wrap(r["encoder"], 26, break_on_hyphens=False)[:3])
             for r in rows]
    lines = max(n.count("\n") + 1 for n in names)
    fig = Figure(figsize=(max(3.2, 0.9 * len(rows) + 1.2) * len(TABLE_METRICS),
                          4.2 + 0.45 * lines), layout="constrained")
    axes = fig.subplots(1, len(TABLE_METRICS), sharey=False)
    n_h = len(result.heads)
    offsets = (np.arange(n_h) - (n_h - 1) / 2) * (0.6 / max(n_h, 1))
    for ax, m in zip(np.atleast_1d(axes), TABLE_METRICS, strict=True):
        for j, h in enumerate(result.heads):
            xs, ys, lo, hi = [], [], [], []
            for i, r in enumerate(rows):
                run = r[h]
                if run is None or run.get(m) is None:
                    continue
                v = 100 * run[m]
                ci = (run.get("ci") or {}).get(m) or [run[m], run[m]]
                xs.append(i + offsets[j])
                ys.append(v)
                lo.append(v - 100 * ci[0])
                hi.append(100 * ci[1] - v)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=f"C{j % 10}", capsize=3,
                            label=h if m == TABLE_METRICS[0] else None)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(f"{get_metric(m).label} % (95% CI)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.legend(loc="outside lower center", ncols=min(n_h, 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9, color="0.35")
    return _save(fig, path)


def _write_outputs(result: EncoderBenchResult, ref: FeatureCache, cv: int | None) -> None:
    """results.md and encoders.png, then results.json last (its presence says the others
    describe the same runs)."""
    out = result.out_dir
    atomic_write_text(out / RESULTS_MD, markdown(result))
    what = f"{cv}-fold CV over train+val" if cv else "test"
    plot_encoders(result, out / PLOT,
                  title=f"{ref.header.dataset} · {what} · {len(result.encoders)} encoders")
    write_json(out / RESULTS_JSON, {
        "kind": "bench-encoders", "dataset": ref.header.dataset, "protocol": result.protocol,
        "features": result.features,
        "cv": cv, "encoders": result.encoders, "heads": result.heads, "runs": result.runs,
        "rows": _compact_rows(result), "created": now_iso()})


def _compact_rows(result: EncoderBenchResult) -> list[dict]:
    """results.json's table: per encoder, per head, each metric and its CI (None: not run)."""
    return [{"encoder": r["encoder"], "embed_dim": r["embed_dim"],
             **{h: None if r[h] is None else
                {**{m: r[h].get(m) for m in TABLE_METRICS},
                 "ci": {m: (r[h].get("ci") or {}).get(m) for m in TABLE_METRICS}}
                for h in result.heads}}
            for r in table_rows(result)]

"""Lesion-grouped, stratified K-fold cross-validation of a head over train+val.

A 9% test split cannot tell 0.03 of balanced accuracy apart; K folds over the rest can (ISIC
challenge entries report 5-fold). What runs, exactly:

1. The pool is the cache's train and val splits together; the test split is never in it.
   Each image's group is its lesion (the cache's `group_id`; an image without one is its own
   group), so no lesion is ever on both sides of a fold.
2. scikit-learn's `StratifiedGroupKFold(K, shuffle=True, random_state=seed)` splits the pool
   into K held-out folds.
3. Inside each fold, the fold's training part is split again the same way
   (`StratifiedGroupKFold(INNER_SPLITS)`, lesion-grouped, stratified): its first part is the
   inner validation set, the rest is what the head is fit on. The head's whole selection (C,
   tau, epochs, temperature: whatever it chooses on val) is made on that inner val only; the
   held-out fold is scored once, after.
4. Per metric of the registry (`metrics()`): the mean over folds and a 95% Student t interval
   (`ci95_half_width`: folds are few, 1.96 would be too narrow). The folds share training
   images, so the interval says how much the score moves with the data, not a sampling CI.
5. The refit: the same inner carving on the whole pool (one `INNER_SPLITS`-th of train+val
   as inner val, the rest to fit on), the head's selection on it, then one score on the test
   split with the run folder's bootstrap CIs. It is not the normal fit-head run (fit on train,
   selection on val): it sees the val images as training data too.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import now_iso, write_json
from skincache.bench import (
    VAL_KEY,
    _finished_runs,
    aggregate,
    check_out_dir,
    check_variants,
    metadata_available,
)
from skincache.cache import FeatureCache
from skincache.errors import UsageError
from skincache.metrics import (
    PRIMARY,
    ci95_half_width,
    classification_report,
    get_metric,
    metrics,
)
from skincache.prompts import ALL_TEMPLATES
from skincache.runs import fit_inputs, make_head

#: the fold's training part is split this many ways; one part is the inner validation set
#: (a fifth: about the share of val in skincache's default train+val)
INNER_SPLITS = 5
#: where fit-head --cv writes in the run folder
CV_JSON, CV_PLOT = "cv.json", "plots/cv_folds.png"


@dataclass
class Pool:
    """The train+val images a cross-validation draws folds from (never test): float16
    features as stored, labels, image ids, integer lesion groups, and the split each came
    from."""

    features16: np.ndarray
    views16: np.ndarray
    labels: np.ndarray
    image_id: np.ndarray
    groups: np.ndarray
    origin: np.ndarray  # "train" or "val"
    #: the metadata columns both splits hold ({field: [N]}), for heads given `-p metadata`
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Fold:
    """Row indices into the pool: `fit` (the head's training images), `inner_val` (its
    selection), `held_out` (scored once). `index` is the fold number, or -1 for the refit."""

    index: int
    fit: np.ndarray
    inner_val: np.ndarray
    held_out: np.ndarray


@dataclass
class FoldResult:
    """One fold: its sizes, the metrics of the held-out part, the inner-val score the head
    maximised, and what it chose (C_, logit_adjust_, temperature_, best_epoch_, ...)."""

    fold: int
    n_fit: int
    n_inner_val: int
    n_held_out: int
    metrics: dict[str, float | None]
    inner_val_score: float | None
    selection: dict[str, float]
    fit_seconds: float


@dataclass
class CVResult:
    """What `cross_validate` found: per-fold metrics, their mean and 95% t half-width over
    folds (per registered metric), and the refit's test report (None without a test split)."""

    head: str
    params: dict[str, Any]
    k: int
    seed: int
    n_pool: int
    folds: list[FoldResult]
    mean: dict[str, float | None] = field(default_factory=dict)
    ci95: dict[str, float | None] = field(default_factory=dict)
    refit: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": "cv", "protocol": protocol(self.k), **asdict(self),
                "created": now_iso()}


def protocol(k: int) -> str:
    """The one-line description cv.json and the tables carry."""
    return (f"{k} lesion-grouped stratified folds over train+val (test never in a fold); "
            f"selection on an inner val (1/{INNER_SPLITS} of each fold's training part, "
            "lesion-grouped); mean and 95% Student t interval over folds; refit: the same "
            "inner carving on all of train+val, scored on test")


def lesion_groups(group_id: np.ndarray) -> np.ndarray:
    """Integer groups from lesion ids: equal ids share a group; an empty id (an image of no
    known lesion) is a group of its own."""
    ids = [str(g) for g in group_id]
    codes: dict[str, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, g in enumerate(ids):
        out[i] = codes.setdefault(g if g else f"\0{i}", len(codes))
    return out


def make_pool(cache: FeatureCache) -> Pool:
    """The train and val splits of `cache`, concatenated (the test split is not read)."""
    parts = [cache.split(s) for s in ("train", "val") if s in cache.splits]
    names = [s for s in ("train", "val") if s in cache.splits]
    return Pool(
        features16=np.concatenate([p.features16 for p in parts]),
        views16=np.concatenate([p.views16 for p in parts]),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        image_id=np.concatenate([np.asarray(p.image_id, dtype=str) for p in parts]),
        groups=lesion_groups(np.concatenate([np.asarray(p.group_id, dtype=str)
                                             for p in parts])),
        origin=np.concatenate([np.full(len(p), n) for p, n in zip(parts, names, strict=True)]),
        meta={c: np.concatenate([np.asarray(p.meta[c], dtype=object) for p in parts])
              for c in set.intersection(*(set(p.meta) for p in parts))},
    )


def _rows(meta: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[rows] for c, v in meta.items()}


def _split(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, what: str
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """StratifiedGroupKFold's (train, test) index pairs; too few lesions is a UsageError."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise UsageError(f"{what}: {n_groups} lesion group(s) cannot make {n_splits} "
                         "lesion-disjoint parts; use a smaller --cv or a larger cache")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class with fewer lesions than parts: still valid
        warnings.filterwarnings("ignore", message="The least populated class")
        return list(sgkf.split(np.zeros(len(labels)), labels, groups))


def inner_split(pool: Pool, rows: np.ndarray, seed: int, what: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, inner val) rows of `rows`: the first of `INNER_SPLITS` lesion-grouped stratified
    parts is the inner val."""
    fit, val = _split(pool.labels[rows], pool.groups[rows], INNER_SPLITS, seed, what)[0]
    return rows[fit], rows[val]


def make_folds(pool: Pool, k: int, seed: int = 0) -> list[Fold]:
    """The K folds over the pool, each with its inner val carved from its training part."""
    if k < 2:
        raise UsageError(f"--cv must be at least 2 folds, got {k}")
    folds = []
    for i, (train, held) in enumerate(_split(pool.labels, pool.groups, k, seed, "--cv")):
        fit, inner = inner_split(pool, train, seed + 1 + i, f"--cv fold {i}")
        folds.append(Fold(i, fit, inner, held))
    return folds


def refit_fold(pool: Pool, seed: int = 0) -> Fold:
    """The refit: inner val carved from all of train+val, the rest to fit on (nothing held
    out of the pool: the test split is scored)."""
    fit, inner = inner_split(pool, np.arange(len(pool)), seed, "--cv refit")
    return Fold(-1, fit, inner, np.empty(0, dtype=np.int64))


def _selection(head: Any) -> dict[str, float]:
    """The scalars the head chose on its val (C_, best_epoch_, logit_adjust_, temperature_)."""
    names = (*type(head)._fitted_scalars, *type(head)._posthoc_scalars)
    out = {}
    for n in names:
        v = getattr(head, n, None)
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[n] = float(v)
    return out


def fit_fold(pool: Pool, fold: Fold, base: dict[str, Any], head_name: str,
             params: dict[str, Any] | None, seed: int) -> tuple[Any, float]:
    """Fit the head on the fold's `fit` rows, its selection on `inner_val` only. `base`: the
    rest of the fit arguments (text, logit scale, number of classes) from `fit_inputs`."""
    head = make_head(head_name, params, seed)
    inputs = {**base, "X": pool.features16[fold.fit], "y": pool.labels[fold.fit],
              "views": pool.views16[fold.fit], "X_val": pool.features16[fold.inner_val],
              "y_val": pool.labels[fold.inner_val], "meta": _rows(pool.meta, fold.fit),
              "meta_val": _rows(pool.meta, fold.inner_val)}
    t0 = time.perf_counter()
    head.fit(**inputs)
    return head, time.perf_counter() - t0


def _proba(head: Any, features16: np.ndarray, meta: Any = None) -> np.ndarray:
    """Probabilities of the rows; `meta` (their metadata) goes to a head fit with it only."""
    X = np.asarray(features16, dtype=np.float32)
    if getattr(head, "metadata_fields", lambda: ())():
        return head.predict_proba(X, meta)
    return head.predict_proba(X)


def score_fold(pool: Pool, fold: Fold, base: dict[str, Any], head_name: str,
               params: dict[str, Any] | None, seed: int, classes: list[str]) -> FoldResult:
    """Fit one fold and score its held-out part on every registered metric."""
    head, fit_s = fit_fold(pool, fold, base, head_name, params, seed)
    y = pool.labels[fold.held_out]
    report = classification_report(y, _proba(head, pool.features16[fold.held_out],
                                             _rows(pool.meta, fold.held_out)), classes,
                                   n_bootstrap=0)
    val = get_metric(PRIMARY).score(pool.labels[fold.inner_val],
                                    _proba(head, pool.features16[fold.inner_val],
                                           _rows(pool.meta, fold.inner_val)))
    return FoldResult(fold.index, len(fold.fit), len(fold.inner_val), len(fold.held_out),
                      {m.name: report[m.name] for m in metrics()}, val, _selection(head),
                      fit_s)


def summarize(per_fold: list[dict[str, float | None]]
              ) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(mean, 95% t half-width) over folds for every registered metric; a metric undefined
    in a fold (AUROC without both classes) is left out of that metric's mean."""
    mean, ci = {}, {}
    for m in metrics():
        vals = np.array([np.nan if f.get(m.name) is None else f[m.name] for f in per_fold],
                        dtype=float)
        ok = vals[np.isfinite(vals)]
        mean[m.name] = float(ok.mean()) if len(ok) else None
        ci[m.name] = float(ci95_half_width(ok.std(), len(ok))) if len(ok) else None
    return mean, ci


def score_refit(cache: FeatureCache, pool: Pool, base: dict[str, Any], head_name: str,
                params: dict[str, Any] | None, seed: int, n_bootstrap: int
                ) -> dict[str, Any] | None:
    """The refit on train+val (`refit_fold`) scored on the test split with bootstrap CIs;
    None when the cache has no test split."""
    if "test" not in cache.splits:
        return None
    fold = refit_fold(pool, seed)
    head, fit_s = fit_fold(pool, fold, base, head_name, params, seed)
    test = cache.split("test")
    report = classification_report(test.labels, _proba(head, test.features16, test.meta),
                                   cache.classes,
                                   n_bootstrap=n_bootstrap, seed=seed)
    return {"split": "test", "n_fit": len(fold.fit), "n_inner_val": len(fold.inner_val),
            "n_samples": report["n_samples"], "selection": _selection(head),
            "fit_seconds": fit_s, "ci": report.get("ci", {}),
            **{m.name: report[m.name] for m in metrics()}}


def cross_validate(cache: FeatureCache | str | Path, head: str,
                   params: dict[str, Any] | None = None, *, k: int = 5, seed: int = 0,
                   template_set: str = ALL_TEMPLATES, n_bootstrap: int = 1000,
                   refit: bool = True, progress=None) -> CVResult:
    """K-fold cross-validation of `head` over train+val (see the module docstring for the
    exact protocol), plus the refit's test score when `refit` and the cache has a test split.
    `progress(1)` is called after each fit."""
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    t0 = time.perf_counter()
    pool = make_pool(fc)
    folds = make_folds(pool, k, seed)
    base = _base_inputs(fc, template_set)
    results = []
    for fold in folds:
        results.append(score_fold(pool, fold, base, head, params, seed, fc.classes))
        if progress:
            progress(1)
    mean, ci = summarize([r.metrics for r in results])
    test = score_refit(fc, pool, base, head, params, seed, n_bootstrap) if refit else None
    if progress and refit:
        progress(1)
    return CVResult(head, dict(params or {}), k, seed, len(pool), results, mean, ci, test,
                    time.perf_counter() - t0)


def _base_inputs(fc: FeatureCache, template_set: str) -> dict[str, Any]:
    """The fit arguments that do not depend on the rows: text, logit scale, classes."""
    full = fit_inputs(fc, template_set=template_set, use_val=False)
    return {k: full[k] for k in ("text", "logit_scale", "n_classes", "concepts")}


def plot_folds(result: CVResult, path: Path, title: str = "") -> Path:
    """Each table metric per fold (dots), its mean (bar) and 95% t interval (whisker), and
    the refit's test score (a cross) beside them."""
    from matplotlib.figure import Figure

    from skincache.metrics import table_metrics
    from skincache.plots import _save

    shown = [m for m in table_metrics() if m.fmt == "percent"]
    fig = Figure(figsize=(1.4 * len(shown) + 2.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for x, m in enumerate(shown):
        vals = [100 * f.metrics[m.name] for f in result.folds if f.metrics.get(m.name)
                is not None]
        ax.scatter(np.full(len(vals), x) + np.linspace(-0.12, 0.12, len(vals)), vals, s=18,
                   color="C0", zorder=3, label="fold" if x == 0 else None)
        if result.mean.get(m.name) is not None:
            ax.errorbar(x + 0.3, 100 * result.mean[m.name], yerr=100 * result.ci95[m.name],
                        fmt="s", color="C1", capsize=4,
                        label="mean ± 95% t CI" if x == 0 else None)
        if result.refit and result.refit.get(m.name) is not None:
            ax.scatter([x + 0.5], [100 * result.refit[m.name]], marker="x", color="C3",
                       zorder=3, label="refit on train+val, test" if x == 0 else None)
    ax.set_xticks(np.arange(len(shown)) + 0.2, [m.heading for m in shown])
    ax.set_ylabel("% (per fold)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_title(title or f"{result.head}: {result.k}-fold lesion-grouped CV", fontsize=9)
    return _save(fig, path)


# -- bench-heads --cv: every variant x folds, one JSON per fold run


@dataclass
class BenchCVResult:
    out_dir: Path
    rows: list[dict]  # one per variant: `<metric>_mean`, `<metric>_ci95`, refit test score
    runs: list[dict]  # one per (variant, fold)
    reused: int = 0


def n_cv_fits(k: int, variants: list[str] | None = None) -> int:
    """Fits `bench_cv` makes: K folds plus the refit, per variant."""
    return (k + 1) * len(check_variants(variants))


def bench_cv(cache: FeatureCache | str | Path, *, k: int = 5, variants: list[str] | None = None,
             seed: int = 0, template_set: str = ALL_TEMPLATES, out_dir: str | Path,
             progress=None) -> BenchCVResult:
    """Every variant x K folds (and the refit), one JSON per fit under `out_dir/runs/`
    (`<variant>_cv<K>_f<i>.json`, `<variant>_cv<K>_refit.json`); a rerun into the same
    folder keeps the finished ones (bench-heads' resume rule). Seeded heads run with `seed`
    only: the folds are the repetition. Writes cv_results.json."""
    chosen = check_variants(variants)
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    base = _base_inputs(fc, template_set)
    if base["text"] is None:
        from skincache.heads import get_head_class

        chosen = [v for v in chosen if not get_head_class(v[1]).needs_text]
    if base["concepts"] is None:
        from skincache.heads import get_head_class

        chosen = [v for v in chosen if not get_head_class(v[1]).needs_concepts]
    chosen = metadata_available(chosen, fc, explicit=variants is not None)
    pool = make_pool(fc)
    folds = make_folds(pool, k, seed)
    if "test" in fc.splits:
        folds.append(refit_fold(pool, seed))
    out = check_out_dir(out_dir)
    plan = []
    for variant, head_name, params in chosen:
        for fold in folds:
            tag = "refit" if fold.index < 0 else f"f{fold.index}"
            key = {"variant": variant, "head": head_name, "params": params, "seed": seed,
                   "shots": None, "split": f"cv{k}-{tag}", "cache_key": fc.key,
                   "template_set": template_set}
            plan.append((key, fold, out / "runs" / f"{variant}_cv{k}_{tag}.json"))
    found = [_finished_runs([p], [key["variant"]], key) for key, _, p in plan]  # refuse first
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for (key, fold, path), done in zip(plan, found, strict=True):
        if done is None:
            run = _bench_fit(fc, pool, fold, base, key)
            write_json(path, run)
        else:
            run = done[0]
        runs.append(run)
        if progress:
            progress(1)
    rows = cv_rows(runs)
    write_json(out / "cv_results.json", {"cache": str(fc.path), "cache_key": fc.key,
                                         "model": fc.header.model, "k": k, "seed": seed,
                                         "protocol": protocol(k), "rows": rows,
                                         "created": now_iso()})
    return BenchCVResult(out, rows, runs, sum(d is not None for d in found))


def _bench_fit(fc: FeatureCache, pool: Pool, fold: Fold, base: dict[str, Any], key: dict
               ) -> dict:
    """One bench run: a fold's held-out metrics, or the refit's test metrics."""
    if fold.index < 0:
        rep = score_refit(fc, pool, base, key["head"], key["params"], key["seed"], 0)
        assert rep is not None
        scores, val, fit_s = {m.name: rep[m.name] for m in metrics()}, None, rep["fit_seconds"]
        selection = rep["selection"]
    else:
        r = score_fold(pool, fold, base, key["head"], key["params"], key["seed"], fc.classes)
        scores, val, fit_s, selection = r.metrics, r.inner_val_score, r.fit_seconds, r.selection
    return {**key, "fold": fold.index, "fit_seconds": fit_s, VAL_KEY: val, **scores,
            "selection": selection, "n_fit": len(fold.fit), "n_inner_val": len(fold.inner_val),
            "n_held_out": len(fold.held_out)}


def cv_rows(runs: list[dict]) -> list[dict]:
    """bench-heads' aggregate over the fold runs of each variant (mean, std, `n_folds`), plus
    `<metric>_ci95` (Student t over folds) and `refit_<metric>` (the refit's test score). The
    variant marked `chosen_by_val` is the best mean over the held-out folds (the CV score; the
    inner-val score each head maximised is biased upward by that very selection)."""
    rows = aggregate([r for r in runs if r["fold"] >= 0])
    refits = {r["variant"]: r for r in runs if r["fold"] < 0}
    for row in rows:
        row.pop("chosen_by_val", None)
    scored = [r for r in rows if r[f"{PRIMARY}_mean"] is not None]
    if scored:
        best = max if get_metric(PRIMARY).higher_is_better else min
        best(scored, key=lambda r: r[f"{PRIMARY}_mean"])["chosen_by_val"] = True
    for row in rows:
        for m in metrics():
            std = row[f"{m.name}_std"]
            row[f"{m.name}_ci95"] = (None if std is None else
                                     float(ci95_half_width(std, row["n_seeds"])))
            row[f"refit_{m.name}"] = refits.get(row["variant"], {}).get(m.name)
        row["n_folds"] = row.pop("n_seeds")
    return rows


def cross_validate_runs(fc: FeatureCache, results: list, params: dict[str, Any] | None, *,
                        k: int, seed: int = 0, template_set: str = ALL_TEMPLATES,
                        n_bootstrap: int = 1000, plots: bool = True) -> list[CVResult]:
    """fit-head --cv: `cross_validate` each fitted run's head (`results`: fit-head's
    RunResults; `params` apply to a single head, fit-head --head all passes none) and write
    cv.json (and the per-fold plot) into its run folder."""
    out = []
    for r in results:
        res = cross_validate(fc, r.head, params if len(results) == 1 else None, k=k,
                             seed=seed, template_set=template_set, n_bootstrap=n_bootstrap)
        write_json(r.path / CV_JSON, res.to_json())
        if plots:
            plot_folds(res, r.path / CV_PLOT,
                       title=f"{r.path.name} · {fc.header.model} · "
                             f"{k}-fold lesion-grouped CV over train+val")
        out.append(res)
    return out


def cross_validate_cache(cache: str | Path, results: list, params: dict[str, Any] | None, *,
                         k: int, **kwargs: Any) -> list[CVResult]:
    """`cross_validate_runs` on the cache file fit-head fitted from (opened lazily again:
    only the header and what the folds read)."""
    return cross_validate_runs(FeatureCache.open(cache), results, params, k=k, **kwargs)

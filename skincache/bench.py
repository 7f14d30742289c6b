"""`bench-heads`: every head variant x seeds on one cache, one JSON per run, then an aggregate
(the CLIP_benchmark way: raw results stay, tables are derived from them).

Heads without a seed are deterministic: they run once, and the table says so, rather than
repeating an identical fit N times to fake a standard deviation.
"""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skincache._head_params import is_seeded
from skincache._io import atomic_write_text, now_iso, read_json_file, write_json
from skincache.defaults import RUNS_DIR
from skincache.errors import InputFileError, UsageError
from skincache.metrics import PRIMARY, get_metric, metrics, table_metrics
from skincache.prompts import ALL_TEMPLATES

if TYPE_CHECKING:
    from skincache.cache import FeatureCache

# torch loads with the heads: `check_variants`, `n_fits` and `check_out_dir` run without it,
# so the CLI refuses a typo before that (cache and heads are imported inside `bench_heads`)

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
    # 2024 few-shot probes from the text prototypes (README "lp++, clap and zs-linear")
    ("lp++", "lp++", {}),
    ("clap", "clap", {}),
    ("zs-lp", "clap", {"constraint": "none"}),
    # training-free, closed form (README "gda and proker")
    ("gda", "gda", {}),
    ("proker", "proker", {}),
    ("cbm", "cbm", {}),  # concept bottleneck: what the explanation costs beside logreg
    # metadata fusion (README "Metadata fusion"): run where the cache holds the fields
    ("logreg-meta", "logreg", {"metadata": "age,sex,localization"}),
    ("linear-meta", "linear", {"metadata": "age,sex,localization"}),
    ("mlp-meta", "mlp", {"metadata": "age,sex,localization"}),
]

#: The run key of the selection score: the primary metric on val (`val_balanced_accuracy`).
VAL_KEY = f"val_{PRIMARY}"


def _aggregated() -> tuple[str, ...]:
    """The run keys averaged over seeds: every registered metric, the val score, fit time."""
    return (*(m.name for m in metrics()), VAL_KEY, "fit_seconds")


#: What a per-run JSON must hold, equal, to be reused by a rerun into the same --out-dir.
RUN_KEY = ("variant", "head", "params", "seed", "shots", "split", "cache_key", "template_set",
           "fusion")


@dataclass
class BenchResult:
    out_dir: Path
    rows: list[dict]  # aggregate, one per variant
    runs: list[dict]  # one per (variant, seed)
    reused: int = 0  # fits whose per-run JSON a rerun into the same out_dir found and kept
    n_views: int = 0  # augmented views per image in the cache (0: --tta had nothing to add)


def default_out_dir() -> Path:
    """runs/bench-<time>: where a bench goes unless told (the CLI names it in its Ctrl-C
    hint, so the rerun resumes into the same folder)."""
    return Path(RUNS_DIR) / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out_dir: str | Path | None) -> Path:
    """`out_dir` as a Path (None: `default_out_dir()`); UsageError when it names something
    other than a folder."""
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out}: not a folder (a file is there); give a folder, "
                         "new or one an earlier bench-heads wrote (its finished runs are kept)")
    return out


def bench_heads(
    cache: FeatureCache | str | Path | list[str | Path],
    *,
    seeds: int = 5,
    variants: list[str] | None = None,
    eval_split: str | None = None,
    template_set: str = ALL_TEMPLATES,
    out_dir: str | Path | None = None,
    progress: bool = False,
    shots: list[int] | None = None,
    tta: bool = False,
    fusion: str = "early",
) -> BenchResult:
    """Fit each variant on train (val for selection), score it on val and on `eval_split`
    (test when the cache has one, else val) and write runs/*.json, results.json, results.csv,
    results.md. `shots`: repeat for K training images per class, each seed drawing its own
    subset (so every head runs `seeds` times) and plot balanced accuracy against K. `tta`:
    also score each fit with test-time augmentation (rows `<variant>+tta`, no extra fit).
    `progress`: a bar counting the fits. Several caches fuse (`runs.open_caches`): `fusion`
    "early" or "late", as in fit-head."""
    from skincache._progress import progress_bar
    from skincache.cache.joined import JoinedCache
    from skincache.runs import check_fusion, fit_inputs, open_caches

    chosen = check_variants(variants)
    fc = open_caches(cache)
    fused = isinstance(fc, JoinedCache)
    check_fusion(fc, fusion)  # text heads without joined text are dropped below
    split = eval_split or ("test" if "test" in fc.splits else "val")
    if split not in fc.splits:
        raise UsageError(f"{fc.path}: no split '{split}' (has {sorted(fc.splits)})")
    evald, val = fc.split(split), fc.splits.get("val")
    full = fit_inputs(fc, template_set=template_set)
    if full["text"] is None:
        from skincache.heads import get_head_class

        chosen = [v for v in chosen if not get_head_class(v[1]).needs_text]
    if full.get("concepts") is None:
        from skincache.heads import get_head_class

        chosen = [v for v in chosen if not get_head_class(v[1]).needs_concepts]
    chosen = metadata_available(chosen, fc, explicit=variants is not None)
    out = check_out_dir(out_dir)
    plan = _plan(chosen, seeds, shots, tta,
                 {"split": split, "cache_key": fc.key, "template_set": template_set,
                  "fusion": fusion if fused else None}, out)
    found = [_finished_runs(paths, names, key) for key, names, paths in plan]  # refuse first
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # the tables' commit mark: written last
    runs: list[dict] = []
    reused = sum(done is not None for done in found)
    todo = len(plan) - reused  # the bar counts fits made now, not runs kept from before
    with progress_bar(todo, f"bench heads ({reused} kept)" if reused else "bench heads",
                      unit="fit", enabled=progress) as advance:
        for (key, names, paths), done in zip(plan, found, strict=True):
            if done is None:
                done = _fit_and_score(fc, evald, val, full, key, names, tta)
                for path, run in zip(paths, done, strict=True):
                    write_json(path, run)
                advance(1)
            runs += done
    rows = aggregate(runs)
    _write_tables(out, rows, fc, split, shots_title=bool(shots), tta=tta)
    return BenchResult(out, rows, runs, reused, evald.n_views)


def _plan(chosen: list, seeds: int, shots: list[int] | None, tta: bool, common: dict,
          out: Path) -> list[tuple[dict, list[str], list[Path]]]:
    """One (run key, run names, per-run JSON paths) per fit, in the order they run."""
    plan = []
    for k in shots or [None]:
        for variant, head_name, params in chosen:
            n_seeds = seeds if (k is not None or is_seeded(head_name)) else 1
            for seed in range(n_seeds):
                names = [variant + ("+tta" if t else "") for t in ((False, True) if tta
                                                                    else (False,))]
                tags = [f"{n}_k{k}" if k is not None else n for n in names]
                plan.append(({"variant": variant, "head": head_name, "params": params,
                              "seed": seed, "shots": k, **common}, names,
                             [out / "runs" / f"{t}_s{seed}.json" for t in tags]))
    return plan


def _same(a: Any, b: Any) -> bool:
    """Equal once both went through JSON (tuples are lists there)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _finished_runs(paths: list[Path], names: list[str], key: dict) -> list[dict] | None:
    """The per-run JSONs of one fit, when an earlier bench into this folder wrote them all
    for the same cache and settings; None when any is missing or unreadable (refit it). One
    that holds another cache's or another setting's run is refused: it is someone's result,
    not ours to overwrite."""
    found = []
    for path, name in zip(paths, names, strict=True):
        if not path.is_file():
            return None
        try:
            run = read_json_file(path, max_bytes=1 << 20, what="bench run")
        except InputFileError:
            return None  # damaged: written again below
        if not isinstance(run, dict):
            return None
        want = {**key, "variant": name}  # a key a caller leaves out (fusion) is None
        differ = [f for f in RUN_KEY if not _same(run.get(f), want.get(f))]
        if differ:
            raise UsageError(f"{path}: a run of another bench ({', '.join(differ)} differ: "
                             f"{differ[0]} {run.get(differ[0])!r} there, "
                             f"{want.get(differ[0])!r} now); give another "
                             "--out-dir, or the same options as the bench that wrote it")
        found.append(run)
    return found


def _fit_and_score(fc, evald, val, full: dict, key: dict, names: list[str], tta: bool
                   ) -> list[dict]:
    """Fit one head (variant x seed x shots) and score it: the clean-view run, then the TTA
    run when asked (the same fit)."""
    from skincache.heads._protocols import trains_on_val
    from skincache.metrics import classification_report
    from skincache.runs import fit_inputs, make_fit_head

    k, seed = key["shots"], key["seed"]
    inputs = full if k is None else fit_inputs(fc, template_set=key["template_set"], shots=k,
                                               seed=seed)
    head = make_fit_head(key["head"], key["params"], seed, fc, key.get("fusion") or "early")
    t0 = time.perf_counter()
    head.fit(**inputs)
    fit_s = time.perf_counter() - t0
    probas = {"eval": _split_probas(head, evald, tta)}
    if val is not None:  # scored on val already when there is no test split
        probas["val"] = probas["eval"] if val is evald else _split_probas(head, val, tta)
    runs = []
    for name, with_tta in zip(names, (False, True), strict=False):
        report = classification_report(evald.labels, probas["eval"][with_tta], fc.classes,
                                       n_bootstrap=0)
        val_score = (get_metric(PRIMARY).score(val.labels, probas["val"][with_tta])
                     if val is not None else None)
        runs.append({**key, "variant": name, "fit_seconds": fit_s, VAL_KEY: val_score,
                     "trains_on_val": trains_on_val(head),
                     **{m.name: report[m.name] for m in metrics()},
                     "per_class_recall": {c: v["recall"] for c, v in report["per_class"].items()},
                     "tta": with_tta and evald.n_views > 0})
    return runs


def metadata_available(chosen: list, fc: FeatureCache, explicit: bool) -> list:
    """The variants whose metadata fields (`-p metadata`) the cache holds; one it lacks is
    left out of the default list (as text heads are without text), refused when asked for."""
    from skincache.metadata import parse_fields

    have = set(fc.split("train").meta)
    out = []
    for v in chosen:
        missing = [f for f in parse_fields(v[2].get("metadata")) if f not in have]
        if missing and explicit:
            raise UsageError(f"--variants {v[0]}: cache {fc.path} has no metadata "
                             f"{', '.join(missing)} (it has: {', '.join(sorted(have)) or 'none'})")
        if not missing:
            out.append(v)
    return out


def _split_probas(head, data, tta: bool) -> dict[bool, np.ndarray]:
    """{False: clean-view probabilities, True: the TTA mean} with one pass over each view
    (the views with their image's metadata, for a head fit with it)."""
    from skincache.heads.base import tta_mean
    from skincache.runs import head_meta

    meta = head_meta(head, data)
    clean = head.predict_proba(data.features) if meta is None else head.predict_proba(
        data.features, meta)
    out = {False: clean}
    n, k, d = data.views.shape
    if tta:
        views = np.asarray(data.views, np.float32).reshape(n * k, d)
        out[True] = clean if k == 0 else tta_mean(
            clean, head.predict_proba(views) if meta is None else
            head.predict_proba(views, head_meta(head, data, repeat=k)))
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


def _write_tables(out: Path, rows: list[dict], fc, split: str, *, shots_title: bool,
                  tta: bool) -> None:
    """results.csv, results.md (and shots.png), then results.json, all from the same runs and
    carrying the same `run_id`: results.json is removed before the fits and written last, so
    where it exists the other files are the ones it describes (each file is written
    atomically; a kill in between leaves no results.json, and the rerun writes them all)."""
    run_id = uuid.uuid4().hex[:12]
    meta = {"cache": str(fc.path), "cache_key": fc.key, "model": fc.header.model,
            **({"caches": [str(p) for p in fc.paths]} if hasattr(fc, "paths") else {}),
            "split": split, "tta": tta, "views": fc.split(split).n_views, "run_id": run_id,
            "created": now_iso()}
    buf = io.StringIO(newline="")
    fields = ["run_id", *dict.fromkeys(k for r in rows for k in r)]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows({"run_id": run_id, **r} for r in rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    setting = " with TTA" if tta and meta["views"] else ""
    atomic_write_text(out / "results.md",
        f"Heads on `{fc.path.name}` ({fc.header.model}), scored on `{split}`{setting}; "
        f"mean ± std over seeds (run id `{run_id}`, as in results.json).\n\n"
        + markdown_table(rows))
    if shots_title:
        from skincache.plots import plot_shots

        plot_shots(rows, out / "shots.png",
                   title=f"{fc.header.model} · {fc.header.dataset} · {split}"
                         f"{setting} · run {run_id}")
    write_json(out / "results.json", {**meta, "rows": rows})

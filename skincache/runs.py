"""Run folders: fit a head from a cache, evaluate it, and keep everything a person checks later.

```
runs/<name>/
  run.json                 kind, head name + params, cache path + key, template set, timings
  head/                    head.json + head.safetensors (loading never unpickles), the
                           neighbour index `predict` searches (neighbors-<cache key>.faiss)
  metrics/<split>.json     classification_report: balanced accuracy first, CIs, per class
  predictions/<split>.csv  image_id, true, predicted, p_<class>...
  plots/<split>_*.png      confusion matrix (counts, row-normalised), class-wise bars, reliability
```
`evaluate` on another cache (external validation) writes `<dataset>__<split>` files instead,
and run.json's `evaluations` lists every evaluation: which cache, split and file name.
A run remembers the key of the cache it was fit on, and `evaluate` refuses any other cache:
a head fit on one model's features is meaningless on another's.

Several caches of the same images (`fit-head --cache A --cache B`) are one `JoinedCache`
(`cache/joined.py`: same interface, features joined per image): early fusion fits the head on
the joined features, late fusion (`heads/late_fusion.py`) one head per cache with weights
chosen on val. run.json lists every cache (`caches`, `fusion`); `evaluate` reopens them all.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from skincache._disk import check_writable_dir, disk_error
from skincache._io import (
    __version__,
    atomic_write_text,
    file_safe,
    now_iso,
    plain_json,
    read_json_file,
    read_regular,
    write_json,
)
from skincache._sanity import model_label as _model_label
from skincache.cache import (
    CacheBusyError,
    CacheError,
    CacheLock,
    FeatureCache,
)
from skincache.cache.joined import JoinedCache, join_caches
from skincache.concept_report import concept_bank
from skincache.defaults import RUNS_DIR
from skincache.errors import NotFoundError, SkincacheError, UsageError
from skincache.heads import Head, create_head, get_head_class, load_head
from skincache.heads._protocols import trains_on_val
from skincache.heads.knn import build_neighbor_index, write_neighbor_index
from skincache.heads.late_fusion import LateFusion, load_late_fusion
from skincache.metrics import (
    calibration_bins,
    classification_report,
    expected_calibration_error,
    write_predictions_csv,
)
from skincache.plots import write_report_plots
from skincache.prompts import ALL_TEMPLATES, side_by_side
from skincache.run_record import (
    FUSIONS,
    RunModel,
    RunRecord,
    check_run_name,
    read_run,
    write_run,
)

DEFAULT_RUNS_DIR = Path(RUNS_DIR)
#: a cache as runs read it: one file's, or several joined (`cache/joined.py`)
AnyCache = FeatureCache | JoinedCache
CacheArg = FeatureCache | JoinedCache | str | Path | Sequence[str | Path]
#: what `evaluate --cache` takes: one path, or one per cache of a fused run
CachePaths = str | Path | Sequence[str | Path]


class RunError(SkincacheError, RuntimeError):
    """A run folder that cannot be used as asked; the message names it and the reason."""


def open_caches(cache: CacheArg) -> AnyCache:
    """A cache as given (opened when a path), or several paths joined (`join_caches`:
    checked aligned, one CacheError naming the first mismatch). One path in a list is that
    cache alone, exactly as today."""
    if isinstance(cache, FeatureCache | JoinedCache):
        return cache
    if isinstance(cache, str | Path):
        return FeatureCache.open(cache)
    paths = list(cache)
    if len(paths) == 1:
        return FeatureCache.open(paths[0])
    return join_caches([FeatureCache.open(p) for p in paths])


def check_fusion(fc: AnyCache, fusion: str, head: str | None = None) -> None:
    """Refuse, in one line, what fusion cannot do: an unknown fusion, late fusion of one
    cache, a text `head` on caches whose text does not join."""
    if fusion not in FUSIONS:
        raise UsageError(f"--fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    if not isinstance(fc, JoinedCache):
        if fusion != "early":
            raise UsageError(f"--fusion {fusion} needs two or more --cache")
        return
    if head is not None and get_head_class(head).needs_text and not fc.text:
        raise UsageError(f"head {head!r} needs text features, which these caches cannot "
                         f"share: {fc.text_problem}; choose a head without text")
    if head is not None and getattr(get_head_class(head), "needs_concepts", False):
        raise UsageError(f"head {head!r} with several --cache is not built yet: concept "
                         "prompts live in one encoder's text space; fit it on one cache")


def make_fit_head(name: str, params: dict[str, Any] | None, seed: int | None, fc: AnyCache,
                  fusion: str = "early") -> Head | LateFusion:
    """The head to fit on `fc`: `make_head`, or with late fusion of a joined cache one such
    head per cache inside a `LateFusion`."""
    if fusion == "late" and isinstance(fc, JoinedCache):
        return LateFusion([make_head(name, params, seed) for _ in fc.dims], fc.dims)
    return make_head(name, params, seed)


@dataclass
class RunResult:
    path: Path
    head: str
    params: dict[str, Any]
    fit_seconds: float
    metrics: dict[str, dict] = field(default_factory=dict)  # split -> classification_report
    #: the head fit on the val rows too (a published protocol's train+val refit): its val
    #: metrics are a training score, shown as "val (fit)" and never val's pick
    trains_on_val: bool = False


def text_features(cache: AnyCache, template_set: str = ALL_TEMPLATES) -> np.ndarray | None:
    """[C, T, D] prompt embeddings: one template set, or all sets side by side (`all`)."""
    if not cache.text:
        return None
    if template_set != ALL_TEMPLATES and template_set not in cache.text:
        raise CacheError(f"{cache.path}: no template set '{template_set}' "
                         f"(has {sorted(cache.text)} or '{ALL_TEMPLATES}')")
    return side_by_side(template_set, cache.text.__getitem__, cache.text)


def few_shot_indices(y: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Indices of `shots` training images per class (all of a class that has fewer), drawn
    without replacement by a seeded generator, in increasing order: the few-shot protocol of
    CoOp / Tip-Adapter / CLIP_benchmark's `fewshot_k`."""
    if shots < 1:
        raise UsageError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        picked.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(picked))


def check_features(cache: FeatureCache, features: str) -> None:
    """`-p features=pre` on a cache without pre-projection features is one line."""
    from skincache._head_params import FIT_OPTIONS

    if features not in FIT_OPTIONS["features"]:
        raise UsageError(f"-p features={features}: expected one of "
                         f"{', '.join(FIT_OPTIONS['features'])}")
    if features == "pre" and not all(s.has_pre for s in cache.splits.values()):
        raise CacheError(f"{cache.path}: -p features=pre, but this cache holds no "
                         "pre-projection features; encode it with `skincache encode "
                         "--pre-projection`")


def split_features(data: Any, features: str = "projected", stored: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A split's (clean-view features, views) of the kind `features` names (`pre`: before the
    final projection); `stored`: float16 as stored, else float32."""
    if features == "pre":
        return ((data.features_pre16, data.views_pre16) if stored
                else (data.features_pre, data.views_pre))
    return (data.features16, data.views16) if stored else (data.features, data.views)
class SplitMeta(Mapping):
    """A split's metadata columns ({field: [N] strings}), read from the cache only when a head
    asks (a head that takes no metadata never reads them), restricted to `rows` when given."""

    def __init__(self, split: Any, rows: np.ndarray | None = None):
        self._split, self._rows = split, rows
        self._cols: dict[str, np.ndarray] | None = None

    def _get(self) -> dict[str, np.ndarray]:
        if self._cols is None:
            cols = dict(self._split.meta)
            self._cols = cols if self._rows is None else {
                k: np.asarray(v)[self._rows] for k, v in cols.items()}
        return self._cols

    def __getitem__(self, key: str) -> np.ndarray:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def head_meta(head: Any, split: Any, repeat: int = 1) -> dict[str, np.ndarray] | None:
    """The metadata `head` predicts with on `split` (None for a head fit without it), each
    value repeated `repeat` times (the rows of `views.reshape(N * K, D)`, image-major)."""
    fields = head.metadata_fields() if hasattr(head, "metadata_fields") else ()
    if not fields:
        return None
    meta = split.meta
    # a field the split lacks stays out: the head's own check names it
    return {f: np.repeat(np.asarray(meta[f], dtype=object), repeat) for f in fields
            if f in meta}


def fit_inputs(cache: AnyCache, *, template_set: str = ALL_TEMPLATES,
               use_val: bool = True, shots: int | None = None, seed: int = 0,
               features: str = "projected") -> dict[str, Any]:
    """The uniform `Head.fit` arguments from a cache (train split; val for model selection).
    `shots`: K training images per class (seeded); val stays whole. `features`: `projected`
    (the image tower's output) or `pre` (before its final projection: encode
    --pre-projection); pre-projection features have no text counterpart (text is None).
    `meta` / `meta_val`: the splits' metadata (`SplitMeta`: read only by a head given
    `-p metadata=...`)."""
    check_features(cache, features)
    train = cache.split("train")
    val = cache.splits.get("val") if use_val else None
    # float16 as stored: heads that stream (linear, mlp, logreg, knn) convert batches; the
    # others convert to float32 in `check_fit_inputs`
    X, views = split_features(train, features, stored=True)
    y = train.labels
    idx = None
    if shots is not None:
        idx = few_shot_indices(y, shots, seed)
        X, y, views = X[idx], y[idx], views[idx]
    return dict(
        X=X, y=y, views=views,
        X_val=None if val is None else split_features(val, features, stored=True)[0],
        y_val=None if val is None else val.labels,
        text=text_features(cache, template_set) if features == "projected" else None,
        logit_scale=cache.logit_scale,
        n_classes=len(cache.classes),
        concepts=concept_bank(cache) if features == "projected" else None,
        meta=SplitMeta(train, idx), meta_val=None if val is None else SplitMeta(val),
    )


def make_head(name: str, params: dict[str, Any] | None = None, seed: int | None = None) -> Head:
    """`create_head` plus the seed for heads that take one (the others are deterministic)."""
    params = dict(params or {})
    if seed is not None and "seed" in get_head_class(name)().get_params():
        params.setdefault("seed", seed)
    return create_head(name, **params)


def is_seeded(name: str) -> bool:
    return "seed" in get_head_class(name)().get_params()


def evaluate_head(head: Head | LateFusion, cache: AnyCache, split: str, *,
                  n_bootstrap: int = 1000, seed: int = 0, tta: bool = False,
                  features: str = "projected") -> tuple[dict, np.ndarray]:
    """classification_report of `head` on `split`, plus the ECE before temperature scaling
    (`ece_uncalibrated`) and the post-hoc values the head applied. `features`: the kind the
    head was fit on (`fit_inputs`)."""
    data = cache.split(split)
    check_features(cache, features)
    X, views = split_features(data, features)
    meta = head_meta(head, data)
    proba, raw = (head.predict_proba_pair(X, views if tta else None, meta)
                  if meta is not None else head.predict_proba_pair(X, views if tta else None))
    report = classification_report(data.labels, proba, cache.classes, n_bootstrap=n_bootstrap,
                                   seed=seed)
    report["ece_uncalibrated"] = expected_calibration_error(data.labels, raw)
    report["calibration_uncalibrated"] = calibration_bins(data.labels, raw)
    report["posthoc"] = {"tta": bool(tta and data.views.shape[1] > 0),
                         # a Head is checked fitted by predict_proba_pair above; any other
                         # object with that method applied no post-hoc step
                         "logit_adjust": float(getattr(head, "logit_adjust_", 0.0)),
                         "temperature": float(getattr(head, "temperature_", 1.0))}
    return report, proba


def model_label(attrs: dict) -> str:
    """The model of a cache's (or run's) attributes as a reader of a plot needs it:
    architecture and weights (`_sanity.model_label`)."""
    return _model_label(str(attrs.get("model", "?")), attrs.get("pretrained"),
                        attrs.get("checkpoint"))


def plot_label(run: Path, cache: AnyCache, split: str, n: int) -> str:
    """The subtitle of a run's plots: run, model, dataset and split, so that a figure shared
    on its own still says what it shows."""
    h = cache.header
    return (f"{run.name} · {model_label(vars(h))} · {h.dataset or '?'} "
            f"{split} split (n={n:,})")


def write_split_outputs(run: Path, name: str, report: dict, image_ids: list[str],
                        labels: np.ndarray, proba: np.ndarray, classes: list[str],
                        label: str | None) -> None:
    """The one writer of a split's outputs in a run folder, for head runs and fine-tuning runs
    alike: predictions/<name>.csv, given a plot label (the subtitle) plots/<name>_*.png, and
    metrics/<name>.json LAST: the metrics file marks the split complete, so a run killed
    mid-split has no metrics for it and the rerun writes the split again, whole."""
    write_predictions_csv(run / "predictions" / f"{name}.csv", image_ids, labels, proba, classes)
    if label is not None:
        write_report_plots(report, run / "plots", prefix=f"{name}_", label=label)
    write_json(run / "metrics" / f"{name}.json", report)


def split_complete(run: Path, name: str, report: dict, plots: bool) -> bool:
    """Whether every output of split `name` is there (a folder written before the metrics
    file came last can hold metrics without predictions or plots): the predictions CSV and,
    with `plots`, the three confusion / class-wise plots plus the reliability plot when the
    report has calibration bins (what `write_report_plots` writes)."""
    if not (run / "predictions" / f"{name}.csv").is_file():
        return False
    expected = 3 + bool(report.get("calibration"))
    return not plots or len(list((run / "plots").glob(f"{name}_*.png"))) >= expected


def _write_split(run: Path, cache: AnyCache, split: str, report: dict, proba: np.ndarray,
                 plots: bool, name: str | None = None) -> None:
    """A head run's split: `write_split_outputs` under `name` (default: the split)."""
    data = cache.split(split)
    write_split_outputs(run, name or split, report, list(data.image_id), data.labels, proba,
                        cache.classes,
                        plot_label(run, cache, split, report["n_samples"]) if plots else None)


def evaluation_entry(cache: AnyCache, split: str, name: str, report: dict, by: str,
                     status: str = "written") -> dict:
    """One line of run.json's `evaluations`: which cache and split, under which file name."""
    return {"name": name, "split": split, "dataset": cache.header.dataset,
            "cache": str(cache.path.resolve()), "cache_key": cache.key,
            "n_samples": report["n_samples"],
            "balanced_accuracy": report.get("balanced_accuracy"), "by": by,
            "status": status, "metrics": f"metrics/{name}.json", "created": now_iso()}


def default_run_name(head: str) -> str:
    return f"{head}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def fit_head_run(
    cache: CacheArg,
    head: str,
    params: dict[str, Any] | None = None,
    *,
    runs_dir: str | Path = DEFAULT_RUNS_DIR,
    name: str | None = None,
    template_set: str = ALL_TEMPLATES,
    seed: int = 0,
    eval_splits: tuple[str, ...] = ("val", "test"),
    n_bootstrap: int = 1000,
    plots: bool = True,
    tta: bool = False,
    shots: int | None = None,
    features: str = "projected",
    fusion: str = "early",
) -> RunResult:
    """Fit `head` on the cache's train split (val chooses hyper-parameters, the logit
    adjustment and the temperature), evaluate it on `eval_splits` that exist (with `tta`: the
    mean over the clean and the cached augmented views), and write the run folder. `shots`:
    K training images per class, drawn with `seed`. `features`: `projected` or `pre` (the
    fit option `-p features=pre`; evaluate and predict of the run use the same kind).
    Several caches (`open_caches`) fuse: `fusion` "early" (joined features, one head) or
    "late" (a head per cache)."""
    fc = open_caches(cache)
    check_fusion(fc, fusion, head)
    if isinstance(fc, JoinedCache) and features == "pre":
        raise UsageError("-p features=pre with several caches: fusing pre-projection "
                         "features is not built yet (fuse the projected ones)")
    check_features(fc, features)
    cls = get_head_class(head)
    if features == "pre" and (cls.needs_text or getattr(cls, "needs_concepts", False)):
        what = "prompts" if cls.needs_text else "concept prompts"
        raise UsageError(f"-p features=pre: head '{head}' uses the text tower's {what}, "
                         "which live in the projected space; pre-projection features have "
                         "no text counterpart (fit it on the projected features)")
    if not any(s in fc.splits for s in eval_splits):  # else: an empty metrics table
        raise RunError(f"{fc.path}: no {' or '.join(eval_splits)} split to score a head on "
                       f"(the cache has {list(fc.splits)}); encode data with a validation or "
                       "test split")
    if name is not None:
        check_run_name(name)
    check_writable_dir(Path(runs_dir), "--runs-dir")  # before the fit, not after it
    run = Path(runs_dir) / (name or default_run_name(head))
    created = not run.exists()
    with run_lock(run):
        if (run / "run.json").exists():
            raise RunError(f"{run}: a run with this name exists; choose another --name")
        try:
            return _fit_into(run, fc, head, params, template_set=template_set, seed=seed,
                             eval_splits=eval_splits, n_bootstrap=n_bootstrap, plots=plots,
                             tta=tta, shots=shots, features=features, fusion=fusion)
        except BaseException:
            if created:
                remove_unfinished_run(run)
            raise


def remove_unfinished_run(run: Path) -> None:
    """Delete the folder a failed fit created (its lock, a half-written head), so a refusal
    such as `-p epochs=0` leaves no empty `runs/<head>-<time>/` behind; a folder holding a
    finished run.json is never touched. Called with the run's lock held: no other process is
    writing it (unlinking the locked `.lock` is harmless, its descriptor stays valid)."""
    if not (run / "run.json").exists():
        shutil.rmtree(run, ignore_errors=True)


def _fit_into(run: Path, fc: AnyCache, head: str, params: dict[str, Any] | None, *,
              template_set: str, seed: int, eval_splits: tuple[str, ...], n_bootstrap: int,
              plots: bool, tta: bool, shots: int | None, features: str = "projected",
              fusion: str = "early") -> RunResult:
    """`fit_head_run`'s work once the run folder is locked: fit, save, score, record (run.json
    last: a folder without it is no run, and the same command fits it again)."""
    model = make_fit_head(head, params, seed, fc, fusion)
    inputs = fit_inputs(fc, template_set=template_set, shots=shots, seed=seed,
                        features=features)
    t0 = time.perf_counter()
    model.fit(**inputs)
    fit_s = time.perf_counter() - t0

    try:
        model.save(run / "head")
        # the neighbour index `predict` searches for similar training cases, built once here
        # a fused run's index is built (in memory) when predict first needs it
        if isinstance(fc, FeatureCache):
            write_neighbor_index(run / "head", fc.key,
                                 build_neighbor_index(fc.split("train").features16))
        for fname, text in getattr(model, "run_files", lambda _: {})(list(fc.classes)).items():
            atomic_write_text(run / fname, text)
    except OSError as e:
        de = disk_error(e, run / "head", "writing the head to",
                        "free space (or choose another --runs-dir) and run again")
        if de is None:
            raise
        raise de from None
    result = RunResult(run, head, model.get_params(), fit_s,
                       trains_on_val=trains_on_val(model))
    for split in eval_splits:
        if split in fc.splits:
            report, proba = evaluate_head(model, fc, split, n_bootstrap=n_bootstrap, seed=seed,
                                          tta=tta, features=features)
            _write_split(run, fc, split, report, proba, plots)
            result.metrics[split] = report
    fused = isinstance(fc, JoinedCache)
    extra: dict[str, Any] = {"late_fusion": model.summary()} if isinstance(
        model, LateFusion) else {}
    if fused and fc.notes:
        extra["fusion_notes"] = list(fc.notes)
    write_run(run, RunRecord(
        kind="head", head=head,
        params={k: plain_json(v) for k, v in model.get_params().items()},
        cache=str(fc.path.resolve()), cache_key=fc.key, encoding_key=fc.encoding_key,
        model=RunModel(fc.header.model, fc.header.pretrained or ""),
        classes=list(fc.classes), template_set=template_set, seed=seed, tta=tta, shots=shots,
        caches=fc.records() if fused else [], fusion=fusion if fused else None,
        evaluations=[evaluation_entry(fc, s, s, r, "fit-head") for s, r in
                     result.metrics.items()],
        created=now_iso(),
        extra={"train_images": int(len(inputs["y"])),
               "posthoc": {"logit_adjust": float(model.logit_adjust_),
                           "temperature": float(model.temperature_)},
               "fit_seconds": fit_s, "splits": {s: len(fc.splits[s]) for s in fc.splits},
               "features": features, "trains_on_val": result.trains_on_val,
               "skincache_version": __version__, **extra}))
    return result


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Hold the run folder's `.lock` (the cache's flock: freed by the kernel when the holder
    dies) while a command writes the folder: two `fit-head --name same` or two `evaluate`s
    of one run never interleave, and the second says who holds it."""
    lock = CacheLock(run / ".lock")
    try:
        lock.acquire(wait=False)
    except CacheBusyError:
        holder = ""
        with contextlib.suppress(SkincacheError):
            holder = read_regular(lock.path, max_bytes=64, what="lock").decode(errors="replace")
        raise RunError(f"{run}: another skincache process (pid {holder.strip() or '?'}) is "
                       "writing this run folder; wait for it to finish, or choose another "
                       "--name") from None
    try:
        yield
    finally:
        lock.release()


def fit_heads(
    cache: CacheArg,
    heads: list[str] | None = None,
    *,
    name: str | None = None,
    **kwargs: Any,
) -> list[RunResult]:
    """`fit_head_run` for several heads (default: every registered head the cache can serve,
    text heads only with text), one run folder each (`<name>-<head>` when `name` is given),
    reading the cache once."""
    from skincache.heads import list_heads

    if name is not None:
        check_run_name(name)
    fc = open_caches(cache)
    text = bool(fc.text) and kwargs.get("features", "projected") == "projected"
    concepts = bool(fc.concepts) and kwargs.get("features", "projected") == "projected"
    names = heads or [h for h in list_heads()
                      if (text or not get_head_class(h).needs_text)
                      and (concepts or not get_head_class(h).needs_concepts)]
    return [fit_head_run(fc, h, None, name=f"{name}-{h}" if name else None, **kwargs)
            for h in names]


def chosen_by_val(results: list[RunResult]) -> int | None:
    """Index of the run with the best validation balanced accuracy (ties: the first), or None
    without a val split: the only fair way to pick a head. A head that trained on val is
    never picked (its val score is a training score)."""
    scored = [(r.metrics["val"]["balanced_accuracy"], -i) for i, r in enumerate(results)
              if "val" in r.metrics and r.metrics["val"]["balanced_accuracy"] is not None
              and not r.trains_on_val]
    return -max(scored)[1] if scored else None


@dataclass
class HeadFits:
    """What `fit_from_cache` did, with what a caller shows beside the numbers."""

    results: list[RunResult]
    split: str  # the split the results are shown on: test, else val
    n_views: int  # augmented views of that split (0: --tta had nothing to average)
    picked: int | None  # of several heads, the one val chooses (`chosen_by_val`)
    cache_attrs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # of a fusion (views cut to the smaller K)


def fit_from_cache(cache: CacheArg, head: str, params: dict[str, Any] | None = None, *,
                   name: str | None = None, progress: bool = True,
                   **kwargs: Any) -> HeadFits:
    """`skincache fit-head`: one head (`fit_head_run`) or, with `head="all"`, every head
    (`fit_heads`) on a cache read once; `progress` shows the steps heads report (the C sweep,
    epochs). `kwargs` pass to `fit_head_run`; several caches fuse (`fusion=` early/late)."""
    from skincache._progress import head_progress

    fc = open_caches(cache)  # read once, shared by every head
    with head_progress(enabled=progress):
        if head == "all":
            results = fit_heads(fc, name=name, **kwargs)
        else:
            results = [fit_head_run(fc, head, params, name=name, **kwargs)]
    split = "test" if "test" in results[0].metrics else "val"
    return HeadFits(results, split, fc.split(split).n_views,
                    chosen_by_val(results) if len(results) > 1 else None, dict(fc.attrs),
                    list(getattr(fc, "notes", [])))


def run_features(record: RunRecord) -> str:
    """The kind of features a run's head was fit on (`projected` for runs that predate the
    choice)."""
    return str(record.extra.get("features", "projected"))


@dataclass
class LoadedRun:
    path: Path
    record: RunRecord
    head: Head | LateFusion

    def check_cache(self, cache: AnyCache) -> None:
        """Refuse a cache whose features mean something else (another model, weights,
        preprocessing, precision or class list). Another dataset encoded the same way is
        fine: that is external validation."""
        rec = self.record
        if cache.encoding_key != rec.encoding_key:
            raise RunError(
                f"run {self.path} was fit on features of {rec.model and rec.model.name} (cache "
                f"{rec.cache}, encoding {str(rec.encoding_key)[:12]}); cache "
                f"{cache.path} holds features of {cache.header.model} encoded differently "
                f"(encoding {cache.encoding_key[:12]}: other weights, preprocessing, precision "
                "or classes). A head fit on one model's features is meaningless on another's."
            )

    def open_cache(self, cache: CachePaths | None = None
                   ) -> AnyCache:
        """The run's cache(s), or `cache` (one path, or as many as the run fused, in its
        order), each checked to hold the features the run was fit on."""
        given = [] if cache is None else [cache] if isinstance(cache, str | Path) else \
            list(cache)
        rec = self.record
        if not rec.caches:
            if len(given) > 1:
                raise RunError(f"run {self.path} was fit on one cache; give one --cache")
            fc = FeatureCache.open(given[0] if given else rec.cache)
            self.check_cache(fc)
            return fc
        paths = given or [c["path"] for c in rec.caches]
        if len(paths) != len(rec.caches):
            raise RunError(f"run {self.path} fused {len(rec.caches)} caches "
                           f"({', '.join(c.get('model', '?') for c in rec.caches)}); give "
                           f"{len(rec.caches)} --cache in that order, or none")
        parts = [FeatureCache.open(p) for p in paths]
        for part, want in zip(parts, rec.caches, strict=True):
            if part.encoding_key != want["encoding_key"] or (
                    "dim" in want and int(part.header.embed_dim) != want["dim"]):
                raise RunError(f"run {self.path}: cache {part.path} holds features of "
                               f"{part.header.model} encoded differently from the run's "
                               f"{want.get('model', '?')} cache {want['path']} (encoding "
                               f"{part.encoding_key[:12]} vs {want['encoding_key'][:12]}); "
                               "give the caches in the order the run lists them")
        fc = join_caches(parts)
        self.check_cache(fc)
        return fc


def load_run(path: str | Path) -> LoadedRun:
    """A head run's validated record and its head (checked as `load_head` checks it)."""
    p = Path(path)
    try:
        record = read_run(p)
    except NotFoundError:
        raise RunError(f"{p}: not a run folder (no run.json)") from None
    if record.kind != "head":
        raise RunError(f"{p}: a '{record.kind}' run, not a head run")
    head = load_late_fusion(p / "head") if record.fusion == "late" else load_head(p / "head")
    return LoadedRun(p, record, head)


@dataclass
class Evaluation:
    """What `evaluate_run` did: the report, the name its files carry, and whether they were
    written now or were already there with the same numbers."""

    report: dict
    name: str
    split: str
    status: str  # "written", "unchanged" or "completed" (same numbers, missing files added)
    files: list[Path]
    cache_attrs: dict = field(default_factory=dict)  # of the cache evaluated on
    fit_tta: bool = False  # the run's own setting (run.json), for the CLI's title and warning
    shots: int | None = None


def evaluation_name(run: LoadedRun, cache: AnyCache, split: str) -> str:
    """`<split>` on the run's own cache; `<dataset>__<split>` on another one (external
    validation), so that its results never take the place of the run's own."""
    if cache.key == run.record.cache_key:
        return split
    dataset = file_safe(str(cache.header.dataset or cache.path.stem))
    return f"{dataset}__{split}"


def _same_numbers(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def evaluate(run: str | Path, split: str = "test", *, cache: CachePaths | None = None,
             n_bootstrap: int = 1000, plots: bool = True, tta: bool | None = None
             ) -> Evaluation:
    """Score a saved head on a split of its cache or of another one encoded the same way.

    Nothing the run wrote is replaced: results on another cache go under
    `<dataset>__<split>`; when a file of that name holds other numbers (another cache of the
    same dataset, other bootstrap settings) the new results get the next free name
    (`<name>-2`, ...). Every evaluation, unchanged ones included, is appended to run.json's
    `evaluations`. `tta`: None follows the run (a head fit with `--tta` is evaluated with it,
    so its numbers compare with the run's own)."""
    loaded = load_run(run)
    with run_lock(loaded.path):
        return _evaluate_locked(loaded, split, cache=cache, n_bootstrap=n_bootstrap,
                                plots=plots, tta=tta)


def _evaluate_locked(loaded: LoadedRun, split: str, *,
                     cache: CachePaths | None,
                     n_bootstrap: int, plots: bool, tta: bool | None) -> Evaluation:
    """`evaluate` with the run folder locked: score, write the split as one unit (or complete
    what an earlier, killed evaluation left missing), record the evaluation."""
    tta = loaded.record.tta if tta is None else tta
    fc = loaded.open_cache(cache)
    if split not in fc.splits:
        raise RunError(f"cache {fc.path} has no split '{split}' (it has: "
                       f"{', '.join(fc.splits)}); choose one with --split")
    report, proba = evaluate_head(loaded.head, fc, split, n_bootstrap=n_bootstrap,
                                  seed=loaded.record.seed, tta=tta,
                                  features=run_features(loaded.record))
    base = evaluation_name(loaded, fc, split)
    name, i, status = base, 1, "written"
    while (loaded.path / "metrics" / f"{name}.json").exists():
        old = read_json_file(loaded.path / "metrics" / f"{name}.json", what="metrics file")
        if _same_numbers(old, report):
            status = "unchanged"
            break
        i += 1
        name = f"{base}-{i}"
    if status == "unchanged" and not split_complete(loaded.path, name, report, plots):
        # the same numbers with files missing (fit with --no-plots, or a folder an older
        # version left incomplete when killed): write them, which replaces no other numbers
        status = "completed"
    if status != "unchanged":
        _write_split(loaded.path, fc, split, report, proba, plots, name=name)
    files = [loaded.path / "metrics" / f"{name}.json",
             loaded.path / "predictions" / f"{name}.csv"]
    if plots:
        files += sorted((loaded.path / "plots").glob(f"{name}_*.png"))
    record = read_run(loaded.path)  # as it is now, under the lock
    record.evaluations.append(evaluation_entry(fc, split, name, report, "evaluate", status))
    write_run(loaded.path, record)
    return Evaluation(report, name, split, status, files, dict(fc.attrs),
                      fit_tta=loaded.record.tta, shots=loaded.record.shots)


def evaluate_run(run: str | Path, split: str = "test", *, cache: CachePaths | None = None,
                 n_bootstrap: int = 1000, plots: bool = True, tta: bool | None = None) -> dict:
    """The report of `evaluate` (metrics of a saved head on a split; files written as
    `evaluate` says)."""
    return evaluate(run, split, cache=cache, n_bootstrap=n_bootstrap, plots=plots,
                    tta=tta).report

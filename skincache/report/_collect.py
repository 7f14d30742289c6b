"""What a report is made of: the run folders, bench folders and compare results under the paths
a user names, read into typed entries (never guessed from file names alone), plus the headers of
the caches they were fit on.

Every file goes through skincache's own readers (`read_run`, `read_json_file`, `FeatureCache`),
so a damaged file is one line naming it. A cache that moved or was deleted since the run is a
note in the report, not an error: the scores live in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skincache._io import read_json_file
from skincache.cache import CacheError, FeatureCache
from skincache.errors import SkincacheError, UsageError
from skincache.heads import load_head
from skincache.heads._protocols import trains_on_val
from skincache.heads.late_fusion import FUSION_FILE, load_late_fusion
from skincache.metrics import PRIMARY
from skincache.run_record import RUN_FILE, RunRecord, read_run

#: the test-split plots of a run folder the report shows, in this order, with their captions
RUN_PLOTS = (("confusion_matrix_normalized", "confusion matrix (row-normalised)"),
             ("classwise", "per-class recall"), ("reliability", "calibration"))
CV_FILE, CV_PLOT = "cv.json", "plots/cv_folds.png"
BENCH_FILES = ("results.json", "cv_results.json")


@dataclass
class RunEntry:
    """One run folder: its record, its metrics per split, its plots and CV result."""

    path: Path
    record: RunRecord
    metrics: dict[str, dict[str, Any]]  # split name -> metrics/<split>.json
    plots: list[tuple[str, Path]]  # (caption, png)
    cv: dict[str, Any] | None = None
    cv_plot: Path | None = None
    fit_on_val: bool = False  # the head trained on val: its val score is not a selection score
    chosen: bool = False  # val's pick among the runs of the same cache

    @property
    def name(self) -> str:
        return self.path.name

    def score(self, split: str, metric: str = PRIMARY) -> float | None:
        v = self.metrics.get(split, {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    def ci(self, split: str, metric: str) -> tuple[float, float] | None:
        ci = self.metrics.get(split, {}).get("ci", {}).get(metric)
        return (float(ci[0]), float(ci[1])) if isinstance(ci, list) and len(ci) == 2 else None


@dataclass
class BenchEntry:
    """A bench-heads (or bench-heads --cv) output folder: its results JSON and plots."""

    path: Path
    results: dict[str, Any]
    plots: list[Path]


@dataclass
class CompareEntry:
    """A `skincache compare --json` result, with its plot when it names one that exists."""

    path: Path
    result: dict[str, Any]
    plot: Path | None


@dataclass
class AuditEntry:
    """A `skincache audit --json` result: whether the split is leak-free, and its counts."""

    path: Path
    result: dict[str, Any]


@dataclass
class CacheEntry:
    """A cache the runs were fit on: its header summary, or why it could not be read."""

    path: str
    summary: dict[str, Any] | None
    problem: str | None = None


@dataclass
class Study:
    runs: list[RunEntry] = field(default_factory=list)
    benches: list[BenchEntry] = field(default_factory=list)
    compares: list[CompareEntry] = field(default_factory=list)
    audits: list[AuditEntry] = field(default_factory=list)
    caches: list[CacheEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.runs or self.benches or self.compares or self.audits)


def _read_run(path: Path) -> RunEntry:
    record = read_run(path / RUN_FILE)
    metrics = {}
    for m in sorted((path / "metrics").glob("*.json")):
        data = read_json_file(m)
        if isinstance(data, dict):
            metrics[m.stem] = data
    plots = [(caption, path / "plots" / f"test_{stem}.png") for stem, caption in RUN_PLOTS]
    entry = RunEntry(path, record, metrics, [(c, p) for c, p in plots if p.is_file()])
    if (path / CV_FILE).is_file():
        cv = read_json_file(path / CV_FILE)
        entry.cv = cv if isinstance(cv, dict) else None
        entry.cv_plot = path / CV_PLOT if (path / CV_PLOT).is_file() else None
    if isinstance(record.extra.get("trains_on_val"), bool):  # recorded at fit time
        entry.fit_on_val = record.extra["trains_on_val"]
    elif record.kind == "head" and (path / "head").is_dir():
        try:  # a run written before it was recorded: the saved head says (its JSON+arrays)
            if (path / "head" / FUSION_FILE).is_file():  # late fusion: a head per cache
                entry.fit_on_val = trains_on_val(load_late_fusion(path / "head"))
            else:
                entry.fit_on_val = trains_on_val(load_head(path / "head"))
        except SkincacheError as e:
            raise UsageError(f"{path / 'head'}: {e}") from None
    return entry


def _bench(path: Path) -> BenchEntry | None:
    for name in BENCH_FILES:
        if (path / name).is_file():
            results = read_json_file(path / name)
            if not isinstance(results, dict):
                raise UsageError(f"{path / name}: not a bench results object")
            return BenchEntry(path, results, sorted(path.glob("*.png")))
    return None


def _json_result(path: Path) -> CompareEntry | AuditEntry | None:
    """A compare result (`comparisons`) or an audit result (`leak_free`), else None."""
    data = read_json_file(path)
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("comparisons"), list):
        plot = Path(data["plot"]) if isinstance(data.get("plot"), str) else None
        return CompareEntry(path, data, plot if plot is not None and plot.is_file() else None)
    if "leak_free" in data and "splits" in data:
        return AuditEntry(path, data)
    return None


def _add(study: Study, path: Path, top: bool) -> bool:
    """Add what `path` is; False if it is none of the things a report shows."""
    if path.is_file():
        entry = _json_result(path) if path.suffix == ".json" else None
        if entry is None:
            if top:
                raise UsageError(f"{path}: not a run folder, a bench folder, a compare result "
                                 "(`skincache compare --json`) or an audit result "
                                 "(`skincache audit --json`)")
            return False
        (study.compares if isinstance(entry, CompareEntry) else study.audits).append(entry)
        return True
    if (path / RUN_FILE).is_file():
        study.runs.append(_read_run(path))
        return True
    bench = _bench(path)
    if bench is not None:
        study.benches.append(bench)
        return True
    if not top:
        return False
    found = False
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if (child.is_dir() or child.suffix == ".json") and _add(study, child, top=False):
            found = True
    return found


def collect(paths: list[str | Path]) -> Study:
    """Every run folder, bench folder, compare and audit result named by `paths` (a path may
    be one of them, or a folder holding them one level down, like `runs/`). UsageError for a
    path that does not exist or holds none of them."""
    if not paths:
        raise UsageError("report needs at least one run folder, bench folder or runs/ folder")
    study = Study()
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{p}: no such file or folder")
        if not _add(study, p, top=True):
            raise UsageError(f"{p}: no run folders (run.json), bench folders (results.json) "
                             "or compare results in it")
    _mark_val_picks(study.runs)
    study.caches = _caches(study)
    return study


def val_images(r: RunEntry) -> tuple:
    """Which val images a run was scored on: its val evaluation's dataset and size. Runs of
    one dataset split compete for val's pick whatever cache, fusion or fine-tuning made them;
    runs scored on other images are picked among themselves."""
    ev = next((e for e in r.record.evaluations if e.get("split") == "val"), {})
    return (ev.get("dataset"), r.metrics.get("val", {}).get("n_samples"))


def _mark_val_picks(runs: list[RunEntry]) -> None:
    """Per set of val images, the run with the best val score among those that kept val out
    of training: the one a reader may quote as chosen without looking at test."""
    groups: dict[tuple, list[RunEntry]] = {}
    for r in runs:
        if r.score("val") is not None and not r.fit_on_val:
            groups.setdefault(val_images(r), []).append(r)
    for group in groups.values():
        max(group, key=lambda r: r.score("val")).chosen = True


def _caches(study: Study) -> list[CacheEntry]:
    named = [c["path"] for r in study.runs for c in r.record.caches if c.get("path")] + \
        [r.record.cache for r in study.runs if r.record.cache] + \
        [b.results["cache"] for b in study.benches if isinstance(b.results.get("cache"), str)]
    seen: set[Path] = set()
    paths = [p for p in named if not (Path(p).resolve() in seen or seen.add(Path(p).resolve()))]
    out = []
    for p in paths:
        try:
            fc = FeatureCache.open(p)
        except (CacheError, SkincacheError, OSError) as e:
            out.append(CacheEntry(p, None, str(e).splitlines()[0]))
            continue
        h = fc.header
        out.append(CacheEntry(p, {
            "model": h.model, "pretrained": h.pretrained or "(random init)",
            "dataset": h.dataset, "dataset_root": h.dataset_root,
            "preprocess": h.preprocess, "views": h.views, "precision": h.precision,
            "classes": list(h.classes),
            "splits": {name: len(s) for name, s in fc.splits.items()},
            "split_origin": h.split_origin,
        }))
    return out

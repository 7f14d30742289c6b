"""Run folders: fit a head from a cache, evaluate it, and keep everything a person checks later.

```
runs/<name>/
  run.json                 kind, head name + params, cache path + key, template set, timings
  head/                    head.json + head.safetensors (loading never unpickles)
  metrics/<split>.json     classification_report: balanced accuracy first, CIs, per class
  predictions/<split>.csv  image_id, true, predicted, p_<class>...
  plots/<split>_*.png      confusion matrix (counts, row-normalised), class-wise bars, reliability
```
A run remembers the key of the cache it was fit on, and `evaluate` refuses any other cache:
a head fit on one model's features is meaningless on another's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from skincache import __version__
from skincache.cache import CacheError, FeatureCache, check_writable_dir
from skincache.errors import SkincacheError
from skincache.heads import Head, create_head, get_head_class, load_head
from skincache.metrics import classification_report, write_predictions_csv
from skincache.plots import write_report_plots

DEFAULT_RUNS_DIR = Path("runs")
ALL_TEMPLATES = "all"


class RunError(SkincacheError, RuntimeError):
    """A run folder that cannot be used as asked; the message names it and the reason."""


@dataclass
class RunResult:
    path: Path
    head: str
    params: dict[str, Any]
    fit_seconds: float
    metrics: dict[str, dict] = field(default_factory=dict)  # split -> classification_report


def text_features(cache: FeatureCache, template_set: str = ALL_TEMPLATES) -> np.ndarray | None:
    """[C, T, D] prompt embeddings: one template set, or all sets side by side (`all`)."""
    if not cache.text:
        return None
    if template_set == ALL_TEMPLATES:
        return np.concatenate([cache.text[k] for k in sorted(cache.text)], axis=1)
    if template_set not in cache.text:
        raise CacheError(f"{cache.path}: no template set '{template_set}' "
                         f"(has {sorted(cache.text)} or '{ALL_TEMPLATES}')")
    return cache.text[template_set]


def fit_inputs(cache: FeatureCache, *, template_set: str = ALL_TEMPLATES,
               use_val: bool = True) -> dict[str, Any]:
    """The uniform `Head.fit` arguments from a cache (train split; val for model selection)."""
    train = cache.split("train")
    val = cache.splits.get("val") if use_val else None
    return dict(
        X=train.features, y=train.labels, views=train.views,
        X_val=None if val is None else val.features, y_val=None if val is None else val.labels,
        text=text_features(cache, template_set), logit_scale=cache.logit_scale,
        n_classes=len(cache.classes),
    )


def make_head(name: str, params: dict[str, Any] | None = None, seed: int | None = None) -> Head:
    """`create_head` plus the seed for heads that take one (the others are deterministic)."""
    params = dict(params or {})
    if seed is not None and "seed" in get_head_class(name)().get_params():
        params.setdefault("seed", seed)
    return create_head(name, **params)


def is_seeded(name: str) -> bool:
    return "seed" in get_head_class(name)().get_params()


def evaluate_head(head: Head, cache: FeatureCache, split: str, *, n_bootstrap: int = 1000,
                  seed: int = 0) -> tuple[dict, np.ndarray]:
    data = cache.split(split)
    proba = head.predict_proba(data.features)
    report = classification_report(data.labels, proba, cache.classes, n_bootstrap=n_bootstrap,
                                   seed=seed)
    return report, proba


def _write_split(run: Path, cache: FeatureCache, split: str, report: dict, proba: np.ndarray,
                 plots: bool) -> None:
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    (run / "metrics" / f"{split}.json").write_text(json.dumps(report, indent=2))
    data = cache.split(split)
    write_predictions_csv(run / "predictions" / f"{split}.csv", list(data.image_id),
                          data.labels, proba, cache.classes)
    if plots:
        write_report_plots(report, run / "plots", prefix=f"{split}_",
                           label=f"{run.name} · {split} split (n={report['n_samples']:,})")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_name(head: str) -> str:
    return f"{head}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def fit_head_run(
    cache: FeatureCache | str | Path,
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
) -> RunResult:
    """Fit `head` on the cache's train split (val chooses hyper-parameters), evaluate it on
    `eval_splits` that exist, and write the run folder."""
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    if not any(s in fc.splits for s in eval_splits):  # else: an empty metrics table
        raise RunError(f"{fc.path}: no {' or '.join(eval_splits)} split to score a head on "
                       f"(the cache has {list(fc.splits)}); encode data with a validation or "
                       "test split")
    check_writable_dir(Path(runs_dir), "--runs-dir")  # before the fit, not after it
    model = make_head(head, params, seed)
    inputs = fit_inputs(fc, template_set=template_set)
    t0 = time.perf_counter()
    model.fit(**inputs)
    fit_s = time.perf_counter() - t0

    run = Path(runs_dir) / (name or default_run_name(head))
    if (run / "run.json").exists():
        raise RunError(f"{run}: a run with this name exists; choose another --name")
    model.save(run / "head")
    result = RunResult(run, head, model.get_params(), fit_s)
    for split in eval_splits:
        if split in fc.splits:
            report, proba = evaluate_head(model, fc, split, n_bootstrap=n_bootstrap, seed=seed)
            _write_split(run, fc, split, report, proba, plots)
            result.metrics[split] = report
    (run / "run.json").write_text(json.dumps({
        "kind": "head",
        "head": head,
        "params": {k: _jsonable(v) for k, v in model.get_params().items()},
        "cache": str(fc.path.resolve()),
        "cache_key": fc.key,
        "encoding_key": fc.encoding_key,
        "model": fc.attrs["model"],
        "pretrained": fc.attrs.get("pretrained", ""),
        "classes": fc.classes,
        "template_set": template_set,
        "seed": seed,
        "fit_seconds": fit_s,
        "splits": {s: len(fc.splits[s]) for s in fc.splits},
        "created": _now(),
        "skincache_version": __version__,
    }, indent=2))
    return result


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


@dataclass
class LoadedRun:
    path: Path
    config: dict
    head: Head

    def check_cache(self, cache: FeatureCache) -> None:
        """Refuse a cache whose features mean something else (another model, weights,
        preprocessing, precision or class list). Another dataset encoded the same way is
        fine: that is external validation."""
        if cache.encoding_key != self.config["encoding_key"]:
            raise RunError(
                f"run {self.path} was fit on features of {self.config['model']} (cache "
                f"{self.config['cache']}, encoding {self.config['encoding_key'][:12]}); cache "
                f"{cache.path} holds features of {cache.attrs['model']} encoded differently "
                f"(encoding {cache.encoding_key[:12]}: other weights, preprocessing, precision "
                "or classes). A head fit on one model's features is meaningless on another's."
            )

    def open_cache(self, cache: str | Path | None = None) -> FeatureCache:
        fc = FeatureCache.open(cache or self.config["cache"])
        self.check_cache(fc)
        return fc


def load_run(path: str | Path) -> LoadedRun:
    p = Path(path)
    cfg_path = p / "run.json"
    if not cfg_path.is_file():
        raise RunError(f"{p}: not a run folder (no run.json)")
    config = json.loads(cfg_path.read_text())
    if config.get("kind") != "head":
        raise RunError(f"{p}: a '{config.get('kind')}' run, not a head run")
    return LoadedRun(p, config, load_head(p / "head"))


def evaluate_run(run: str | Path, split: str = "test", *, cache: str | Path | None = None,
                 n_bootstrap: int = 1000, plots: bool = True) -> dict:
    """Metrics (+ predictions and plots, written into the run) of a saved head on a split."""
    loaded = load_run(run)
    fc = loaded.open_cache(cache)
    report, proba = evaluate_head(loaded.head, fc, split, n_bootstrap=n_bootstrap,
                                  seed=int(loaded.config.get("seed", 0)))
    _write_split(loaded.path, fc, split, report, proba, plots)
    return report

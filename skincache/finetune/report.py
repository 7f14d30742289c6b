"""A fine-tuning run's folder: `run.json`, and at the end the outputs `fit-head` writes for a
head: `metrics/<split>.json` (skincache.metrics' report: balanced accuracy first, bootstrap CIs,
confusion matrix, calibration), `predictions/<split>.csv`, the report plots per split, plus the
training curves and, with WiSE-FT, the alpha curve. A finished run can be read back from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skincache._io import now_iso, versions, write_json
from skincache._sanity import model_label
from skincache.data import Dataset
from skincache.finetune.config import FinetuneConfig, FinetuneResult
from skincache.heads.base import balanced_accuracy, softmax
from skincache.metrics import classification_report
from skincache.models import LoadedModel, ModelSpec
from skincache.run_record import read_run
from skincache.runs import write_split_outputs


def write_outputs(run_dir: Path, result, stores: dict, probas: dict[str, np.ndarray],
                  classes: list[str], cfg) -> None:
    """Fill `result.metrics` and write every file under `run_dir`: each split through the
    writer head runs use (`runs.write_split_outputs`), then the curves."""
    who = run_label(run_dir, cfg)
    for split, proba in probas.items():
        store = stores[split]
        y = store.labels.cpu().numpy()
        rep = classification_report(y, proba, classes, n_bootstrap=cfg.n_bootstrap,
                                    seed=cfg.seed)
        rep["model"] = {"best_epoch": result.best_epoch, "wise_alpha": result.wise_alpha}
        result.metrics[split] = rep
        write_split_outputs(run_dir, split, rep, store.image_ids, y, proba, classes,
                            f"{who} {split} split (n={rep['n_samples']:,})" if cfg.plots
                            else None)
    if result.wise_curve is not None:
        write_json(run_dir / "metrics" / "wise_curve.json", result.wise_curve)
    if not cfg.plots:
        return
    from skincache.plots import plot_curves

    plots = run_dir / "plots"
    series = curve_series(result.history, result.init_val)
    if series:
        plot_curves(series, plots / "curves.png", title=f"Fine-tuning ({cfg.setup})",
                    subtitle=who, first_epoch=0 if result.init_val else 1)
    if result.wise_curve:
        plot_wise_curve(result.wise_curve, plots / "wise_curve.png", result.wise_alpha,
                        subtitle=who)


def run_label(run_dir: Path, cfg) -> str:
    """Run, model and dataset for plot subtitles: `<run> · ViT-B-32 (openai) · HAM10000`."""
    model = model_label(str(cfg.model), cfg.pretrained, cfg.checkpoint)
    source = str(cfg.data)
    kind, _, rest = source.partition(":")
    data = Path(rest if rest and kind.isalnum() else source).name or source
    if getattr(cfg, "limit", None):
        data += f" (limit {cfg.limit})"
    return f"{run_dir.name} · {model} · {data}"


def curve_series(history: list[dict[str, Any]], init_val: dict[str, float] | None = None
                 ) -> dict[str, list[float | None]]:
    """Per-epoch series for `plot_curves` (losses left, accuracies right). With `init_val`
    (the model before training, on val) each series starts at epoch 0: that value for the
    validation series, None for the training ones."""
    keys = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_balanced_accuracy")
    out: dict[str, list[float | None]] = {
        k: [r[k] for r in history] for k in keys if history and all(k in r for r in history)}
    if init_val:
        out = {k: [init_val.get(k.removeprefix("val_")) if k.startswith("val_") else None, *v]
               for k, v in out.items()}
    return out


def plot_wise_curve(curve: list[dict[str, float]], path: Path, chosen: float | None,
                    subtitle: str = "") -> Path:
    """Validation balanced accuracy and accuracy against the WiSE-FT alpha."""
    from matplotlib.figure import Figure

    alphas = [r["alpha"] for r in curve]
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(alphas, [r["balanced_accuracy"] for r in curve], marker="o",
            label="Validation balanced accuracy")
    ax.plot(alphas, [r["accuracy"] for r in curve], marker="s", label="Validation accuracy")
    if chosen is not None:
        ax.axvline(chosen, color="grey", linestyle="--", label=f"Chosen alpha = {chosen:g}")
    ax.set_xlabel("alpha (0 = initial / zero-shot weights, 1 = fine-tuned)")
    ax.set_ylabel("Score")
    ax.set_ylim(0, 1)
    ax.set_title("WiSE-FT weight interpolation")
    if subtitle:
        fig.suptitle(subtitle, fontsize=9, color="0.35")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


# ---------------------------------------------------------------------------- run folder


@dataclass(frozen=True)
class RunFacts:
    """What `run.json` says about a run besides its status and results, gathered once the
    data, model and image stores exist (the report reads nothing else of the training loop)."""

    config: FinetuneConfig
    spec: ModelSpec
    loaded: LoadedModel
    scaled_augmentation: dict[str, Any]  # {"resize": int, "crop": [h, w]} at the model's size
    dataset: Dataset
    fingerprint: str
    n_failed: int
    world_size: int
    device: str
    precision: str
    image_store: str


def run_meta(facts: RunFacts, status: str, old: dict[str, Any],
             result: FinetuneResult | None = None) -> dict[str, Any]:
    """`run.json`: kind, status, the full config, the model and data identities, versions."""
    lp, ds, spec = facts.loaded, facts.dataset, facts.spec
    classes = list(ds.classes)
    meta: dict[str, Any] = {
        "kind": "finetune", "format_version": 1, "status": status,
        "created": old.get("created", now_iso()), "updated": now_iso(),
        "config": facts.config.to_dict(),
        "model": {**spec.identity(), "checkpoint": spec.checkpoint,
                  "weights_sha256": lp.weights_sha256, "embed_dim": lp.embed_dim,
                  "logit_scale": lp.logit_scale,
                  "preprocess": json.loads(lp.preprocess.to_json()),
                  "scaled_augmentation": facts.scaled_augmentation},
        "dataset": {"name": ds.name, "kind": ds.kind, "root": str(ds.root),
                    "fingerprint": facts.fingerprint, "classes": classes,
                    "split_sizes": {s: len(ds.split_records(s)) for s in ds.splits},
                    "failed": facts.n_failed},
        "classes": classes,
        "world_size": facts.world_size, "device": facts.device,
        "precision": facts.precision, "image_store": facts.image_store,
        "versions": versions("torch", "open_clip", "torchvision", "numpy", "pillow", "python"),
        "checkpoints": {"best": "best.pt", "last": "last.pt"},
    }
    if result is not None:
        meta.update(best_epoch=result.best_epoch, wise_alpha=result.wise_alpha,
                    stopped_early=result.stopped_early, timings=result.timings,
                    headline={s: {k: m.get(k) for k in ("balanced_accuracy", "accuracy")}
                              for s, m in result.metrics.items()})
        if result.wise_alpha not in (None, 1.0):
            meta["checkpoints"]["wise"] = "wise.pt"
    return meta


def quick_scores(y: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Per-epoch validation numbers: balanced accuracy (the ISIC metric), accuracy, loss."""
    proba = softmax(logits)
    pred = proba.argmax(axis=1)
    loss = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, None)).mean())
    return {"balanced_accuracy": balanced_accuracy(y, pred),
            "accuracy": float((pred == y).mean()), "loss": loss}


def train_timing(history: list[dict[str, Any]]) -> dict[str, float]:
    rows = [r for r in history if r.get("train_seconds")]
    if not rows:
        return {}
    imgs = sum(r["train_images"] for r in rows)
    secs = sum(r["train_seconds"] for r in rows)
    return {"train_s": secs, "train_images_per_s": imgs / secs,
            "eval_s": sum(r.get("eval_seconds", 0.0) for r in rows),
            "save_s": sum(r.get("save_seconds", 0.0) for r in rows)}


def finished_result(run_dir: Path, cfg):
    """A complete run read back from its folder (resuming it again trains nothing)."""
    meta = read_run(run_dir).to_dict()
    hist = json.loads((run_dir / "history.json").read_text())
    metrics = {p.stem: json.loads(p.read_text())
               for p in sorted((run_dir / "metrics").glob("*.json")) if p.stem != "wise_curve"}
    curve_path = run_dir / "metrics" / "wise_curve.json"
    return FinetuneResult(
        run_dir=run_dir, config=cfg, history=hist["epochs"], init_val=hist["init"],
        metrics=metrics, best_epoch=hist["best_epoch"],
        best_val_balanced_accuracy=hist["best_val_balanced_accuracy"],
        wise_alpha=meta.get("wise_alpha"),
        wise_curve=json.loads(curve_path.read_text()) if curve_path.is_file() else None,
        failed=json.loads((run_dir / "failed.json").read_text()),
        stopped_early=hist["stopped_early"], resumed=True, timings=meta.get("timings", {}))

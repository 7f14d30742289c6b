"""The fine-tuning run: data, model, the epoch loop, checkpoints, and the run folder.

Reproducibility is built from functions of (seed, epoch, rank), not from carried state: the
epoch's order comes from `DistributedSampler(seed).set_epoch(epoch)`, its crops from
`views.view_params` seeded by (seed, epoch, image id), and torch's generator is re-seeded at
every epoch start. A run resumed from `last.pt` (weights, head, optimizer, scheduler, scaler,
RNG, history) therefore replays the remaining epochs exactly as the uninterrupted run would.
With N processes each rank takes batch/N images of the same global batch (the sampler
interleaves one permutation) and DDP averages the gradients: the same steps as one process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from skincache._io import write_json
from skincache._progress import progress_bar
from skincache.data import Dataset, limit_dataset, load_dataset
from skincache.device import autocast_dtype, default_workers, resolve_precision
from skincache.errors import ExistsError, UsageError
from skincache.finetune import report, state
from skincache.finetune.config import FinetuneConfig, FinetuneResult
from skincache.finetune.images import (
    ImageStore,
    choose_mode,
    estimate_bytes,
)
from skincache.finetune.model import (
    ClipClassifier,
    fitted_head,
    interpolate,
    param_groups,
    random_head,
    zeroshot_head,
)
from skincache.finetune.report import quick_scores, train_timing
from skincache.heads._math import warmup_cosine
from skincache.heads.base import balanced_class_weights, softmax
from skincache.models import LoadedModel, ModelSpec, load_model
from skincache.run_record import RunRecord, check_run_name, read_run, write_run
from skincache.views import Normalizer, ViewMaker, ViewPolicy

WISE_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


# ---------------------------------------------------------------------- builders
# Each builder takes what it needs and returns what it built: the run composes them in order.


@dataclass
class RunData:
    """The dataset of a run and the splits it evaluates."""

    ds: Dataset
    fingerprint: str
    classes: list[str]
    eval_splits: list[str]
    val_split: str | None


@dataclass
class Net:
    """The model being fine-tuned and what comes with it."""

    spec: ModelSpec
    loaded: LoadedModel
    model: ClipClassifier
    normalize: Normalizer
    init_state: dict[str, torch.Tensor] | None  # the weights before training, for WiSE-FT


@dataclass
class Images:
    """Every image of the run decoded once."""

    maker: ViewMaker
    stores: dict[str, ImageStore]
    store_mode: str
    failed: list[Any]
    seconds: float


@dataclass
class Optimization:
    """Optimizer, schedule, scaler, sampler and loss weights: the optimizer/scheduler/scaler
    states go into `last.pt` (`state_dicts`) and come back on resume (`load_state_dicts`)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    steps_per_epoch: int
    loss_weight: torch.Tensor | None
    train_model: torch.nn.Module  # the model, wrapped in DDP under torchrun

    def state_dicts(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dicts(self, ckpt: dict[str, Any]) -> None:
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])


def pick_run_dir(cfg: FinetuneConfig, ctx: state.DistContext) -> Path:
    """The run folder: the resumed one, `--name`, or a fresh `finetune-<setup>-<time>`."""
    if cfg.resume:
        return Path(cfg.resume)

    def pick() -> str:
        root = Path(cfg.runs_dir)
        if cfg.name:
            check_run_name(cfg.name)
            if (root / cfg.name / "run.json").exists():
                raise ExistsError(f"{root / cfg.name} already holds a run; pass --resume "
                                  f"{root / cfg.name} to continue it, or another --name")
            return cfg.name
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name, i = f"finetune-{cfg.setup}-{stamp}", 1
        while (root / name).exists():
            i += 1
            name = f"finetune-{cfg.setup}-{stamp}-{i}"
        return name

    name = state.on_main(ctx, pick)  # rank 0's error is raised on every rank
    return Path(cfg.runs_dir) / name  # created with run.json, once data and model load


def load_data(cfg: FinetuneConfig, run_dir: Path) -> RunData:
    """The dataset, checked; a resumed run must find the data it started on."""
    ds = limit_dataset(load_dataset(cfg.data, split_ratios=cfg.split_ratios,
                                    seed=cfg.split_seed, test=cfg.test_data),
                       cfg.limit, cfg.split_seed)
    ds.validate()
    fingerprint = ds.fingerprint()
    if "train" not in ds.splits:
        raise UsageError(f"{cfg.data}: no training split (splits: {ds.splits})")
    if cfg.resume:
        saved = read_run(run_dir / "run.json").extra["dataset"]
        if saved["fingerprint"] != fingerprint:
            raise UsageError(f"{cfg.data}: the data changed since {run_dir} started "
                             "(ids, labels, splits or files differ); a resumed run must "
                             "train on the same data")
    eval_splits = [s for s in ds.splits if s != "train"]
    return RunData(ds, fingerprint, list(ds.classes), eval_splits,
                   "val" if "val" in eval_splits else None)


def build_model(cfg: FinetuneConfig, classes: list[str], device: torch.device,
                main: bool) -> Net:
    """The open_clip image tower plus its initial head, on `device`."""
    spec = ModelSpec(cfg.model, cfg.pretrained, cfg.checkpoint)
    loaded = load_model(spec, "cpu")  # the text tower stays on the CPU
    w, b = initial_head(cfg, loaded, classes)
    model = ClipClassifier(loaded.model.visual, w, b, loaded.logit_scale)
    model.to(device)
    wise = cfg.wise is not None or cfg.wise_sweep
    return Net(spec, loaded, model, Normalizer(loaded.preprocess, device),
               state.cpu_state(model) if wise and main else None)


def initial_head(cfg: FinetuneConfig, loaded: LoadedModel, classes: list[str]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = len(classes), loaded.embed_dim
    if cfg.head_init == "zeroshot":
        return zeroshot_head(loaded, classes, cfg.template_set)
    if cfg.head_init == "random":
        return random_head(n, d, cfg.seed)
    return fitted_head(cfg.head_init, loaded.logit_scale, n, d, classes, model=cfg.model)


def decode_images(cfg: FinetuneConfig, ctx: state.DistContext, data: RunData, net: Net, *,
                  progress: bool) -> Images:
    """Decode every image once into uint8 stores (train on every rank, the evaluation
    splits on rank 0 only)."""
    t0 = time.perf_counter()
    policy = ViewPolicy(k=0, resize=cfg.aug_resize, crop=cfg.aug_crop, hflip=cfg.aug_hflip,
                        seed=cfg.seed)
    maker = ViewMaker(net.loaded.preprocess, policy)
    splits = ["train"] + (data.eval_splits if ctx.main else [])
    records = {s: data.ds.split_records(s) for s in splits}
    n_clean = sum(len(r) for s, r in records.items() if s != "train" or not cfg.augment)
    need = estimate_bytes(n_clean, len(records["train"]) if cfg.augment else 0, maker)
    store_mode = choose_mode(cfg.image_store, need, ctx.local_world)
    workers = default_workers(ctx.local_world) if cfg.workers is None else cfg.workers
    stores: dict[str, ImageStore] = {}
    total = sum(len(r) for r in records.values())
    with progress_bar(total, "decode (once)", enabled=progress) as advance:
        for s in splits:
            labels = [data.ds.label_index(r.label) for r in records[s]]
            crops = cfg.augment and s == "train"
            stores[s] = ImageStore(
                records[s], labels, maker, keep_base=crops, keep_clean=not crops,
                mode=store_mode, workers=workers, split=s, advance=advance)
    failed = [f for s in splits for f in stores[s].failed]
    if not len(stores["train"]):
        raise UsageError(f"{cfg.data}: no training image could be decoded "
                         f"({len(failed)} failed, e.g. {failed[0].reason})")
    device = ctx.device
    if device.type == "cuda" and store_mode == "memory":
        free, _ = torch.cuda.mem_get_info(device)
        if sum(st.nbytes() for st in stores.values()) < 0.3 * free:
            for st in stores.values():
                st.to(device)
    return Images(maker, stores, store_mode, failed, time.perf_counter() - t0)


def build_optim(cfg: FinetuneConfig, ctx: state.DistContext, model: ClipClassifier,
                train: ImageStore, n_classes: int, precision: str,
                per_rank_batch: int) -> Optimization:
    """AdamW over the parameter groups, the warm-up/cosine schedule over all the run's steps,
    the epoch sampler, and DDP under torchrun."""
    device = ctx.device
    groups = param_groups(model, cfg.lr, cfg.effective_head_lr, cfg.weight_decay,
                          cfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=(device.type == "cuda") or None)
    sampler = DistributedSampler(range(len(train)), num_replicas=ctx.world, rank=ctx.rank,
                                 shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / per_rank_batch)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, round(cfg.warmup_ratio * total), cfg.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_weight = None
    if cfg.balance == "loss":
        w = balanced_class_weights(train.labels.cpu().numpy(), n_classes)
        loss_weight = torch.as_tensor(w, dtype=torch.float32, device=device)
    train_model: torch.nn.Module = model
    if ctx.active:
        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    return Optimization(opt, sched, scaler, sampler, steps_per_epoch, loss_weight, train_model)


class FinetuneRun:
    """One process's part of a run (all of it without torchrun): the builders above in
    order, then the epoch loop over a `TrainState`."""

    def __init__(self, cfg: FinetuneConfig, ctx: state.DistContext, *, progress: bool,
                 log: Callable[[str], None] | None = None,
                 on_resumable: Callable[[Path | None], None] | None = None):
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.log = log or (lambda line: None)
        #: told the run folder once a Ctrl-C would leave it resumable, None once finished
        self.on_resumable = on_resumable or (lambda run_dir: None)
        self.device = ctx.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.amp = autocast_dtype(self.precision)
        self.timings: dict[str, float] = {}
        if cfg.batch_size % ctx.world:
            raise UsageError(f"batch size {cfg.batch_size} does not split over {ctx.world} "
                             "processes; use a multiple of the process count")
        self.per_rank_batch = cfg.batch_size // ctx.world

    # ------------------------------------------------------------------ the whole run

    def run(self) -> FinetuneResult:
        t0 = time.perf_counter()
        cfg, ctx = self.cfg, self.ctx
        self.run_dir = pick_run_dir(cfg, ctx)
        self.data = load_data(cfg, self.run_dir)
        self.net = build_model(cfg, self.data.classes, self.device, ctx.main)
        self.images = decode_images(cfg, ctx, self.data, self.net, progress=self.progress)
        self.timings["decode_s"] = self.images.seconds
        if self.images.failed:
            self.log(f"{len(self.images.failed)} image(s) could not be read and are "
                     f"skipped (listed in {self.run_dir / 'failed.json'})")
        self.optim = build_optim(cfg, ctx, self.net.model, self.images.stores["train"],
                                 len(self.data.classes), self.precision, self.per_rank_batch)
        self.state = self._restore()
        resumed = self.state.epoch > 0
        if ctx.main:
            with state.disk_errors(self.run_dir):
                self._write_run_json("running")
            self.on_resumable(self.run_dir)
            if not resumed:
                self.state.init_val = self._val_scores()
        self.state.init_val = ctx.broadcast(self.state.init_val)
        self._train()
        result = FinetuneResult(run_dir=self.run_dir, config=cfg, rank=ctx.rank,
                                world_size=ctx.world, resumed=resumed)
        if ctx.main:
            with state.disk_errors(self.run_dir):
                self._finish(result)
            self.on_resumable(None)  # finished: nothing left to resume
        ctx.barrier()
        result.seconds = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, epoch: int, kind: str) -> dict[str, Any]:
        net = self.net
        p: dict[str, Any] = {
            "format": state.CHECKPOINT_FORMAT, "format_version": state.CHECKPOINT_VERSION,
            "kind": kind, "epoch": epoch, "classes": self.data.classes,
            "model": {"name": net.spec.name, "pretrained": net.spec.pretrained,
                      "checkpoint": net.spec.checkpoint},
            # the FULL open_clip CLIP state dict: `encode --checkpoint` loads it as is
            "state_dict": state.cpu_state(net.loaded.model),
            "head": {"weight": net.model.head.weight.detach().cpu().clone(),
                     "bias": net.model.head.bias.detach().cpu().clone(),
                     "logit_scale": net.model.logit_scale.detach().cpu().clone()},
            "val_balanced_accuracy": self.state.history[-1]["val_balanced_accuracy"]
            if self.state.history else None,
        }
        if kind == "last":
            p.update(**self.optim.state_dicts(), rng=state.rng_state(self.device),
                     **self.state.to_checkpoint(), world_size=self.ctx.world,
                     config=self.cfg.to_dict())
            p["epoch"] = epoch
        return p

    def _load_weights(self, ckpt: dict[str, Any]) -> None:
        self.net.loaded.model.load_state_dict(ckpt["state_dict"])
        with torch.no_grad():
            self.net.model.head.weight.copy_(ckpt["head"]["weight"])
            self.net.model.head.bias.copy_(ckpt["head"]["bias"])

    def _restore(self) -> state.TrainState:
        """A fresh TrainState, or with `resume` the one `last.pt` saved (weights, optimizer,
        RNG restored alongside); `epoch > 0` marks a resumed run."""
        last = self.run_dir / "last.pt"
        if not (self.cfg.resume and last.is_file()):
            return state.TrainState()
        ckpt = state.load_checkpoint(last)
        self._load_weights(ckpt)
        self.optim.load_state_dicts(ckpt)
        state.set_rng_state(ckpt["rng"], self.device)
        if int(ckpt["world_size"]) != self.ctx.world:
            self.log(f"resuming a {ckpt['world_size']}-process run with "
                     f"{self.ctx.world}: the global batch is the same, float sums may "
                     "differ in the last digits")
        self.log(f"resuming {self.run_dir} after epoch {ckpt['epoch']}")
        return state.TrainState.from_checkpoint(ckpt)

    # ------------------------------------------------------------------ training

    def _train(self) -> None:
        cfg = self.cfg
        for epoch in range(self.state.epoch + 1, cfg.epochs + 1):
            if self.state.stopped:
                break
            row = self._train_epoch(epoch)
            if self.ctx.main:
                self._end_epoch(epoch, row)
            self.state.stopped = self.ctx.broadcast(self.state.stopped)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, store, optim = self.cfg, self.ctx, self.images.stores["train"], self.optim
        optim.train_model.train()
        optim.sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + ctx.rank)
        order = list(optim.sampler)
        crops = store.crops(cfg.seed, epoch) if cfg.augment else None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        count = 0
        params = [p for g in optim.opt.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        desc = f"epoch {epoch}/{cfg.epochs}"
        with progress_bar(len(order) * ctx.world, desc, enabled=self.progress) as advance:
            for px, y in store.batches(order, self.per_rank_batch, self.device, crops):
                x = self.net.normalize(px)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = optim.train_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=optim.loss_weight,
                                       label_smoothing=cfg.label_smoothing)
                optim.opt.zero_grad(set_to_none=True)
                optim.scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    optim.scaler.unscale_(optim.opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optim.scaler.step(optim.opt)
                optim.scaler.update()
                optim.sched.step()
                n = y.shape[0]
                sums[0] += loss.detach().double() * n  # summed on the device: no sync per step
                sums[1] += (logits.argmax(1) == y).sum()
                count += n
                advance(n * ctx.world)
        sums[2] = count
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        loss_sum, correct, count = ctx.all_sum(sums).tolist()
        return {"epoch": epoch, "train_loss": loss_sum / count, "train_accuracy": correct / count,
                "lr": max(g["lr"] for g in optim.opt.param_groups if g["name"].startswith(
                    "visual")), "train_images": int(count),
                "train_seconds": seconds, "train_images_per_s": count / seconds}

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Rank 0: validate, keep the best, write last.pt, decide early stopping."""
        t0 = time.perf_counter()
        row.update({f"val_{k}": v for k, v in (self._val_scores() or {}).items()})
        row["eval_seconds"] = time.perf_counter() - t0
        score = row.get("val_balanced_accuracy")
        improved = self.state.observe(row, self.cfg.patience)
        t1 = time.perf_counter()
        if improved:
            state.save_checkpoint(self._payload(epoch, "best"), self.run_dir / "best.pt")
        state.save_checkpoint(self._payload(epoch, "last"), self.run_dir / "last.pt")
        row["save_seconds"] = time.perf_counter() - t1
        with state.disk_errors(self.run_dir):
            write_json(self.run_dir / "history.json", self.state.history_json())
        val = ("" if score is None else
               f"  val bal-acc {score:.4f} acc {row['val_accuracy']:.4f}"
               + ("  best" if improved else ""))
        self.log(f"epoch {epoch}/{self.cfg.epochs}  loss {row['train_loss']:.4f}  "
                 f"train acc {row['train_accuracy']:.4f}{val}  "
                 f"{row['train_images_per_s']:,.0f} img/s"
                 + ("  early stop" if self.state.stopped else ""))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _logits(self, split: str) -> np.ndarray:
        store, model = self.images.stores[split], self.net.model
        bs = self.cfg.eval_batch_size or (256 if self.device.type == "cuda" else 64)
        model.eval()
        out = []
        for px, _ in store.batches(list(range(len(store))), bs, self.device):
            x = self.net.normalize(px)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out.append(model(x).float())
        if not out:
            return np.zeros((0, len(self.data.classes)), dtype=np.float32)
        return torch.cat(out).cpu().numpy()

    def _val_scores(self) -> dict[str, float] | None:
        val = self.data.val_split
        if val is None or not len(self.images.stores[val]):
            return None
        y = self.images.stores[val].labels.numpy()
        return quick_scores(y, self._logits(val))

    # ------------------------------------------------------------------ the end

    def _finish(self, result: FinetuneResult) -> None:
        cfg, ts, stores = self.cfg, self.state, self.images.stores
        best = self.run_dir / "best.pt"
        if best.is_file():
            self._load_weights(state.load_checkpoint(best))
        t0 = time.perf_counter()
        alpha, curve = None, None
        if self.net.init_state is not None:
            alpha, curve = self._wise()
        self.timings["wise_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probas = {s: softmax(self._logits(s)) for s in self.data.eval_splits if len(stores[s])}
        self.timings["final_eval_s"] = time.perf_counter() - t0
        result.history, result.init_val = ts.history, ts.init_val
        result.best_epoch, result.best_val_balanced_accuracy = ts.best_epoch, ts.best_score
        result.wise_alpha, result.wise_curve = alpha, curve
        result.failed = [f.__dict__ for f in self.images.failed]
        result.stopped_early = ts.stopped
        result.timings = {**self.timings, **train_timing(ts.history)}
        write_json(self.run_dir / "history.json", ts.history_json())
        report.write_outputs(self.run_dir, result, stores, probas, self.data.classes, cfg)
        self._write_run_json("complete", result)

    def _wise(self) -> tuple[float, list[dict[str, float]] | None]:
        """Interpolate the best fine-tuned weights with the initial ones (WiSE-FT): the sweep
        scores alpha 0..1 on val; the final model uses `wise`, else the sweep's best alpha."""
        init, model = self.net.init_state, self.net.model
        assert init is not None
        cfg = self.cfg
        tuned = state.cpu_state(model)
        curve = None
        if cfg.wise_sweep and self.data.val_split is not None:
            curve = []
            for a in WISE_ALPHAS:
                model.load_state_dict(interpolate(init, tuned, a))
                curve.append({"alpha": a, **(self._val_scores() or {})})
        alpha = cfg.wise
        if alpha is None:
            if not curve:
                alpha = 1.0
            else:  # ties go to the larger alpha (closer to the fine-tuned model)
                top = max(r["balanced_accuracy"] for r in curve)
                alpha = max(r["alpha"] for r in curve if r["balanced_accuracy"] == top)
        model.load_state_dict(interpolate(init, tuned, alpha))
        if alpha != 1.0:
            p = self._payload(self.state.best_epoch or 0, "wise")
            p["wise_alpha"] = alpha
            state.save_checkpoint(p, self.run_dir / "wise.pt")
        return alpha, curve

    def _facts(self) -> report.RunFacts:
        return report.RunFacts(
            config=self.cfg, spec=self.net.spec, loaded=self.net.loaded,
            scaled_augmentation={"resize": self.images.maker.aug_resize,
                                 "crop": list(self.images.maker.crop_hw)},
            dataset=self.data.ds, fingerprint=self.data.fingerprint,
            n_failed=len(self.images.failed), world_size=self.ctx.world,
            device=self.device.type, precision=self.precision,
            image_store=self.images.store_mode)

    def _write_run_json(self, status: str, result: FinetuneResult | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.run_dir / "run.json"
        old = read_run(meta_path).to_dict() if meta_path.is_file() else {}
        write_run(meta_path, RunRecord.from_dict(report.run_meta(self._facts(), status, old,
                                                                 result), meta_path))
        write_json(self.run_dir / "failed.json", [f.__dict__ for f in self.images.failed])

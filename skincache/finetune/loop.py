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
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from skincache._io import write_json
from skincache._options import set_interrupt_hint
from skincache._progress import progress_bar
from skincache.data import limit_dataset, load_dataset
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
from skincache.models import ModelSpec, load_model
from skincache.run_record import RunRecord, check_run_name, read_run, write_run
from skincache.views import Normalizer, ViewMaker, ViewPolicy

WISE_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


class FinetuneRun:
    """One process's part of a run (all of it without torchrun)."""

    def __init__(self, cfg: FinetuneConfig, ctx: state.DistContext, *, progress: bool,
                 log: Callable[[str], None] | None = None):
        self.cfg, self.ctx, self.progress = cfg, ctx, progress
        self.log = log or (lambda line: None)
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
        self.run_dir = self._run_dir()
        self._load_data()
        self._build_model()
        self._decode()
        self._build_optim()
        resumed = self._restore()
        if self.ctx.main:
            self._write_run_json("running")
            set_interrupt_hint(f"continue with `skincache finetune --resume {self.run_dir}` "
                               "(from its last finished epoch)")
            if not resumed:
                self.init_val = self._val_scores()
        self.init_val = self.ctx.broadcast(self.init_val)
        self._train()
        result = FinetuneResult(run_dir=self.run_dir, config=self.cfg, rank=self.ctx.rank,
                                world_size=self.ctx.world, resumed=resumed)
        if self.ctx.main:
            self._finish(result)
            set_interrupt_hint("")  # finished: nothing left to resume
        self.ctx.barrier()
        result.seconds = time.perf_counter() - t0
        return result

    def _run_dir(self) -> Path:
        cfg = self.cfg
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

        name = state.on_main(self.ctx, pick)  # rank 0's error is raised on every rank
        return Path(cfg.runs_dir) / name  # created with run.json, once data and model load

    # ------------------------------------------------------------------ data

    def _load_data(self) -> None:
        cfg = self.cfg
        self.ds = limit_dataset(load_dataset(cfg.data, split_ratios=cfg.split_ratios,
                                             seed=cfg.split_seed, test=cfg.test_data),
                                cfg.limit, cfg.split_seed)
        self.ds.validate()
        self.fingerprint = self.ds.fingerprint()
        if "train" not in self.ds.splits:
            raise UsageError(f"{cfg.data}: no training split (splits: {self.ds.splits})")
        if cfg.resume:
            saved = read_run(self.run_dir).extra["dataset"]
            if saved["fingerprint"] != self.fingerprint:
                raise UsageError(f"{cfg.data}: the data changed since {self.run_dir} started "
                                 "(ids, labels, splits or files differ); a resumed run must "
                                 "train on the same data")
        self.classes = list(self.ds.classes)
        self.eval_splits = [s for s in self.ds.splits if s != "train"]
        self.val_split = "val" if "val" in self.eval_splits else None

    def _decode(self) -> None:
        """Decode every image once into uint8 stores (train on every rank, the evaluation
        splits on rank 0 only)."""
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        policy = ViewPolicy(k=0, resize=cfg.aug_resize, crop=cfg.aug_crop, hflip=cfg.aug_hflip,
                            seed=cfg.seed)
        self.maker = ViewMaker(self.loaded.preprocess, policy)
        splits = ["train"] + (self.eval_splits if ctx.main else [])
        records = {s: self.ds.split_records(s) for s in splits}
        n_clean = sum(len(r) for s, r in records.items() if s != "train" or not cfg.augment)
        need = estimate_bytes(n_clean, len(records["train"]) if cfg.augment else 0, self.maker)
        self.store_mode = choose_mode(cfg.image_store, need, ctx.local_world)
        workers = default_workers(ctx.local_world) if cfg.workers is None else cfg.workers
        self.stores: dict[str, ImageStore] = {}
        total = sum(len(r) for r in records.values())
        with progress_bar(total, "decode (once)", enabled=self.progress) as advance:
            for s in splits:
                labels = [self.ds.label_index(r.label) for r in records[s]]
                crops = cfg.augment and s == "train"
                self.stores[s] = ImageStore(
                    records[s], labels, self.maker, keep_base=crops, keep_clean=not crops,
                    mode=self.store_mode, workers=workers, split=s, advance=advance)
        self.failed = [f for s in splits for f in self.stores[s].failed]
        if not len(self.stores["train"]):
            raise UsageError(f"{cfg.data}: no training image could be decoded "
                             f"({len(self.failed)} failed, e.g. {self.failed[0].reason})")
        if self.device.type == "cuda" and self.store_mode == "memory":
            free, _ = torch.cuda.mem_get_info(self.device)
            if sum(st.nbytes() for st in self.stores.values()) < 0.3 * free:
                for st in self.stores.values():
                    st.to(self.device)
        self.timings["decode_s"] = time.perf_counter() - t0
        if self.failed:
            self.log(f"[yellow]{len(self.failed)} image(s) could not be read and are "
                          f"skipped[/] (listed in {self.run_dir / 'failed.json'})")

    # ------------------------------------------------------------------ model

    def _build_model(self) -> None:
        cfg = self.cfg
        spec = ModelSpec(cfg.model, cfg.pretrained, cfg.checkpoint)
        self.spec = spec
        self.loaded = load_model(spec, "cpu")  # the text tower stays on the CPU
        w, b = self._initial_head()
        self.model = ClipClassifier(self.loaded.model.visual, w, b, self.loaded.logit_scale)
        self.model.to(self.device)
        self.normalize = Normalizer(self.loaded.preprocess, self.device)
        wise = cfg.wise is not None or cfg.wise_sweep
        self.init_state = state.cpu_state(self.model) if wise and self.ctx.main else None

    def _initial_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, n, d = self.cfg, len(self.classes), self.loaded.embed_dim
        if cfg.head_init == "zeroshot":
            return zeroshot_head(self.loaded, self.classes, cfg.template_set)
        if cfg.head_init == "random":
            return random_head(n, d, cfg.seed)
        return fitted_head(cfg.head_init, self.loaded.logit_scale, n, d, self.classes,
                           model=cfg.model)

    def _build_optim(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        groups = param_groups(self.model, cfg.lr, cfg.effective_head_lr, cfg.weight_decay,
                              cfg.layer_decay)
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=fused or None)
        n_train = len(self.stores["train"])
        self.sampler = DistributedSampler(range(n_train), num_replicas=ctx.world, rank=ctx.rank,
                                          shuffle=True, seed=cfg.seed)
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.per_rank_batch)
        total = cfg.epochs * self.steps_per_epoch
        warm = round(cfg.warmup_ratio * total)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(total, warm, cfg.schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.loss_weight = None
        if cfg.balance == "loss":
            y = self.stores["train"].labels.cpu().numpy()
            w = balanced_class_weights(y, len(self.classes))
            self.loss_weight = torch.as_tensor(w, dtype=torch.float32, device=self.device)
        self.train_model = self.model
        if ctx.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"epoch": None, "score": None}
        self.since_best, self.stopped, self.start_epoch = 0, False, 1
        self.init_val: dict[str, float] | None = None

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, epoch: int, kind: str) -> dict[str, Any]:
        p: dict[str, Any] = {
            "format": state.CHECKPOINT_FORMAT, "format_version": state.CHECKPOINT_VERSION,
            "kind": kind, "epoch": epoch, "classes": self.classes,
            "model": {"name": self.spec.name, "pretrained": self.spec.pretrained,
                      "checkpoint": self.spec.checkpoint},
            # the FULL open_clip CLIP state dict: `encode --checkpoint` loads it as is
            "state_dict": state.cpu_state(self.loaded.model),
            "head": {"weight": self.model.head.weight.detach().cpu().clone(),
                     "bias": self.model.head.bias.detach().cpu().clone(),
                     "logit_scale": self.model.logit_scale.detach().cpu().clone()},
            "val_balanced_accuracy": self.history[-1]["val_balanced_accuracy"]
            if self.history else None,
        }
        if kind == "last":
            p.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                     scaler=self.scaler.state_dict(), rng=state.rng_state(self.device),
                     history=self.history, best=self.best, since_best=self.since_best,
                     stopped=self.stopped, init_val=self.init_val, world_size=self.ctx.world,
                     config=self.cfg.to_dict())
        return p

    def _load_weights(self, ckpt: dict[str, Any]) -> None:
        self.loaded.model.load_state_dict(ckpt["state_dict"])
        with torch.no_grad():
            self.model.head.weight.copy_(ckpt["head"]["weight"])
            self.model.head.bias.copy_(ckpt["head"]["bias"])

    def _restore(self) -> bool:
        last = self.run_dir / "last.pt"
        if not (self.cfg.resume and last.is_file()):
            return False
        ckpt = state.load_checkpoint(last)
        self._load_weights(ckpt)
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        state.set_rng_state(ckpt["rng"], self.device)
        self.history, self.best = list(ckpt["history"]), dict(ckpt["best"])
        self.since_best, self.stopped = int(ckpt["since_best"]), bool(ckpt["stopped"])
        self.init_val = ckpt["init_val"]
        self.start_epoch = int(ckpt["epoch"]) + 1
        if int(ckpt["world_size"]) != self.ctx.world:
            self.log(f"[yellow]resuming a {ckpt['world_size']}-process run with "
                          f"{self.ctx.world}: the global batch is the same, float sums may "
                          "differ in the last digits[/]")
        self.log(f"resuming {self.run_dir} after epoch {ckpt['epoch']}")
        return True

    # ------------------------------------------------------------------ training

    def _train(self) -> None:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            if self.stopped:
                break
            row = self._train_epoch(epoch)
            if self.ctx.main:
                self._end_epoch(epoch, row)
            self.stopped = self.ctx.broadcast(self.stopped)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, ctx, store = self.cfg, self.ctx, self.stores["train"]
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + ctx.rank)
        order = list(self.sampler)
        crops = store.crops(cfg.seed, epoch) if cfg.augment else None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        count = 0
        params = [p for g in self.opt.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        desc = f"epoch {epoch}/{cfg.epochs}"
        with progress_bar(len(order) * ctx.world, desc, enabled=self.progress) as advance:
            for px, y in store.batches(order, self.per_rank_batch, self.device, crops):
                x = self.normalize(px)
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.train_model(x)
                loss = F.cross_entropy(logits.float(), y, weight=self.loss_weight,
                                       label_smoothing=cfg.label_smoothing)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.grad_clip is not None:
                    self.scaler.unscale_(self.opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.scaler.step(self.opt)
                self.scaler.update()
                self.sched.step()
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
                "lr": max(g["lr"] for g in self.opt.param_groups if g["name"].startswith(
                    "visual")), "train_images": int(count),
                "train_seconds": seconds, "train_images_per_s": count / seconds}

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Rank 0: validate, keep the best, write last.pt, decide early stopping."""
        t0 = time.perf_counter()
        row.update({f"val_{k}": v for k, v in (self._val_scores() or {}).items()})
        row["eval_seconds"] = time.perf_counter() - t0
        score = row.get("val_balanced_accuracy")
        improved = score is None or self.best["score"] is None or score > self.best["score"]
        if improved:
            self.best = {"epoch": epoch, "score": score}
            self.since_best = 0
        else:
            self.since_best += 1
        patience = self.cfg.patience
        if patience is not None and score is not None and self.since_best >= patience:
            self.stopped = True
        self.history.append(row)
        t1 = time.perf_counter()
        if improved:
            state.save_checkpoint(self._payload(epoch, "best"), self.run_dir / "best.pt")
        state.save_checkpoint(self._payload(epoch, "last"), self.run_dir / "last.pt")
        row["save_seconds"] = time.perf_counter() - t1
        write_json(self.run_dir / "history.json", self._history_json())
        val = ("" if score is None else
               f"  val bal-acc {score:.4f} acc {row['val_accuracy']:.4f}"
               + ("  [green]best[/]" if improved else ""))
        self.log(f"epoch {epoch}/{self.cfg.epochs}  loss {row['train_loss']:.4f}  "
                 f"train acc {row['train_accuracy']:.4f}{val}  "
                 f"{row['train_images_per_s']:,.0f} img/s"
                 + ("  [yellow]early stop[/]" if self.stopped else ""))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _logits(self, split: str) -> np.ndarray:
        store = self.stores[split]
        bs = self.cfg.eval_batch_size or (256 if self.device.type == "cuda" else 64)
        self.model.eval()
        out = []
        for px, _ in store.batches(list(range(len(store))), bs, self.device):
            x = self.normalize(px)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                out.append(self.model(x).float())
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(out).cpu().numpy()

    def _val_scores(self) -> dict[str, float] | None:
        if self.val_split is None or not len(self.stores[self.val_split]):
            return None
        y = self.stores[self.val_split].labels.numpy()
        return quick_scores(y, self._logits(self.val_split))

    # ------------------------------------------------------------------ the end

    def _finish(self, result: FinetuneResult) -> None:
        cfg = self.cfg
        best = self.run_dir / "best.pt"
        if best.is_file():
            self._load_weights(state.load_checkpoint(best))
        t0 = time.perf_counter()
        alpha, curve = None, None
        if self.init_state is not None:
            alpha, curve = self._wise()
        self.timings["wise_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        probas = {s: softmax(self._logits(s)) for s in self.eval_splits if len(self.stores[s])}
        self.timings["final_eval_s"] = time.perf_counter() - t0
        result.history, result.init_val = self.history, self.init_val
        result.best_epoch, result.best_val_balanced_accuracy = self.best["epoch"], \
            self.best["score"]
        result.wise_alpha, result.wise_curve = alpha, curve
        result.failed = [f.__dict__ for f in self.failed]
        result.stopped_early = self.stopped
        result.timings = {**self.timings, **train_timing(self.history)}
        write_json(self.run_dir / "history.json", self._history_json())
        report.write_outputs(self.run_dir, result, self.stores, probas, self.classes, cfg)
        self._write_run_json("complete", result)

    def _wise(self) -> tuple[float, list[dict[str, float]] | None]:
        """Interpolate the best fine-tuned weights with the initial ones (WiSE-FT): the sweep
        scores alpha 0..1 on val; the final model uses `wise`, else the sweep's best alpha."""
        assert self.init_state is not None
        cfg = self.cfg
        tuned = state.cpu_state(self.model)
        curve = None
        if cfg.wise_sweep and self.val_split is not None:
            curve = []
            for a in WISE_ALPHAS:
                self.model.load_state_dict(interpolate(self.init_state, tuned, a))
                curve.append({"alpha": a, **(self._val_scores() or {})})
        alpha = cfg.wise
        if alpha is None:
            if not curve:
                alpha = 1.0
            else:  # ties go to the larger alpha (closer to the fine-tuned model)
                top = max(r["balanced_accuracy"] for r in curve)
                alpha = max(r["alpha"] for r in curve if r["balanced_accuracy"] == top)
        self.model.load_state_dict(interpolate(self.init_state, tuned, alpha))
        if alpha != 1.0:
            p = self._payload(self.best["epoch"] or 0, "wise")
            p["wise_alpha"] = alpha
            state.save_checkpoint(p, self.run_dir / "wise.pt")
        return alpha, curve

    def _history_json(self) -> dict[str, Any]:
        return {"init": self.init_val, "epochs": self.history, "best_epoch": self.best["epoch"],
                "best_val_balanced_accuracy": self.best["score"], "stopped_early": self.stopped}

    def _facts(self) -> report.RunFacts:
        return report.RunFacts(
            config=self.cfg, spec=self.spec, loaded=self.loaded,
            scaled_augmentation={"resize": self.maker.aug_resize,
                                 "crop": list(self.maker.crop_hw)},
            dataset=self.ds, fingerprint=self.fingerprint, n_failed=len(self.failed),
            world_size=self.ctx.world, device=self.device.type, precision=self.precision,
            image_store=self.store_mode)

    def _write_run_json(self, status: str, result: FinetuneResult | None = None) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.run_dir / "run.json"
        old = read_run(meta_path).to_dict() if meta_path.is_file() else {}
        write_run(meta_path, RunRecord.from_dict(report.run_meta(self._facts(), status, old,
                                                                 result), meta_path))
        write_json(self.run_dir / "failed.json", [f.__dict__ for f in self.failed])

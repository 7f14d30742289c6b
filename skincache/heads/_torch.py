"""The one training loop the PyTorch heads share (linear, mlp, zs-linear, tip-adapter-f).

Why it looks the way it does:
- Everything is a full tensor on the device and batches are index slices: with 10k x 512 cached
  features a DataLoader's per-item overhead would cost more than the arithmetic.
- Feature-level augmentation: every epoch each image contributes one of its clean + K cached
  views, drawn at random (the clean view alone when K=0 or views are switched off). The clean
  view is in the draw because val and test are scored on clean views. This is what the
  cache buys: augmentation without running the image tower again.
- Class imbalance (HAM10000 is two-thirds nv): `balance="loss"` weights the cross-entropy by
  inverse class frequency, `balance="sampler"` draws each epoch's images with probability
  inversely proportional to their class size.
- Early stopping watches validation balanced accuracy (the ISIC metric) and restores the best
  epoch's weights.
- Determinism without side effects: training runs inside `torch.random.fork_rng`, seeded from the
  head's `seed`, so the same seed gives the same weights and the caller's global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skincache.device import inference_device  # noqa: F401 (the heads' import point)
from skincache.device import resolve_device as _resolve_device
from skincache.errors import UsageError

from . import _progress
from ._math import balanced_accuracy, balanced_class_weights, warmup_cosine

BALANCE_MODES = (None, "loss", "sampler")

#: the automatic memory budget: this fraction of physical memory (see `memory_budget`)
AUTO_MEMORY_FRACTION = 0.25
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_budget(max_memory: int | float | str | None) -> int:
    """Bytes a head may spend on float32 copies of its training data: a number (MiB, so that
    a saved head's integer parameter stays small), a string like "512M" / "8G" / "100K", or
    None / "auto" for a quarter of physical memory."""
    if max_memory is None or (isinstance(max_memory, str) and max_memory.lower() == "auto"):
        return int(physical_memory() * AUTO_MEMORY_FRACTION)
    if isinstance(max_memory, str):
        text = max_memory.strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1] if text and text[-1] in _UNITS else ""
        try:
            value = float(text[: len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"max_memory must be bytes, '512M', '8G' or 'auto', got "
                             f"{max_memory!r}") from None
    else:
        value = float(max_memory) * (1 << 20)
    if not value > 0:
        raise ValueError(f"max_memory must be positive, got {max_memory!r}")
    return int(value)


class RowSource:
    """Training rows for `train` without a float32 copy of the whole set: clean-view rows X
    [N, D] and views [N, K, D] stay as given (float16 from a cache, or a memory map) and each
    batch is gathered, converted and preprocessed (`prep`) on its own. Gives the same rows,
    in the same order, as the in-memory tensors, so the same seed gives the same weights."""

    def __init__(self, X: np.ndarray, views: np.ndarray,
                 prep: Callable[[np.ndarray], np.ndarray], device: torch.device):
        self.X, self.views, self.prep, self.device = X, views, prep, device
        self.shape = X.shape

    def gather(self, order: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
        idx = order.cpu().numpy()
        rows = np.asarray(self.X[idx], dtype=np.float32)
        if pick is not None:  # pick == K is the clean view (as in `epoch_features`)
            p = pick.cpu().numpy()
            aug = p < self.views.shape[1]
            rows[aug] = self.views[idx[aug], p[aug]]
        return to_tensor(self.prep(rows), self.device)


def resolve_device(device: str | torch.device) -> torch.device:
    """`skincache.device.resolve_device`, where "auto" never picks MPS (float64 numerics)."""
    return _resolve_device(device, auto_mps=False)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for the duration only (module init, dropout)."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    balance: str | None = None
    use_views: bool = True
    patience: int | None = 10
    eval_every: int = 1
    #: also score the initial weights, so training that only hurts is undone (zs-linear,
    #: tip-adapter-f start from a useful training-free classifier)
    eval_init: bool = False
    #: images drawn per epoch (None: all N); lets an expensive head take short epochs
    samples_per_epoch: int | None = None
    #: small training sets get smaller batches so each epoch still takes this many steps;
    #: otherwise a demo-sized set (a few hundred images) would see one step per epoch
    min_steps_per_epoch: int = 10
    #: validation score of the logits (higher is better); default: plain balanced accuracy.
    #: Heads pass the score after their logit adjustment, so early stopping and the final
    #: head agree.
    val_score: Callable[[np.ndarray], float] | None = None
    #: shown in progress lines
    name: str = "head"

    def check(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise UsageError(f"balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch_size must be positive")


def head_config(head: Any, data: Any, **extra: Any) -> TrainConfig:
    """The TrainConfig of a torch head, from the parameters every one of them has (epochs,
    batch_size, lr, weight_decay, seed, balance, use_views, patience) and its validation
    score (after its logit adjustment, so early stopping and the final head agree); `extra`:
    the fields one head sets on top (eval_init, samples_per_epoch)."""
    return TrainConfig(
        epochs=head.epochs, batch_size=head.batch_size, lr=head.lr,
        weight_decay=head.weight_decay, seed=head.seed, balance=head.balance,
        use_views=head.use_views, patience=head.patience,
        val_score=head._val_score(data) if data.has_val else None, name=head.name, **extra,
    )


@dataclass
class TrainResult:
    epochs_run: int = 0
    #: 1-based; 0 means the initial weights were best; -1 without validation data
    best_epoch: int = -1
    best_val_score: float = float("nan")
    val_scores: list[float] = field(default_factory=list)


def epoch_indices(
    y: torch.Tensor, n_classes: int, balance: str | None, g: torch.Generator
) -> torch.Tensor:
    """The order in which one epoch visits the N training images: a permutation, or, with
    `balance="sampler"`, N draws with replacement weighted so every class is equally likely."""
    n = y.shape[0]
    if balance == "sampler":
        counts = torch.bincount(y, minlength=n_classes).clamp(min=1).double()
        return torch.multinomial((1.0 / counts)[y], n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def epoch_features(
    X: torch.Tensor, views: torch.Tensor, use_views: bool, g: torch.Generator,
    order: torch.Tensor,
) -> torch.Tensor:
    """The epoch's feature rows in visiting order (one gather per epoch, so batches are
    contiguous slices): for each image one of its K+1 cached views drawn at random, the clean
    view included (val and test are scored on clean views: a head that never saw one trains on
    a shifted distribution), or the clean view alone."""
    n, k = views.shape[0], views.shape[1]
    if not use_views or k == 0:
        return X[order]
    pick = torch.randint(k + 1, (n,), generator=g).to(views.device)[order]
    out = X[order].clone()
    aug = pick < k
    out[aug] = views[order[aug], pick[aug]]
    return out


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train(
    module: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    views: torch.Tensor,
    n_classes: int,
    cfg: TrainConfig,
    *,
    X_val: torch.Tensor | None = None,
    y_val: np.ndarray | None = None,
    forward: Forward | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    predict_val: Callable[[], torch.Tensor] | None = None,
    optimizer_kwargs: dict | None = None,
) -> TrainResult:
    """Train `module` in place with AdamW and a per-step cosine schedule; returns a record.

    X [N, D], y [N] (long), views [N, K, D] already on the module's device and preprocessed;
    or X a `RowSource` (views then unused) that gathers and preprocesses each batch.
    `forward(x_batch, index_batch)` computes logits (default `module(x_batch)`; the index lets
    tip-adapter-f mask each image's own cache key). `penalty()` is added to the loss
    (zs-linear's pull towards the zero-shot weights). Call inside `seeded(...)`.
    """
    cfg.check()
    streamed = isinstance(X, RowSource)
    device = X.device
    g = torch.Generator().manual_seed(cfg.seed)
    fwd: Forward = forward or (lambda xb, _idx: module(xb))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            **(optimizer_kwargs or {}))
    n = X.shape[0] if cfg.samples_per_epoch is None else min(cfg.samples_per_epoch, X.shape[0])
    batch_size = max(1, min(cfg.batch_size, X.shape[0] // cfg.min_steps_per_epoch))
    steps_per_epoch = math.ceil(n / batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, 0))
    loss_w = None
    if cfg.balance == "loss":
        w = balanced_class_weights(y.cpu().numpy(), n_classes)
        loss_w = torch.as_tensor(w, dtype=torch.float32, device=device)
    y_cpu = y.cpu()
    use_val = y_val is not None and (X_val is not None or predict_val is not None)
    if use_val and predict_val is None:
        def predict_val() -> torch.Tensor:
            return module(X_val)

    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None

    def validate(epoch: int) -> bool:
        """Record the validation score after `epoch` (0: the initial weights); True to stop."""
        nonlocal best_state
        module.eval()
        with torch.no_grad():
            logits = predict_val().float().cpu().numpy()
        score = (cfg.val_score(logits) if cfg.val_score is not None
                 else balanced_accuracy(y_val, logits.argmax(axis=1)))
        result.val_scores.append(score)
        if best_state is None or score > result.best_val_score:
            result.best_val_score, result.best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        return cfg.patience is not None and epoch - result.best_epoch >= cfg.patience

    if use_val and cfg.eval_init:
        validate(0)
    for epoch in range(1, cfg.epochs + 1):
        module.train()
        order = epoch_indices(y_cpu, n_classes, cfg.balance, g)[:n].to(device)
        if streamed:  # the same draws as epoch_features, rows fetched per batch
            k = X.views.shape[1]
            pick = (torch.randint(k + 1, (X.shape[0],), generator=g)
                    if cfg.use_views and k else None)
            labels = y[order]
        else:
            feats, labels = epoch_features(X, views, cfg.use_views, g, order), y[order]
        for start in range(0, n, batch_size):
            stop = start + batch_size
            if streamed:
                ob = order[start:stop].cpu()
                xb = X.gather(ob, None if pick is None else pick[ob])
            else:
                xb = feats[start:stop]
            logits = fwd(xb, order[start:stop])
            loss = F.cross_entropy(logits, labels[start:stop], weight=loss_w)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        result.epochs_run = epoch
        _progress.report(f"{cfg.name} epochs", epoch, cfg.epochs,
                         f"val {result.best_val_score:.3f}" if use_val else "")
        if use_val and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and validate(epoch):
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return result


@torch.no_grad()
def predict_logits(
    fn: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray, device: torch.device,
    batch_size: int = 8192,
) -> np.ndarray:
    """Apply `fn` to X in chunks on `device`; float32 numpy logits."""
    out = []
    for start in range(0, len(X), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(X[start:start + batch_size])).to(device)
        out.append(fn(xb).float().cpu().numpy())
    return np.concatenate(out)


def to_tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def state_to_numpy(module: nn.Module, prefix: str = "module.") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def numpy_to_state(arrays: dict[str, np.ndarray], prefix: str = "module."
                   ) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in arrays.items()
            if k.startswith(prefix)}

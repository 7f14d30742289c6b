"""CLIP_benchmark's linear probe, with its defaults, so a number sits beside that benchmark's.

Read from LAION-AI/CLIP_benchmark (`clip_benchmark/metrics/linear_probe.py`, defaults from
`clip_benchmark/cli.py`):

- L2-normalised features (its `Featurizer(normalize=True)` default);
- a `torch.nn.Linear` probe under `torch.manual_seed(seed)` (seed 0), cross-entropy, AdamW at
  lr 0.1 (`--fewshot_lr`), batch 64 (`--batch_size`), 10 epochs (`--fewshot_epochs`), a cosine
  schedule per step without warm-up, shuffled batches;
- the weight decay chosen on val top-1 accuracy ("OpenAI-like" sweep): a grid of 97 values
  log-spaced over [1e-6, 1e2], first its 7 decade-and-a-third points, then around the best a
  search with spans of 8, 4, 2, 1 grid steps (left, peak, right each time; a strictly better
  accuracy moves the peak, ties keep the earlier), one fit per grid point (cached);
- the final probe refit on **train+val merged** with the chosen weight decay; without val, weight
  decay 0 on train.

Val therefore ends up as training data: `trains_on_val` is True whenever val is given, and val
scores of this head are not a validation score (tables mark them "(fit)"; val's pick skips it).
No post-hoc step by default (`logit_adjust=None`, `calibrate=False`): CLIP_benchmark applies none.
Float32 on the CPU (CLIP_benchmark runs mixed precision on a GPU): the same protocol, not the same
bits.
"""

from __future__ import annotations

import numpy as np

from . import _progress
from ._protocols import ProbeHead, fit_rows, full_weights, seen_classes
from ._registry import register_head
from .base import FitData

#: CLIP_benchmark's weight-decay grid (`np.logspace(-6, 2, num=97)`) and its coarse points
WD_GRID = tuple(float(w) for w in np.logspace(-6, 2, num=97))
COARSE = tuple(range(0, 97, 16))
SPANS = (8, 4, 2, 1)


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """CLIP_benchmark's per-step cosine schedule with no warm-up."""
    return 0.5 * (1.0 + np.cos(np.pi * step / total)) * base_lr


@register_head("clip-benchmark-lp")
class CLIPBenchmarkLinearProbeHead(ProbeHead):
    """CLIP_benchmark's linear probe: AdamW, weight decay swept on val, refit on train+val.

    Val picks the weight decay and is then merged into the training set: the final head has
    seen val (`trains_on_val`), so its val metrics are a training score, never a selection one.
    lr, epochs, batch_size: AdamW's (0.1, 10, 64: CLIP_benchmark's defaults). weight_decay: None
    sweeps CLIP_benchmark's grid on val accuracy; a number fixes it (no sweep, train+val still
    merged). normalize: L2-normalise the features (True, as CLIP_benchmark). seed: torch seed.
    logit_adjust / calibrate: off (None / False), as published.
    """

    _fitted_scalars = ("weight_decay_", "merged_val_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"lr": ">0", "epochs": ">=1", "batch_size": ">=1", "weight_decay": ">=0"}

    def __init__(
        self,
        lr: float = 0.1,
        epochs: int = 10,
        batch_size: int = 64,
        weight_decay: float | None = None,
        normalize: bool = True,
        seed: int = 0,
        logit_adjust: float | str | None = None,
        calibrate: bool = False,
    ) -> None:
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.normalize = normalize
        self.seed = seed
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    @property
    def trains_on_val(self) -> bool:
        """True once fit with val rows (CLIP_benchmark refits on train+val)."""
        return bool(getattr(self, "merged_val_", False))

    def _train(self, X: np.ndarray, y: np.ndarray, n_out: int, wd: float
               ) -> tuple[np.ndarray, np.ndarray]:
        """One probe: AdamW + per-step cosine, seeded; (W, b). torch's global RNG is kept."""
        import torch
        import torch.nn.functional as F

        Xt, yt = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            probe = torch.nn.Linear(X.shape[1], n_out)
            order_rng = torch.Generator().manual_seed(self.seed)
            opt = torch.optim.AdamW(probe.parameters(), lr=self.lr, weight_decay=wd)
            per_epoch = -(-len(X) // self.batch_size)
            total = self.epochs * per_epoch
            for epoch in range(self.epochs):
                order = torch.randperm(len(X), generator=order_rng)
                for i in range(per_epoch):
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(self.lr, epoch * per_epoch + i, total)
                    idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                    opt.zero_grad()
                    F.cross_entropy(probe(Xt[idx]), yt[idx]).backward()
                    opt.step()
        return probe.weight.detach().numpy().copy(), probe.bias.detach().numpy().copy()

    def _sweep(self, X: np.ndarray, y: np.ndarray, n_out: int, data: FitData,
               seen: np.ndarray) -> float:
        """CLIP_benchmark's weight-decay search on val top-1 accuracy; the chosen value."""
        assert data.X_val is not None and data.y_val is not None
        X_val = self._features(data.X_val)
        acc: dict[int, float] = {}

        def score(i: int) -> float:
            if i not in acc:  # a probe is deterministic given (rows, seed, wd): fit once
                W, b = self._train(X, y, n_out, WD_GRID[i])
                acc[i] = float((seen[(X_val @ W.T + b).argmax(1)] == data.y_val).mean())
                _progress.report("clip-benchmark-lp wd sweep", len(acc),
                                 len(COARSE) + 2 * len(SPANS),
                                 f"wd={WD_GRID[i]:.3g} val acc {acc[i]:.3f}")
            return acc[i]

        def peak(candidates: list[int], start: int) -> int:
            best, best_acc = start, 0.0
            for i in candidates:
                if score(i) > best_acc:
                    best, best_acc = i, acc[i]
            return best

        top = peak(list(COARSE), 0)
        for span in SPANS:
            top = peak([max(top - span, 0), top, min(top + span, len(WD_GRID) - 1)], 0)
        self.sweep_ = {WD_GRID[i]: a for i, a in sorted(acc.items())}
        return WD_GRID[top]

    def _fit(self, data: FitData) -> None:
        X_train = self._features(data.X)
        seen, y_train = seen_classes(data.y, data.n_classes)
        if self.weight_decay is not None:
            self.weight_decay_ = float(self.weight_decay)
        elif data.has_val:
            self.weight_decay_ = self._sweep(X_train, y_train, len(seen), data, seen)
        else:
            self.weight_decay_ = 0.0
        self.merged_val_ = data.has_val
        X, y_all = fit_rows(data, merge_val=True)
        seen, y = seen_classes(y_all, data.n_classes)
        W, b = self._train(self._features(X), y, len(seen), self.weight_decay_)
        self.coef_, self.intercept_ = full_weights(seen, W, b, data.n_classes)


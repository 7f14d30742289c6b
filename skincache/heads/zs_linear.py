"""A linear probe that starts from the zero-shot classifier, held near it by a fixed anchor.

Few labels, or a rare class, can make a probe initialised at random worse than zero-shot CLIP;
starting from the text prototypes keeps the prior the model already has and lets the labels
correct it. `anchor` adds anchor * ||W - W0||^2 to the loss, a pull back towards the prototypes
W0. Logits are computed like zero-shot ones, logit_scale * normalise(x) @ W^T, plus a learned
per-class bias that can absorb the class prior.

It is neither of the 2024 probes it resembles (both are heads of their own):
- not CLAP (`clap`): CLAP's pull is class-adaptive, each class's strength set from the support
  set (its zero-shot accuracy there), its weights are normalised in the logits and it has no
  bias; here one fixed `anchor` (0 by default) holds every class alike, on unnormalised W.
- not LP++ (`lp++`): LP++ learns a per-class blend alpha_c of the text prototype beside free
  visual weights started at the class centroids, by full-batch block-coordinate steps; here W
  itself starts at the prototypes and moves.
What it keeps of its own: AdamW mini-batches over the cached views, the class-weighted loss
and early stopping on validation balanced accuracy with the zero-shot start scored as epoch 0,
so training that only hurts is undone (CLAP selects nothing on validation; LP++'s code keeps
the epoch of best validation accuracy). With `anchor=0` it is also not CLAP's ZS-LP
(`clap -p constraint=none`): that one has normalised weights, no bias and SGD.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from . import _torch as T
from ._registry import register_head
from .base import FitData, Head, l2_normalize, softmax
from .zeroshot import zeroshot_prototypes


class ScaledLinear(nn.Module):
    """logit_scale * x @ W^T + b, with W initialised at (and remembering) the prototypes W0."""

    def __init__(self, w0: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.weight = nn.Parameter(w0.clone())
        self.bias = nn.Parameter(torch.zeros(w0.shape[0]))
        self.register_buffer("w0", w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * (x @ self.weight.T) + self.bias

    def anchor_penalty(self) -> torch.Tensor:
        return (self.weight - self.w0).pow(2).sum()


@register_head("zs-linear")
class ZSLinearHead(Head):
    """Zero-shot-initialised linear probe on L2-normalised features.

    anchor: weight of ||W - W0||^2 (0: the prototypes are only the starting point).
    epochs/batch_size/lr/weight_decay: AdamW, cosine schedule (small lr: with a logit scale of
    100 a small change of W is a large change of the logits). balance: "loss" by default,
    unlike `linear`: the zero-shot start has no class prior, and an unweighted loss on a
    67%-nv set first learns that prior, which validation balanced accuracy then rejects (the
    head falls back to its zero-shot start). use_views, patience, seed, device: as for
    `linear`; the zero-shot start is scored as epoch 0, so training that only hurts is undone.
    """

    needs_text = True
    _fitted_scalars = ("logit_scale_", "epochs_run_", "best_epoch_", "best_val_score_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"anchor": ">=0", "epochs": ">=1", "batch_size": ">=1", "lr": ">0",
                         "weight_decay": ">=0", "patience": ">=1"}

    def __init__(
        self,
        anchor: float = 0.0,
        epochs: int = 30,
        batch_size: int = 512,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        balance: str | None = "loss",
        use_views: bool = True,
        patience: int | None = 10,
        seed: int = 0,
        device: str = "cpu",
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.anchor = anchor
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.balance = balance
        self.use_views = use_views
        self.patience = patience
        self.seed = seed
        self.device = device
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _fit(self, data: FitData) -> None:
        assert data.text is not None
        dev = T.resolve_device(self.device)
        self.logit_scale_ = float(data.logit_scale)
        w0 = torch.from_numpy(zeroshot_prototypes(data.text))
        n, k, d = data.views.shape
        views = l2_normalize(data.views.reshape(n * k, d)).reshape(n, k, d)
        cfg = T.head_config(self, data, eval_init=True)
        module = ScaledLinear(w0, self.logit_scale_).to(dev)
        anchor = float(self.anchor)
        penalty = (lambda: anchor * module.anchor_penalty()) if anchor > 0 else None
        with T.seeded(self.seed, dev):
            res = T.train(
                module, T.to_tensor(l2_normalize(data.X), dev),
                T.to_tensor(data.y, dev, torch.long), T.to_tensor(views, dev), data.n_classes,
                cfg,
                X_val=T.to_tensor(l2_normalize(data.X_val), dev) if data.has_val else None,
                y_val=data.y_val if data.has_val else None, penalty=penalty,
            )
        self.module_ = module
        self.epochs_run_, self.best_epoch_ = res.epochs_run, res.best_epoch
        self.best_val_score_ = None if np.isnan(res.best_val_score) else res.best_val_score

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        dev = self.module_.weight.device
        return softmax(T.predict_logits(self.module_, l2_normalize(X), dev))

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.module_
        return (m.weight.detach().double().cpu().numpy() * m.logit_scale,
                m.bias.detach().double().cpu().numpy())

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return T.state_to_numpy(self.module_)

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super()._restore({}, scalars)
        state = T.numpy_to_state(arrays)
        module = ScaledLinear(state["w0"], self.logit_scale_)
        module.load_state_dict(state)
        self.module_ = module.to(T.inference_device(self.device)).eval()

"""CLAP (Silva-Rodriguez et al., "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models", CVPR 2024): a zero-shot-initialised linear probe held near the text
prototypes by a class-adaptive penalty whose strength comes from the support set itself.

ZS-LP, the probe: cosine logits logit_scale * norm(x) . norm(w_c), no bias, w_c initialised at
the class's text prototype t_c (the mean of its raw template embeddings, as the authors' code).
CLAP adds to the cross-entropy the penalty

    mean_c lambda_c * ||w_c - t_c||^2,   lambda_c = mean over class-c training rows of the
                                         zero-shot probability of class c

so a class the prompts already recognise is held at its prototype and one they miss is free to
move; no validation set sets the strength (the paper's point: few-shot has none). The
multipliers are fixed at that value (the authors' default constraint "l2"; their optional outer
augmented-Lagrangian updates, "adaptative", are not used for the paper's results and are not
built). `constraint="none"` is ZS-LP itself.

Training as in the authors' config: SGD (momentum 0.9) at lr 0.1, batches of 256, 300 epochs,
one warm-up epoch at lr 1e-5, then a per-epoch cosine schedule; the rows are the clean and all
cached augmented views (they train on 20 augmented copies of the support). Differences: the
cached views are K (2 or 4), not 20; on a large training set the epochs are cut so the fit
takes at most `max_steps` SGD steps (the paper's few-shot supports take a few hundred);
the last epoch is kept (no validation-based selection, as in the paper) and the validation
split only sets the post-hoc logit adjustment and temperature, as for every head.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from skincache.errors import UsageError

from . import _progress
from . import _torch as T
from ._registry import register_head
from .base import FitData, Head, l2_normalize, softmax

CONSTRAINTS = ("l2", "none")
#: the authors' warm-up: one epoch at this constant lr
WARMUP_LR = 1e-5


def clap_prototypes(text: np.ndarray) -> np.ndarray:
    """[C, T, D] raw prompt embeddings -> [C, D]: the mean of the raw templates (CLAP's
    `base_text_features`; not renormalised: the logits normalise, the penalty does not)."""
    return np.asarray(text, np.float32).mean(axis=1)


def clap_multipliers(X: np.ndarray, y: np.ndarray, prototypes: np.ndarray,
                     logit_scale: float, n_classes: int) -> np.ndarray:
    """lambda_c = mean over the rows of class c of the zero-shot softmax probability of class
    c (cosine logits times logit_scale); 1.0 for a class without rows (held at its prototype:
    no label says where else it should go)."""
    logits = logit_scale * (l2_normalize(X) @ l2_normalize(prototypes).T)
    p = softmax(logits)
    counts = np.bincount(y, minlength=n_classes)
    own = np.bincount(y, weights=p[np.arange(len(y)), y], minlength=n_classes)
    lam = np.ones(n_classes)
    lam[counts > 0] = own[counts > 0] / counts[counts > 0]
    return lam


def cosine_lr(epoch: int, epochs: int, lr: float) -> float:
    """The lr of 0-based `epoch`: WARMUP_LR for the first, then cosine from lr over `epochs`
    (dassl's constant warm-up before its cosine scheduler, which counts the warm-up epoch)."""
    if epoch == 0 and epochs > 1:
        return WARMUP_LR
    return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))


@register_head("clap")
class CLAPHead(Head):
    """CLAP: zero-shot-initialised cosine probe with the class-adaptive penalty (module doc).

    constraint: "l2" (CLAP) or "none" (ZS-LP). epochs/batch_size/lr/momentum: SGD as the
    paper (300, 256, 0.1, 0.9). max_steps: a bound on the SGD steps; epochs are cut to fit it
    on large training sets (None: no bound). use_views: train on the clean and every cached
    view of each image (K+1 rows per image). seed, device.
    """

    needs_text = True
    _fitted_arrays = ("weight_", "prototypes_", "multipliers_")
    _fitted_scalars = ("logit_scale_", "epochs_run_", "steps_run_")

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"constraint": "l2|none", "epochs": ">=1", "batch_size": ">=1",
                         "lr": ">0", "momentum": "[0,1)", "max_steps": ">=1"}

    def __init__(
        self,
        constraint: str = "l2",
        epochs: int = 300,
        batch_size: int = 256,
        lr: float = 0.1,
        momentum: float = 0.9,
        max_steps: int | None = 1500,
        use_views: bool = True,
        seed: int = 0,
        device: str = "cpu",
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        self.constraint = constraint
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.max_steps = max_steps
        self.use_views = use_views
        self.seed = seed
        self.device = device
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _fit(self, data: FitData) -> None:
        assert data.text is not None
        if self.constraint not in CONSTRAINTS:
            raise UsageError(f"constraint must be one of {CONSTRAINTS}, got {self.constraint!r}")
        dev = T.resolve_device(self.device)
        self.logit_scale_ = float(data.logit_scale)
        t = clap_prototypes(data.text)
        X, y = l2_normalize(data.X), data.y
        n, k, d = data.views.shape
        if self.use_views and k:
            X = np.concatenate([X, l2_normalize(data.views.reshape(n * k, d))])
            y = np.concatenate([y, np.repeat(y, k)])
        c = data.n_classes
        lam = (clap_multipliers(X, y, t, self.logit_scale_, c) if self.constraint == "l2"
               else np.zeros(c))
        self.prototypes_, self.multipliers_ = t, lam.astype(np.float32)

        rows = len(X)
        steps_per_epoch = math.ceil(rows / self.batch_size)
        epochs = int(self.epochs)
        if self.max_steps is not None:
            epochs = max(1, min(epochs, int(self.max_steps) // steps_per_epoch))
        Xt, yt = T.to_tensor(X, dev), T.to_tensor(y, dev, torch.long)
        t_dev, lam_dev = T.to_tensor(t, dev), T.to_tensor(lam, dev)
        w = T.to_tensor(t, dev).clone().requires_grad_(True)
        buf = torch.zeros_like(w)  # SGD momentum as torch's (no dampening, not Nesterov)
        g = torch.Generator().manual_seed(int(self.seed))
        scale, mom = self.logit_scale_, float(self.momentum)
        penalize = self.constraint == "l2"
        for epoch in range(epochs):
            lr = cosine_lr(epoch, epochs, float(self.lr))
            order = torch.randperm(rows, generator=g).to(dev)
            for start in range(0, rows, self.batch_size):
                idx = order[start:start + self.batch_size]
                logits = scale * (Xt[idx] @ F.normalize(w, dim=1).T)
                loss = F.cross_entropy(logits, yt[idx])
                if penalize:
                    loss = loss + (lam_dev * (w - t_dev).pow(2).sum(1)).mean()
                (grad,) = torch.autograd.grad(loss, w)
                with torch.no_grad():
                    buf.mul_(mom).add_(grad)
                    w.sub_(lr * buf)
            _progress.report("clap epochs", epoch + 1, epochs, "")
        self.epochs_run_, self.steps_run_ = epochs, epochs * steps_per_epoch
        self.weight_ = w.detach().cpu().numpy().astype(np.float32)

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        w = l2_normalize(self.weight_).astype(np.float64) * self.logit_scale_
        return w, np.zeros(len(w))

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        w, b = self._linear_form()
        return softmax(l2_normalize(X) @ w.T + b)

"""Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned by gradient descent.

As in the paper, only the keys are trained (AdamW with eps 1e-4, cosine schedule); the zero-shot
prototypes and the values stay fixed. The paper's cache is a few shots per class; here it is the
whole, imbalanced training set, which forced four changes, each a parameter:
- alpha and beta during training are those the training-free search picked on the validation
  split (the paper's defaults without one); after training they are searched again.
- `mask_self`: an image's own key is left out of its cache logits during training. Otherwise
  the loss is minimised by each image recognising itself (similarity 1), which teaches the keys
  nothing that transfers.
- `normalize_keys`: keys are used (and saved) L2-normalised. With thousands of keys per class,
  a small coherent growth of one class's key norms raises that class's logit for every query;
  on the sphere only the directions can move.
- `balance="loss"`: class-weighted cross-entropy. The cache is class-balanced (see
  `tip_adapter`); an unweighted loss on a 67%-nv training set pulls all keys towards nv, and
  validation balanced accuracy then falls from the first epoch.
Cost: each step multiplies a batch by all N keys, so an epoch draws `samples_per_epoch` images
rather than all of them; the defaults fit 10k x 512 in a few seconds on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _torch as T
from ._registry import register_head
from .base import FitData, l2_normalize
from .tip_adapter import TipAdapterHead, affinity_logits, cache_keys
from .zeroshot import zeroshot_prototypes


class _Keys(nn.Module):
    def __init__(self, keys: np.ndarray) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.from_numpy(keys.copy()))


@register_head("tip-adapter-f")
class TipAdapterFHead(TipAdapterHead):
    """Tip-Adapter with fine-tuned keys.

    alpha, beta, alpha_range, n_alpha, beta_range, n_beta, balance_cache: as for
    `tip-adapter`; alpha and beta are searched on the validation split before and after
    training. epochs, batch_size, lr, weight_decay: AdamW on the keys (the paper's lr 1e-3
    made validation accuracy swing with a 10k-key cache; 5e-4 is steadier).
    samples_per_epoch: images per epoch (None: all). use_views: train on one random cached
    view per image per epoch. mask_self, normalize_keys, balance: see the module doc.
    patience: early stopping on validation balanced accuracy (None: run every epoch). Either
    way the best epoch's keys are kept, counting the training-free start as epoch 0, so
    fine-tuning that only hurts is undone. seed, device.
    """

    _fitted_scalars = TipAdapterHead._fitted_scalars + (
        "init_alpha_", "init_beta_", "epochs_run_", "best_epoch_",
    )

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"alpha": ">=0", "beta": ">0", "alpha_range": ">0", "n_alpha": ">=1",
                         "beta_range": ">0", "n_beta": ">=1", "epochs": ">=1",
                         "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
                         "patience": ">=1", "samples_per_epoch": ">=1"}

    def __init__(
        self,
        alpha: float | None = None,
        beta: float | None = None,
        alpha_range: tuple[float, float] = (1e-3, 1e2),
        n_alpha: int = 16,
        beta_range: tuple[float, float] = (0.5, 100.0),
        n_beta: int = 12,
        balance_cache: bool = True,
        epochs: int = 6,
        batch_size: int = 256,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        samples_per_epoch: int | None = 1024,
        use_views: bool = True,
        mask_self: bool = True,
        normalize_keys: bool = True,
        balance: str | None = "loss",
        patience: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
    ) -> None:
        super().__init__(alpha, beta, alpha_range, n_alpha, beta_range, n_beta, balance_cache)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.samples_per_epoch = samples_per_epoch
        self.use_views = use_views
        self.mask_self = mask_self
        self.normalize_keys = normalize_keys
        self.balance = balance
        self.patience = patience
        self.seed = seed
        self.device = device
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate

    def _final_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(keys, dim=1) if self.normalize_keys else keys

    def _device(self) -> torch.device:
        return T.inference_device(self.device)

    def _fit(self, data: FitData) -> None:
        assert data.text is not None
        dev = T.resolve_device(self.device)
        self.weights_ = zeroshot_prototypes(data.text)
        self.logit_scale_ = float(data.logit_scale)
        self.keys_ = cache_keys(data.X, data.views)
        self.key_labels_ = data.y.copy()
        self._choose_alpha_beta(data)  # the training-free optimum is where training starts
        alpha, beta = self.alpha_, self.beta_
        self.init_alpha_, self.init_beta_ = alpha, beta

        n, k, d = data.views.shape
        X = T.to_tensor(l2_normalize(data.X), dev)
        views = T.to_tensor(l2_normalize(data.views.reshape(n * k, d)).reshape(n, k, d), dev)
        y = T.to_tensor(data.y, dev, torch.long)
        W = T.to_tensor(self.weights_, dev)
        V = self._values(dev)
        scale = self.logit_scale_

        with T.seeded(self.seed, dev):
            module = _Keys(self.keys_).to(dev)

        def forward(xb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            keys = module.keys
            if self.normalize_keys:
                keys = torch.nn.functional.normalize(keys, dim=1)
            e = torch.exp(beta * (xb @ keys.T - 1.0))
            cache = e @ V
            if self.mask_self:  # remove each image's vote for itself
                cache = cache - e.gather(1, idx[:, None]) * V[idx]
            return scale * (xb @ W.T) + alpha * cache

        predict_val = None
        if data.has_val:
            assert data.X_val is not None
            q = T.to_tensor(l2_normalize(data.X_val), dev)
            zs_val = scale * (q @ W.T)

            def predict_val() -> torch.Tensor:
                (cache,) = affinity_logits(q, self._final_keys(module.keys), V, [beta])
                return zs_val + alpha * cache

        cfg = T.head_config(self, data, samples_per_epoch=self.samples_per_epoch,
                            eval_init=True)
        with T.seeded(self.seed, dev):
            res = T.train(
                module, X, y, views, data.n_classes, cfg, y_val=data.y_val if data.has_val
                else None, forward=forward, predict_val=predict_val,
                optimizer_kwargs={"eps": 1e-4},
            )
        with torch.no_grad():
            self.keys_ = self._final_keys(module.keys).cpu().numpy().astype(np.float32)
        self.epochs_run_, self.best_epoch_ = res.epochs_run, res.best_epoch
        self._choose_alpha_beta(data)  # re-search with the tuned keys

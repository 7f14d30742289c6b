"""What `linear` and `mlp` share: preprocessing, the network, fit through the common loop, and
saving the weights as safetensors.

Inputs are L2-normalised (CLIP features live on the sphere) and then standardised per dimension
with the training mean and spread, so that one learning rate suits every backbone whatever the
scale of its embedding. The spread is shrunk toward the average one (`std_shrink`): a dimension
that is nearly constant in training (std 1e-4 where the median is 1e-2 on the Lite1 HAM10000
features) would otherwise be multiplied by 100, and images from another acquisition that move
it a little get huge inputs there (ISIC 2018: max |z| 270, val 71); on synthetic features such a
shift sends every image to one class (tests/test_heads_shift.py, issue 15). With `std_shrink` s
every scale is at least sqrt(s) times the root-mean-square spread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from skincache.errors import UsageError

from . import _torch as T
from .base import FitData, Head, l2_normalize, softmax


def build_mlp(n_in: int, n_out: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    """`depth` hidden layers of width `hidden` (Linear, GELU, Dropout), then a linear output;
    depth 0 is a plain linear classifier."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def check_std_shrink(value: float) -> float:
    """`std_shrink` as a float in [0, 1], else UsageError."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        s = float("nan")
    if not 0.0 <= s <= 1.0:
        raise UsageError(f"std_shrink must be a number in [0, 1], got {value!r}")
    return s


def _normalized_moments(X: np.ndarray, shrink: float = 0.0, rows: int = 65536
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and scale (+1e-6) of the L2-normalised rows, accumulated in
    float64 over row blocks: the same numbers whether X is in memory or streamed. The scale
    is sqrt((1 - shrink) * var_j + shrink * mean(var)): shrink 0 is the plain spread, 1 one
    scale for every dimension (see the module doc)."""
    d = X.shape[1]
    s1, s2 = np.zeros(d), np.zeros(d)
    for i in range(0, len(X), rows):
        b = l2_normalize(X[i:i + rows]).astype(np.float64)
        s1 += b.sum(axis=0)
        s2 += (b * b).sum(axis=0)
    n = max(1, len(X))
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    std = np.sqrt((1.0 - shrink) * var + shrink * var.mean())
    return mean.astype(np.float32), (std + 1e-6).astype(np.float32)


class FeedForwardHead(Head):
    """Base for heads trained by `_torch.train` on standardised features (see module doc)."""

    _fitted_scalars = ("epochs_run_", "best_epoch_", "best_val_score_")

    # Subclasses set these through __init__; linear has depth 0.
    hidden: int = 0
    depth: int = 0
    dropout: float = 0.0
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    balance: str | None
    use_views: bool
    patience: int | None
    seed: int
    device: str
    #: shrinkage of each dimension's spread toward the average one (see the module doc);
    #: subclasses expose it as a parameter
    std_shrink: float = 0.0

    def _build(self, n_in: int, n_out: int) -> nn.Module:
        return build_mlp(n_in, n_out, self.hidden, self.depth, self.dropout)

    def _prep(self, X: np.ndarray) -> np.ndarray:
        return (self._l2(X) - self.mean_) / self.scale_

    #: float16 inputs are kept; batches are gathered and converted when streaming
    _streams = True
    #: bytes of float32 training data held at once before streaming (None/"auto": a quarter
    #: of physical memory); subclasses expose it as the `max_memory` parameter
    max_memory: int | str | None = None

    def _moments(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The standardisation of the image columns (`_normalized_moments`); metadata columns
        (see `Head`) are already on a unit scale and pass as they are (mean 0, scale 1), so
        neither their spread enters the image columns' shrinkage nor a one-hot column never
        seen in training (the unknown one) gets a scale of 1e-6."""
        m = self._n_meta()
        mean, scale = _normalized_moments(X[:, :X.shape[1] - m],
                                          check_std_shrink(self.std_shrink))
        if not m:
            return mean, scale
        return (np.concatenate([mean, np.zeros(m, np.float32)]),
                np.concatenate([scale, np.ones(m, np.float32)]))

    def _streaming(self, data: FitData) -> bool:
        n, k, d = data.views.shape
        # in memory: the preprocessed rows and views as float32, twice (numpy, then tensor)
        need = 2 * 4 * d * (n * (1 + (k if self.use_views else 0)))
        self.streamed_ = need > T.memory_budget(self.max_memory)
        return self.streamed_

    def _fit(self, data: FitData) -> None:
        dev = T.resolve_device(self.device)
        self.mean_, self.scale_ = self._moments(data.X)
        n, k, d = data.views.shape
        if self._streaming(data):
            self._fit_streamed(data, dev)
            return
        views = self._prep(data.views.reshape(n * k, d)).reshape(n, k, d)
        cfg = T.head_config(self, data)
        with T.seeded(self.seed, dev):
            module = self._build(d, data.n_classes).to(dev)
            res = T.train(
                module, T.to_tensor(self._prep(data.X), dev),
                T.to_tensor(data.y, dev, torch.long), T.to_tensor(views, dev), data.n_classes,
                cfg,
                X_val=T.to_tensor(self._prep(data.X_val), dev) if data.has_val else None,
                y_val=data.y_val if data.has_val else None,
            )
        self._finish(module, res)

    def _fit_streamed(self, data: FitData, dev: torch.device) -> None:
        """The same loop over batches gathered from the (float16) arrays: memory is the
        inputs as given plus one batch, and the weights equal the in-memory fit's."""
        n, k, d = data.views.shape
        rows = T.RowSource(data.X, data.views, self._prep, dev)
        with T.seeded(self.seed, dev):
            module = self._build(d, data.n_classes).to(dev)

            def predict_val() -> torch.Tensor:
                return torch.from_numpy(self._logits(module, data.X_val, dev))

            res = T.train(
                module, rows, T.to_tensor(data.y, dev, torch.long), torch.empty(0),
                data.n_classes, T.head_config(self, data),
                y_val=data.y_val if data.has_val else None,
                predict_val=predict_val if data.has_val else None,
            )
        self._finish(module, res)

    def _logits(self, module: nn.Module, X: np.ndarray, dev: torch.device,
                rows: int = 65536) -> np.ndarray:
        """Logits in row blocks, preprocessing each block (no float32 copy of X)."""
        parts = [T.predict_logits(module, self._prep(X[i:i + rows]), dev)
                 for i in range(0, len(X), rows)]
        return (np.concatenate(parts) if parts else
                np.zeros((0, self.n_classes_), dtype=np.float32))

    def _finish(self, module: nn.Module, res: T.TrainResult) -> None:
        self.module_ = module
        self.epochs_run_ = res.epochs_run
        self.best_epoch_ = res.best_epoch
        self.best_val_score_ = None if np.isnan(res.best_val_score) else res.best_val_score
        self.val_scores_ = res.val_scores

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        dev = next(self.module_.parameters()).device
        return softmax(self._logits(self.module_, X, dev))

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Depth 0 (`linear`, or `mlp` with depth=0) is linear: the standardisation folds into
        W and b. Deeper networks are not (None)."""
        module = self.module_
        if not (isinstance(module, nn.Sequential) and len(module) == 1
                and isinstance(module[0], nn.Linear)):
            return None
        wl = module[0].weight.detach().double().cpu().numpy()
        bl = module[0].bias.detach().double().cpu().numpy()
        mean = np.asarray(self.mean_, np.float64)
        scale = np.asarray(self.scale_, np.float64)
        return wl / scale[None, :], bl - (mean / scale) @ wl.T

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_, **T.state_to_numpy(self.module_)}

    def _restore(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        super()._restore({k: arrays[k] for k in ("mean_", "scale_")}, scalars)
        module = self._build(self.n_features_in_, self.n_classes_)
        module.load_state_dict(T.numpy_to_state(arrays))
        self.module_ = module.to(T.inference_device(self.device)).eval()

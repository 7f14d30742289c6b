"""Zero-shot classification from the cache's prompt embeddings: no training at all.

The prototypes follow open_clip's `build_zero_shot_classifier` exactly: each template embedding
is L2-normalised, the templates of a class are averaged, and the mean is normalised again. (Its
weights are [D, C]; ours are stored as [C, D], the transpose.) Logits are the model's logit
scale times the cosine similarity, so probabilities are CLIP's own.
"""

from __future__ import annotations

import numpy as np

from ._registry import register_head
from .base import FitData, Head, l2_normalize, softmax


def zeroshot_prototypes(text: np.ndarray) -> np.ndarray:
    """[C, T, D] prompt embeddings -> [C, D] unit class prototypes (mean of normalised
    templates, renormalised: the ensemble order of CLIP's prompt-ensembling)."""
    text = np.asarray(text, dtype=np.float32)
    if text.ndim == 2:
        text = text[:, None, :]
    return l2_normalize(l2_normalize(text, axis=-1).mean(axis=1), axis=-1)


def zeroshot_logits(X: np.ndarray, weights: np.ndarray, logit_scale: float) -> np.ndarray:
    """logit_scale * cos(X, prototypes): [N, C] float32."""
    return np.float32(logit_scale) * (l2_normalize(X) @ weights.T)


@register_head("zeroshot")
class ZeroShotHead(Head):
    """CLIP zero-shot: the class whose prompt prototype is closest to the image wins. X and y
    passed to `fit` only fix the feature dimension and class count; nothing is learned."""

    needs_text = True
    _fitted_arrays = ("weights_",)
    _fitted_scalars = ("logit_scale_",)

    def __init__(self, logit_adjust: float | str | None = None, calibrate: bool = True
                 ) -> None:
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate
        pass

    def _fit(self, data: FitData) -> None:
        assert data.text is not None
        self.weights_ = zeroshot_prototypes(data.text)
        self.logit_scale_ = float(data.logit_scale)

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(zeroshot_logits(X, self.weights_, self.logit_scale_))

    def _linear_form(self) -> tuple[np.ndarray, np.ndarray]:
        return self.weights_ * self.logit_scale_, np.zeros(self.n_classes_)

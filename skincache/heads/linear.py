"""A linear classifier trained with AdamW on cached (augmented) features: the fast,
augmentation-aware counterpart of the lbfgs `logreg` probe."""

from __future__ import annotations

from ._feedforward import FeedForwardHead
from ._registry import register_head


@register_head("linear")
class LinearHead(FeedForwardHead):
    """Softmax regression on standardised, L2-normalised features.

    std_shrink: how far each dimension's spread is pulled toward the average one before
    standardising (0: plain per-dimension standardisation; 1: one scale for all). 0.5 keeps a
    dimension that is nearly constant in training from dominating on images of another
    acquisition (issue 15; chosen on HAM10000 val, where it costs nothing).
    epochs/batch_size/lr/weight_decay: AdamW with a cosine schedule to zero (batch_size is an
    upper bound: a small training set gets smaller batches, at least 10 steps per epoch).
    balance: None, "loss" (class-weighted cross-entropy, the default) or "sampler"
    (class-balanced draws). "loss" rather than None: trained on the 67%-nv prior and corrected
    only afterwards by the logit adjustment, the head stopped after 2-3 epochs with rare-class
    logits that an acquisition shift flipped (ISIC 2018: `vasc` for 35% of the images, 2.3%
    true); on HAM10000 val "loss" is better too (0.539 vs 0.515 balanced accuracy).
    use_views: draw one of the clean + K cached views per image per epoch (clean when K=0).
    patience: epochs without a better validation balanced accuracy before stopping (None: run
    all epochs); the best epoch's weights are kept. Without validation data all epochs run.
    seed: the same seed gives identical weights. device: "cpu", "cuda" or "auto".
    max_memory: MiB (a number) or "512M" / "8G" of float32 training data to hold at once;
    above it (None/"auto": a quarter of physical memory) batches are gathered from the float16
    cache arrays instead: the same weights, a fraction of the memory.
    metadata: patient fields appended to the standardised features, e.g.
    "age,sex,localization" (`skincache.metadata`); None: image features only.
    """

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"epochs": ">=1", "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
                         "patience": ">=1", "std_shrink": "[0,1]",
                         "metadata": "metadata-fields"}

    def __init__(
        self,
        epochs: int = 30,
        batch_size: int = 1024,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        balance: str | None = "loss",
        use_views: bool = True,
        patience: int | None = 10,
        seed: int = 0,
        device: str = "cpu",
        max_memory: int | str | None = None,
        logit_adjust: float | str | None = "auto",
        calibrate: bool = True,
        std_shrink: float = 0.5,
        metadata: str | None = None,
    ) -> None:
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.balance = balance
        self.use_views = use_views
        self.patience = patience
        self.seed = seed
        self.device = device
        self.max_memory = max_memory
        self.logit_adjust = logit_adjust
        self.calibrate = calibrate
        self.std_shrink = std_shrink
        self.metadata = metadata

"""A small MLP on cached (augmented) features: a little non-linearity on top of a frozen
backbone, trained in seconds because the images never pass through the tower again."""

from __future__ import annotations

from ._feedforward import FeedForwardHead
from ._registry import register_head


@register_head("mlp")
class MLPHead(FeedForwardHead):
    """`depth` hidden layers of width `hidden` (GELU, dropout) and a linear output.

    Defaults are sized for speed on a CPU (10k x 512 in about a second): hidden 128, and no
    dropout, because on a CPU the dropout masks cost a quarter of the fit and the random cached
    views already regularise. Raise `hidden` / set `dropout` when a GPU or time allows.

    Training parameters as for `linear`: epochs/batch_size/lr/weight_decay (AdamW, cosine),
    balance (None | "loss" | "sampler"), use_views (one of the clean + K cached views per image
    per epoch),
    patience (early stopping on validation balanced accuracy, best weights restored), seed,
    device ("cpu" | "cuda" | "auto"), max_memory, std_shrink (as for `linear`; 0.5: on the
    Lite1 HAM10000 val split 0.601 vs 0.594 with plain standardisation), metadata (patient
    fields appended to the standardised features, e.g. "age,sex,localization"; see
    `skincache.metadata`).
    """

    #: the values each parameter accepts (skincache/_head_params.py's grammar, checked
    #: by `-p` before torch loads and by `fit`)
    param_constraints = {"hidden": ">=1", "depth": ">=0", "dropout": "[0,1)", "epochs": ">=1",
                         "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
                         "patience": ">=1", "std_shrink": "[0,1]",
                         "metadata": "metadata-fields"}

    def __init__(
        self,
        hidden: int = 128,
        depth: int = 1,
        dropout: float = 0.0,
        epochs: int = 20,
        batch_size: int = 512,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        balance: str | None = None,
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
        self.hidden = hidden
        self.depth = depth
        self.dropout = dropout
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

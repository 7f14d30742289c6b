"""`skincache finetune`: the reference paper's Table 1 setups with the image tower unfrozen.

    cfg = FinetuneConfig.from_setup("augmented", data="../data/HAM10000", device="cuda")
    result = run_finetune(cfg)            # runs/finetune-augmented-<time>/
    result.metrics["test"]["balanced_accuracy"]

The setups (Table 1): AdamW, lr 5e-5 with a cosine schedule after a linear warm-up, batch 16,
20 epochs; `base` trains on the model's eval preprocessing without weight decay,
`regularization` adds weight decay 0.01, `augmented` trains on Resize 256 / RandomCrop 224 /
HorizontalFlip 0.5 crops (scaled to the model's input size). Every value can be overridden.

The model is the open_clip image tower plus a linear head on L2-normalised features times the
model's logit scale, initialised from the zero-shot class prototypes (so training starts from
zero-shot CLIP exactly), from a head fit earlier by `fit-head` (any head with a
`linear_form()`), or at random. Each image is decoded once; checkpoints are atomic and load
with `weights_only=True`; `resume` continues a killed run to the same result; under
`torchrun` it trains with DDP.

The package, bottom to top (each module imports only those before it):
`config` (setups, FinetuneConfig, FinetuneResult) · `state` (checkpoints, DistContext, RNG) ·
`images` (decode-once image store, per-epoch crops) · `model` (classifier, head init,
optimiser groups, schedule, WiSE-FT) · `report` (run.json, metrics, plots; a finished run read
back) · `loop` (builders that return values, then FinetuneRun: the epoch loop over a
`state.TrainState`) · `run` (`run_finetune`: entry, resume, torchrun).
This module is the public API: the names below.
"""

from skincache.finetune.config import RESUME_MUTABLE, SETUPS, FinetuneConfig, FinetuneResult
from skincache.finetune.model import ClipClassifier, random_head, zeroshot_head
from skincache.finetune.run import finetune_from_cli, run_finetune
from skincache.finetune.state import load_checkpoint, save_checkpoint

__all__ = ["RESUME_MUTABLE", "SETUPS", "ClipClassifier", "FinetuneConfig", "FinetuneResult",
           "finetune_from_cli", "load_checkpoint", "random_head", "run_finetune", "save_checkpoint",
           "zeroshot_head"]

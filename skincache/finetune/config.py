"""What a fine-tuning run is: the Table 1 setups, `FinetuneConfig` (every option, checked) and
`FinetuneResult` (what a run produced). Imports nothing from `skincache.finetune`: every other
module of the package may import this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skincache.defaults import RUNS_DIR, SPLIT_RATIOS
from skincache.device import PRECISIONS
from skincache.errors import UsageError
from skincache.prompts import TEMPLATE_SETS

#: Table 1 of the reference paper: what each setup changes from `base` (the defaults).
SETUPS: dict[str, dict[str, Any]] = {
    "base": {"weight_decay": 0.0, "augment": False},
    "regularization": {"weight_decay": 0.01, "augment": False},
    "augmented": {"weight_decay": 0.0, "augment": True},
}

#: Options a resumed run may change: where and how fast it runs, never what it computes.
RESUME_MUTABLE = ("device", "workers", "eval_batch_size", "image_store", "resume")

_STORES = ("auto", "memory", "stream")

#: `skincache finetune` parameters named otherwise than the field they set (`--templates` sets
#: `template_set`; `--no-plots` sets `plots` to False). Every other field is set by the CLI
#: parameter of its own name (`--head-lr` for `head_lr`).
CLI_NAMES = {"template_set": "templates", "n_bootstrap": "bootstrap", "plots": "no_plots"}
#: Fields without a `skincache finetune` flag: set from Python (benchmarks, notebooks) only.
NO_CLI_FLAG = frozenset({"augment", "eval_batch_size", "aug_resize", "aug_crop", "aug_hflip",
                         "deterministic"})
#: `skincache finetune` parameters that are no field (how the command prints, not what runs).
CLI_ONLY = frozenset({"quiet"})


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; each field is one `skincache finetune` option
    (`--head-lr` for `head_lr`, ...). `weight_decay` and `augment` left as None take the
    setup's value, so `FinetuneConfig(setup="augmented", lr=1e-5)` is the augmented setup at
    another learning rate. Recorded in full in `run.json`."""

    data: str = ""
    test_data: str | None = None  # a second source used whole as the test split (ISIC 2018)
    model: str = "ViT-B-32"
    pretrained: str | None = "openai"
    checkpoint: str | None = None
    setup: str = "base"
    epochs: int = 20
    batch_size: int = 16  # global: split over the processes of a torchrun job
    lr: float = 5e-5  # image tower (the top layer when layer_decay < 1)
    head_lr: float | None = None  # None: same as lr
    weight_decay: float | None = None  # None: the setup's (0, or 0.01 for regularization)
    warmup_ratio: float = 0.05  # share of all steps spent warming up linearly
    schedule: str = "cosine"  # "cosine" (to 0 after warm-up) or "constant"
    augment: bool | None = None  # None: the setup's (True for augmented)
    aug_resize: int = 256  # the augmentation, for a 224-pixel model (scaled to the model)
    aug_crop: int = 224
    aug_hflip: float = 0.5
    layer_decay: float = 1.0  # layer-wise lr decay; 1.0 = off
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    label_smoothing: float = 0.0
    balance: str | None = None  # None or "loss": class-weighted cross-entropy
    head_init: str = "zeroshot"  # "zeroshot", "random", or a fit-head run folder
    template_set: str = "all"  # prompts of the zero-shot head: a set, or "all" (fit-head's)
    wise: float | None = None  # WiSE-FT alpha for the final model (0 = initial, 1 = fine-tuned)
    wise_sweep: bool = False  # evaluate alpha 0, 0.1, ..., 1 on val (picks alpha if wise=None)
    patience: int | None = None  # early stopping on val balanced accuracy; None = off
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms where the backend has them
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast on CUDA, fp32 elsewhere
    split_ratios: tuple[float, ...] = SPLIT_RATIOS  # for sources without a split
    split_seed: int = 0
    limit: int | None = None  # quick trial: about this many images (seeded by split_seed)
    runs_dir: str = RUNS_DIR
    name: str | None = None  # default finetune-<setup>-<timestamp>
    resume: str | None = None  # a run folder: continue it from its last.pt
    workers: int | None = None  # decode processes per training process; None = cores/procs
    eval_batch_size: int | None = None  # None: 256 on CUDA, 64 elsewhere
    image_store: str = "auto"  # "memory" (decode once), "stream", or "auto" (memory if it fits)
    n_bootstrap: int = 1000  # bootstrap resamples for the final metrics' CIs
    plots: bool = True

    def __post_init__(self) -> None:
        if self.setup not in SETUPS:
            raise UsageError(f"unknown setup {self.setup!r}; choose one of {', '.join(SETUPS)}")
        preset = SETUPS[self.setup]
        if self.weight_decay is None:
            self.weight_decay = float(preset["weight_decay"])
        if self.augment is None:
            self.augment = bool(preset["augment"])
        if self.pretrained == "":
            self.pretrained = None
        self.split_ratios = tuple(float(r) for r in self.split_ratios)
        self._check()

    def _check(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(f"finetune: {msg}")

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        need(self.lr >= 0 and (self.head_lr is None or self.head_lr >= 0),
             "learning rates must be >= 0")
        need(self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got "
             f"{self.warmup_ratio}")
        need(self.schedule in ("cosine", "constant"), "schedule must be cosine or constant")
        need(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None")
        need(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        need(self.balance in (None, "loss"), f"balance must be None or 'loss', got "
             f"{self.balance!r}")
        need(self.template_set == "all" or self.template_set in TEMPLATE_SETS,
             f"template_set must be 'all' or one of {sorted(TEMPLATE_SETS)}")
        need(self.wise is None or 0.0 <= self.wise <= 1.0, f"wise alpha must be in [0, 1], got "
             f"{self.wise}")
        need(self.patience is None or self.patience >= 1, "patience must be >= 1 or None")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}")
        need(self.image_store in _STORES, f"image_store must be one of {_STORES}")
        need(self.aug_resize >= self.aug_crop >= 1, "aug_resize must be >= aug_crop >= 1")
        need(0 <= self.aug_hflip <= 1, "aug_hflip must be in [0, 1]")
        need(self.n_bootstrap >= 0, "n_bootstrap must be >= 0")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1,
             "eval_batch_size must be >= 1")
        need(bool(self.data) or bool(self.resume), "give the data (or a run to resume)")
        need(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")

    @classmethod
    def from_setup(cls, setup: str, **overrides: Any) -> FinetuneConfig:
        """A named setup (base, regularization, augmented) with any field overridden. None for
        a field that cannot be None (epochs, lr, ...) means "the default", so a CLI can pass
        every option through unchanged; `pretrained=None` still means random init."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        keep = {k: v for k, v in overrides.items()
                if v is not None or defaults.get(k) is None or k == "pretrained"}
        return cls(setup=setup, **keep)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["split_ratios"] = list(self.split_ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def effective_head_lr(self) -> float:
        return self.lr if self.head_lr is None else self.head_lr


def cli_mismatch(fields: Iterable[str], params: Iterable[str]) -> list[str]:
    """What keeps the config's `fields` and the CLI's `params` from matching one to one
    (through CLI_NAMES, NO_CLI_FLAG and CLI_ONLY); empty when they agree. The option lists
    are declared once, in the dataclass: a field added without a flag (or a flag without a
    field, or a stale entry in these tables) is named here, and `config_from_cli` refuses."""
    fields, params = set(fields), set(params)
    wanted = {CLI_NAMES.get(f, f) for f in fields - NO_CLI_FLAG} | CLI_ONLY
    out = [f"field {f!r} has no CLI parameter {CLI_NAMES.get(f, f)!r} (add the option, or "
           "list the field in NO_CLI_FLAG)" for f in sorted(fields - NO_CLI_FLAG)
           if CLI_NAMES.get(f, f) not in params]
    out += [f"CLI parameter {p!r} sets no field (add the field, map it in CLI_NAMES, or list "
            "it in CLI_ONLY)" for p in sorted(params - wanted)]
    out += [f"{t} lists {n!r}, which is no field" for t, names in
            (("NO_CLI_FLAG", NO_CLI_FLAG), ("CLI_NAMES", set(CLI_NAMES))) for n in sorted(names)
            if n not in fields]
    return out


def config_from_cli(params: dict[str, Any]) -> FinetuneConfig:
    """The config of `skincache finetune`'s parsed parameters (by name, as click hands them
    over: paths already made strings where a field is a string): each field from its
    parameter, None meaning the setup's default (`FinetuneConfig.from_setup`)."""
    names = [f.name for f in dataclasses.fields(FinetuneConfig)]
    problems = cli_mismatch(names, params)
    if problems:  # a programming error, caught by the test suite before any user sees it
        raise RuntimeError("finetune options out of step: " + "; ".join(problems))
    kw = {f: params[CLI_NAMES.get(f, f)] for f in names if f not in NO_CLI_FLAG}
    kw["plots"] = not kw["plots"]  # the flag is --no-plots
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}
    return FinetuneConfig.from_setup(kw.pop("setup"), **kw)


@dataclass
class FinetuneResult:
    """What a run produced. On ranks other than 0 of a torchrun job only `run_dir`, `rank`
    and `world_size` are meaningful (`is_main` is False): print nothing there."""

    run_dir: Path
    config: FinetuneConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    init_val: dict[str, float] | None = None  # the initial (zero-shot) model on val
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> report
    best_epoch: int | None = None
    best_val_balanced_accuracy: float | None = None
    wise_alpha: float | None = None  # the alpha of the final model, if WiSE-FT was applied
    wise_curve: list[dict[str, float]] | None = None  # one row per alpha, on val
    failed: list[dict[str, str]] = field(default_factory=list)
    stopped_early: bool = False
    resumed: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

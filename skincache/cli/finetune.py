"""The fine-tune command: the image tower trained end to end (resumable, DDP under torchrun).
Its options are checked against `FinetuneConfig` (`finetune.config.cli_mismatch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file, set_interrupt_hint
from skincache.cli._common import (
    PRETRAINED_HELP,
    Limit,
    Quiet,
    RunsDir,
    check_min,
    ratios,
    warn_meaningless,
)
from skincache.defaults import RUNS_DIR, SETUP_NAMES
from skincache.device import PRECISIONS
from skincache.errors import UsageError


def finetune(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Dataset (as for encode); not needed with "
                                                  "--resume.")] = None,
    setup: Annotated[str, typer.Option(help="base, regularization or augmented (the reference "
                                            "paper's Table 1).")] = "base",
    model: Annotated[str, typer.Option(help="open_clip architecture, hf-hub: id or derm short "
                                            "name (`skincache models [--derm]` lists them)."
                                       )] = "ViT-B-32",
    pretrained: Annotated[str | None, typer.Option(help=PRETRAINED_HELP)] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights to start from.")] = None,
    test_data: Annotated[str | None, typer.Option(help="A second source used whole as the "
                                                       "test split.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (setup: 20).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (setup: 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Backbone learning rate (setup: 5e-5).")] = None,
    head_lr: Annotated[float | None, typer.Option(help="Head learning rate (default: --lr)."
                                                  )] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (setup: 0, "
                                                             "regularization 0.01).")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Share of steps warming up.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine or constant.")] = None,
    layer_decay: Annotated[float | None, typer.Option(help="Layer-wise lr decay (1 = off)."
                                                      )] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing.")] = None,
    balance: Annotated[str | None, typer.Option(help="'loss' for class-weighted "
                                                     "cross-entropy.")] = None,
    head_init: Annotated[str | None, typer.Option(help="zeroshot, random, or a fit-head run "
                                                       "folder.")] = None,
    templates: Annotated[str | None, typer.Option(help="Prompt set of the zero-shot head, or "
                                                       "'all'.")] = None,
    wise: Annotated[float | None, typer.Option(help="WiSE-FT alpha for the final model.")] = None,
    wise_sweep: Annotated[bool, typer.Option(help="Evaluate WiSE-FT alpha 0..1 on val.")] = False,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience (epochs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, mps or auto.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on cuda), fp32, bf16.")] = None,
    split_ratios: Annotated[str | None, typer.Option(help="As for encode.")] = None,
    split_seed: Annotated[int | None, typer.Option(help="As for encode.")] = None,
    runs_dir: RunsDir = Path(RUNS_DIR),
    name: Annotated[str | None, typer.Option(help="Run name (default: finetune-<setup>-<time>)."
                                             )] = None,
    resume: Annotated[Path | None, typer.Option(help="A run folder to continue from its last "
                                                     "saved epoch.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode processes.")] = None,
    image_store: Annotated[str | None, typer.Option(help="auto, memory or stream.")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the CIs.")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    limit: Limit = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune the image tower (backbone unfrozen); resumable, DDP under torchrun."""
    from skincache._options import check_choice, check_device, check_model

    if data is None and resume is None:
        raise UsageError("give --data (or --resume a run)")
    check_choice("--setup", setup, SETUP_NAMES)
    check_device(device)
    check_model(model)
    check_file("--checkpoint", checkpoint)
    check_choice("--precision", precision, PRECISIONS)
    check_min("--limit", limit, 1)
    if resume is not None and not (resume / "run.json").is_file():
        raise UsageError(f"--resume {resume}: not a run folder (no run.json there)")
    set_interrupt_hint("nothing was saved yet: run the same command again")
    # torch and open_clip load from here on: every cheap check is done
    from skincache.finetune import finetune_from_cli

    # every other option passes through by name (checked against FinetuneConfig)
    result = finetune_from_cli({**ctx.params, "data": data or "",
                                "split_ratios": ratios(split_ratios) if split_ratios else None},
                               progress=not quiet, on_resumable=_resume_hint)
    if result.is_main:
        _render.finetune_result(result)
        c = result.config
        warn_meaningless({"model": c.model, "pretrained": c.pretrained,
                          "checkpoint": c.checkpoint}, result.metrics, "the fine-tuned model",
                         "try more --epochs, another --lr or --balance loss")


def _resume_hint(run_dir: Path | None) -> None:
    """The Ctrl-C hint once the run folder can be resumed (None: the run is finished)."""
    set_interrupt_hint(f"continue with `skincache finetune --resume {run_dir}` (from its last "
                       "finished epoch)" if run_dir else "")

"""The entry point: `run_finetune` (a new run, a resumed one, or a finished one read back), the
process group under torchrun, and the run-wide torch settings (determinism, threads)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from skincache.defaults import is_rank0
from skincache.errors import NotFoundError, UsageError
from skincache.finetune.config import (
    RESUME_MUTABLE,
    FinetuneConfig,
    FinetuneResult,
    config_from_cli,
)
from skincache.run_record import read_run


def finetune_from_cli(params: dict[str, Any], *, progress: bool = True,
                      on_resumable: Callable[[Path | None], None] | None = None
                      ) -> FinetuneResult:
    """`skincache finetune`: its parsed options (by name, as `config_from_cli` reads them) to
    a finished run. The open_clip pretrained tag is resolved as for encode (openai where the
    model has it); a resumed run keeps its own. `on_resumable` as for `run_finetune`."""
    from skincache.models import resolve_pretrained

    ckpt = str(params["checkpoint"]) if params.get("checkpoint") else None
    pretrained = (None if params.get("resume")
                  else resolve_pretrained(params["model"], params.get("pretrained"), ckpt))
    return run_finetune(config_from_cli({**params, "pretrained": pretrained}),
                        progress=progress, on_resumable=on_resumable)


def run_finetune(config: FinetuneConfig, *, progress: bool = True,
                 log: Callable[[str], None] | None = None,
                 on_resumable: Callable[[Path | None], None] | None = None) -> FinetuneResult:
    """Fine-tune, evaluate and write `runs/<name>/` (see the package doc and the README).

    Under torchrun (WORLD_SIZE > 1 in the environment) every process calls this; they join one
    process group and only rank 0 writes. A finished run given to `resume` is read back, not
    trained again. `log` receives rank 0's one-line notes (each epoch, skipped images, a
    resume); by default they go to the console when `progress` is on. `on_resumable(run_dir)`
    is called on rank 0 once a stop would leave `run_dir` resumable (`--resume`), and with None
    once the run is finished: the CLI's Ctrl-C hint, which the library does not set."""
    from skincache.device import resolve_device
    from skincache.finetune.loop import FinetuneRun
    from skincache.finetune.report import finished_result
    from skincache.finetune.state import DistContext

    cfg = _resolve_resume(config)
    if cfg.resume and _status(Path(cfg.resume)) == "complete":
        return finished_result(Path(cfg.resume), cfg)
    if is_rank0():  # only rank 0 writes; before any data loads
        from skincache._disk import check_writable_dir

        check_writable_dir(Path(cfg.runs_dir), "--runs-dir")
    device = resolve_device(cfg.device)
    ctx = DistContext.from_env(device)
    try:
        with _runtime(cfg, ctx.device, ctx.local_world):
            show = progress and ctx.main
            if log is None and show:
                from skincache._progress import console

                def log(line: str) -> None:  # plain text: a path may hold "[...]"
                    console.print(line, markup=False, highlight=False)
            return FinetuneRun(cfg, ctx, progress=show, log=log if ctx.main else None,
                               on_resumable=on_resumable).run()
    finally:
        ctx.close()


def _status(run_dir: Path) -> str | None:
    meta = run_dir / "run.json"
    return read_run(meta).status if meta.is_file() else None


def _resolve_resume(config: FinetuneConfig) -> FinetuneConfig:
    """With `resume`, the run's own saved config, except where and how fast it runs: a
    different learning rate or epoch count would not continue the same run."""
    if not config.resume:
        return config
    meta_path = Path(config.resume) / "run.json"
    if not meta_path.is_file():
        raise NotFoundError(f"--resume {config.resume}: no run.json there (not a run folder)")
    meta = read_run(meta_path)
    if meta.kind != "finetune":
        raise UsageError(f"{meta_path}: kind is {meta.kind!r}, not a fine-tuning run")
    saved = FinetuneConfig.from_dict(meta.extra["config"])
    keep = {k: getattr(config, k) for k in RESUME_MUTABLE}
    return dataclasses.replace(saved, **keep)


@contextlib.contextmanager
def _runtime(cfg: FinetuneConfig, device: torch.device, local_world: int):
    """Determinism and CPU threads for the run only, restored afterwards (a library call
    should not leave the process in another mode)."""
    import torch.backends.cudnn as cudnn

    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
            cudnn.benchmark, torch.get_num_threads())
    if cfg.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = cfg.deterministic, not cfg.deterministic
    if device.type == "cpu" and local_world > 1:  # processes of one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        cudnn.deterministic, cudnn.benchmark = prev[2], prev[3]
        torch.set_num_threads(prev[4])

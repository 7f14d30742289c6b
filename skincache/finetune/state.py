"""Fine-tuning state that outlives a process: checkpoints, JSON files, and the DDP context.

Checkpoints are plain `torch.save` dicts of tensors, numbers, strings, lists and dicts, so
`torch.load(..., weights_only=True)` reads them (nothing is unpickled); RNG states are stored as
the uint8 tensors torch returns. Every file is written to a temporary name, flushed to disk and
renamed, so a reader (or a run killed while saving) sees the old file or the new one, never half.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from skincache._io import atomic_write
from skincache.errors import InputFileError, NotFoundError, SkincacheError

CHECKPOINT_FORMAT = "skincache.finetune"
CHECKPOINT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Atomically write `payload` to `path` (tmp + fsync + os.replace).

    Called for `best.pt` and `last.pt`; the SIGKILL resume test wraps this function."""
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True` (refuses anything that needs unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no checkpoint here")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty (EOFError, shown by click as a bare "Aborted."), pickle, junk
        from skincache.models import checkpoint_problem

        raise InputFileError(f"{path}: cannot read this checkpoint: "
                             f"{checkpoint_problem(path, e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputFileError(f"{path}: not a skincache fine-tuning checkpoint")
    absent = [k for k in ("state_dict", "head") if not isinstance(ckpt.get(k), dict)]
    if absent:
        raise InputFileError(f"{path}: damaged checkpoint (no {absent[0]!r} weights)")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise InputFileError(f"{path}: checkpoint format {version!r} is not one this skincache "
                             f"reads ({CHECKPOINT_VERSION}); upgrade skincache")
    return ckpt


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a state dict (what checkpoints and WiSE-FT keep)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------- DDP


@dataclass
class DistContext:
    """Where this process sits in a `torchrun` job (world 1 without one).

    Only rank 0 ("main") logs, evaluates and writes files; the others train their shard."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> DistContext:
        """Read torchrun's variables; with WORLD_SIZE > 1 join the process group (nccl on CUDA,
        gloo on the CPU) and pin this process to its GPU (cuda:LOCAL_RANK)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        created = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            created = True
        return cls(world, rank, local_rank, local_world, device, created)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank (run names, stop flags, scores)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and give every rank its result; a skincache error raised there
    (a taken run name) is raised on every rank, so all of them stop with the same message."""
    box: tuple[str, Any] = ("ok", None)
    if ctx.main:
        try:
            box = ("ok", fn())
        except SkincacheError as e:
            box = ("error", e)
    kind, value = ctx.broadcast(box)
    if kind == "error":
        raise value
    return value

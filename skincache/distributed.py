"""Where this process sits in a `torchrun` job: one small context shared by sharded encode and
DDP fine-tuning, on torch.distributed (NCCL on GPUs, gloo on CPUs) — the engine the field
already runs, nothing home-made. Without torchrun (WORLD_SIZE unset or 1) it is a world of one
and every call is a no-op."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from skincache.defaults import env_rank
from skincache.errors import SkincacheError


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
        rank = env_rank()
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

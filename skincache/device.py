"""Where the arithmetic runs, said once: the device, the precision and the worker count.

`resolve_device` is the one place that turns `cpu | cuda | mps | auto` (or a `torch.device`)
into a device; an unavailable device is a `UsageError` that says what to use instead.
`PRECISIONS` and `autocast_dtype` are the one precision table (encode, predict, fine-tuning
and the benchmarks share it); `default_workers` the one rule for decode processes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from skincache.errors import UsageError

if TYPE_CHECKING:
    import torch

#: The precisions every command takes (importing this module does not import torch, so the
#: CLI checks options with it before torch loads).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device, *, auto_mps: bool = True) -> torch.device:
    """`auto` picks cuda, then mps (unless `auto_mps` is False: the heads' float64 numerics
    stay off MPS), then cpu; an explicit device that is not available is a UsageError."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if auto_mps and _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device}: not a device; use cpu, cuda, mps or auto"
                         ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (try --device cpu)")
    if dev.type == "mps" and not _mps_available():
        raise UsageError("--device mps: MPS is not available here (try --device cpu)")
    return dev


def inference_device(device: str | torch.device) -> torch.device:
    """Like `resolve_device` (without MPS for auto), but something saved with device="cuda"
    still loads and predicts on a machine without a GPU (on the CPU)."""
    import torch

    if not torch.cuda.is_available() and str(device).startswith("cuda"):
        return torch.device("cpu")
    return resolve_device(device, auto_mps=False)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: fp32, autocast off)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def default_workers(sharers: int = 1) -> int:
    """Decode processes: the machine's cores, shared between `sharers` processes (the
    torchrun processes of one machine)."""
    return max(1, (os.cpu_count() or 1) // max(1, sharers))

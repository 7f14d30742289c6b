"""Fine-tuning state that outlives a process: checkpoints, JSON files, and the DDP context.

Checkpoints are plain `torch.save` dicts of tensors, numbers, strings, lists and dicts, so
`torch.load(..., weights_only=True)` reads them (nothing is unpickled); RNG states are stored as
the uint8 tensors torch returns. Every file is written to a temporary name, flushed to disk and
renamed, so a reader (or a run killed while saving) sees the old file or the new one, never half.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from skincache._io import atomic_write
from skincache.distributed import DistContext, on_main  # noqa: F401  (re-exported)
from skincache.errors import InputFileError, NotFoundError

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



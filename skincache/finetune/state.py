"""Fine-tuning state that outlives a process: checkpoints, the loop's `TrainState`, disk errors
of the run folder's writes, and the DDP context.

Checkpoints are plain `torch.save` dicts of tensors, numbers, strings, lists and dicts, so
`torch.load(..., weights_only=True)` reads them (nothing is unpickled); RNG states are stored as
the uint8 tensors torch returns. Every file is written to a temporary name, flushed to disk and
renamed, so a reader (or a run killed while saving) sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from skincache._disk import disk_error
from skincache._io import atomic_write
from skincache.distributed import DistContext, on_main  # noqa: F401  (re-exported)
from skincache.errors import DiskError, InputFileError, NotFoundError

CHECKPOINT_FORMAT = "skincache.finetune"
CHECKPOINT_VERSION = 1


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Atomically write `payload` to `path` (tmp + fsync + os.replace): a full disk or a file
    size limit leaves the previous `path` as it was, removes the temp file and raises one
    `DiskError` line saying how to go on.

    Called for `best.pt` and `last.pt`; the SIGKILL resume test wraps this function."""
    path = Path(path)
    try:
        return atomic_write(path, lambda f: _torch_save(payload, f))
    except OSError as e:
        de = disk_error(e, path.with_name(path.name + ".tmp"), "writing",
                        f"the {path.name} saved before is kept; {_resume_hint(path.parent)}")
        if de is None:
            raise
        raise de from None


class _WriteErrors:
    """A file wrapper that keeps the OSError a write raised: torch's zip writer turns it into
    a RuntimeError ("unexpected pos ...") that no longer says the disk is full."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(payload: dict[str, Any], fh: BinaryIO) -> None:
    out = _WriteErrors(fh)
    try:
        torch.save(payload, out)
    except RuntimeError:
        if out.error is None:
            raise
        raise out.error from None


def _resume_hint(run_dir: Path) -> str:
    return f"free some space, then continue with `skincache finetune --resume {run_dir}`"


@contextlib.contextmanager
def disk_errors(run_dir: Path) -> Iterator[None]:
    """Writes into a run folder (history.json, run.json, metrics, plots): an OSError the disk
    caused (full, a file size limit, read-only) becomes one `DiskError` line; each of those
    files is written atomically, so what was there before is kept."""
    try:
        yield
    except DiskError:
        raise
    except OSError as e:
        de = disk_error(e, e.filename or run_dir, "writing", _resume_hint(run_dir))
        if de is None:
            raise
        raise de from None


@dataclass
class TrainState:
    """What the epoch loop carries from one epoch to the next: all of it is saved in `last.pt`
    (`to_checkpoint`) and read back on resume (`from_checkpoint`), so a resumed run continues
    with exactly the state the killed one had after its last finished epoch."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None  # val balanced accuracy of best_epoch (None: no val)
    since_best: int = 0
    stopped: bool = False
    init_val: dict[str, float] | None = None  # the model before training, on val
    epoch: int = 0  # the last finished epoch; 0 before the first

    def observe(self, row: dict[str, Any], patience: int | None) -> bool:
        """Record a finished epoch's `row` (kept by reference: later keys still land in the
        history); True when it is the new best (always, without a val score)."""
        score = row.get("val_balanced_accuracy")
        improved = score is None or self.best_score is None or score > self.best_score
        if improved:
            self.best_epoch, self.best_score, self.since_best = row["epoch"], score, 0
        else:
            self.since_best += 1
        if patience is not None and score is not None and self.since_best >= patience:
            self.stopped = True
        self.history.append(row)
        self.epoch = row["epoch"]
        return improved

    def to_checkpoint(self) -> dict[str, Any]:
        """The `last.pt` keys of this state (the format of CHECKPOINT_VERSION 1)."""
        return {"epoch": self.epoch, "history": self.history,
                "best": {"epoch": self.best_epoch, "score": self.best_score},
                "since_best": self.since_best, "stopped": self.stopped,
                "init_val": self.init_val}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        best = dict(ckpt["best"])
        return cls(history=list(ckpt["history"]), best_epoch=best["epoch"],
                   best_score=best["score"], since_best=int(ckpt["since_best"]),
                   stopped=bool(ckpt["stopped"]), init_val=ckpt["init_val"],
                   epoch=int(ckpt["epoch"]))

    def history_json(self) -> dict[str, Any]:
        """What `history.json` holds."""
        return {"init": self.init_val, "epochs": self.history, "best_epoch": self.best_epoch,
                "best_val_balanced_accuracy": self.best_score, "stopped_early": self.stopped}


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



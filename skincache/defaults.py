"""The constants several modules share, in one place and torch-free (the CLI reads them before
any heavy import): default folders, the default split, the shipped tiny model, fine-tune setup
names, HAM10000's metadata layout, the errno values that mean "the disk said no", and which
torch.distributed rank this process is.

Nothing here imports anything but the standard library."""

from __future__ import annotations

import errno
import os

#: `--cache-dir` and `--runs-dir` defaults (both git-ignored in this repository).
CACHE_DIR = "cache"
RUNS_DIR = "runs"

#: train / val / test fractions of the seeded, stratified, lesion-grouped split.
SPLIT_RATIOS: tuple[float, float, float] = (0.72, 0.19, 0.09)
#: the same as the CLI writes it
SPLIT_RATIOS_TEXT = ",".join(f"{r:g}" for r in SPLIT_RATIOS)

#: the random-initialised open_clip config shipped with the package (offline tests, demo).
TINY_MODEL = "skincache-tiny"

#: fine-tuning setups of the reference paper's Table 1 (their settings: finetune/config.py).
SETUP_NAMES: tuple[str, ...] = ("base", "regularization", "augmented")

#: HAM10000's official metadata file and its columns, the first three required.
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                                     "localization")

#: OSError codes that mean the disk refused a write (full, quota, size limit, read-only,
#: permission): reported as one DiskError line, nothing already written lost.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                         errno.EPERM})


def env_rank() -> int:
    """This process's torch.distributed rank as torchrun sets it (`RANK`), 0 when alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_rank0() -> bool:
    """True in a lone process and on rank 0 of a torchrun job."""
    return env_rank() == 0

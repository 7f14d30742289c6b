"""One-line errors for what the disk refused (full, read-only, no permission): turning an
OSError into a `DiskError` that names the path and the action, and checking a folder is
writable before any work starts.

On a low layer (errors and defaults only) because the cache writer, the loaders, run folders,
fine-tuning and the CLI all need it, and none of them should import the cache reader for it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from skincache.defaults import DISK_ERRNOS
from skincache.errors import DiskError


def check_writable_dir(folder: Path, option: str) -> None:
    """Create `folder` if needed and make sure files can be written in it, before any work
    is done: a read-only folder is one line naming it, not a traceback after the run."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".skincache-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        de = disk_error(e, folder, "writing in", f"{option} must be a folder skincache can write")
        if de is not None:
            raise de from None
        raise make_disk_error(e.errno or 0, f"{folder}: cannot write here "
                              f"({e.strerror or e}); {option} must be a writable folder"
                              ) from None



def disk_error(e: OSError, path: str | Path, action: str, after: str = "") -> DiskError | None:
    """A one-line `DiskError` for an OSError the disk caused (full, read-only, no permission),
    naming `path` and what was being done; None for any other OSError. h5py reports a failed
    write with the errno only in its message, so the text is checked too."""
    text = str(e)
    code = e.errno
    if code is None:
        for c, marks in ((errno.ENOSPC, ("errno = 28", "No space left")),
                         (errno.EFBIG, ("errno = 27", "File too large")),
                         (errno.EDQUOT, ("errno = 122", "quota exceeded")),
                         (errno.EROFS, ("errno = 30", "Read-only file system")),
                         (errno.EACCES, ("errno = 13", "Permission denied"))):
            if any(m in text for m in marks):
                code = c
                break
    if code not in DISK_ERRNOS:
        return None
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit reached (disk full for this process)",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}[code]
    return make_disk_error(code, f"{what} {action} {path}{'; ' + after if after else ''}")


def make_disk_error(code: int, message: str) -> DiskError:
    """A DiskError whose str() is `message` alone (OSError(errno, msg) would print
    "[Errno 28] ..."), with `.errno` still set for callers that check it."""
    err = DiskError(message)
    err.errno = code
    return err

"""What encode writes while it runs: the `<name>.partial/` folder of committed chunks (each a
small `.npz` written to a temporary name, fsynced, then renamed, so a killed run loses at most
the chunk in flight), and the `<name>.lock` that keeps two encodes of one key from interleaving.

numpy and the standard library only (`fcntl` imported where it is used)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from skincache._disk import disk_error
from skincache._io import atomic_write, read_json_file
from skincache.cache.schema import CacheBusyError, CacheWarning, first_line
from skincache.errors import SkincacheError

#: fds of the cache locks this process holds; a forked child closes its copies at once.
_HELD_LOCK_FDS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader decode worker): close the inherited lock fds. An flock
    belongs to the open file description, which fork shares, so without this the workers of a
    SIGKILLed encode would hold its lock for seconds after it died. (O_CLOEXEC only covers
    exec; fork keeps every fd.)"""
    for fd in list(_HELD_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CacheLock:
    """An exclusive advisory lock on `<name>.lock`: two encodes of one key never interleave.

    flock is released by the kernel when the holder dies, so a SIGKILLed run leaves no stale
    lock behind; the fd is O_CLOEXEC and closed in forked children, so decode workers never
    hold it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        if self._fd is not None:  # held by this object already (`with`, then acquire)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            de = disk_error(e, self.path, "creating the lock file")
            if de is not None:
                raise de from None
            raise
        import fcntl  # POSIX only: imported where used, so `import skincache.cache` works
        # anywhere (reading caches needs no lock)

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder.isdigit() and not _pid_alive(int(holder)):
                raise CacheBusyError(
                    f"{self.path}: locked, but its holder (pid {holder}) has exited; a process "
                    "it started is still finishing: run again in a few seconds (or pass --wait)"
                ) from None
            raise CacheBusyError(
                f"{self.path}: another skincache process (pid {holder}) is writing this cache; "
                "wait for it to finish (or pass --wait)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; False (and nothing held) otherwise."""
        try:
            self.acquire(wait=False)
        except CacheBusyError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CacheLock:
        """`with CacheLock(path):` holds the lock (without waiting: a held lock is a
        CacheBusyError naming the holder); a lock acquired before (`acquire(wait=True)`) is
        kept as it is."""
        if self._fd is None:
            self.acquire(wait=False)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class PartialCache:
    """The `<name>.partial/` folder of committed chunks for a cache being written."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def manifest(self) -> dict | None:
        """The manifest on disk; None when there is none, or (with a warning) when it is not
        a JSON object: the folder is then started afresh."""
        if not self.manifest_path.exists():
            return None
        try:
            old = read_json_file(self.manifest_path, max_bytes=1 << 20,
                                 what="partial-cache manifest")
        except SkincacheError as e:
            old = str(e)
        if not isinstance(old, dict):
            warnings.warn(f"{self.manifest_path}: not a valid manifest ({str(old)[:80]}); "
                          "starting the partial folder afresh", CacheWarning, stacklevel=2)
            return None
        return old

    def start(self, manifest: dict) -> dict:
        """Open for resume if the manifest matches `manifest["key"]`, else start afresh.

        Returns the manifest in force (an existing one keeps its chunk and batch sizes so
        the resumed numbers equal an uninterrupted run's; `forced` is kept once set, so an
        interrupted `--force` rebuild is continued by any rerun)."""
        old = self.manifest()
        if old is not None and old.get("key") == manifest["key"] \
                and old.get("n_records") == manifest["n_records"]:
            if manifest.get("forced") and not old.get("forced"):
                old["forced"] = True
                self._write_manifest(old)
            return old
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest).encode()))

    def forced_rebuild_pending(self, key: str) -> bool:
        """Whether this folder is an interrupted `--force` rebuild of `key` (so a rerun
        without --force continues it rather than reporting the old cache up to date)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)  # said again when it is started
            old = self.manifest()
        return bool(old and old.get("forced") and old.get("key") == key)

    def chunk_path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.npz"

    def n_chunks(self) -> int:
        """How many chunk files are committed (for messages)."""
        return len(list(self.folder.glob("chunk_*.npz")))

    def write_chunk(self, i: int, **arrays: np.ndarray) -> None:
        atomic_write(self.chunk_path(i), lambda f: np.savez(f, **arrays))

    def read_chunk(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.chunk_path(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def keep_chunk(self, i: int, fields: tuple[str, ...]) -> bool:
        """Whether chunk `i` is committed and sound (a zip of plain arrays holding `fields`).
        A damaged one (truncated, object arrays, edited) is removed with a warning, so it is
        encoded again; never unpickled."""
        path = self.chunk_path(i)
        if not path.exists():
            return False
        try:
            arrays = self.read_chunk(i)
            if any(f not in arrays for f in fields):
                raise ValueError(f"no {next(f for f in fields if f not in arrays)!r} array")
            return True
        except Exception as e:  # zipfile, numpy and OS errors alike: the file is not usable
            warnings.warn(f"{path}: damaged chunk ({type(e).__name__}: {first_line(e)[:80]});"
                          " discarded, it is encoded again", CacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                path.unlink()
            return False

    def write_array(self, name: str, **arrays: np.ndarray) -> None:
        atomic_write(self.folder / f"{name}.npz", lambda f: np.savez(f, **arrays))

    def read_array(self, name: str) -> dict[str, np.ndarray] | None:
        """`<name>.npz`'s arrays; None when absent or (with a warning, the file removed)
        damaged, so it is written again."""
        p = self.folder / f"{name}.npz"
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:
            warnings.warn(f"{p}: damaged ({type(e).__name__}); discarded, it is written again",
                          CacheWarning, stacklevel=2)
            with contextlib.suppress(OSError):
                p.unlink()
            return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

"""The HDF5 feature cache: its schema, its key, crash-safe writing and a strict reader.

Knows HDF5 and numpy only (no torch, no open_clip), so heads and reports can read a cache
without loading a model.

Writing is two-phase. While encoding, each chunk of images is committed as its own small
`.npz` file inside `<name>.partial/` (written to a temporary name, fsynced, then renamed), so a
run killed at any instant loses at most the chunk in flight and the next run resumes after the
last committed chunk. When every chunk is there, the HDF5 file is assembled as `<name>.h5.tmp`
and renamed to `<name>.h5`: a reader never sees half a cache under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from skincache.errors import SkincacheError

SCHEMA_VERSION = 1
FEATURE_DTYPE = np.float16
_STR = h5py.string_dtype()


class CacheError(SkincacheError, RuntimeError):
    """A cache that cannot be used as asked; the message names the file and the reason."""


class CacheBusyError(CacheError):
    """Another process holds the cache's lock."""


def cache_key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything that changes the cached numbers."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_name(dataset: str, model_slug: str, k: int, key: str) -> str:
    return f"{dataset}__{model_slug}__k{k}__{key[:12]}"


# --------------------------------------------------------------------------- reading


@dataclass
class SplitData:
    """One split's arrays. Features are float32 in memory (float16 on disk), not normalised."""

    features: np.ndarray  # [N, D]
    views: np.ndarray  # [N, K, D]
    labels: np.ndarray  # [N] int64 index into classes
    image_id: np.ndarray  # [N] str
    group_id: np.ndarray  # [N] str ("" where unknown)
    sha1: np.ndarray  # [N] str
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


class FeatureCache:
    """A complete cache, read into memory (HAM10000 at D=512, K=4 is about 100 MB)."""

    def __init__(self, path: Path, attrs: dict, splits: dict[str, SplitData],
                 text: dict[str, np.ndarray], failed: list[dict]):
        self.path = path
        self.attrs = attrs
        self.splits = splits
        self.text = text
        self.failed = failed

    @classmethod
    def open(cls, path: str | Path) -> FeatureCache:
        """Read and check a cache; refuses partial, foreign or newer-schema files."""
        path = Path(path)
        if path.name.endswith(".partial") or path.suffix == ".tmp" or (
            path.is_dir() and path.name.endswith(".partial")
        ):
            raise CacheError(f"{path}: a partial cache (an encode run that has not finished); "
                             "run the same `skincache encode` again to resume it")
        if path.is_dir():
            raise CacheError(f"{path}: a folder, not a cache file; caches are the .h5 files "
                             "in it")
        if not path.is_file():
            partial = path.with_suffix(".partial")
            hint = (" (an unfinished run exists: run the same encode again to resume it)"
                    if partial.exists() else "")
            raise CacheError(f"{path}: no such cache file{hint}")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise CacheError(f"{path}: not a readable HDF5 file ({e})") from None
        with f:
            raw = dict(f.attrs)
            if raw.get("format") != "skincache-features":
                raise CacheError(f"{path}: not a skincache feature cache")
            if not bool(raw.get("complete", False)):
                raise CacheError(f"{path}: cache is marked incomplete; re-run encode")
            if int(raw.get("schema_version", -1)) > SCHEMA_VERSION:
                raise CacheError(f"{path}: schema version {raw['schema_version']} is newer than "
                                 f"this skincache reads ({SCHEMA_VERSION}); upgrade skincache")
            attrs = {k: _decode_attr(v) for k, v in raw.items()}
            splits = {}
            for name in json.loads(attrs["split_order"]):
                g = f["splits"][name]
                splits[name] = SplitData(
                    features=g["features"][()].astype(np.float32),
                    views=g["views"][()].astype(np.float32),
                    labels=g["labels"][()].astype(np.int64),
                    image_id=_strs(g["image_id"]),
                    group_id=_strs(g["group_id"]),
                    sha1=_strs(g["sha1"]),
                    meta={c: _strs(g["meta"][c]) for c in g["meta"]} if "meta" in g else {},
                )
            text = {name: f["text"][name][()] for name in f["text"]} if "text" in f else {}
            failed = []
            if "failed" in f:
                cols = {c: _strs(f["failed"][c]) for c in f["failed"]}
                n = len(next(iter(cols.values()))) if cols else 0
                failed = [{c: str(cols[c][i]) for c in cols} for i in range(n)]
        return cls(path, attrs, splits, text, failed)

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def encoding_key(self) -> str:
        """What the features mean, without which images they are of: model weights,
        preprocessing, precision, class list. Two caches with the same encoding key can share
        a head (fit on one dataset, evaluate on another: external validation)."""
        a = self.attrs
        return cache_key({"weights": a["weights_sha256"], "preprocess": a["preprocess"],
                          "precision": a["precision"], "classes": a["classes"]})

    @property
    def classes(self) -> list[str]:
        return json.loads(self.attrs["classes"])

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.attrs["class_names"])

    @property
    def logit_scale(self) -> float:
        return float(self.attrs["logit_scale"])

    def split(self, name: str) -> SplitData:
        if name not in self.splits:
            raise CacheError(f"{self.path}: no split '{name}' (has {list(self.splits)})")
        return self.splits[name]

    def summary(self) -> dict:
        """What `skincache info` shows: provenance, shapes, class counts, failures."""
        a = self.attrs
        counts = {
            s: {c: int((d.labels == i).sum()) for i, c in enumerate(self.classes)}
            for s, d in self.splits.items()
        }
        reasons: dict[str, int] = {}
        for row in self.failed:
            r = row["reason"].split(":")[0]
            reasons[r] = reasons.get(r, 0) + 1
        return {
            "path": str(self.path),
            "key": a["key"],
            "model": a["model"],
            "pretrained": a.get("pretrained") or "",
            "checkpoint": a.get("checkpoint") or "",
            "checkpoint_sha256": a.get("checkpoint_sha256") or "",
            "weights_sha256": a["weights_sha256"],
            "precision": a["precision"],
            "preprocess": json.loads(a["preprocess"]),
            "views": json.loads(a["views"]),
            "dataset": {"name": a["dataset"], "kind": a["dataset_kind"], "root": a["dataset_root"],
                        "fingerprint": a["dataset_fingerprint"]},
            "classes": self.classes,
            "embed_dim": int(a["embed_dim"]),
            "feature_dtype": a["feature_dtype"],
            "splits": {s: len(d) for s, d in self.splits.items()},
            "class_counts": counts,
            "text_sets": {k: list(v.shape) for k, v in self.text.items()},
            "failed": len(self.failed),
            "failed_reasons": reasons,
            "created": a["created"],
            "versions": json.loads(a["versions"]),
        }


def _decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _strs(ds) -> np.ndarray:
    return np.array(ds.asstr()[()], dtype=object) if len(ds) else np.array([], dtype=object)


# --------------------------------------------------------------------------- writing


class CacheLock:
    """An exclusive advisory lock on `<name>.lock`: two encodes of one key never interleave.

    flock is released by the kernel when the holder dies, so a SIGKILLed run leaves no stale
    lock behind."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheBusyError(
                f"{self.path}: another skincache process (pid {holder}) is writing this cache; "
                "wait for it to finish (or pass --wait)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PartialCache:
    """The `<name>.partial/` folder of committed chunks for a cache being written."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def start(self, manifest: dict) -> dict:
        """Open for resume if the manifest matches `manifest["key"]`, else start afresh.

        Returns the manifest in force (an existing one keeps its chunk and batch sizes so
        the resumed numbers equal an uninterrupted run's)."""
        if self.manifest_path.exists():
            old = json.loads(self.manifest_path.read_text())
            if old.get("key") == manifest["key"] and old.get("n_records") == manifest["n_records"]:
                return old
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        _atomic_write(self.manifest_path, lambda f: f.write(json.dumps(manifest).encode()))
        return manifest

    def chunk_path(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.npz"

    def has_chunk(self, i: int) -> bool:
        return self.chunk_path(i).exists()

    def write_chunk(self, i: int, **arrays: np.ndarray) -> None:
        _atomic_write(self.chunk_path(i), lambda f: np.savez(f, **arrays))

    def read_chunk(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.chunk_path(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def write_array(self, name: str, **arrays: np.ndarray) -> None:
        _atomic_write(self.folder / f"{name}.npz", lambda f: np.savez(f, **arrays))

    def read_array(self, name: str) -> dict[str, np.ndarray] | None:
        p = self.folder / f"{name}.npz"
        if not p.exists():
            return None
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class SplitArrays:
    """What the writer needs for one split, in row order."""

    features: np.ndarray
    views: np.ndarray
    labels: np.ndarray
    image_id: list[str]
    group_id: list[str]
    sha1: list[str]
    meta: dict[str, list[str]]


def write_cache(path: Path, attrs: dict, splits: dict[str, SplitArrays],
                text: dict[str, np.ndarray], failed: dict[str, list[str]]) -> None:
    """Write a complete cache atomically (tmp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["format"] = "skincache-features"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["feature_dtype"] = np.dtype(FEATURE_DTYPE).name
        f.attrs["split_order"] = json.dumps(list(splits))
        f.attrs["complete"] = False
        root = f.create_group("splits")
        for name, s in splits.items():
            g = root.create_group(name)
            g.create_dataset("features", data=s.features.astype(FEATURE_DTYPE))
            g.create_dataset("views", data=s.views.astype(FEATURE_DTYPE))
            g.create_dataset("labels", data=s.labels.astype(np.int16))
            g.create_dataset("image_id", data=s.image_id, dtype=_STR)
            g.create_dataset("group_id", data=s.group_id, dtype=_STR)
            g.create_dataset("sha1", data=s.sha1, dtype=_STR)
            m = g.create_group("meta")
            for col, values in s.meta.items():
                m.create_dataset(col, data=values, dtype=_STR)
        t = f.create_group("text")
        for name, arr in text.items():
            t.create_dataset(name, data=arr.astype(np.float32))
        fg = f.create_group("failed")
        for col, values in failed.items():
            fg.create_dataset(col, data=values, dtype=_STR)
        f.attrs["complete"] = True
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path, wait: bool = False) -> Iterator[CacheLock]:
    lock = CacheLock(path)
    lock.acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()

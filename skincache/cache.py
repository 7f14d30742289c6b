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
import dataclasses
import errno
import hashlib
import io
import json
import math
import mmap
import os
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from skincache._io import atomic_write, read_json_file
from skincache.errors import DiskError, SkincacheError

#: 2: a sha256 per dataset (`checksums` attr) and over the attributes (`header_sha256`).
SCHEMA_VERSION = 2
#: Caches written before checksums: still read, with a `CacheWarning`.
OLDEST_READABLE_SCHEMA = 1
#: errno values that mean "the disk said no" rather than a bug: one line, nothing lost.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                         errno.EPERM})
FEATURE_DTYPE = np.float16
_STR = h5py.string_dtype()


class CacheError(SkincacheError, RuntimeError):
    """A cache that cannot be used as asked; the message names the file and the reason."""


class CacheBusyError(CacheError):
    """Another process holds the cache's lock."""


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


class CacheWarning(UserWarning):
    """A cache that is still read but deserves a word (an old schema without checksums)."""


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


def cache_key(parts: dict) -> str:
    """sha256 of the canonical JSON of everything that changes the cached numbers."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_name(dataset: str, model_slug: str, k: int, key: str) -> str:
    return f"{dataset}__{model_slug}__k{k}__{key[:12]}"


# --------------------------------------------------------------------------- reading


#: rows per block when streaming a dataset (hashing, batches): about 32 MB of float16 at D=512
def _block_rows(row_bytes: int, target: int = 32 << 20) -> int:
    return max(1, target // max(1, row_bytes))


class _SplitSource:
    """Where a lazy split's datasets live: the cache file, re-opened per read (a `FeatureCache`
    holds no HDF5 handle, so it survives forks and never pins the file), each dataset checked
    against its sha256 the first time it is read, streaming the hash in blocks."""

    def __init__(self, owner: FeatureCache, base: str, n: int, dim: int, k: int):
        self.owner, self.base, self.n, self.dim, self.k = owner, base, n, dim, k

    def read(self, col: str) -> np.ndarray:
        return self.owner._read_dataset(f"{self.base}/{col}")

    def blocks(self, col: str, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        return self.owner._iter_dataset(f"{self.base}/{col}", rows)


class SplitData:
    """One split's arrays. `features` / `views` are float32 (float16 on disk), not normalised.

    A split of an opened cache is lazy: nothing is read until an attribute is asked for, and
    each array is read (and checked against its checksum) once, then kept. `features16` /
    `views16` give the stored float16 (half the memory); `batches` streams float32 row blocks
    without keeping anything; `release()` drops what was read. Built from arrays (tests,
    callers with their own data) it simply holds them."""

    COLUMNS = ("features", "views", "labels", "image_id", "group_id", "sha1")

    def __init__(self, features: np.ndarray | None = None, views: np.ndarray | None = None,
                 labels: np.ndarray | None = None, image_id: np.ndarray | None = None,
                 group_id: np.ndarray | None = None, sha1: np.ndarray | None = None,
                 meta: dict[str, np.ndarray] | None = None, *,
                 _source: _SplitSource | None = None, _meta_cols: tuple[str, ...] = ()):
        self._source = _source
        self._meta_cols = _meta_cols
        self._have: dict[str, np.ndarray] = {}
        given = dict(features=features, views=views, labels=labels, image_id=image_id,
                     group_id=group_id, sha1=sha1)
        for k, v in given.items():
            if v is not None:
                self._have[k] = v
        self._meta: dict[str, np.ndarray] | None = (
            None if _source is not None else dict(meta or {}))

    # -- lazy columns
    def _get(self, col: str) -> np.ndarray:
        if col not in self._have:
            if self._source is None:
                raise AttributeError(f"split has no {col}")
            if col in ("features", "views"):
                self._have[col] = self._get16(col).astype(np.float32)
            elif col == "labels":
                self._have[col] = self._source.read("labels").astype(np.int64)
            else:
                self._have[col] = self._source.read(col)
        return self._have[col]

    def _get16(self, col: str) -> np.ndarray:
        key = col + "16"
        if key in self._have:
            return self._have[key]
        if col in self._have:  # built from arrays (or already read as float32)
            return self._have[col]
        assert self._source is not None
        arr = self._source.read(col)
        self._have[key] = arr
        return arr

    features = property(lambda self: self._get("features"))
    views = property(lambda self: self._get("views"))
    labels = property(lambda self: self._get("labels"))
    image_id = property(lambda self: self._get("image_id"))
    group_id = property(lambda self: self._get("group_id"))
    sha1 = property(lambda self: self._get("sha1"))

    @property
    def features16(self) -> np.ndarray:
        """The clean-view features as stored (float16 for an opened cache), read once."""
        return self._get16("features")

    @property
    def views16(self) -> np.ndarray:
        return self._get16("views")

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if self._meta is None:
            assert self._source is not None
            self._meta = {c: self._source.read(f"meta/{c}") for c in self._meta_cols}
        return self._meta

    @property
    def n_views(self) -> int:
        if self._source is not None:
            return self._source.k
        return int(self._get("views").shape[1])

    def __len__(self) -> int:
        if self._source is not None:
            return self._source.n
        return len(self._get("labels"))

    def nbytes32(self, views: bool = True) -> int:
        """Bytes of the float32 features (and views) in memory: what `features`/`views` cost."""
        if self._source is not None:
            n, d, k = self._source.n, self._source.dim, self._source.k
        else:
            n, d = self._get("features").shape
            k = self.n_views
        return n * d * 4 * (1 + (k if views else 0))

    def batches(self, rows: int | None = None, what: str = "features"
                ) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 block) over `features` or `views`, streamed from the file in
        blocks of `rows` (about 32 MB by default); nothing is kept."""
        if what not in ("features", "views"):
            raise ValueError(f"what must be 'features' or 'views', got {what!r}")
        if self._source is None or what in self._have or what + "16" in self._have:
            arr = self._get16(what)
            step = rows or _block_rows(int(np.prod(arr.shape[1:])) * 2)
            for start in range(0, len(arr), step):
                yield start, np.asarray(arr[start:start + step], dtype=np.float32)
            return
        for start, block in self._source.blocks(what, rows):
            yield start, block.astype(np.float32)

    def load(self) -> SplitData:
        """Read every column into memory now (float32 features and views)."""
        for c in self.COLUMNS:
            self._get(c)
        _ = self.meta
        return self

    def release(self) -> None:
        """Forget what was read (an opened cache reads it again on demand)."""
        if self._source is not None:
            self._have.clear()
            self._meta = None if self._meta_cols else {}

    @property
    def loaded(self) -> tuple[str, ...]:
        """Which columns are in memory now (for tests and memory accounting)."""
        return tuple(sorted(self._have))


class FeatureCache:
    """A complete cache. `open` checks the header and every split's shapes but reads no
    feature data: splits read on demand (`split(name).features`, `.batches()`), each dataset
    verified against its sha256 when first read. `load()` (or `open(path, load=True)`) reads
    everything into memory at once, as small caches may prefer."""

    def __init__(self, path: Path, attrs: dict, splits: dict[str, SplitData],
                 text: dict[str, np.ndarray], failed: list[dict]):
        self.path = path
        self.attrs = attrs
        self.splits = splits
        self.text = text
        self.failed = failed
        self._sums: dict[str, str] | None = None  # None: schema 1, nothing to verify
        self._verified: set[str] = set()
        self._header = ""

    @classmethod
    def open(cls, path: str | Path, load: bool = False) -> FeatureCache:
        """Open and check a cache; refuses partial, foreign or newer-schema files. Split data is
        read lazily unless `load`."""
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
        with cls._file(path) as f:
            fc = cls._read(path, f)
        if load:
            fc.load()
        return fc

    def load(self) -> FeatureCache:
        """Read every split into memory now (float32), checking each dataset."""
        for s in self.splits.values():
            s.load()
        return self

    @staticmethod
    @contextlib.contextmanager
    def _file(path: Path) -> Iterator[h5py.File]:
        """The HDF5 file, with a damaged structure (truncated, overwritten) as one line.

        The one place h5py's errors are turned into ours: every read of a cache (open, the
        `visititems` walk, lazy split reads, verify) runs inside it, and a damaged object
        header or B-tree surfaces from h5py as OSError, RuntimeError, KeyError or ValueError
        depending on where it is met."""
        try:
            f = h5py.File(path, "r")
        except (OSError, RuntimeError, ValueError) as e:
            raise CacheError(f"{path}: not a readable HDF5 file ({_first_line(e)}); "
                             "re-encode it with `skincache encode ... --force`") from None
        try:
            with f:
                _refuse_damaged_heaps(path, f)
                yield f
        except _H5PY_ERRORS as e:
            if isinstance(e, SkincacheError):
                raise
            raise CacheError(f"{path}: damaged cache file ({type(e).__name__}: "
                             f"{_first_line(e)}); re-encode it with "
                             "`skincache encode ... --force`") from None

    @contextlib.contextmanager
    def _reopen(self) -> Iterator[h5py.File]:
        with self._file(self.path) as f:
            if self._header and _decode_attr(f.attrs.get("header_sha256", "")) != self._header:
                raise CacheError(f"{self.path}: the file changed since it was opened "
                                 "(re-encoded?); open it again")
            yield f

    def _want(self, name: str) -> str | None:
        if self._sums is None or name in self._verified:
            return None
        want = self._sums.get(name)
        if want is None:
            raise CacheError(f"{self.path}: dataset {name} has no checksum; the file was "
                             "altered after writing; re-encode it")
        return want

    def _mismatch(self, name: str) -> CacheError:
        return CacheError(f"{self.path}: dataset {name} does not match its checksum: the file "
                          "is corrupted (disk fault or edit); re-encode it with "
                          "`skincache encode ... --force`")

    def _read_dataset(self, name: str) -> np.ndarray:
        """A dataset's stored values, read in blocks and checked against its sha256 as they
        arrive (once per dataset and open cache): one pass over the file, no second copy."""
        want = self._want(name)
        with self._reopen() as f:
            ds = f[name]
            if ds.dtype.kind == "O":
                value = _strs(ds)
                if want is not None and _digest(value) != want:
                    raise self._mismatch(name)
            else:
                value = np.empty(ds.shape, dtype=ds.dtype.newbyteorder("="))
                h = _digest_start(value) if want is not None else None
                for start, stop in _row_blocks(ds):
                    if stop > start:
                        ds.read_direct(value, np.s_[start:stop], np.s_[start:stop])
                    if h is not None:
                        _digest_update(h, value[start:stop])
                if h is not None and h.hexdigest() != want:
                    raise self._mismatch(name)
        if want is not None:
            self._verified.add(name)
        if name.endswith("/labels") and value.size:
            n_classes = len(self.classes)
            if value.min() < 0 or value.max() >= n_classes:
                split = name.split("/")[1]
                raise CacheError(f"{self.path}: split '{split}' has labels outside [0, "
                                 f"{n_classes}) (the classes attribute and the labels "
                                 "disagree); re-encode it")
        return value

    def _iter_dataset(self, name: str, rows: int | None = None
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, block) of a numeric dataset, streamed; a dataset not yet verified is first
        hashed in one streaming pass (holding one block), so no block of a corrupted dataset
        is ever handed out."""
        with self._reopen() as f:
            self._verify_stream(f, name)
            ds = f[name]
            for start, stop in _row_blocks(ds, rows):
                yield start, ds[start:stop]

    def _verify_stream(self, f: h5py.File, name: str) -> None:
        """Hash one dataset in blocks (holding one block) against its sha256, once."""
        want = self._want(name)
        if want is None:
            return
        ds = f[name]
        if ds.dtype.kind == "O":
            ok = _digest(_strs(ds)) == want
        else:
            h = _digest_start(np.empty((0,), ds.dtype), shape=ds.shape)
            for start, stop in _row_blocks(ds):
                _digest_update(h, ds[start:stop])
            ok = h.hexdigest() == want
        if not ok:
            raise self._mismatch(name)
        self._verified.add(name)

    def verify(self) -> FeatureCache:
        """Check every dataset of the file against its checksum now, streaming (one block in
        memory at a time); `skincache info` does this. Reads are checked anyway as they come."""
        if self._sums:
            with self._reopen() as f:
                for name in sorted(self._sums):
                    self._verify_stream(f, name)
        return self

    @classmethod
    def _read(cls, path: Path, f: h5py.File) -> FeatureCache:
        raw = dict(f.attrs)
        if raw.get("format") != "skincache-features":
            raise CacheError(f"{path}: not a skincache feature cache")
        if not bool(raw.get("complete", False)):
            raise CacheError(f"{path}: cache is marked incomplete; re-run encode")
        try:
            schema = int(raw.get("schema_version", -1))
        except (TypeError, ValueError):
            schema = -1
        if schema > SCHEMA_VERSION:
            raise CacheError(f"{path}: schema version {raw['schema_version']} is newer than "
                             f"this skincache reads ({SCHEMA_VERSION}); upgrade skincache")
        if schema < OLDEST_READABLE_SCHEMA:
            raise CacheError(f"{path}: schema version {raw.get('schema_version')!r} is not one "
                             "this skincache reads; re-encode it")
        checked = schema >= 2
        sums: dict[str, str] | None = None
        if checked:
            _verify_header(path, raw)
            try:
                sums = json.loads(raw["checksums"])
                assert isinstance(sums, dict)
            except Exception:
                raise CacheError(f"{path}: attribute 'checksums' is not a JSON object; "
                                 "re-encode it") from None
        else:
            warnings.warn(f"{path}: written by an older skincache (schema {schema}) without "
                          "checksums, so corruption cannot be detected; re-encode it with "
                          "`skincache encode ... --force` to add them", CacheWarning,
                          stacklevel=4)
        attrs = {k: _decode_attr(v) for k, v in raw.items()}
        classes, split_order = _check_attrs(path, attrs, f)
        fc = cls(path, attrs, {}, {}, [])
        fc._sums = sums
        fc._header = _decode_attr(raw.get("header_sha256", "")) if checked else ""

        if checked:
            assert sums is not None
            present: list[str] = []
            f.visititems(lambda n, o: present.append(n) if isinstance(o, h5py.Dataset) else None)
            extra = sorted(set(present) - set(sums))
            if extra:
                raise CacheError(f"{path}: dataset {extra[0]} was added after writing (no "
                                 "checksum); re-encode it")
            missing = sorted(set(sums) - set(present))
            if missing:
                raise CacheError(f"{path}: dataset {missing[0]} is missing (the file was "
                                 "altered after writing); re-encode it")
        n_classes = len(classes)
        dim = int(attrs["embed_dim"])
        # Shapes from the HDF5 metadata only: no split data is read here.
        for name in split_order:
            base = f"splits/{name}"
            g = f[base]
            feats, views, labels = g["features"], g["views"], g["labels"]
            n = labels.shape[0] if labels.ndim == 1 else -1
            if labels.ndim != 1 or feats.shape != (n, dim) or views.ndim != 3 or \
                    views.shape[0] != n or views.shape[2] != dim:
                raise CacheError(f"{path}: split '{name}' has inconsistent shapes (features "
                                 f"{feats.shape}, views {views.shape}, labels {labels.shape}, "
                                 f"embed_dim {dim}); re-encode it")
            meta_cols = tuple(g["meta"]) if "meta" in g else ()
            cols = {c: g[c] for c in ("image_id", "group_id", "sha1")}
            cols.update({c: g["meta"][c] for c in meta_cols})
            bad = [c for c, v in cols.items() if v.shape != (n,)]
            if bad:
                raise CacheError(f"{path}: split '{name}': column {bad[0]} has a different "
                                 f"length than the labels ({n}); re-encode it")
            fc.splits[name] = SplitData(_source=_SplitSource(fc, base, n, dim, views.shape[1]),
                                        _meta_cols=meta_cols)
        # text prototypes and the failed table are small: read (and verified) now
        if "text" in f:
            for name in f["text"]:
                arr = fc._read_dataset(f"text/{name}")
                if arr.ndim != 3 or arr.shape[0] != n_classes or arr.shape[2] != dim:
                    raise CacheError(f"{path}: text/{name} has shape {arr.shape}, expected "
                                     f"[{n_classes}, T, {dim}]; re-encode it")
                fc.text[name] = arr
        if "failed" in f:
            fcols = {c: fc._read_dataset(f"failed/{c}") for c in f["failed"]}
            n = len(next(iter(fcols.values()))) if fcols else 0
            if any(len(v) != n for v in fcols.values()):
                raise CacheError(f"{path}: the failed-images table has columns of different "
                                 "lengths; re-encode it")
            fc.failed = [{c: str(fcols[c][i]) for c in fcols} for i in range(n)]
        return fc

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

    @property
    def header(self) -> CacheHeader:
        """The attributes encode wrote, typed (`CacheHeader`)."""
        return CacheHeader.from_attrs(self.attrs)

    def summary(self) -> dict:
        """What `skincache info` shows: provenance, shapes, class counts, failures. Verifies
        every dataset's checksum first (streaming), so `info` is a whole-file check."""
        self.verify()
        a = self.attrs
        counts = {
            s: {c: int((d.labels == i).sum()) for i, c in enumerate(self.classes)}
            for s, d in self.splits.items()
        }
        reasons: dict[str, int] = {}
        for row in self.failed:
            r = row["reason"].split(":")[0]
            reasons[r] = reasons.get(r, 0) + 1
        h = self.header
        return {
            "path": str(self.path),
            "key": h.key,
            "model": h.model,
            "pretrained": h.pretrained or "",
            "checkpoint": h.checkpoint or "",
            "checkpoint_sha256": h.checkpoint_sha256 or "",
            "weights_sha256": h.weights_sha256,
            "precision": h.precision,
            "preprocess": h.preprocess,
            "views": h.views,
            "dataset": {"name": h.dataset, "kind": h.dataset_kind, "root": h.dataset_root,
                        "fingerprint": h.dataset_fingerprint},
            "classes": self.classes,
            "embed_dim": int(h.embed_dim),
            "feature_dtype": a["feature_dtype"],
            "splits": {s: len(d) for s, d in self.splits.items()},
            "class_counts": counts,
            "text_sets": {k: list(v.shape) for k, v in self.text.items()},
            "failed": len(self.failed),
            "failed_reasons": reasons,
            "created": h.created,
            "versions": h.versions,
        }


#: what h5py raises on a damaged file (its errors map HDF5's error stack onto these)
_H5PY_ERRORS = (KeyError, OSError, ValueError, TypeError, RuntimeError, IndexError)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _decode_attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _strs(ds) -> np.ndarray:
    """A string dataset's values as h5py decodes them (the writer's own, just-written file)."""
    return np.array(ds.asstr()[()], dtype=object) if len(ds) else np.array([], dtype=object)


#: how a variable-length string element is stored: length, heap collection address, index
_VLEN_REF = struct.Struct("<IQI")
_GCOL_HEAD = struct.Struct("<4sB3sQ")  # signature, version, reserved, collection size
_GCOL_OBJ = struct.Struct("<HH4xQ")  # heap object index, reference count, size
#: (inode, size, mtime) -> the damaged heap collections found in that file (usually none)
_HEAPS_SEEN: dict[tuple[int, int, int], list[int]] = {}


def _damaged_heaps(path: Path) -> list[int]:
    """File offsets of the global heap collections (where HDF5 keeps every variable-length
    string: our attributes and string columns) that HDF5's own reader would loop on for ever
    or run past: it steps from object to object by each object's stored size, and a zeroed
    block leaves a size of 0. Found by scanning the file for collection signatures and
    walking each as HDF5 does, with bounds; done once per file version (a plain scan, about
    1 GB/s), before h5py reads any string."""
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp in _HEAPS_SEEN:
        return _HEAPS_SEEN[stamp]
    bad: list[int] = []
    with open(path, "rb") as fh:
        if st.st_size:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                at = mm.find(b"GCOL")
                while at >= 0:
                    if _heap_is_damaged(mm, at):
                        bad.append(at)
                    at = mm.find(b"GCOL", at + 4)
    _HEAPS_SEEN[stamp] = bad
    return bad


def _heap_is_damaged(mm: mmap.mmap, at: int) -> bool:
    """Whether the collection at `at` would trap HDF5's walk (False for the rare float16 run
    that merely spells "GCOL": HDF5 refuses those by their version or reserved bytes)."""
    if at + _GCOL_HEAD.size > len(mm):
        return False
    _sig, version, reserved, total = _GCOL_HEAD.unpack_from(mm, at)
    if version != 1 or reserved != b"\0\0\0":
        return False
    if not _GCOL_HEAD.size < total <= len(mm) - at:
        return True
    pos = _GCOL_HEAD.size
    while pos + _GCOL_OBJ.size <= total:
        index, _refs, size = _GCOL_OBJ.unpack_from(mm, at + pos)
        need = size if index == 0 else _GCOL_OBJ.size + (size + 7) // 8 * 8
        if need <= 0 or pos + need > total:
            return True
        pos += need
    return False


def _refuse_damaged_heaps(path: Path, f: h5py.File) -> None:
    """One CacheError naming the string dataset whose heap is damaged (found from the
    datasets' raw storage, read here), or the attributes when no dataset's is."""
    bad = _damaged_heaps(path)
    if not bad:
        return
    names: list[tuple[str, int, int]] = []

    def strings(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and h5py.check_string_dtype(obj.dtype) is not None \
                and obj.id.get_offset() is not None:
            names.append((name, obj.id.get_offset(), obj.id.get_storage_size()))

    f.visititems(strings)
    with open(path, "rb") as fh:
        for name, offset, size in sorted(names):
            fh.seek(offset)
            raw = fh.read(min(size, 1 << 26))
            raw = raw[:len(raw) // _VLEN_REF.size * _VLEN_REF.size]
            if any(addr in bad for _n, addr, _i in _VLEN_REF.iter_unpack(raw)):
                raise _heap_error(path, name, f"its string heap at byte {bad[0]:,}")
    raise CacheError(f"{path}: the attributes are damaged (their string heap at byte "
                     f"{bad[0]:,}); re-encode it with `skincache encode ... --force`")


def _heap_error(path: Path, name: str, why: str) -> CacheError:
    return CacheError(f"{path}: dataset {name} is damaged ({why}); re-encode it with "
                      "`skincache encode ... --force`")


def _digest(value) -> str:
    """sha256 of a dataset's values as stored: dtype, shape and raw bytes for numbers;
    length-prefixed UTF-8 for strings (what h5py gives back is re-encoded the same way)."""
    h = hashlib.sha256()
    a = np.asarray(value)
    if a.dtype.kind in "OUS":
        items = [x.decode() if isinstance(x, bytes) else str(x) for x in a.reshape(-1)]
        data = [x.encode("utf-8") for x in items]
        h.update(f"str{a.shape}".encode())
        h.update(np.array([len(b) for b in data], dtype="<u8").tobytes())
        h.update(b"".join(data))
    else:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def dataset_digest(value) -> str:
    """The sha256 `write_cache` stores for each dataset and `FeatureCache.open` verifies
    (public so the checksum benchmark times exactly it)."""
    return _digest(value)


def _digest_start(a: np.ndarray, shape: tuple | None = None):
    """A streaming `_digest` of a numeric array: the header now, rows via `_digest_update`
    (row blocks of a C-contiguous array are its byte stream, so the digest is the same)."""
    h = hashlib.sha256()
    dt = a.dtype.newbyteorder("<")
    h.update(f"{dt.str}{tuple(a.shape if shape is None else shape)}".encode())
    return h


def _digest_update(h, block: np.ndarray) -> None:
    b = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    h.update(b.reshape(-1).view(np.uint8))


def _row_blocks(ds, rows: int | None = None) -> Iterator[tuple[int, int]]:
    n = ds.shape[0] if ds.ndim else 0
    if not ds.ndim:
        yield 0, 0
        return
    step = rows or _block_rows(int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    for start in range(0, n, step):
        yield start, min(n, start + step)
    if n == 0:
        yield 0, 0


def _header_digest(raw: dict) -> str:
    """sha256 of every attribute but `header_sha256` itself and `created` (a timestamp that
    says nothing about the numbers: two identical runs get identical checksums), as
    canonical JSON."""
    canon = {k: _decode_attr(v) for k, v in raw.items() if k not in ("header_sha256",
                                                                      "created")}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def _verify_header(path: Path, raw: dict) -> None:
    want = _decode_attr(raw.get("header_sha256", ""))
    if not want:
        raise CacheError(f"{path}: attribute header_sha256 is missing; the file was altered "
                         "after writing; re-encode it")
    if _header_digest(raw) != want:
        raise CacheError(f"{path}: the attributes (classes, model, preprocessing, ...) do not "
                         "match their checksum: hand-edited or corrupted; re-encode it with "
                         "`skincache encode ... --force`")


_REQUIRED_ATTRS = ("key", "model", "weights_sha256", "embed_dim", "logit_scale", "precision",
                   "preprocess", "views", "classes", "class_names", "split_order", "created",
                   "versions", "dataset", "dataset_kind", "dataset_root", "dataset_fingerprint",
                   "feature_dtype")
_JSON_ATTRS = ("preprocess", "views", "versions", "template_sets", "chunking")


def _check_attrs(path: Path, attrs: dict, f: h5py.File) -> tuple[list[str], list[str]]:
    """Refuse, with one line, attributes that make no sense whatever their checksum says
    (old caches have none): (classes, split order) when they are sound."""
    missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise CacheError(f"{path}: attribute {missing[0]!r} is missing; re-encode it")

    def as_json(name: str):
        try:
            return json.loads(attrs[name])
        except (TypeError, ValueError):
            raise CacheError(f"{path}: attribute {name!r} is not valid JSON "
                             f"({str(attrs[name])[:60]!r}); re-encode it") from None

    classes = as_json("classes")
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):
        raise CacheError(f"{path}: attribute 'classes' must be a list of at least 2 distinct "
                         f"names, got {str(attrs['classes'])[:80]!r}; re-encode it")
    names = as_json("class_names")
    if not (isinstance(names, list) and len(names) == len(classes)):
        raise CacheError(f"{path}: attribute 'class_names' does not list one name per class "
                         f"({len(classes)}); re-encode it")
    order = as_json("split_order")
    if not (isinstance(order, list) and order and all(isinstance(s, str) for s in order)
            and len(set(order)) == len(order)):
        raise CacheError(f"{path}: attribute 'split_order' must list the splits, got "
                         f"{str(attrs['split_order'])[:80]!r}; re-encode it")
    have = set(f["splits"]) if "splits" in f else set()
    absent = [s for s in order if s not in have]
    if absent:
        raise CacheError(f"{path}: attribute 'split_order' names split '{absent[0]}', which "
                         f"the file does not hold (has {sorted(have)}); re-encode it")
    for name in _JSON_ATTRS:
        if name in attrs:
            as_json(name)
    try:
        scale = float(attrs["logit_scale"])
        dim = int(attrs["embed_dim"])
    except (TypeError, ValueError):
        raise CacheError(f"{path}: attribute logit_scale or embed_dim is not a number; "
                         "re-encode it") from None
    if not (math.isfinite(scale) and 0 < scale <= 1000):
        raise CacheError(f"{path}: attribute logit_scale = {scale} is outside (0, 1000] "
                         "(CLIP's is at most 100); re-encode it")
    if not 1 <= dim <= 1 << 16:
        raise CacheError(f"{path}: attribute embed_dim = {dim} is not a feature dimension; "
                         "re-encode it")
    return classes, order


# --------------------------------------------------------------------------- writing


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
            warnings.warn(f"{path}: damaged chunk ({type(e).__name__}: {_first_line(e)[:80]});"
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


#: CacheHeader fields stored as JSON text in the HDF5 attributes.
_JSON_FIELDS = ("preprocess", "views", "classes", "class_names", "template_sets", "chunking",
                "versions", "split_origin")


@dataclass
class CacheHeader:
    """The root attributes `encode` writes and `summary` reads back: their names live here,
    once. JSON-valued attributes are held decoded. (`write_cache` adds the format, schema,
    split order, checksums and completeness flag itself.)"""

    key: str
    model: str
    weights_sha256: str
    embed_dim: int
    logit_scale: float
    precision: str
    preprocess: dict
    views: dict
    dataset: str
    dataset_kind: str
    dataset_root: str
    dataset_fingerprint: str
    classes: list
    class_names: list
    template_sets: dict
    versions: dict
    created: str = ""
    skincache_version: str = ""
    pretrained: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    device: str = ""
    features_normalized: bool = False
    chunking: dict = field(default_factory=dict)
    #: where the splits came from when not the seed or the source (`Dataset.split_origin`:
    #: a split file and its sha256, how many lesion mates --drop-lesion-mates left out)
    split_origin: dict = field(default_factory=dict)

    def to_attrs(self) -> dict:
        """The attributes as `write_cache` takes them (JSON-valued ones encoded)."""
        return {f.name: json.dumps(getattr(self, f.name)) if f.name in _JSON_FIELDS
                else getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict) -> CacheHeader:
        """From a cache's (checked) attributes; ones an older cache lacks take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: json.loads(v) if k in _JSON_FIELDS and isinstance(v, str) else v
                  for k, v in attrs.items() if k in known}
        for name in ("preprocess", "views", "template_sets", "versions"):
            values.setdefault(name, {})
        for name in ("dataset", "dataset_kind", "dataset_root", "dataset_fingerprint"):
            values.setdefault(name, "")
        values.setdefault("class_names", values.get("classes", []))
        return cls(**values)


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
    """Write a complete cache atomically (tmp file, fsync, rename), with a sha256 of every
    dataset and of the attributes, checked by `FeatureCache.open`.

    HDF5 builds the file in memory and plain Python writes it out: HDF5 writing straight to a
    disk that fills up fails in many places at once (a flood of errors from every handle's
    destructor, and a segfault was seen), while a plain write fails once, cleanly. The cost is
    one copy of the cache in memory (the arrays already are). On any failure the `.h5.tmp` is
    removed; OSErrors the disk caused become a one-line `DiskError`."""
    tmp = path.with_name(path.name + ".tmp")
    image = io.BytesIO()
    _write_h5(image, attrs, splits, text, failed)
    try:
        atomic_write(tmp, lambda fh: _write_view(fh, image.getbuffer()))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        de = disk_error(e, tmp, "writing")
        if de is not None:
            raise de from None
        raise


def _write_view(fh, view: memoryview, block: int = 1 << 24) -> None:
    for start in range(0, len(view), block):
        fh.write(view[start:start + block])


def _write_h5(target, attrs: dict, splits: dict[str, SplitArrays],
              text: dict[str, np.ndarray], failed: dict[str, list[str]]) -> None:
    sums: dict[str, str] = {}
    with h5py.File(target, "w") as f:
        def put(name: str, data, dtype=None) -> None:
            ds = f.create_dataset(name, data=data, dtype=dtype)
            sums[name] = _digest(_strs(ds) if dtype is _STR else data)

        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["format"] = "skincache-features"
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["feature_dtype"] = np.dtype(FEATURE_DTYPE).name
        f.attrs["split_order"] = json.dumps(list(splits))
        f.attrs["complete"] = False
        f.create_group("splits")
        for name, s in splits.items():
            base = f"splits/{name}"
            f.create_group(base)
            put(f"{base}/features", s.features.astype(FEATURE_DTYPE))
            put(f"{base}/views", s.views.astype(FEATURE_DTYPE))
            put(f"{base}/labels", s.labels.astype(np.int16))
            put(f"{base}/image_id", s.image_id, _STR)
            put(f"{base}/group_id", s.group_id, _STR)
            put(f"{base}/sha1", s.sha1, _STR)
            f.create_group(f"{base}/meta")
            for col, values in s.meta.items():
                put(f"{base}/meta/{col}", values, _STR)
        f.create_group("text")
        for name, arr in text.items():
            put(f"text/{name}", arr.astype(np.float32))
        f.create_group("failed")
        for col, values in failed.items():
            put(f"failed/{col}", values, _STR)
        f.attrs["checksums"] = json.dumps(sums, sort_keys=True)
        f.attrs["complete"] = True
        f.attrs["header_sha256"] = _header_digest(dict(f.attrs))


def estimate_cache_bytes(splits: dict[str, SplitArrays], text: dict[str, np.ndarray],
                         failed: dict[str, list[str]]) -> int:
    """A generous estimate of the `.h5` size, to refuse assembly on a disk that cannot hold
    it (HDF5 on a full disk fails in many places at once)."""
    n = 0
    for s in splits.values():
        n += (s.features.size + s.views.size) * np.dtype(FEATURE_DTYPE).itemsize
        n += s.labels.size * 2
        for col in (s.image_id, s.group_id, s.sha1, *s.meta.values()):
            n += sum(len(x) for x in col) + 16 * len(col)
    n += sum(a.size * 4 for a in text.values())
    n += sum(sum(len(x) for x in col) + 16 * len(col) for col in failed.values())
    return int(n * 1.2) + (256 << 10)

"""Reading a cache: `FeatureCache.open` checks the header (against `CacheHeader`'s schema and
its checksum) and every split's shapes without reading feature data; `SplitData` reads each
column on demand, verified against its sha256 as it arrives. Damaged files (truncated,
overwritten, a looping string heap) are one `CacheError` line, never a hang or a traceback.

HDF5 and numpy only (no torch, no open_clip), so heads and reports read a cache without
loading a model."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from skincache.cache.digest import (
    _block_rows,
    _decode_attr,
    _digest,
    _digest_start,
    _digest_update,
    _header_digest,
    _row_blocks,
    _strs,
)
from skincache.cache.schema import (
    OLDEST_READABLE_SCHEMA,
    SCHEMA_VERSION,
    CacheError,
    CacheHeader,
    CacheWarning,
    first_line,
)
from skincache.errors import SkincacheError


class _SplitSource:
    """Where a lazy split's datasets live: the cache file, re-opened per read (a `FeatureCache`
    holds no HDF5 handle, so it survives forks and never pins the file), each dataset checked
    against its sha256 the first time it is read, streaming the hash in blocks."""

    def __init__(self, owner: FeatureCache, base: str, n: int, dim: int, k: int,
                 pre_dim: int = 0):
        self.owner, self.base, self.n, self.dim, self.k = owner, base, n, dim, k
        self.pre_dim = pre_dim  # 0: no pre-projection features

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
            if col in ("features", "views", "features_pre", "views_pre"):
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

    features_pre = property(lambda self: self._get_pre("features_pre"))
    views_pre = property(lambda self: self._get_pre("views_pre"))

    def _get_pre(self, col: str, as16: bool = False) -> np.ndarray:
        if not self.has_pre:
            raise CacheError("this split has no pre-projection features (encode with "
                             "--pre-projection)")
        return self._get16(col) if as16 else self._get(col)

    @property
    def has_pre(self) -> bool:
        """Whether the split holds `features_pre` / `views_pre` (encode --pre-projection)."""
        if self._source is not None:
            return self._source.pre_dim > 0
        return "features_pre" in self._have

    @property
    def features_pre16(self) -> np.ndarray:
        """The pre-projection clean-view features as stored (float16), read once."""
        return self._get_pre("features_pre", as16=True)

    @property
    def views_pre16(self) -> np.ndarray:
        return self._get_pre("views_pre", as16=True)

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
    everything into memory at once, as small caches may prefer.

    `header` is the typed view of the attributes (what callers read); `attrs` holds them as
    stored (JSON ones as text), for the checksum and the encoding key. `header_type` is the
    schema the reader checks and builds `header` from (a subclass may extend it)."""

    header_type: type[CacheHeader] = CacheHeader

    def __init__(self, path: Path, attrs: dict, splits: dict[str, SplitData],
                 text: dict[str, np.ndarray], failed: list[dict]):
        self.path = path
        self.attrs = attrs
        self.splits = splits
        self.text = text
        self.failed = failed
        #: `/concepts/`'s arrays (`encoder.encode_concepts`); {} for a cache without them
        self.concepts: dict[str, np.ndarray] = {}
        self._sums: dict[str, str] | None = None  # None: schema 1, nothing to verify
        self._verified: set[str] = set()
        self._header = ""

    @classmethod
    def open(cls, path: str | Path, load: bool = False) -> FeatureCache:
        """Open and check a cache; refuses partial, foreign or newer-schema files. Split data is
        read lazily unless `load`."""
        path = Path(path)
        if path.name.endswith(".partial") or path.suffix == ".tmp":
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
            if path.is_file() and not h5py.is_hdf5(path):  # not a damaged cache: another file
                raise CacheError(f"{path}: not a readable HDF5 file (no HDF5 signature), so "
                                 "not a skincache cache: a cache is the .h5 file `skincache "
                                 "encode` writes into --cache-dir") from None
            raise CacheError(f"{path}: not a readable HDF5 file ({first_line(e)}); "
                             "re-encode it with `skincache encode ... --force`") from None
        try:
            with f:
                _refuse_damaged_heaps(path, f)
                yield f
        except _H5PY_ERRORS as e:
            if isinstance(e, SkincacheError):
                raise
            raise CacheError(f"{path}: damaged cache file ({type(e).__name__}: "
                             f"{first_line(e)}); re-encode it with "
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
        classes, split_order = _check_attrs(path, attrs, f, cls.header_type)
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
            pre_dim = _pre_dim(path, name, g, n, views.shape[1],
                               int(attrs.get("pre_projection_dim", 0) or 0))
            meta_cols = tuple(g["meta"]) if "meta" in g else ()
            cols = {c: g[c] for c in ("image_id", "group_id", "sha1")}
            cols.update({c: g["meta"][c] for c in meta_cols})
            bad = [c for c, v in cols.items() if v.shape != (n,)]
            if bad:
                raise CacheError(f"{path}: split '{name}': column {bad[0]} has a different "
                                 f"length than the labels ({n}); re-encode it")
            fc.splits[name] = SplitData(_source=_SplitSource(fc, base, n, dim, views.shape[1],
                                                             pre_dim),
                                        _meta_cols=meta_cols)
        # text prototypes and the failed table are small: read (and verified) now
        if "text" in f:
            for name in f["text"]:
                arr = fc._read_dataset(f"text/{name}")
                if arr.ndim != 3 or arr.shape[0] != n_classes or arr.shape[2] != dim:
                    raise CacheError(f"{path}: text/{name} has shape {arr.shape}, expected "
                                     f"[{n_classes}, T, {dim}]; re-encode it")
                fc.text[name] = arr
        if "concepts" in f:  # small (a few hundred prompts): read and verified now
            fc.concepts = {n: fc._read_dataset(f"concepts/{n}") for n in f["concepts"]}
            for n in ("prompt_embeddings", "reference_embeddings"):
                arr = fc.concepts.get(n)
                if arr is None or arr.ndim != 2 or arr.shape[1] != dim:
                    raise CacheError(f"{path}: concepts/{n} is missing or not [n, {dim}]; "
                                     "re-encode it")
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
        return self.header_type.encoding_key_of(self.attrs)

    @property
    def classes(self) -> list[str]:
        return self.header.classes

    @property
    def class_names(self) -> list[str]:
        return self.header.class_names

    @property
    def logit_scale(self) -> float:
        return float(self.header.logit_scale)

    def split(self, name: str) -> SplitData:
        if name not in self.splits:
            raise CacheError(f"{self.path}: no split '{name}' (has {list(self.splits)})")
        return self.splits[name]

    @functools.cached_property
    def header(self) -> CacheHeader:
        """The attributes encode wrote, typed (`header_type`), decoded once."""
        return self.header_type.from_attrs(self.attrs)

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
            "pre_projection_dim": int(h.pre_projection_dim or 0),
            "feature_dtype": a["feature_dtype"],
            "splits": {s: len(d) for s, d in self.splits.items()},
            "class_counts": counts,
            "text_sets": {k: list(v.shape) for k, v in self.text.items()},
            "concepts": {**h.concepts, "stored": len(self.concepts.get("names", []))},
            "failed": len(self.failed),
            "failed_reasons": reasons,
            "created": h.created,
            "versions": h.versions,
        }



#: what h5py raises on a damaged file (its errors map HDF5's error stack onto these)
_H5PY_ERRORS = (KeyError, OSError, ValueError, TypeError, RuntimeError, IndexError)


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


def _pre_dim(path: Path, name: str, g: h5py.Group, n: int, k: int, want: int) -> int:
    """The split's pre-projection dimension (0: none), its shapes checked against the header's
    `pre_projection_dim` (old caches have neither)."""
    have = "features_pre" in g, "views_pre" in g
    if not any(have) and not want:
        return 0
    if not all(have) or not want:
        raise CacheError(f"{path}: split '{name}': the pre-projection features and the "
                         f"header's pre_projection_dim ({want}) disagree (features_pre "
                         f"{'present' if have[0] else 'absent'}, views_pre "
                         f"{'present' if have[1] else 'absent'}); re-encode it")
    fp, vp = g["features_pre"].shape, g["views_pre"].shape
    if fp != (n, want) or vp != (n, k, want):
        raise CacheError(f"{path}: split '{name}' has inconsistent pre-projection shapes "
                         f"(features_pre {fp}, views_pre {vp}, pre_projection_dim {want}); "
                         "re-encode it")
    return want


def _verify_header(path: Path, raw: dict) -> None:
    want = _decode_attr(raw.get("header_sha256", ""))
    if not want:
        raise CacheError(f"{path}: attribute header_sha256 is missing; the file was altered "
                         "after writing; re-encode it")
    if _header_digest(raw) != want:
        raise CacheError(f"{path}: the attributes (classes, model, preprocessing, ...) do not "
                         "match their checksum: hand-edited or corrupted; re-encode it with "
                         "`skincache encode ... --force`")


def _check_attrs(path: Path, attrs: dict, f: h5py.File, schema: type[CacheHeader]
                 ) -> tuple[list[str], list[str]]:
    """Refuse, with one line, attributes that make no sense whatever their checksum says
    (old caches have none): (classes, split order) when they are sound. What is required
    and what is JSON is `schema`'s field metadata."""
    missing = [k for k in schema.required_attrs() if k not in attrs]
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
    for name in schema.json_attrs():
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


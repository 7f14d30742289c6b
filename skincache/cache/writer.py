"""Writing a complete cache: the header's attributes, every split's arrays (features and views
as float16), the text prototypes and the failed-images table, with a sha256 of every dataset
and of the attributes, assembled in memory and written atomically (`<name>.h5.tmp`, fsync,
rename): a reader never sees half a cache under the final name."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from skincache._disk import disk_error
from skincache._io import atomic_write
from skincache.cache.digest import _digest, _header_digest, _strs
from skincache.cache.schema import SCHEMA_VERSION, CacheHeader

FEATURE_DTYPE = np.float16
_STR = h5py.string_dtype()


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
    #: encode --pre-projection: the pooled outputs before the final projection
    features_pre: np.ndarray | None = None
    views_pre: np.ndarray | None = None


def write_cache(path: Path, header: CacheHeader, splits: dict[str, SplitArrays],
                text: dict[str, np.ndarray], failed: dict[str, list[str]],
                concepts: dict[str, np.ndarray] | None = None) -> None:
    """Write a complete cache atomically (tmp file, fsync, rename), with a sha256 of every
    dataset and of the attributes, checked by `FeatureCache.open`. The root attributes are
    `header`'s fields (`CacheHeader.to_attrs`) and the ones the writer owns (format, schema,
    feature dtype, split order, checksums, completeness).

    HDF5 builds the file in memory and plain Python writes it out: HDF5 writing straight to a
    disk that fills up fails in many places at once (a flood of errors from every handle's
    destructor, and a segfault was seen), while a plain write fails once, cleanly. The cost is
    one copy of the cache in memory (the arrays already are). On any failure the `.h5.tmp` is
    removed; OSErrors the disk caused become a one-line `DiskError`. `concepts`: the concept
    arrays (`encoder.encode_concepts`) stored under `/concepts/`, strings as strings."""
    tmp = path.with_name(path.name + ".tmp")
    image = io.BytesIO()
    _write_h5(image, header.to_attrs(), splits, text, failed, concepts or {})
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
              text: dict[str, np.ndarray], failed: dict[str, list[str]],
              concepts: dict[str, np.ndarray]) -> None:
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
            if s.features_pre is not None and s.views_pre is not None:
                put(f"{base}/features_pre", s.features_pre.astype(FEATURE_DTYPE))
                put(f"{base}/views_pre", s.views_pre.astype(FEATURE_DTYPE))
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
        if concepts:
            f.create_group("concepts")
            for name, arr in concepts.items():
                arr = np.asarray(arr)
                if arr.dtype.kind in "US":
                    put(f"concepts/{name}", [str(x) for x in arr], _STR)
                else:
                    put(f"concepts/{name}", arr)
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
        if s.features_pre is not None and s.views_pre is not None:
            n += (s.features_pre.size + s.views_pre.size) * np.dtype(FEATURE_DTYPE).itemsize
        n += s.labels.size * 2
        for col in (s.image_id, s.group_id, s.sha1, *s.meta.values()):
            n += sum(len(x) for x in col) + 16 * len(col)
    n += sum(a.size * 4 for a in text.values())
    n += sum(sum(len(x) for x in col) + 16 * len(col) for col in failed.values())
    return int(n * 1.2) + (256 << 10)

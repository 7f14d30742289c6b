"""The HDF5 feature cache: its schema, its key, crash-safe writing and a strict reader.

Knows HDF5 and numpy only (no torch, no open_clip), so heads and reports can read a cache
without loading a model. Inside, bottom to top: `schema.py` (`CacheHeader`, the one statement
of the attributes; errors; the key), `digest.py` (checksums), `partial.py` (the partial folder
and the lock), `writer.py` (`write_cache`), `reader.py` (`FeatureCache`, `SplitData`).

Writing is two-phase. While encoding, each chunk of images is committed as its own small
`.npz` file inside `<name>.partial/` (written to a temporary name, fsynced, then renamed), so a
run killed at any instant loses at most the chunk in flight and the next run resumes after the
last committed chunk. When every chunk is there, the HDF5 file is assembled as `<name>.h5.tmp`
and renamed to `<name>.h5`: a reader never sees half a cache under the final name.

Names are re-exported lazily: `from skincache.cache import CacheWarning` imports the schema
alone, without numpy or h5py.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the submodule that defines it
_EXPORTS = {
    **dict.fromkeys(("SCHEMA_VERSION", "OLDEST_READABLE_SCHEMA", "CacheError", "CacheBusyError",
                     "CacheWarning", "CacheHeader", "ModelRef", "cache_key", "cache_name"),
                    "schema"),
    "dataset_digest": "digest",
    **dict.fromkeys(("CacheLock", "PartialCache"), "partial"),
    **dict.fromkeys(("FEATURE_DTYPE", "SplitArrays", "write_cache", "estimate_cache_bytes"),
                    "writer"),
    **dict.fromkeys(("FeatureCache", "SplitData"), "reader"),
}
#: the disk-error helpers live in `skincache._disk` (a lower layer); still importable here
_DISK = ("DISK_ERRNOS", "disk_error", "make_disk_error", "check_writable_dir")

__all__ = ["CacheBusyError", "CacheError", "CacheHeader", "CacheLock", "CacheWarning",
           "DISK_ERRNOS", "FEATURE_DTYPE", "FeatureCache", "ModelRef", "OLDEST_READABLE_SCHEMA",
           "PartialCache", "SCHEMA_VERSION", "SplitArrays", "SplitData", "cache_key",
           "cache_name", "check_writable_dir", "dataset_digest", "disk_error",
           "estimate_cache_bytes", "make_disk_error", "write_cache"]

if TYPE_CHECKING:
    from skincache._disk import check_writable_dir, disk_error, make_disk_error
    from skincache.cache.digest import dataset_digest
    from skincache.cache.partial import CacheLock, PartialCache
    from skincache.cache.reader import FeatureCache, SplitData
    from skincache.cache.schema import (
        OLDEST_READABLE_SCHEMA,
        SCHEMA_VERSION,
        CacheBusyError,
        CacheError,
        CacheHeader,
        CacheWarning,
        ModelRef,
        cache_key,
        cache_name,
    )
    from skincache.cache.writer import (
        FEATURE_DTYPE,
        SplitArrays,
        estimate_cache_bytes,
        write_cache,
    )
    from skincache.defaults import DISK_ERRNOS


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"skincache.cache.{_EXPORTS[name]}")
    elif name == "DISK_ERRNOS":
        module = importlib.import_module("skincache.defaults")
    elif name in _DISK:
        module = importlib.import_module("skincache._disk")
    else:
        raise AttributeError(f"module 'skincache.cache' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

"""Data sources, splits, the synthetic demo set, the leakage audit and the downloader.

Everything here produces or inspects `Dataset`s of `Record`s (one per image); nothing here
decodes images for the model or knows about the cache.

Names are re-exported lazily, by name (as `skincache/__init__.py` does): the CLI reads the
source registry for its help text at import, and that must not pull in numpy with `demo`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "SPLITS": "_record", "DataError": "_record", "Dataset": "_record", "Record": "_record",
    "AuditReport": "audit", "audit_dataset": "audit",
    "DX_NAMES": "classes", "HAM10000_CLASSES": "classes", "display_name": "classes",
    "with_test_set": "combine",
    "make_demo_dataset": "demo", "synthetic_features": "demo",
    "FetchError": "fetch", "fetch_ham10000": "fetch",
    "detect_kind": "sources", "load_dataset": "sources", "read_image_bytes": "sources",
    "list_sources": "sources", "register_source": "sources",
    "DEFAULT_RATIOS": "splits", "assign_splits": "splits", "limit_dataset": "splits",
    "SplitFile": "_split_file", "read_split_file": "_split_file",
    "apply_split_file": "_split_file", "drop_test_lesion_mates": "_split_file",
}

__all__ = sorted(_EXPORTS)

def __getattr__(name: str) -> Any:
    """Import the defining submodule on first use, then keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

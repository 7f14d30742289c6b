"""Small things every module needs once: files written whole or not at all (a temp file in
the same folder, then a rename, so a reader never sees half a result and a crash leaves the old
file), JSON without NaN, the UTC timestamp runs record, and the library versions they record.

Nothing here imports torch or another skincache module."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

__version__ = "0.1.0"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], *, fsync: bool = True,
                 tmp: Path | None = None) -> Path:
    """`write(fh)` into `tmp` (default `<name>.tmp` beside `path`), fsync, rename onto `path`.
    On any failure (a full disk, an exception in `write`) the temp file is removed and the
    error raised as it is; the old `path`, if any, is untouched."""
    path = Path(path)
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomic UTF-8 text write (folders created; the temp name holds the pid, so processes
    writing the same file never share a temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(text.encode()), fsync=False,
                        tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON write (indent 2). NaN/inf are written as null, never as invalid JSON."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _finite(obj.item())
    return obj


def now_iso() -> str:
    """UTC now, to the second, ISO 8601 (what every run and result records)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_MODULES = {"pillow": "PIL"}  # the version key -> the module that has the __version__


def versions(*names: str) -> dict[str, str]:
    """{"skincache": __version__, name: version...} in the order given, as caches and run
    folders record them; "python" is the interpreter's version."""
    import importlib
    import platform

    out = {"skincache": __version__}
    for name in names:
        out[name] = (platform.python_version() if name == "python" else
                     importlib.import_module(_MODULES.get(name, name)).__version__)
    return out

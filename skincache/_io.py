"""Small things every module needs once: files written whole or not at all (a temp file in
the same folder, then a rename, so a reader never sees half a result and a crash leaves the old
file), JSON without NaN, the UTC timestamp runs record, and the library versions they record.

Nothing here imports torch or a skincache module other than `errors`."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputFileError, NotFoundError

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
    return atomic_write_text(path, json.dumps(plain_json(obj), indent=2, allow_nan=False) + "\n")


def plain_json(obj: Any) -> Any:
    """`obj` as plain JSON values, the one coercion every writer uses (run.json, head.json,
    metrics): numpy scalars become Python ones, tuples lists, NaN/inf null (valid JSON, and
    a missing number reads as missing), dicts and lists converted all the way down."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: plain_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return plain_json(obj.item())
    return obj


def file_safe(text: str) -> str:
    """`text` with every character but letters, digits and `-_.` turned into '-': safe as
    a file or folder name (cache names, evaluation names) and still readable."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def read_regular(path: str | Path, *, max_bytes: int = 64 << 20, what: str = "file") -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes`.

    Opened non-blocking and checked with fstat on the open descriptor, so a FIFO, a socket,
    a device or a symlink to `/dev/zero` is refused at once (never waited on, never read
    without end). Raises NotFoundError / InputFileError naming `what` and the path."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise NotFoundError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{what} {path} is a folder, not a file") from exc
    except OSError as exc:
        raise InputFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputFileError(f"{what} {path} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{what} {path} is not a regular file (a FIFO, socket or "
                                 "device); refusing to read it")
        if st.st_size > max_bytes:
            raise InputFileError(f"{what} {path} is {st.st_size:,} bytes, over the "
                                 f"{max_bytes:,}-byte limit for it")
        chunks, total = [], 0
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            total += len(block)
            if total > max_bytes:
                raise InputFileError(f"{what} {path} grew past the {max_bytes:,}-byte limit "
                                     "while being read")
            chunks.append(block)
        return b"".join(chunks)
    except OSError as exc:
        if isinstance(exc, InputFileError | NotFoundError):
            raise
        raise InputFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def read_json_file(path: str | Path, *, max_bytes: int = 64 << 20, what: str = "file") -> Any:
    """JSON from a regular UTF-8 file (`read_regular`'s refusals), one InputFileError line for
    invalid UTF-8, invalid JSON or JSON nested too deep to parse."""
    raw = read_regular(path, max_bytes=max_bytes, what=what)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
                             ) from exc
    except RecursionError as exc:
        raise InputFileError(f"{what} {path} is JSON nested too deep to read") from exc


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

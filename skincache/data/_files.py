"""Small file-system and CSV helpers shared by the data sources.

Kept apart from the loaders so that every source finds images, reads CSV headers and names
splits the same way (one walk of the tree, one spelling of "val").
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from skincache.errors import InputFileError

IMAGE_EXTS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)
JPEG_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg"})

# Spellings of split names found in the wild -> the canonical names of `SPLITS`.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


def normalize_split(value: str | None) -> str | None:
    """The canonical split name for a source's spelling; empty -> None; unknown names kept
    as given (lower-cased) so a custom split survives."""
    if value is None:
        return None
    v = value.strip().lower()
    if not v:
        return None
    return SPLIT_ALIASES.get(v, v)


def split_from_name(parts: Iterable[str]) -> str | None:
    """The split named by the first word of `parts` (file stem, then parent folders) that is a
    known split spelling, e.g. `train-00000-of-00005` -> train, `validation/0.parquet` -> val."""
    for part in parts:
        for token in re.split(r"[^a-z0-9]+", part.lower()):
            if token in SPLIT_ALIASES:
                return SPLIT_ALIASES[token]
    return None


def slug(text: str) -> str:
    """A short file-name-safe name: lower case, runs of other characters turned into '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "dataset"


def index_files(root: Path | str, exts: frozenset[str] = JPEG_EXTS) -> dict[str, str]:
    """Map file stem -> absolute path (a str) for every file below `root` with one of `exts`.

    One walk of the tree (not one search per image), in sorted order so that when a stem
    occurs twice the same file wins on every machine. Hidden folders are skipped. Paths are
    plain strings joined onto the resolved root: building 10,000 Path objects, or resolving
    each, costs more than the walk itself.
    """
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(Path(root).resolve()):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts and stem not in found:
                found[stem] = os.path.join(dirpath, name)
    return found


def open_regular(path: Path, mode: str = "rb", **kw) -> IO:
    """`open(path, mode)` for reading, refusing at once anything but a regular file: opened
    non-blocking and checked with fstat on the descriptor (as `_io.read_regular` does), so a
    FIFO named like a metadata CSV is one InputFileError line, not a read that waits for ever.
    For files read a row at a time, which `read_regular` (whole file in memory) does not do."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputFileError(f"{path} is not a regular file (a FIFO, socket, device or "
                                 "folder); refusing to read it; replace it with the real file")
        os.set_blocking(fd, True)
        return open(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def read_csv_header(path: Path) -> list[str]:
    """The first row of a CSV, stripped; [] for an empty or unreadable file; a FIFO or device
    in its place is an InputFileError (it would block the read for ever).

    Only the first line is decoded (bad bytes replaced): a non-UTF-8 byte further down is
    reported by `read_csv_rows`, naming the file, not turned into "unrecognised header"."""
    try:
        with open_regular(path) as f:
            first = f.readline(1 << 16).decode("utf-8-sig", errors="replace")
        row = next(csv.reader([first]), [])
    except (OSError, csv.Error):
        return []
    return [c.strip() for c in row]


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line number, row dict)]) with values stripped and missing cells as ''.

    Line numbers count the header as line 1 so that error messages point at the file's line.
    A file that is not UTF-8, an unterminated quote, an over-long field or a NUL byte is a
    `DataError` naming the file and line: found here, before any model loads, not as a
    `_csv.Error` traceback or an "unknown label ''" far from its cause.
    """
    from ._record import DataError

    line = 1
    try:
        with open_regular(path, "r", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = [c.strip() for c in next(reader, [])]
            rows: list[tuple[int, dict[str, str]]] = []
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if any("\x00" in c for c in row):
                    raise DataError(f"{path}, line {line}: a NUL byte in a cell; "
                                    "the file is binary or corrupt")
                values = [c.strip() for c in row] + [""] * (len(header) - len(row))
                rows.append((line, dict(zip(header, values, strict=False))))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be "
                        "decoded; Latin-1 or another encoding?); save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}, near line {line + 1}: malformed CSV ({e}; an unterminated "
                        "quote or a field over the size limit?)") from None
    if header and any("\x00" in c for c in header):
        raise DataError(f"{path}, line 1: a NUL byte in the header; the file is binary or corrupt")
    return header, rows

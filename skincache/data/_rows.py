"""Checks on the rows of a metadata CSV, shared by the CSV-based sources (HAM10000, ISIC 2018,
`path,label`), so that a missing column or an id that is a path reads the same in each."""

from __future__ import annotations

import os
from pathlib import Path

from ._record import DataError


def plain_id(path: Path, line: int, image_id: str, column: str) -> str:
    """An image id that names a file below the dataset folder: not empty, no path separator,
    not `.`/`..`. An id such as `../../outside/secret` would otherwise be read from outside
    the dataset (the missing-file path is built from the id)."""
    if not image_id:
        raise DataError(f"{path}, line {line}: empty {column}")
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or \
            os.path.isabs(image_id):
        raise DataError(f"{path}, line {line}: {column} {image_id!r} is not a file name "
                        "(ids name images below the dataset folder; no paths)")
    return image_id


def require_columns(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    absent = [c for c in required if c not in header]
    if absent:
        raise DataError(f"{path}: missing columns {absent} (header: {header}; "
                        f"expected {','.join(required)})")

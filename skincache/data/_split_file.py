"""Published splits: read a split file, assign the splits it names, drop test lesions' mates.

A paper's number is only comparable on the paper's test images, so `encode --split-file` takes
them from a file. Two layouts, told apart by the header:

- an id column and a split column (`image_id,split`; values train/val/test and their usual
  spellings): every listed image gets its split;
- an id column alone, or no header and one id per line (a plain text file): the list of test
  images. The DermFM-Zero predictions CSV is such a list (its `filename` column).

Ids are matched on the last path part without an image extension, so `/a/b/ISIC_0025661.jpg`
names `ISIC_0025661`. Either way the file decides the test split exactly: every image the file
does not list goes to train/val by the usual seeded, lesion-grouped split (the train:val shares
of --split-ratios), never to test, so a published image-level split stays as published and its
lesion leak stays visible to `audit`. `drop_test_lesion_mates` then removes that leak by leaving
out every train/val image of a lesion that has an image in test.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .._io import read_regular
from ..errors import InputFileError
from ._files import IMAGE_EXTS, normalize_split
from ._record import SPLITS, DataError, Dataset, Record
from .splits import assign_splits, check_ratios, lesion_mates_of_test

#: header names taken as the image id column, in order of preference
ID_COLUMNS = ("image_id", "image", "filename", "file_name", "file", "isic_id", "id", "ids",
              "name", "path")
#: header names taken as the split column
SPLIT_COLUMNS = ("split", "set", "subset", "partition")
MAX_SPLIT_FILE_BYTES = 64 << 20
_EXAMPLES = 3  # ids named in an error line


@dataclass(frozen=True)
class SplitFile:
    """What a split file says: image id -> split, in file order, and how it said it."""

    path: str
    sha256: str
    layout: str  # "id+split" or "test ids"
    splits: dict[str, str]

    def counts(self) -> dict[str, int]:
        c = Counter(self.splits.values())
        return {s: c[s] for s in SPLITS if c[s]}


def image_id_of(value: str) -> str:
    """The image id a split file's cell names: its last path part, without an image extension
    (`/data/ISIC_0025661.jpg` -> `ISIC_0025661`)."""
    base = re.split(r"[/\\]", value.strip())[-1]
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_EXTS else base


def read_split_file(path: str | Path) -> SplitFile:
    """Parse a split file (see the module doc). Refuses, in one line naming the file and line,
    what is not one: not a regular file, not UTF-8, no rows, no id column, an unknown split
    name, an empty id, one id given two splits."""
    path = Path(path)
    raw = read_regular(path, max_bytes=MAX_SPLIT_FILE_BYTES, what="split file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputFileError(f"split file {path} is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise InputFileError(f"split file {path} holds NUL bytes: a binary file, not a CSV or "
                             "a list of ids")
    rows = _rows(path, text)
    if not rows:
        raise DataError(f"split file {path} lists no image ids")
    header = [c.strip().lower() for c in rows[0][1]]
    id_col = next((header.index(c) for c in ID_COLUMNS if c in header), None)
    if id_col is not None:
        split_col = next((header.index(c) for c in SPLIT_COLUMNS if c in header), None)
        body = rows[1:]
    elif len(header) == 1:
        id_col, split_col, body = 0, None, rows
    elif len(header) == 2 and normalize_split(header[1]) in SPLITS:
        id_col, split_col, body = 0, 1, rows
    else:
        raise DataError(f"split file {path}: no image id column (header {rows[0][1]}); give "
                        f"a CSV with one of {', '.join(ID_COLUMNS[:4])}... (and optionally a "
                        "split column), or one test image id per line")
    splits: dict[str, str] = {}
    where: dict[str, int] = {}
    for line, row in body:
        cell = row[id_col].strip() if id_col < len(row) else ""
        if not cell:
            raise DataError(f"split file {path}, line {line}: empty image id")
        image_id = image_id_of(cell)
        split = "test" if split_col is None else _split_name(path, line, row, split_col)
        if splits.get(image_id, split) != split:
            raise DataError(f"split file {path}, line {line}: {image_id} is given split "
                            f"{split}, but {splits[image_id]} on line {where[image_id]}")
        splits[image_id] = split
        where.setdefault(image_id, line)
    if not splits:
        raise DataError(f"split file {path} lists no image ids (a header only)")
    layout = "test ids" if split_col is None else "id+split"
    return SplitFile(str(path), hashlib.sha256(raw).hexdigest(), layout, splits)


def _rows(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row that is not a `#` comment."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out = []
    try:
        for row in reader:
            if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#"):
                out.append((reader.line_num, row))
    except csv.Error as e:
        raise DataError(f"split file {path}, near line {reader.line_num + 1}: malformed CSV "
                        f"({e})") from None
    return out


def _split_name(path: Path, line: int, row: list[str], col: int) -> str:
    value = row[col].strip() if col < len(row) else ""
    split = normalize_split(value)
    if split not in SPLITS:
        raise DataError(f"split file {path}, line {line}: split {value!r} is none of "
                        f"{', '.join(SPLITS)} (or their spellings training, valid, testing...)")
    return split


def apply_split_file(ds: Dataset, sf: SplitFile, ratios: tuple[float, ...],
                     seed: int) -> Dataset:
    """`ds` with the splits `sf` names; every image it does not list is split train/val by
    `assign_splits` with the train:val shares of `ratios` and `seed` (never test, so the test
    split is exactly the file's). Ids the file names that `ds` lacks are one DataError line
    naming a few and the count. The dataset's name gains `-split<sha256[:8]>`, and
    `split_origin` records the file, its sha256 (part of the cache key) and the counts."""
    check_ratios(ratios)
    known = {r.image_id for r in ds.records}
    unknown = [i for i in sf.splits if i not in known]
    if unknown:
        raise DataError(
            f"split file {sf.path}: {len(unknown):,} of its {len(sf.splits):,} image ids are "
            f"not in {ds.root or ds.name} (e.g. {', '.join(unknown[:_EXAMPLES])}); is it the "
            "split of another dataset, or a subset of this one?")
    listed = [replace(r, split=sf.splits.get(r.image_id)) for r in ds.records]
    rest = [r for r in listed if r.split != "test"]
    n_unlisted = sum(r.split is None for r in rest)
    train, val = ratios[0], ratios[1]
    split_rest = iter(assign_splits(rest, (train / (train + val), val / (train + val)), seed))
    records: list[Record] = [r if r.split == "test" else next(split_rest) for r in listed]
    if not any(r.split == "val" for r in records):
        raise DataError(f"split file {sf.path} puts no image in val and lists every image; "
                        "heads choose their settings on val: add val ids, or list only the "
                        "test ids (the rest is then split train/val by --split-seed)")
    origin = {"file": sf.path, "sha256": sf.sha256, "layout": sf.layout,
              "listed": sf.counts(), "split_by_seed": n_unlisted,
              "split_seed": seed if n_unlisted else None}
    declared = [s for s in SPLITS if any(r.split == s for r in records)]
    return replace(ds, name=f"{ds.name}-split{sf.sha256[:8]}", records=records,
                   declared_splits=declared, split_origin=origin)


def drop_test_lesion_mates(ds: Dataset) -> Dataset:
    """`ds` without the train/val images of lesions that have an image in test (its leak-free
    version); `split_origin` records how many were left out, the name gains `-leakfree`.
    A dataset without a test split is a DataError: there is nothing to protect."""
    if not any(r.split == "test" for r in ds.records):
        raise DataError(f"{ds.root or ds.name}: --drop-lesion-mates needs a test split, and "
                        "this dataset has none")
    mates = set(lesion_mates_of_test(ds.records))
    records = [r for i, r in enumerate(ds.records) if i not in mates]
    kept = {r.image_id for r in records}
    origin = {**ds.split_origin,
              "lesion_mates_dropped": len(mates),
              "lesions_with_mates_dropped": len({ds.records[i].group for i in mates})}
    return replace(ds, name=f"{ds.name}-leakfree", records=records,
                   missing=[m for m in ds.missing if m in kept], split_origin=origin)

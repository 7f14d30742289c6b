"""Data sources: turn a path (HAM10000 folder, ISIC 2018 CSV, parquet shards, generic CSV, class
folders) into a `Dataset` of `Record`s, one per image, in a fixed order.

Each source is one module that registers its loader, detector and layout with
`@register_source` (`_registry.py`): `_ham10000.py`, `_isic2018.py`, `parquet.py`, `_csv.py`,
`_folder.py`. This module imports them (which fills the registry), and everything that lists
sources (detection, `kind:` prefixes, the "expected one of" errors, the CLI help) reads the
registry: adding a source is one module and one import line here.

Loaders never open images: they list what the source says and where the bytes are. An image the
source lists but whose file is not there is kept as a record (its `source` is the expected path,
which does not exist) and its id is added to `Dataset.missing`, so that the encoder can report it
as "listed in metadata but missing" instead of the dataset silently shrinking.

`load_dataset` is the entry point: it detects the kind of source (or takes a `kind:` prefix) and
assigns seeded, lesion-grouped splits where the source has none.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InputFileError
from ._csv import load_csv
from ._folder import load_folder
from ._ham10000 import HAM_COLUMNS, HAM_META, HAM_METADATA, load_ham10000
from ._isic2018 import ISIC_HEADER, is_isic_header, load_isic2018
from ._record import DataError, Dataset
from ._registry import (
    SOURCES,
    Probe,
    Source,
    detect_source,
    expected_text,
    get_source,
    list_sources,
    register_source,
)
from ._registry import help_text as sources_help
from ._split_file import apply_split_file, drop_test_lesion_mates, read_split_file
from .parquet import load_parquet, read_parquet_image, split_source
from .splits import DEFAULT_RATIOS, assign_splits, check_ratios

__all__ = [
    "HAM_COLUMNS", "HAM_META", "HAM_METADATA", "ISIC_HEADER", "MAX_IMAGE_BYTES", "Source",
    "detect_kind", "expected_text", "is_isic_header", "list_sources", "load_csv", "load_dataset",
    "load_folder", "load_ham10000", "load_isic2018", "load_parquet", "parse_spec",
    "read_image_bytes", "register_source", "sources_help",
]


def detect_kind(path: Path) -> str:
    """The name of the registered source that recognises `path` (`_registry.detect_source`);
    a DataError naming the path and every layout when none does."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {expected_text()}")
    source = detect_source(path)
    if source is None:
        raise DataError(f"{path}: {_unrecognised(Probe(path))}; {expected_text()}")
    return source.name


def _unrecognised(probe: Probe) -> str:
    if probe.is_dir:
        return "unrecognised dataset folder"
    if probe.is_file and probe.suffix == ".csv":
        return f"unrecognised CSV header {probe.csv_header}"
    return "unrecognised file type"


def parse_spec(spec: str | Path, kind: str | None = None) -> tuple[str | None, Path]:
    """Split an optional `kind:` prefix off `spec`; the prefix and `kind` must agree."""
    prefix = None
    if isinstance(spec, str):
        head, sep, rest = spec.partition(":")
        if sep and head.lower() in SOURCES:
            prefix, spec = head.lower(), rest
    if kind is not None:
        get_source(kind)  # an unknown kind names the known ones
    if prefix and kind and prefix != kind:
        raise DataError(f"{spec}: prefix '{prefix}:' disagrees with kind={kind!r}")
    return prefix or kind, Path(spec).expanduser()


def load_dataset(
    spec: str | Path,
    *,
    split_ratios: tuple[float, ...] = DEFAULT_RATIOS,
    seed: int = 0,
    kind: str | None = None,
    test: str | Path | None = None,
    split_file: str | Path | None = None,
    drop_lesion_mates: bool = False,
) -> Dataset:
    """Load any registered source and give every record a split.

    `spec` is a path, optionally prefixed with a source's name (`ham10000:`, `isic2018:`,
    `parquet:`, `csv:`, `folder:`, ...); without a prefix (or `kind`) the kind is detected from
    the path. Records that the source gives a split keep it; the others get a seeded split
    stratified by class and grouped by lesion (`assign_splits`). Record order is the source's
    order. `test` names a second source used whole as the test split (e.g. the ISIC 2018 Task 3
    test set); then `split_ratios` should have two entries (train, val).

    `split_file` (a published split, `_split_file.py`) replaces the source's and the seeded
    split: the test split is exactly the file's, and what the file does not list is split
    train/val by seed. `drop_lesion_mates` then leaves out every
    train/val image of a lesion that has an image in test (the split's leak-free version).
    """
    chosen, path = parse_spec(spec, kind)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {expected_text()}")
    if split_file is not None and test is not None:
        raise DataError("--split-file and --test-data both choose the test images; give one "
                        "of them")
    ds = get_source(chosen or detect_kind(path)).load(path)
    if split_file is not None:
        ds = apply_split_file(ds, read_split_file(split_file), split_ratios, seed)
    elif any(r.split is None for r in ds.records):
        ds.records = assign_splits(ds.records, split_ratios, seed)
        ds.declared_splits = check_ratios(split_ratios)
    if test is not None:
        from .combine import with_test_set

        ds = with_test_set(ds, load_dataset(test, split_ratios=split_ratios, seed=seed))
    if drop_lesion_mates:
        ds = drop_test_lesion_mates(ds)
    return ds


#: Largest image file read (bytes). HAM10000 JPEGs are ~250 KB, 30-megapixel dermoscopy
#: images under 30 MB; a cap keeps a symlink to /dev/zero or a huge file from eating memory.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def read_image_bytes(source: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a record's image: a file, or row N of a parquet file (`file::N`).

    Reading parquet rows in order is fast: the last row groups are kept decoded per process.
    A missing file raises FileNotFoundError naming the path. Only regular files are read (a
    FIFO would block forever, a device never ends), and at most `max_bytes` (default
    `MAX_IMAGE_BYTES`): anything else raises `InputFileError` naming the path.
    """
    cap = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    parsed = split_source(source)
    if parsed is not None:
        data = read_parquet_image(*parsed)
        if len(data) > cap:
            raise InputFileError(f"{source}: image is {len(data):,} bytes, over the "
                                 f"{cap:,}-byte limit")
        return data
    # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; fstat then says
    # what was opened (after the open, so a swap between check and open cannot fool it).
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{source}: not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > cap:
            raise InputFileError(f"{source}: file is {st.st_size:,} bytes, over the "
                                 f"{cap:,}-byte image limit")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:  # grew while being read
        raise InputFileError(f"{source}: file is over the {cap:,}-byte image limit")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"

"""Hugging Face-style parquet shards (the `marmal88/skin_cancer` layout).

Listing reads only the small columns (ids, labels, metadata): the image bytes stay on disk until
the encoder asks for them, one row at a time, through `read_parquet_image`. That reader keeps the
last row groups it decoded so that reading rows in order (what the encoder does) decodes each row
group once instead of once per image.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import SPLIT_ALIASES, slug, split_from_name
from ._record import SPLITS, DataError, Dataset, Record
from ._registry import Confidence, Probe, register_source
from .classes import HAM10000_CLASSES

if TYPE_CHECKING:  # pyarrow costs ~0.15 s to import: only loaded when parquet is used
    import pyarrow as pa
    import pyarrow.parquet as pq

IMAGE_COLUMN = "image"
LABEL_COLUMNS = ("dx", "label")
META_COLUMNS = ("dx_type", "age", "sex", "localization")
SEP = "::"

_CACHED_ROW_GROUPS = 2  # row groups kept decoded per process
_CACHED_FILES = 8  # open ParquetFile handles kept per process


def parquet_files(root: Path) -> list[Path]:
    """The parquet files of a dataset folder (searched recursively) or the file itself."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.parquet") if p.is_file())


def parquet_split(path: Path) -> str | None:
    """Split from the file name (`train-00000-of-00005.parquet` -> train), else from a parent
    folder named exactly like a split (`validation/0000.parquet` -> val); None otherwise.
    Only the word-for-word parent counts: a folder such as `test_runs/` names no split."""
    from_stem = split_from_name([path.stem])
    if from_stem is not None:
        return from_stem
    return SPLIT_ALIASES.get(path.parent.name.lower())


def _str(value: object) -> str:
    return "" if value is None else str(value)


def _detect(probe: Probe) -> Confidence:
    """A `.parquet` file, or a folder with parquet files anywhere below: certain."""
    if probe.is_file:
        return Confidence.CERTAIN if probe.suffix == ".parquet" else Confidence.NO
    return Confidence.CERTAIN if probe.is_dir and parquet_files(probe.path) else Confidence.NO


@register_source(
    "parquet", layout="a .parquet file or a folder of parquet shards", detect=_detect,
    priority=30, split="from the file name, else assigned", group="lesion_id",
)
def load_parquet(spec: Path) -> Dataset:
    """Records for every row of every parquet shard under `spec` (a file or a folder).

    `source` is `<absolute file path>::<row index in file>`; split from the file name (None when
    the name has none, to be assigned later); group = `lesion_id` where the column exists.
    Files are taken in split order (train, val, test, other), then by path.
    """
    spec = Path(spec)
    files = parquet_files(spec)
    if not files:
        raise DataError(f"{spec}: no .parquet files found")
    order = {s: i for i, s in enumerate(SPLITS)}
    files.sort(key=lambda p: (order.get(parquet_split(p) or "", len(SPLITS)), str(p)))
    records: list[Record] = []
    for path in files:
        records.extend(_file_records(path))
    name = slug(spec.name if spec.is_dir() else spec.stem)
    return Dataset(name=name, records=records, classes=list(HAM10000_CLASSES),
                   root=str(spec.resolve()), kind="parquet")


def _file_records(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = set(schema.names)
    label_col = next((c for c in LABEL_COLUMNS if c in names), None)
    if IMAGE_COLUMN not in names or label_col is None:
        raise DataError(
            f"{path}: expected columns '{IMAGE_COLUMN}' and 'dx' (the marmal88/skin_cancer "
            f"layout: image, image_id, lesion_id, dx, dx_type, age, sex, localization); "
            f"found {sorted(names)}"
        )
    wanted = [c for c in ("image_id", "lesion_id", label_col, *META_COLUMNS) if c in names]
    table = pq.read_table(path, columns=wanted)  # never the image column
    cols = {c: table.column(c).to_pylist() for c in wanted}
    split = parquet_split(path)
    prefix = str(path.resolve())
    out: list[Record] = []
    for i in range(table.num_rows):
        image_id = _str(cols["image_id"][i]) if "image_id" in cols else ""
        lesion = _str(cols["lesion_id"][i]) if "lesion_id" in cols else ""
        out.append(Record(
            image_id=image_id or f"{path.stem}-{i}",
            source=f"{prefix}{SEP}{i}",
            label=_str(cols[label_col][i]),
            split=split,
            group=lesion or None,
            meta={c: _str(cols[c][i]) for c in META_COLUMNS if c in cols},
        ))
    return out


def split_source(source: str) -> tuple[str, int] | None:
    """(file, row) for a `file::row` source, None for a plain path."""
    path, sep, row = source.rpartition(SEP)
    if sep and row.isdigit():
        return path, int(row)
    return None


class _RowReader:
    """Per-process cache of open parquet files and their last decoded row groups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[tuple[str, int, int], tuple[pq.ParquetFile, list[int]]] = (
            OrderedDict()
        )
        self._groups: OrderedDict[tuple[tuple[str, int, int], int], pa.Array] = OrderedDict()

    def read(self, path: str, row: int) -> bytes:
        st = os.stat(path)  # FileNotFoundError names the path
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            pf, starts = self._open(key)
            if not 0 <= row < pf.metadata.num_rows:
                raise IndexError(f"{path}: row {row} out of range (0..{pf.metadata.num_rows - 1})")
            g = bisect.bisect_right(starts, row) - 1
            images = self._group(key, pf, g)
            value = images[row - starts[g]].as_py()
        if value is None:
            raise DataError(f"{path}: row {row} has no image bytes")
        return value

    def _open(self, key: tuple[str, int, int]) -> tuple[pq.ParquetFile, list[int]]:
        import pyarrow.parquet as pq

        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        pf = pq.ParquetFile(key[0])
        if IMAGE_COLUMN not in pf.schema_arrow.names:
            raise DataError(f"{key[0]}: no '{IMAGE_COLUMN}' column")
        starts, n = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(n)
            n += pf.metadata.row_group(g).num_rows
        self._files[key] = (pf, starts)
        while len(self._files) > _CACHED_FILES:
            self._files.popitem(last=False)
        return pf, starts

    def _group(self, key: tuple[str, int, int], pf: pq.ParquetFile, g: int) -> pa.Array:
        import pyarrow as pa

        gkey = (key, g)
        if gkey in self._groups:
            self._groups.move_to_end(gkey)
            return self._groups[gkey]
        col = pf.read_row_group(g, columns=[IMAGE_COLUMN]).column(IMAGE_COLUMN).combine_chunks()
        if pa.types.is_struct(col.type):
            col = col.field("bytes")
        self._groups[gkey] = col
        while len(self._groups) > _CACHED_ROW_GROUPS:
            self._groups.popitem(last=False)
        return col


_reader = _RowReader()


def read_parquet_image(path: str, row: int) -> bytes:
    """The image bytes of row `row` of parquet file `path` (cached by row group)."""
    return _reader.read(path, row)

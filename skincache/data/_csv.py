"""A generic CSV listing images: `path,label[,split][,group]`."""

from __future__ import annotations

import os
from pathlib import Path

from ._files import normalize_split, read_csv_rows, slug
from ._record import DataError, Dataset, Record
from ._registry import Confidence, Probe, register_source
from ._rows import require_columns


def _detect(probe: Probe) -> Confidence:
    """`path,label` are common column names: likely, not certain."""
    return Confidence.LIKELY if {"path", "label"} <= set(probe.csv_header) else Confidence.NO


@register_source(
    "csv", layout="a CSV with a `path,label` header", detect=_detect, priority=40,
    split="the split column, else assigned", group="the group column",
)
def load_csv(csv_path: Path) -> Dataset:
    """A CSV with `path,label[,split][,group]` (paths relative to the CSV's folder, or absolute).

    image_id = the path without extension; other columns go to `meta`; classes = sorted labels.
    """
    csv_path = Path(csv_path)
    header, rows = read_csv_rows(csv_path)
    require_columns(csv_path, header, ("path", "label"))
    base = csv_path.parent.resolve()
    extra = [c for c in header if c not in ("path", "label", "split", "group")]
    records, missing = [], []
    for line, row in rows:
        rel = row["path"]
        if not rel or not row["label"]:
            raise DataError(f"{csv_path}, line {line}: empty path or label")
        path = os.path.normpath(os.path.join(base, rel))  # rel may be absolute
        if not os.path.isfile(path):
            missing.append(rel)
        records.append(Record(
            image_id=os.path.splitext(Path(rel).as_posix())[0],
            source=path,
            label=row["label"],
            split=normalize_split(row.get("split")),
            group=row.get("group") or None,
            meta={c: row[c] for c in extra},
        ))
    classes = sorted({r.label for r in records})
    return Dataset(name=slug(f"{base.name}-{csv_path.stem}"), records=records,
                   classes=classes, root=str(base), kind="csv", missing=missing)

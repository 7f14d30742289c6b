"""HAM10000 as distributed: `HAM10000_metadata.csv` plus `<image_id>.jpg` anywhere below."""

from __future__ import annotations

import os
from pathlib import Path

from skincache.defaults import HAM10000_COLUMNS, HAM10000_METADATA

from ._files import index_files, read_csv_rows
from ._record import DataError, Dataset, Record
from ._registry import Confidence, Probe, register_source
from ._rows import plain_id, require_columns
from .classes import HAM10000_CLASSES

HAM_METADATA = HAM10000_METADATA
HAM_COLUMNS = HAM10000_COLUMNS[:3]  # required
HAM_META = HAM10000_COLUMNS[3:]  # kept as /meta/<col> where present


def _detect(probe: Probe) -> Confidence:
    """A folder holding the metadata file is certain; a CSV with the HAM columns only likely
    (an ISIC 2018 CSV that also had them would be read as ISIC)."""
    if probe.is_dir:
        return Confidence.CERTAIN if (probe.path / HAM_METADATA).is_file() else Confidence.NO
    return Confidence.LIKELY if set(HAM_COLUMNS) <= set(probe.csv_header) else Confidence.NO


@register_source(
    "ham10000", layout=f"a folder holding {HAM_METADATA}", detect=_detect, priority=10,
    split="assigned", group="lesion_id",
)
def load_ham10000(root: Path) -> Dataset:
    """HAM10000 as distributed: `HAM10000_metadata.csv` plus images anywhere below the folder.

    `root` is the folder (or the metadata CSV itself). group = lesion_id; meta = dx_type, age, sex,
    localization as strings ('' where missing). No split (HAM10000 has none).
    """
    root = Path(root)
    csv_path = root if root.is_file() else root / HAM_METADATA
    if root.is_file():
        root = root.parent
    if not csv_path.is_file():
        raise DataError(f"{root}: no {HAM_METADATA} in this folder")
    header, rows = read_csv_rows(csv_path)
    require_columns(csv_path, header, HAM_COLUMNS)
    root = root.resolve()
    images = index_files(root)
    records, missing = [], []
    for line, row in rows:
        image_id = plain_id(csv_path, line, row["image_id"], "image_id")
        path = images.get(image_id)
        if path is None:
            missing.append(image_id)
            path = os.path.join(root, f"{image_id}.jpg")
        records.append(Record(
            image_id=image_id,
            source=path,
            label=row["dx"].lower(),
            split=None,
            group=row["lesion_id"] or None,
            meta={k: row.get(k, "") for k in HAM_META},
        ))
    return Dataset(name="ham10000", records=records, classes=list(HAM10000_CLASSES),
                   root=str(root), kind="ham10000", missing=missing)

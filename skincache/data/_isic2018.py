"""ISIC 2018 Task 3: the one-hot ground-truth CSV(s) plus images."""

from __future__ import annotations

import os
from pathlib import Path

from ._files import index_files, normalize_split, read_csv_header, read_csv_rows, split_from_name
from ._record import DataError, Dataset, Record
from ._registry import Confidence, Probe, register_source
from ._rows import plain_id, require_columns
from .classes import HAM10000_CLASSES, ISIC_COLUMNS

ISIC_HEADER = ("image", *ISIC_COLUMNS)


def is_isic_header(header: list[str]) -> bool:
    return set(ISIC_HEADER) <= set(header)


def _isic_csvs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.csv") if is_isic_header(read_csv_header(p)))


def _detect(probe: Probe) -> Confidence:
    """The eight-column one-hot header names the format: certain, for the CSV or a folder
    holding one."""
    if probe.is_dir:
        return Confidence.CERTAIN if _isic_csvs(probe.path) else Confidence.NO
    return Confidence.CERTAIN if is_isic_header(probe.csv_header) else Confidence.NO


@register_source(
    "isic2018",
    layout=f"an ISIC 2018 Task 3 ground-truth CSV `{','.join(ISIC_HEADER)}` or a folder "
           "holding one",
    detect=_detect, priority=20, split="from the file name, else test", group="none",
)
def load_isic2018(spec: Path, *, images: Path | None = None, split: str | None = None) -> Dataset:
    """ISIC 2018 Task 3 one-hot ground truth (`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`) plus images.

    `spec` is the CSV, or a folder holding one or more such CSVs (e.g. the Training, Validation
    and Test ground truths). Images are searched recursively below `images` (default: the CSV's
    folder). Split: `split` if given, else the one the file name says (Training/Validation/Test),
    else "test". group = None: no lesion ids are published for the ISIC test set.
    A row that is not exactly one-hot is a DataError naming the file and line.
    """
    spec = Path(spec)
    csvs = [spec] if spec.is_file() else _isic_csvs(spec)
    if not csvs:
        raise DataError(f"{spec}: no ISIC 2018 ground-truth CSV ({','.join(ISIC_HEADER)})")
    folder = (Path(images) if images is not None else csvs[0].parent).resolve()
    index = index_files(folder)
    records, missing = [], []
    for csv_path in csvs:
        header, rows = read_csv_rows(csv_path)
        require_columns(csv_path, header, ISIC_HEADER)
        file_split = normalize_split(split) or split_from_name([csv_path.stem]) or "test"
        for line, row in rows:
            label = _one_hot_label(csv_path, line, row)
            image_id = plain_id(csv_path, line, row["image"], "image")
            path = index.get(image_id)
            if path is None:
                missing.append(image_id)
                path = os.path.join(folder, f"{image_id}.jpg")
            records.append(Record(image_id=image_id, source=path, label=label,
                                  split=file_split, group=None))
    splits = sorted({r.split for r in records if r.split})
    name = f"isic2018-{splits[0]}" if len(splits) == 1 else "isic2018"
    return Dataset(name=name, records=records, classes=list(HAM10000_CLASSES),
                   root=str(folder), kind="isic2018", missing=missing)


def _one_hot_label(path: Path, line: int, row: dict[str, str]) -> str:
    values: dict[str, float] = {}
    for col in ISIC_COLUMNS:
        try:
            values[col] = float(row[col])
        except ValueError:
            raise DataError(
                f"{path}, line {line} ({row.get('image', '?')}): column {col} is "
                f"{row[col]!r}, not a number"
            ) from None
    ones = [c for c, v in values.items() if v == 1.0]
    if len(ones) != 1 or any(v not in (0.0, 1.0) for v in values.values()):
        raise DataError(
            f"{path}, line {line} ({row.get('image', '?')}): not exactly one-hot "
            f"({', '.join(f'{c}={row[c]}' for c in ISIC_COLUMNS)})"
        )
    return ISIC_COLUMNS[ones[0]]

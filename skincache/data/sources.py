"""Data sources: turn a path (HAM10000 folder, ISIC 2018 CSV, parquet shards, generic CSV, class
folders) into a `Dataset` of `Record`s, one per image, in a fixed order.

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
from collections.abc import Callable
from pathlib import Path

from ..errors import InputFileError
from ._files import (
    IMAGE_EXTS,
    SPLIT_ALIASES,
    index_files,
    normalize_split,
    read_csv_header,
    read_csv_rows,
    slug,
    split_from_name,
)
from ._record import DataError, Dataset, Record
from .classes import HAM10000_CLASSES, ISIC_COLUMNS
from .parquet import load_parquet, parquet_files, read_parquet_image, split_source
from .splits import DEFAULT_RATIOS, assign_splits, check_ratios

HAM_METADATA = "HAM10000_metadata.csv"
HAM_COLUMNS = ("lesion_id", "image_id", "dx")
HAM_META = ("dx_type", "age", "sex", "localization")
ISIC_HEADER = ("image", *ISIC_COLUMNS)
KINDS = ("ham10000", "isic2018", "parquet", "csv", "folder")

EXPECTED = (
    "expected one of: a folder holding HAM10000_metadata.csv (ham10000:); an ISIC 2018 Task 3 "
    "ground-truth CSV `image,MEL,NV,BCC,AKIEC,BKL,DF,VASC` or a folder holding one (isic2018:); "
    "a .parquet file or a folder of parquet shards (parquet:); a CSV with a `path,label` header "
    "(csv:); a folder with one sub-folder of images per class (folder:)"
)


# --- HAM10000 -------------------------------------------------------------------------------


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
    _require_columns(csv_path, header, HAM_COLUMNS)
    root = root.resolve()
    images = index_files(root)
    records, missing = [], []
    for line, row in rows:
        image_id = _plain_id(csv_path, line, row["image_id"], "image_id")
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


# --- ISIC 2018 Task 3 -----------------------------------------------------------------------


def is_isic_header(header: list[str]) -> bool:
    return set(ISIC_HEADER) <= set(header)


def _isic_csvs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.csv") if is_isic_header(read_csv_header(p)))


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
        _require_columns(csv_path, header, ISIC_HEADER)
        file_split = normalize_split(split) or split_from_name([csv_path.stem]) or "test"
        for line, row in rows:
            label = _one_hot_label(csv_path, line, row)
            image_id = _plain_id(csv_path, line, row["image"], "image")
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


# --- generic CSV and class folders ----------------------------------------------------------


def load_csv(csv_path: Path) -> Dataset:
    """A CSV with `path,label[,split][,group]` (paths relative to the CSV's folder, or absolute).

    image_id = the path without extension; other columns go to `meta`; classes = sorted labels.
    """
    csv_path = Path(csv_path)
    header, rows = read_csv_rows(csv_path)
    _require_columns(csv_path, header, ("path", "label"))
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


def _images_below(folder: Path) -> list[str]:
    """Absolute paths (str) of the image files below `folder`, in sorted walk order."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_layout(root: Path) -> bool:
    """True for `root/<split>/<class>/...` (every sub-folder is named like a split)."""
    subs = _subdirs(root)
    return bool(subs) and all(p.name.lower() in SPLIT_ALIASES for p in subs)


def load_folder(root: Path) -> Dataset:
    """Images in one sub-folder per class: `root/<class>/**/*.{jpg,png,...}`.

    Also `root/<split>/<class>/...` when every sub-folder is a split name (train, val, test...).
    image_id = the path relative to `root` without extension; classes = sorted class folders.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    split_dirs = [(normalize_split(d.name), d) for d in _subdirs(root)] if _split_layout(root) \
        else [(None, root)]
    records = []
    for split, base in split_dirs:
        for class_dir in _subdirs(base):
            for path in _images_below(class_dir):
                rel = os.path.splitext(os.path.relpath(path, root))[0]
                records.append(Record(
                    image_id=Path(rel).as_posix(),
                    source=path,
                    label=class_dir.name,
                    split=split,
                ))
    if not records:
        raise DataError(f"{root}: no images in class sub-folders; {EXPECTED}")
    return Dataset(name=slug(root.name), records=records,
                   classes=sorted({r.label for r in records}), root=str(root),
                   kind="folder")


# --- detection and the entry point ----------------------------------------------------------


def _has_class_folders(root: Path) -> bool:
    """At least one class sub-folder (or `<split>/<class>` folder) holds an image."""
    bases = _subdirs(root) if _split_layout(root) else [root]
    for base in bases:
        for class_dir in _subdirs(base):
            for _dirpath, _dirnames, filenames in os.walk(class_dir):
                if any(os.path.splitext(f)[1].lower() in IMAGE_EXTS for f in filenames):
                    return True
    return False


def detect_kind(path: Path) -> str:
    """The source kind of `path` (one of KINDS); DataError naming the path when none fits."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {EXPECTED}")
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        if path.suffix.lower() == ".csv":
            header = read_csv_header(path)
            if is_isic_header(header):
                return "isic2018"
            if set(HAM_COLUMNS) <= set(header):
                return "ham10000"
            if {"path", "label"} <= set(header):
                return "csv"
            raise DataError(f"{path}: unrecognised CSV header {header}; {EXPECTED}")
        raise DataError(f"{path}: unrecognised file type; {EXPECTED}")
    if (path / HAM_METADATA).is_file():
        return "ham10000"
    if _isic_csvs(path):
        return "isic2018"
    if parquet_files(path):
        return "parquet"
    if _has_class_folders(path):
        return "folder"
    raise DataError(f"{path}: unrecognised dataset folder; {EXPECTED}")


_LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "ham10000": load_ham10000,
    "isic2018": load_isic2018,
    "parquet": load_parquet,
    "csv": load_csv,
    "folder": load_folder,
}


def parse_spec(spec: str | Path, kind: str | None = None) -> tuple[str | None, Path]:
    """Split an optional `kind:` prefix off `spec`; the prefix and `kind` must agree."""
    prefix = None
    if isinstance(spec, str):
        head, sep, rest = spec.partition(":")
        if sep and head.lower() in KINDS:
            prefix, spec = head.lower(), rest
    if kind is not None and kind not in KINDS:
        raise DataError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(KINDS)}")
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
) -> Dataset:
    """Load any supported source and give every record a split.

    `spec` is a path, optionally prefixed `ham10000:`, `isic2018:`, `parquet:`, `csv:` or
    `folder:`; without a prefix (or `kind`) the kind is detected from the path. Records that
    the source gives a split keep it; the others get a seeded split stratified by class and
    grouped by lesion (`assign_splits`). Record order is the source's order. `test` names a
    second source used whole as the test split (e.g. the ISIC 2018 Task 3 test set); then
    `split_ratios` should have two entries (train, val).
    """
    chosen, path = parse_spec(spec, kind)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; {EXPECTED}")
    chosen = chosen or detect_kind(path)
    ds = _LOADERS[chosen](path)
    if any(r.split is None for r in ds.records):
        ds.records = assign_splits(ds.records, split_ratios, seed)
        ds.declared_splits = check_ratios(split_ratios)
    if test is not None:
        from .combine import with_test_set

        ds = with_test_set(ds, load_dataset(test, split_ratios=split_ratios, seed=seed))
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


def _plain_id(path: Path, line: int, image_id: str, column: str) -> str:
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


def _require_columns(path: Path, header: list[str], required: tuple[str, ...]) -> None:
    absent = [c for c in required if c not in header]
    if absent:
        raise DataError(f"{path}: missing columns {absent} (header: {header}; "
                        f"expected {','.join(required)})")

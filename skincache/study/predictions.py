"""A predictions file read into one typed value, `Predictions`, whatever tool wrote it.

Three layouts, told apart by the header so that no flag is needed for the two known ones:

- **skincache** (`predictions/<split>.csv` of a run folder, `metrics.write_predictions_csv`):
  `image_id,true,predicted,p_<class>...`; the classes are the `p_` columns, in their order.
- **DermFM-Zero** (their published linear-probe files): `filename,true_label,predicted_label,
  probability_class_0..K-1`; integer labels are the alphabetical class codes (`DERMFM_CLASSES`,
  their `class2label/HAM.csv`) and the image id is the file name's stem (`.../ISIC_0025661.jpg`
  -> `ISIC_0025661`, the HAM10000 `image_id`).
- **any other CSV** through a `ColumnMap` (`--true COL --pred COL --proba PREFIX --id COL
  --classes a,b,...`); a mapping also overrides single columns of a known layout.

Everything a reader could get wrong is refused with one `InputFileError` line naming the file:
not a regular file (`_io.read_regular`: a FIFO is never waited on), not UTF-8, empty, missing
columns, duplicated ids, labels outside the classes, probabilities that are not numbers or do not
sum to 1 (divided by their sum only when asked: `renormalize=True`, and then noted).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PureWindowsPath

import numpy as np

from skincache._io import read_regular
from skincache.errors import InputFileError, NotFoundError

__all__ = ["DERMFM_CLASSES", "PREDICTIONS_VERSION", "ColumnMap", "Predictions",
           "read_predictions"]

PREDICTIONS_VERSION = 1
"""Bumped when `Predictions` changes meaning, so a saved report says which reader made it."""

DERMFM_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
"""DermFM-Zero's integer labels 0..6 (alphabetical HAM10000 codes)."""

MAX_BYTES = 512 << 20
"""Largest predictions file read (about 5 million rows of 7 classes)."""

_PROBA_ATOL = 1e-3  # the tolerance metrics.classification_report applies to row sums


@dataclass(frozen=True)
class ColumnMap:
    """Which columns hold what, for a CSV of another tool (every field optional: a field left
    None keeps the detected layout's column). `proba` is a column-name prefix: `prob_` takes
    `prob_akiec, prob_bcc, ...` or `prob_0, prob_1, ...` (numbered columns need `classes`)."""

    id: str | None = None
    true: str | None = None
    pred: str | None = None
    proba: str | None = None
    classes: tuple[str, ...] | None = None

    def columns_given(self) -> bool:
        return any(v is not None for v in (self.id, self.true, self.pred, self.proba))


@dataclass(frozen=True, eq=False)
class Predictions:
    """One model's predictions on labelled images: `y_true`, `y_pred` are class indices into
    `classes`; `proba` [n, C] rows sum to 1 (None when the file has no probabilities: then
    AUROC, ECE and log loss are undefined). `notes` are plain sentences about anything the
    reader decided (ids from row numbers, rows renormalised, predicted labels that are not the
    argmax)."""

    ids: tuple[str, ...]
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray | None
    classes: tuple[str, ...]
    source_path: Path
    format: str  # "skincache", "dermfm-zero" or "columns"
    notes: tuple[str, ...] = field(default_factory=tuple)
    version: int = PREDICTIONS_VERSION

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, ids: Sequence[str]) -> Predictions:
        """The rows of `ids`, in that order (every id must be present)."""
        where = {image_id: i for i, image_id in enumerate(self.ids)}
        idx = np.array([where[i] for i in ids], dtype=np.int64)
        return replace(self, ids=tuple(ids), y_true=self.y_true[idx], y_pred=self.y_pred[idx],
                       proba=None if self.proba is None else self.proba[idx])

    def describe(self) -> dict:
        """Where the predictions came from, for a JSON report."""
        return {"path": str(self.source_path), "format": self.format, "n": len(self),
                "classes": list(self.classes), "probabilities": self.proba is not None,
                "reader_version": self.version, "notes": list(self.notes)}


@dataclass(frozen=True)
class _Layout:
    format: str
    id: str | None
    true: str
    pred: str | None
    proba: str | None
    classes: tuple[str, ...] | None
    id_is_path: bool = False


_SKINCACHE = _Layout("skincache", "image_id", "true", "predicted", "p_", None)
_DERMFM = _Layout("dermfm-zero", "filename", "true_label", "predicted_label",
                  "probability_class_", DERMFM_CLASSES, id_is_path=True)


def _text(path: Path) -> str:
    raw = read_regular(path, max_bytes=MAX_BYTES, what="predictions file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"predictions file {path} is not UTF-8 text (byte {exc.start}); "
                             "save it as UTF-8 CSV") from exc
    if not text.strip():
        raise InputFileError(f"predictions file {path} is empty; expected a CSV with a header "
                             "and one row per image")
    return text


def _rows(path: Path, text: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (each as long as the header) and each row's line number."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise InputFileError(f"predictions file {path}, line {reader.line_num}: "
                                     f"{len(row)} fields, the header has {len(header)}")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise InputFileError(f"predictions file {path} is not valid CSV: {exc}") from exc
    if not rows:
        raise InputFileError(f"predictions file {path} has a header but no rows")
    return header, rows, lines


def _layout(path: Path, header: list[str], cmap: ColumnMap) -> _Layout:
    """The detected layout with the mapping's columns laid over it."""
    cols = set(header)
    if {"image_id", "true", "predicted"} <= cols and any(h.startswith("p_") for h in header):
        base = _SKINCACHE
    elif ({"filename", "true_label", "predicted_label"} <= cols
          and "probability_class_0" in cols):
        base = _DERMFM
    elif cmap.true is None or (cmap.pred is None and cmap.proba is None):
        raise InputFileError(
            f"predictions file {path}: columns {header[:12]} are neither skincache's "
            "(image_id,true,predicted,p_<class>) nor DermFM-Zero's (filename,true_label,"
            "predicted_label,probability_class_N); name them with --true COL and --pred COL "
            "and/or --proba PREFIX (and --id COL, --classes a,b,...)")
    else:
        base = _Layout("columns", None, cmap.true, None, None, None)
    return _Layout("columns" if cmap.columns_given() else base.format,
                   cmap.id if cmap.id is not None else base.id,
                   cmap.true or base.true,
                   cmap.pred if cmap.pred is not None else base.pred,
                   cmap.proba if cmap.proba is not None else base.proba,
                   cmap.classes or base.classes,
                   base.id_is_path and cmap.id is None)


def _check_columns(path: Path, header: list[str], lay: _Layout) -> list[str]:
    """The probability columns (prefix order); InputFileError listing every missing column."""
    missing = [c for c in (lay.id, lay.true, lay.pred) if c is not None and c not in header]
    proba_cols = [h for h in header if lay.proba and h.startswith(lay.proba)]
    if lay.proba and not proba_cols:
        missing.append(f"{lay.proba}<class>")
    if missing:
        raise InputFileError(f"predictions file {path}: missing column(s) {', '.join(missing)} "
                             f"(it has {', '.join(header[:12])}"
                             f"{', ...' if len(header) > 12 else ''})")
    return proba_cols


def _proba_classes(path: Path, lay: _Layout, proba_cols: list[str]
                   ) -> tuple[tuple[str, ...], list[str]]:
    """The class names and their probability columns, in class order."""
    suffixes = [c[len(lay.proba or ""):] for c in proba_cols]
    if all(s.isdigit() for s in suffixes):
        numbers = sorted(int(s) for s in suffixes)
        if numbers != list(range(len(numbers))):
            raise InputFileError(f"predictions file {path}: probability columns numbered "
                                 f"{numbers}, expected 0..{len(numbers) - 1}")
        if lay.classes is None:
            raise InputFileError(f"predictions file {path}: probability columns are numbered "
                                 f"({proba_cols[0]}, ...); name the classes in that order with "
                                 "--classes a,b,...")
        if len(lay.classes) != len(numbers):
            raise InputFileError(f"predictions file {path}: {len(numbers)} probability "
                                 f"columns but {len(lay.classes)} classes "
                                 f"({','.join(lay.classes)})")
        by_number = dict(zip(suffixes, proba_cols, strict=True))
        return tuple(lay.classes), [by_number[str(i)] for i in range(len(numbers))]
    if lay.classes is None:
        return tuple(suffixes), proba_cols
    absent = [c for c in lay.classes if f"{lay.proba}{c}" not in proba_cols]
    if absent:
        raise InputFileError(f"predictions file {path}: no probability column for class(es) "
                             f"{', '.join(absent)} (has {', '.join(proba_cols)})")
    return tuple(lay.classes), [f"{lay.proba}{c}" for c in lay.classes]


def _label_classes(path: Path, lay: _Layout, values: list[str]) -> tuple[str, ...]:
    """Without probabilities: --classes, else the sorted label names."""
    if lay.classes is not None:
        return tuple(lay.classes)
    if all(v.strip().isdigit() for v in values):
        raise InputFileError(f"predictions file {path}: integer labels need the class names in "
                             "index order: --classes a,b,...")
    return tuple(sorted(set(values)))


def _indices(path: Path, column: str, values: list[str], classes: tuple[str, ...],
             lines: list[int]) -> np.ndarray:
    """Class indices of label texts: a class name, or an integer index into `classes`."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.empty(len(values), dtype=np.int64)
    bad: dict[str, int] = {}
    for i, v in enumerate(values):
        v = v.strip()
        if v in index:
            out[i] = index[v]
        elif v.isdigit() and int(v) < len(classes):
            out[i] = int(v)
        else:
            bad.setdefault(v, lines[i])
    if bad:
        shown = ", ".join(f"{v!r} (line {n})" for v, n in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputFileError(f"predictions file {path}: column {column} holds labels outside "
                             f"the classes {','.join(classes)}: {shown}{more}; name the classes "
                             "with --classes")
    return out


def _probabilities(path: Path, rows: list[list[str]], cols: list[int], names: list[str],
                   lines: list[int], renormalize: bool) -> tuple[np.ndarray, list[str]]:
    """[n, C] probabilities, rows summing to 1 (or refused), and a note if renormalised."""
    p = np.empty((len(rows), len(cols)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, c in enumerate(cols):
            try:
                p[i, j] = float(row[c])
            except ValueError:
                raise InputFileError(f"predictions file {path}, line {lines[i]}: {names[j]} "
                                     f"{row[c]!r} is not a number") from None
    bad_value = ~np.isfinite(p).all(axis=1) | (p < 0).any(axis=1)
    if bad_value.any():
        i = int(np.flatnonzero(bad_value)[0])
        raise InputFileError(f"predictions file {path}, line {lines[i]}: probabilities must be "
                             f"finite and non-negative ({int(bad_value.sum())} row(s) are not)")
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > _PROBA_ATOL
    if not off.any():
        return p, []
    i = int(np.flatnonzero(off)[0])
    if not renormalize or np.any(sums[off] <= 0):
        raise InputFileError(
            f"predictions file {path}: {int(off.sum())} of {len(p)} rows' probabilities do not "
            f"sum to 1 (line {lines[i]} sums to {sums[i]:.4g}); logits or scores are not "
            "probabilities. If they are probabilities up to a scale, pass --renormalize")
    note = (f"{int(off.sum())} of {len(p)} rows' probabilities did not sum to 1 (line "
            f"{lines[i]}: {sums[i]:.4g}) and were divided by their sum (--renormalize)")
    return p / sums[:, None], [note]


def _ids(path: Path, rows: list[list[str]], lines: list[int], col: int | None,
         is_path: bool) -> tuple[tuple[str, ...], list[str]]:
    if col is None:
        return (tuple(str(n) for n in lines),
                ["no id column: images are numbered by their line in the file"])
    ids = tuple(PureWindowsPath(r[col].strip()).stem if is_path else r[col].strip()
                for r in rows)
    empty = [lines[i] for i, v in enumerate(ids) if not v]
    if empty:
        raise InputFileError(f"predictions file {path}, line {empty[0]}: empty image id "
                             f"({len(empty)} row(s))")
    dups = [(v, n) for v, n in Counter(ids).items() if n > 1]
    if dups:
        shown = ", ".join(f"{v} ({n}x)" for v, n in dups[:3])
        raise InputFileError(f"predictions file {path}: {len(dups)} image id(s) appear more "
                             f"than once: {shown}{' ...' if len(dups) > 3 else ''}; one row "
                             "per image")
    return ids, []


def predictions_path(path: str | Path, split: str = "test") -> Path:
    """A run folder's `predictions/<split>.csv`, or a predictions file as it is (score and
    compare take either)."""
    p = Path(path)
    if not p.is_dir():
        return p
    f = p / "predictions" / f"{split}.csv"
    if not f.is_file():
        folder = p / "predictions"
        have = sorted(x.stem for x in folder.glob("*.csv")) if folder.is_dir() else []
        raise NotFoundError(f"{p}: no predictions/{split}.csv (this folder has "
                            f"{', '.join(have) if have else 'no predictions'}); choose "
                            "--split, or give a predictions file")
    return f


def read_predictions(path: str | Path, columns: ColumnMap | None = None, *,
                     renormalize: bool = False) -> Predictions:
    """Read a predictions file (layout detected from its header, see the module docstring).

    Predicted labels: the file's column when there is no probability, else the argmax of the
    probabilities (ties to the lowest index, as the run folder scores); rows where the file's
    predicted column says otherwise are counted in `notes`."""
    path = Path(path)
    cmap = columns or ColumnMap()
    header, rows, lines = _rows(path, _text(path))
    lay = _layout(path, header, cmap)
    proba_cols = _check_columns(path, header, lay)
    col = {h: i for i, h in enumerate(header)}
    true_text = [r[col[lay.true]] for r in rows]
    pred_text = None if lay.pred is None else [r[col[lay.pred]] for r in rows]
    empty = [lines[i] for i, v in enumerate(true_text) if not v.strip()]
    if empty:
        raise InputFileError(f"predictions file {path}, line {empty[0]}: no true label "
                             f"({len(empty)} row(s); a `predict` output has none); scoring "
                             "needs the true class of every image")
    notes: list[str] = []
    if proba_cols:
        classes, ordered = _proba_classes(path, lay, proba_cols)
        proba, notes = _probabilities(path, rows, [col[c] for c in ordered], ordered, lines,
                                      renormalize)
    else:
        classes = _label_classes(path, lay, true_text + (pred_text or []))
        proba = None
    if len(classes) < 2:
        raise InputFileError(f"predictions file {path}: one class only ({classes[0]}); "
                             "scoring needs at least two")
    y_true = _indices(path, lay.true, true_text, classes, lines)
    ids, id_notes = _ids(path, rows, lines, None if lay.id is None else col[lay.id],
                         lay.id_is_path)
    file_pred = (None if pred_text is None
                 else _indices(path, lay.pred or "", pred_text, classes, lines))
    if proba is None:
        if file_pred is None:
            raise InputFileError(f"predictions file {path}: neither a predicted-label column "
                                 "nor probabilities; give --pred COL or --proba PREFIX")
        y_pred = file_pred
    else:
        y_pred = np.argmax(proba, axis=1).astype(np.int64)
        if file_pred is not None and (differ := int(np.count_nonzero(file_pred != y_pred))):
            notes.append(f"{differ} row(s) name a predicted label that is not the most probable "
                         f"class; the scores use the most probable class, as run folders do")
    return Predictions(ids, y_true, y_pred, proba, classes, path, lay.format,
                       tuple(id_notes + notes))

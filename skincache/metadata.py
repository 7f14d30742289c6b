"""Patient metadata (age, sex, anatomic site) as extra head inputs: which fields a head may take,
and the encoding learned on the training split.

HAM10000 and ISIC ship age, sex and localization with every image, and a cache keeps them
(`SplitData.meta`, strings, "" where missing). A head given `-p metadata=age,sex,localization`
appends their encoding to its normalised image features:

- a category (sex, localization) is one-hot over the values seen in training, plus an explicit
  `unknown` column: HAM10000 writes "unknown" or leaves the cell empty, and a value training
  never saw (another site vocabulary) is unknown too, never an error or a silent zero row;
- age is standardised with the training mean and spread of the known ages, plus a missing flag
  (empty, NaN, unparseable or negative: flag 1, value 0, the training mean).

`dx_type` is refused: it says how the diagnosis was confirmed, and histopathology is done almost
only on lesions that look malignant, so it carries the label (label leakage). Field names are
checked here, by `_head_params` before torch loads (`-p metadata=...`) and by `Head.fit`.

The learned state is `MetadataEncoding`, a typed, versioned dataclass that saves as JSON in
head.json (never pickle). numpy only: below the heads, so `-p` can check names cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from skincache.errors import UsageError

#: the fields a head may take, and how each is encoded
FIELDS: dict[str, str] = {"age": "number", "sex": "category", "localization": "category"}
#: fields that exist in the metadata but must never be a head input, and why
REFUSED: dict[str, str] = {
    "dx_type": "it is label leakage (how the diagnosis was confirmed: histopathology is done "
               "almost only on lesions that look malignant)",
}
#: cell values that mean "not recorded" (compared lower-cased, stripped)
UNKNOWN_VALUES = frozenset({"", "unknown", "nan", "none", "null", "na", "n/a", "?"})
#: the name of a category's extra column
UNKNOWN = "unknown"
ENCODING_VERSION = 1
#: a saved encoding larger than this is not one skincache wrote
MAX_CATEGORIES = 1000


def field_violation(value: Any) -> str | None:
    """Why `value` (the `metadata` parameter: "age,sex" or a sequence of names) is not a list
    of fields a head may take, else None. The one check behind `-p` and `Head.fit`."""
    try:
        parse_fields(value)
    except UsageError as e:
        return str(e)
    return None


def parse_fields(value: Any) -> tuple[str, ...]:
    """"age, sex" -> ("age", "sex"); None or "" -> (). UsageError for a refused field
    (`dx_type`), an unknown one (naming the known fields) or a repeated one."""
    if value is None:
        return ()
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",")]
    elif isinstance(value, Sequence):
        names = [str(v).strip() for v in value]
    else:
        raise UsageError(f"metadata must be field names such as 'age,sex,localization', got "
                         f"{type(value).__name__}")
    names = [n for n in names if n]
    for n in names:
        if n in REFUSED:
            raise UsageError(f"metadata field '{n}' is refused: {REFUSED[n]}")
        if n not in FIELDS:
            raise UsageError(f"unknown metadata field '{n}'; known fields: {', '.join(FIELDS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"metadata field repeated in {','.join(names)}")
    return tuple(names)


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, float) and math.isnan(v):
        return ""
    return str(v).strip().lower()


def _is_unknown(v: str) -> bool:
    return v in UNKNOWN_VALUES


def parse_age(v: Any) -> float | None:
    """An age in years, or None when missing ("", NaN, unparseable, negative, > 150)."""
    try:
        a = float(_text(v))
    except ValueError:
        return None
    return a if math.isfinite(a) and 0.0 <= a <= 150.0 else None


@dataclass(frozen=True)
class FieldEncoding:
    """One field's learned encoding: a number's training mean and spread, or a category's
    training values (the `unknown` column comes after them)."""

    name: str
    kind: str  # "number" or "category"
    categories: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0

    @property
    def columns(self) -> tuple[str, ...]:
        if self.kind == "number":
            return (self.name, f"{self.name}_missing")
        return tuple(f"{self.name}={c}" for c in (*self.categories, UNKNOWN))

    def encode(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros((len(values), len(self.columns)), dtype=np.float32)
        if self.kind == "number":
            for i, v in enumerate(values):
                a = parse_age(v)
                if a is None:
                    out[i, 1] = 1.0
                else:
                    out[i, 0] = (a - self.mean) / self.std
            return out
        index = {c: j for j, c in enumerate(self.categories)}
        unknown = len(self.categories)
        for i, v in enumerate(values):
            out[i, index.get(_text(v), unknown)] = 1.0
        return out


@dataclass(frozen=True)
class MetadataEncoding:
    """The learned encoding of a head's metadata fields, in order; saved with the head."""

    fields: tuple[FieldEncoding, ...]
    version: int = ENCODING_VERSION

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c for f in self.fields for c in f.columns)

    @property
    def width(self) -> int:
        return len(self.columns)

    def transform(self, meta: Mapping[str, Any], n: int, what: str = "meta") -> np.ndarray:
        """[n, width] float32 encoding of `meta` ({field: n values}); UsageError naming the
        fields `meta` lacks."""
        cols = require_fields(meta, self.names, n, what)
        if not self.fields:
            return np.zeros((n, 0), dtype=np.float32)
        return np.concatenate([f.encode(cols[f.name]) for f in self.fields], axis=1)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version,
                "fields": [{"name": f.name, "kind": f.kind, "categories": list(f.categories),
                            "mean": f.mean, "std": f.std} for f in self.fields]}

    @classmethod
    def from_json(cls, obj: Any) -> MetadataEncoding:
        """The encoding `to_json` wrote; ValueError naming what is wrong otherwise."""
        if not isinstance(obj, dict) or set(obj) != {"version", "fields"}:
            raise ValueError("metadata must be an object with 'version' and 'fields'")
        if obj["version"] != ENCODING_VERSION:
            raise ValueError(f"metadata encoding version {obj['version']!r}; this skincache "
                             f"reads version {ENCODING_VERSION}")
        if not isinstance(obj["fields"], list) or not obj["fields"]:
            raise ValueError("metadata.fields must be a non-empty list")
        fields = []
        for f in obj["fields"]:
            if not isinstance(f, dict) or set(f) != {"name", "kind", "categories", "mean", "std"}:
                raise ValueError("metadata field must hold name, kind, categories, mean, std")
            name, kind, cats = f["name"], f["kind"], f["categories"]
            if name not in FIELDS or FIELDS[name] != kind:
                raise ValueError(f"metadata field {name!r} of kind {kind!r} is not one "
                                 f"skincache encodes ({FIELDS})")
            if not (isinstance(cats, list) and len(cats) <= MAX_CATEGORIES
                    and all(isinstance(c, str) for c in cats)):
                raise ValueError(f"metadata field {name!r}: categories must be a list of "
                                 "strings")
            mean, std = f["mean"], f["std"]
            if not all(isinstance(x, int | float) and not isinstance(x, bool)
                       and math.isfinite(x) for x in (mean, std)) or std <= 0:
                raise ValueError(f"metadata field {name!r}: mean and std must be finite, "
                                 "std > 0")
            fields.append(FieldEncoding(name, kind, tuple(cats), float(mean), float(std)))
        parse_fields([f.name for f in fields])  # no repeats
        return cls(tuple(fields))


def require_fields(meta: Mapping[str, Any] | None, names: Sequence[str], n: int,
                   what: str = "meta") -> dict[str, np.ndarray]:
    """{field: array of n values} for `names` from `meta`; UsageError naming the missing
    fields (or a wrong length)."""
    if meta is None:
        raise UsageError(f"the head takes metadata ({', '.join(names)}) and {what} was not "
                         "given; give the same fields (predict: --metadata FILE)")
    missing = [f for f in names if f not in meta]
    if missing:
        have = ", ".join(sorted(meta)) or "none"
        raise UsageError(f"{what} has no metadata field {', '.join(missing)} (it has: {have}); "
                         "the head was asked for " + ", ".join(names))
    out = {}
    for f in names:
        a = np.asarray(meta[f], dtype=object).reshape(-1)
        if len(a) != n:
            raise UsageError(f"{what}['{f}'] has {len(a)} values for {n} images")
        out[f] = a
    return out


def fit_encoding(fields: Sequence[str], meta: Mapping[str, Any] | None, n: int
                 ) -> MetadataEncoding:
    """The encoding of `fields` learned on the training split's `meta` (n images): the
    categories seen (sorted; unknown values excluded), the mean and spread of known ages."""
    names = parse_fields(list(fields))
    cols = require_fields(meta, names, n, "the training split's metadata")
    out = []
    for name in names:
        if FIELDS[name] == "number":
            ages = np.array([a for a in map(parse_age, cols[name]) if a is not None])
            mean = float(ages.mean()) if len(ages) else 0.0
            std = float(ages.std()) if len(ages) > 1 else 0.0
            out.append(FieldEncoding(name, "number", mean=mean, std=std if std > 0 else 1.0))
        else:
            seen = {_text(v) for v in cols[name]}
            out.append(FieldEncoding(name, "category",
                                     tuple(sorted(c for c in seen if not _is_unknown(c)))))
    return MetadataEncoding(tuple(out))

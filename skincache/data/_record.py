"""The unit every data source produces: one `Record` per image, gathered in a `Dataset`."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field

from skincache.errors import SkincacheError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image and what is known about it.

    `source` is how to get the image's bytes: a file path, or `<file.parquet>::<row>` for an
    image stored inside a parquet shard (see `skincache.data.read_image_bytes`).
    `split` is the source's own split when it has one, else None until a split is assigned.
    `group` is the lesion id where known (several images of one lesion must share a split).
    """

    image_id: str
    source: str
    label: str
    split: str | None = None
    group: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


class DataError(SkincacheError, ValueError):
    """A dataset that cannot be used as given; the message names the file and the problem."""


@dataclass
class Dataset:
    """Records plus the class vocabulary, in a fixed order (the order of the cache rows).

    `kind` names the source type (ham10000, isic2018, parquet, csv, folder). `missing` lists the
    image ids the source names whose file was not found: their records are kept (with the
    expected, non-existent path as `source`) so the encoder can report each one as "listed in
    metadata but missing" rather than the dataset shrinking silently. `declared_splits` are the
    splits a split assignment promised (train/val[/test]): each must end up non-empty.
    `split_origin` says where the splits came from when not from the seed or the source
    (`encode --split-file`: the file and its sha256; `--drop-lesion-mates`: how many images
    were left out); it is part of the fingerprint, hence of the cache key, and the cache
    records it.
    """

    name: str
    records: list[Record]
    classes: list[str]
    root: str = ""
    kind: str = ""
    missing: list[str] = field(default_factory=list)
    declared_splits: list[str] = field(default_factory=list)
    split_origin: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def splits(self) -> list[str]:
        """Split names present, canonical ones (train, val, test) first."""
        present = {r.split for r in self.records if r.split is not None}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def split_records(self, split: str) -> list[Record]:
        return [r for r in self.records if r.split == split]

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: count}} with every class present (zero where absent)."""
        out: dict[str, dict[str, int]] = {}
        for split in self.splits:
            c = Counter(r.label for r in self.records if r.split == split)
            out[split] = {k: c.get(k, 0) for k in self.classes}
        return out

    def label_index(self, label: str) -> int:
        return self.classes.index(label)

    def validate(self, min_classes: int = 2) -> None:
        """Refuse, before any model is loaded, what cannot make a useful cache."""
        if not self.records:
            raise DataError(f"{self.root or self.name}: the dataset has no images")
        unknown = sorted({r.label for r in self.records} - set(self.classes))
        if unknown:
            raise DataError(
                f"{self.root or self.name}: unknown labels {unknown}; known classes: {self.classes}"
            )
        missing_split = [r.image_id for r in self.records if r.split is None]
        if missing_split:
            raise DataError(
                f"{self.root or self.name}: {len(missing_split)} records have no split "
                f"(e.g. {missing_split[0]}); assign splits first"
            )
        present = {r.label for r in self.records}
        if len(present) < min_classes:
            raise DataError(
                f"{self.root or self.name}: only {len(present)} class present ({sorted(present)}); "
                f"a classifier needs at least {min_classes}"
            )
        for split in self.declared_splits or self.splits:
            if not self.split_records(split):
                raise DataError(
                    f"{self.root or self.name}: split '{split}' is empty ({len(self)} images "
                    f"for splits {self.declared_splits or self.splits}); use more images or "
                    "other --split-ratios"
                )
        self._check_strings()
        ids = Counter(r.image_id for r in self.records)
        dup = [i for i, n in ids.items() if n > 1]
        if dup:
            raise DataError(
                f"{self.root or self.name}: {len(dup)} image ids appear more than once "
                f"(e.g. {dup[0]}); run `skincache audit` to see them"
            )

    def _check_strings(self) -> None:
        """Every string the cache will store must be storable: HDF5 variable-length strings
        refuse NUL bytes and h5py needs valid UTF-8. Found here, before a model loads, rather
        than after every image has been encoded."""
        where = self.root or self.name
        for r in self.records:
            fields = [("image id", r.image_id), ("label", r.label), ("split", r.split or ""),
                      ("group", r.group or ""), ("source", r.source)]
            fields += [(f"column '{k}'", v) for k, v in r.meta.items()]
            fields += [("a column name", k) for k in r.meta]
            for what, value in fields:
                problem = _unstorable(value)
                if problem:
                    raise DataError(f"{where}: {what} of image {r.image_id!r} {problem}; "
                                    "fix the metadata")

    def fingerprint(self) -> str:
        """A hash of what the cache's numbers depend on: ids, labels, splits, groups, and the
        size and modification time of every file read (cheap: no image is read)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        stats: dict[str, tuple[int, int]] = {}
        for r in self.records:
            path = r.source.split("::", 1)[0]
            if path not in stats:
                try:
                    st = os.stat(path)
                    stats[path] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stats[path] = (-1, -1)
            h.update(
                json.dumps([r.image_id, r.source, r.label, r.split, r.group, stats[path]]).encode()
            )
        if self.split_origin:  # where the file lives is not part of what it says
            h.update(json.dumps({k: v for k, v in self.split_origin.items() if k != "file"},
                                sort_keys=True).encode())
        return h.hexdigest()


def _unstorable(value: str) -> str:
    """Why `value` cannot be stored as an HDF5 string, or ''."""
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (an undecodable file name?)"
    return ""

"""Split-leakage audit: what makes a test score on a dataset untrustworthy.

A lesion photographed several times whose images sit in two splits, or the same image file
stored twice (the `marmal88/skin_cancer` parquet split has 13,354 rows for 10,015 images) lets a
model be tested on what it trained on. The audit lists both, plus repeated image ids and the
class counts per split. Unreadable images are listed, never fatal: an audit must finish.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ._record import Dataset, Record
from .sources import read_image_bytes
from .splits import lesion_mates_of_test

NO_SPLIT = "-"  # how a record without a split is reported


@dataclass
class GroupLeak:
    """A lesion (group) whose images are in more than one split."""

    group: str
    splits: list[str]
    image_ids: list[str]


@dataclass
class DuplicateImages:
    """Records whose image bytes are identical (same sha1)."""

    sha1: str
    splits: list[str]
    image_ids: list[str]

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1


@dataclass
class RepeatedId:
    """An image id that names more than one record."""

    image_id: str
    count: int
    splits: list[str]


@dataclass
class Unreadable:
    """A record whose bytes could not be read (missing file, bad parquet row...)."""

    image_id: str
    source: str
    reason: str


@dataclass
class LesionLeak:
    """How much of the test split is a test on training lesions: test images whose lesion
    has an image in train/val ("affected"), and those train/val images ("mates")."""

    test_images: int
    test_images_affected: int
    test_lesions_affected: int
    mates_outside_test: int
    mates_by_split: dict[str, int]


def lesion_leak(records: list[Record]) -> LesionLeak | None:
    """The lesion leak into test (None when there is no test split). An image-level split such
    as the DermFM-Zero HAM10000 one is the case this measures: 613 of its 1,503 test images."""
    test = [r for r in records if r.split == "test"]
    if not test:
        return None
    mates = [records[i] for i in lesion_mates_of_test(records)]
    groups = {r.group for r in mates}
    by_split = Counter(r.split or NO_SPLIT for r in mates)
    return LesionLeak(
        test_images=len(test),
        test_images_affected=sum(r.group in groups for r in test),
        test_lesions_affected=len(groups),
        mates_outside_test=len(mates),
        mates_by_split=dict(sorted(by_split.items())),
    )


@dataclass
class AuditReport:
    """Everything `audit_dataset` found; `to_dict()` gives plain JSON-able data."""

    name: str
    n_images: int
    n_groups: int
    splits: list[str]
    totals: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    cross_split_groups: list[GroupLeak] = field(default_factory=list)
    duplicates: list[DuplicateImages] = field(default_factory=list)
    repeated_image_ids: list[RepeatedId] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    hashed: bool = False
    test_leakage: LesionLeak | None = None
    split_origin: dict = field(default_factory=dict)

    @property
    def cross_split_duplicates(self) -> list[DuplicateImages]:
        """Byte-identical images found in more than one split."""
        return [d for d in self.duplicates if d.cross_split]

    @property
    def leak_free(self) -> bool:
        """No lesion and no identical image shared between splits (as far as was checked)."""
        return not self.cross_split_groups and not self.cross_split_duplicates

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: every field, plus `cross_split_duplicates` (the duplicate sets
        that span splits, as dicts) and `leak_free`."""
        d = asdict(self)
        d["cross_split_duplicates"] = [asdict(x) for x in self.cross_split_duplicates]
        d["leak_free"] = self.leak_free
        return d


def audit_dataset(
    ds: Dataset,
    *,
    hash_images: bool = True,
    progress: Callable[[int], object] | None = None,
) -> AuditReport:
    """Audit `ds` for leakage between splits.

    With `hash_images`, every image is read (through `read_image_bytes`) and hashed with sha1;
    `progress(1)` is called after each one so a caller can drive a progress bar.
    """
    split_order = ds.splits + ([NO_SPLIT] if any(r.split is None for r in ds.records) else [])
    rank = {s: i for i, s in enumerate(split_order)}

    def sorted_splits(splits: set[str]) -> list[str]:
        return sorted(splits, key=lambda s: rank.get(s, len(rank)))

    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(ds.records):
        if r.group is not None:
            by_group[r.group].append(i)
    leaks = []
    for group, idx in by_group.items():
        splits = {ds.records[i].split or NO_SPLIT for i in idx}
        if len(splits) > 1:
            leaks.append(GroupLeak(group, sorted_splits(splits),
                                   [ds.records[i].image_id for i in idx]))

    ids = Counter(r.image_id for r in ds.records)
    id_splits: dict[str, set[str]] = defaultdict(set)
    for r in ds.records:
        if ids[r.image_id] > 1:
            id_splits[r.image_id].add(r.split or NO_SPLIT)
    repeated = [RepeatedId(i, ids[i], sorted_splits(id_splits[i])) for i in id_splits]

    duplicates: list[DuplicateImages] = []
    unreadable: list[Unreadable] = []
    if hash_images:
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(ds.records):
            try:
                by_hash[hashlib.sha1(read_image_bytes(r.source)).hexdigest()].append(i)
            except Exception as e:  # any failure is reported, not raised
                unreadable.append(Unreadable(r.image_id, r.source, f"{type(e).__name__}: {e}"))
            if progress is not None:
                progress(1)
        for digest, idx in by_hash.items():
            if len(idx) > 1:
                duplicates.append(DuplicateImages(
                    digest,
                    sorted_splits({ds.records[i].split or NO_SPLIT for i in idx}),
                    [ds.records[i].image_id for i in idx],
                ))

    n_split = Counter(r.split or NO_SPLIT for r in ds.records)
    counts = ds.class_counts()
    if NO_SPLIT in split_order:
        c = Counter(r.label for r in ds.records if r.split is None)
        counts[NO_SPLIT] = {k: c.get(k, 0) for k in ds.classes}
    return AuditReport(
        name=ds.name,
        n_images=len(ds.records),
        n_groups=len(by_group) + sum(1 for r in ds.records if r.group is None),
        splits=split_order,
        totals={s: n_split.get(s, 0) for s in split_order},
        class_counts=counts,
        cross_split_groups=leaks,
        duplicates=duplicates,
        repeated_image_ids=repeated,
        unreadable=unreadable,
        hashed=hash_images,
        test_leakage=lesion_leak(ds.records),
        split_origin=dict(ds.split_origin),
    )

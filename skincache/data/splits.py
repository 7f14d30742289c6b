"""Seeded, class-stratified, lesion-grouped splits.

HAM10000 has several images of many lesions; a random image-level split puts images of one lesion
in train and test and inflates every score. So whole groups (lesions) are assigned: the groups of
each class are shuffled with the seed and each goes to the split whose share of that class is
furthest below its target (lowest filled fraction), which meets the ratios to within one group
per class and gives every split some of every class that has at least as many groups as splits.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace

from skincache.defaults import SPLIT_RATIOS

from ._record import SPLITS, DataError, Dataset, Record

DEFAULT_RATIOS: tuple[float, ...] = SPLIT_RATIOS


def check_ratios(ratios: Sequence[float]) -> list[str]:
    """The split names for `ratios` (train, val[, test]); DataError unless there are 2 or 3
    positive, finite ratios summing to 1 (within 1e-3)."""
    r = [float(x) for x in ratios]
    if len(r) not in (2, 3):
        raise DataError(
            f"split ratios {tuple(ratios)}: give 2 (train, val) or 3 (train, val, test)"
        )
    if any(not math.isfinite(x) or x <= 0 for x in r):
        raise DataError(f"split ratios {tuple(ratios)}: every ratio must be positive")
    if abs(sum(r) - 1.0) > 1e-3:
        raise DataError(f"split ratios {tuple(ratios)}: they sum to {sum(r):.4f}, not 1")
    return list(SPLITS[: len(r)])


def _group_key(r: Record) -> str:
    # Records without a group are their own group; the NUL keeps them apart from real ids.
    return r.group if r.group is not None else f"\0{r.image_id}"


def assign_splits(
    records: Sequence[Record],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
) -> list[Record]:
    """A copy of `records` (same order) where every record without a split has one.

    Records that already have a split keep it; an unsplit record whose group already has a
    split (from those records) joins it, so no group spans two splits. The rest are split by
    group, stratified by each group's majority class; deterministic for a given seed.
    """
    names = check_ratios(ratios)
    weights = dict(zip(names, (float(x) for x in ratios), strict=True))

    fixed: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.split is not None:
            fixed[_group_key(r)].add(r.split)

    members: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.split is None:
            members[_group_key(r)].append(r)

    chosen: dict[str, str] = {}
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, rs in members.items():
        if len(fixed.get(key, ())) == 1:
            chosen[key] = next(iter(fixed[key]))
            continue
        counts = Counter(r.label for r in rs)
        label = min(counts, key=lambda c: (-counts[c], c))
        by_class[label].append(key)

    for label in sorted(by_class):
        keys = sorted(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(keys)
        total = sum(len(members[k]) for k in keys)
        target = {s: weights[s] * total for s in names}
        filled = dict.fromkeys(names, 0)
        for key in keys:
            split = min(names, key=lambda s: (filled[s] / target[s], names.index(s)))
            chosen[key] = split
            filled[split] += len(members[key])

    return [r if r.split is not None else replace(r, split=chosen[_group_key(r)])
            for r in records]


def limit_records(records: Sequence[Record], n: int, seed: int = 0) -> list[Record]:
    """About `n` of `records` for a quick trial: whole groups (lesions), stratified by split
    and class, chosen with `seed`, in the records' own order.

    Each (split, class) stratum keeps its share of `n`, and at least one group, so every split
    still has every class it had and no lesion is cut in two. A group goes to the stratum of
    its majority class; a stratum takes a group while that brings it nearer its share, so the
    total is within about half a group per stratum of `n`. Records without a split are an error
    (assign splits first: the subset must not change which split an image is in)."""
    if n < 1:
        raise DataError(f"--limit {n}: give a number of images >= 1")
    if any(r.split is None for r in records):
        raise DataError("limit_records: assign splits before taking a subset")
    if n >= len(records):
        return list(records)
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.split, _group_key(r))].append(r)
    strata: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for key, rs in groups.items():
        counts = Counter(r.label for r in rs)
        strata[(key[0], min(counts, key=lambda c: (-counts[c], c)))].append(key)
    total = len(records)
    keep: set[tuple[str, str]] = set()
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        random.Random(f"{seed}:limit:{stratum[0]}:{stratum[1]}").shuffle(keys)
        size = sum(len(groups[k]) for k in keys)
        quota, taken = n * size / total, 0
        for key in keys:  # a group is taken when it brings the stratum nearer its share
            if not taken or taken + len(groups[key]) - quota <= quota - taken:
                keep.add(key)
                taken += len(groups[key])
    return [r for r in records if (r.split, _group_key(r)) in keep]


def limit_dataset(ds: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """`ds` cut to about `n` images by `limit_records` (`--limit` of encode and finetune);
    the name gains `-limit<n>` so its cache and runs never pass for the full dataset's."""
    if n is None:
        return ds
    records = limit_records(ds.records, n, seed)
    if len(records) == len(ds.records):
        return ds
    ids = {r.image_id for r in records}
    return replace(ds, name=f"{ds.name}-limit{n}", records=records,
                   missing=[m for m in ds.missing if m in ids])


def lesion_mates_of_test(records: Sequence[Record]) -> list[int]:
    """Indices of the records outside test whose lesion (group) has an image in test: the
    images that make a test score partly a score on training lesions. Records without a group
    are their own lesion and never count."""
    test_groups = {r.group for r in records if r.split == "test" and r.group is not None}
    return [i for i, r in enumerate(records)
            if r.split != "test" and r.group is not None and r.group in test_groups]

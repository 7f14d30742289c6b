"""Lesion-grouped, class-stratified, seeded splits."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from skincache.data import DataError, Record, assign_splits

CLASSES = {"nv": 300, "mel": 60, "bkl": 40, "df": 12}


def synthetic_records(seed: int = 0) -> list[Record]:
    """Lesions of 1-4 images per class; some records have no group (their own group)."""
    rng = random.Random(seed)
    records: list[Record] = []
    lesion = 0
    for label, n in CLASSES.items():
        made = 0
        while made < n:
            size = min(rng.choice([1, 1, 2, 3, 4]), n - made)
            group = None if rng.random() < 0.1 else f"L{lesion}"
            for _ in range(size if group else 1):
                records.append(Record(f"img{len(records)}", f"/x/{len(records)}.jpg", label,
                                      group=group))
                made += 1
            lesion += 1
    return records


def splits_of_groups(records: list[Record]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.group is not None:
            out[r.group].add(r.split)
    return out


def test_no_group_in_two_splits_and_ratios_met() -> None:
    records = synthetic_records()
    out = assign_splits(records, (0.72, 0.19, 0.09), seed=0)
    assert [r.image_id for r in out] == [r.image_id for r in records]  # order kept
    assert all(r.split in ("train", "val", "test") for r in out)
    assert all(len(s) == 1 for s in splits_of_groups(out).values())
    total = Counter(r.split for r in out)
    for split, ratio in zip(("train", "val", "test"), (0.72, 0.19, 0.09), strict=True):
        assert abs(total[split] / len(out) - ratio) < 0.03, (split, total)
    # stratified: every class reaches every split, close to its share
    for label, n in CLASSES.items():
        per = Counter(r.split for r in out if r.label == label)
        assert set(per) == {"train", "val", "test"}, (label, per)
        assert abs(per["train"] / n - 0.72) <= 4 / n + 0.02, (label, per)


def test_deterministic_by_seed_and_seed_matters() -> None:
    records = synthetic_records()
    a = [r.split for r in assign_splits(records, seed=7)]
    b = [r.split for r in assign_splits(records, seed=7)]
    c = [r.split for r in assign_splits(records, seed=8)]
    assert a == b
    assert a != c


def test_existing_splits_kept_and_groups_follow_them() -> None:
    records = synthetic_records()
    records[0] = Record("fixed", "/x/f.jpg", "nv", split="test", group="LX")
    records.insert(1, Record("follower", "/x/g.jpg", "nv", group="LX"))
    records.insert(2, Record("custom", "/x/h.jpg", "mel", split="holdout"))
    out = {r.image_id: r.split for r in assign_splits(records, seed=1)}
    assert out["fixed"] == "test" and out["follower"] == "test"
    assert out["custom"] == "holdout"


def test_two_ratios_give_train_and_val() -> None:
    out = assign_splits(synthetic_records(), (0.8, 0.2), seed=0)
    assert {r.split for r in out} == {"train", "val"}


@pytest.mark.parametrize("ratios", [(0.5, 0.6), (1.0,), (0.5, 0.25, 0.15, 0.1), (0.9, 0.0, 0.1),
                                    (1.1, -0.1)])
def test_bad_ratios(ratios: tuple[float, ...]) -> None:
    with pytest.raises(DataError, match="ratio"):
        assign_splits(synthetic_records(), ratios)

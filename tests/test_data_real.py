"""The loaders on the real HAM10000 and ISIC 2018 test layouts in ../shared/data (skipped when
that folder is absent: the data never enters the repository)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from skincache.data import HAM10000_CLASSES, audit_dataset, load_dataset, read_image_bytes

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HAM = DATA / "ham10000"
ISIC = DATA / "isic2018-test"


def need(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not available: {path.resolve()} is absent "
                    f"(the tests read it from ../shared/data next to the repository)")
    return path


@pytest.fixture(scope="module")
def ham():
    return load_dataset(need(HAM), seed=0)


def test_ham10000_counts(ham) -> None:
    assert ham.kind == "ham10000" and ham.classes == HAM10000_CLASSES
    assert len(ham) == 10_015 and ham.missing == []
    assert len({r.image_id for r in ham.records}) == 10_015
    assert len({r.group for r in ham.records}) == 7_470
    assert Counter(r.label for r in ham.records) == {
        "nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
    assert all(os.path.isfile(r.source) for r in ham.records)
    assert read_image_bytes(ham.records[0].source)[:2] == b"\xff\xd8"  # a JPEG
    ham.validate()


def test_ham10000_split_is_lesion_grouped_and_stratified(ham) -> None:
    rep = audit_dataset(ham, hash_images=False)
    assert rep.cross_split_groups == []
    assert rep.totals.keys() == {"train", "val", "test"}
    for split, ratio in (("train", 0.72), ("val", 0.19), ("test", 0.09)):
        assert abs(rep.totals[split] / 10_015 - ratio) < 0.01, rep.totals
        for cls in HAM10000_CLASSES:
            n = sum(1 for r in ham.records if r.label == cls)
            assert abs(rep.class_counts[split][cls] / n - ratio) < 0.05, (split, cls)


def test_isic2018_test_counts() -> None:
    ds = load_dataset(need(ISIC))
    assert ds.kind == "isic2018" and ds.name == "isic2018-test"
    assert len(ds) == 1_512 and ds.missing == []
    assert {r.split for r in ds.records} == {"test"}
    assert all(r.group is None for r in ds.records)
    assert Counter(r.label for r in ds.records) == {
        "nv": 909, "bkl": 217, "mel": 171, "bcc": 93, "df": 44, "akiec": 43, "vasc": 35}
    assert all(os.path.isfile(r.source) for r in ds.records)


def test_ham10000_train_val_with_the_official_isic2018_test_set(ham10000_dir, isic2018_dir):
    from skincache.data import load_dataset

    ds = load_dataset(ham10000_dir, split_ratios=(0.8, 0.2), test=isic2018_dir)
    counts = {s: len(ds.split_records(s)) for s in ds.splits}
    assert counts["test"] == 1512 and counts["train"] + counts["val"] == 10015
    assert ds.declared_splits == ["train", "val", "test"]
    ds.validate()
    with pytest.raises(Exception, match="already has a test split"):
        load_dataset(ham10000_dir, test=isic2018_dir)

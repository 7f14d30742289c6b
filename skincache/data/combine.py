"""Train on one source, test on another: HAM10000 for train/val, the official ISIC 2018 Task 3
test set for test — the comparison the ISIC challenge numbers are about."""

from __future__ import annotations

from dataclasses import replace

from ._record import DataError, Dataset


def with_test_set(ds: Dataset, test: Dataset) -> Dataset:
    """`ds`'s train/val records plus every record of `test` as the test split.

    Refuses a `ds` that already has a test split (give two split ratios, train and val) and a
    test set whose classes `ds` does not know."""
    own_test = [r.image_id for r in ds.records if r.split == "test"]
    if own_test:
        raise DataError(
            f"{ds.root or ds.name} already has a test split ({len(own_test)} images); with a "
            "separate test set give two split ratios (train,val), e.g. --split-ratios 0.8,0.2"
        )
    unknown = sorted({r.label for r in test.records} - set(ds.classes))
    if unknown:
        raise DataError(f"{test.root or test.name}: labels {unknown} are not classes of "
                        f"{ds.root or ds.name} ({ds.classes})")
    records = ds.records + [replace(r, split="test") for r in test.records]
    return replace(
        ds, name=f"{ds.name}+{test.name}", records=records, root=f"{ds.root} + {test.root}",
        kind=f"{ds.kind}+{test.kind}", missing=ds.missing + test.missing,
        declared_splits=[*dict.fromkeys([*(ds.declared_splits or ds.splits), "test"])],
    )

"""Cross-split near-duplicates by feature cosine."""

from __future__ import annotations

import numpy as np
import pytest

from skincache.cache import FeatureCache, SplitData
from skincache.near_duplicates import near_duplicates


def test_near_duplicates_finds_a_planted_cross_split_pair(tmp_path):
    rng = np.random.default_rng(0)

    def split(n, prefix):
        return SplitData(features=rng.normal(size=(n, 32)).astype(np.float32),
                         views=np.zeros((n, 0, 32), np.float32), labels=np.zeros(n, np.int64),
                         image_id=np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
                         group_id=np.array([f"g{prefix}{i}" for i in range(n)], dtype=object),
                         sha1=np.array([""] * n, dtype=object))
    train, val = split(50, "t"), split(20, "v")
    val.features[7] = train.features[11] * 2.0 + 1e-3  # same direction: cosine ~1
    val.group_id[7] = train.group_id[11]
    fc = FeatureCache(tmp_path / "x.h5", {}, {"train": train, "val": val}, {}, [])
    pairs = near_duplicates(fc, 0.99)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["image_a"], p["image_b"], p["same_group"]) == ("t11", "v7", True)
    assert p["similarity"] > 0.999
    assert len(near_duplicates(fc, -1.0)) == 50 * 5  # bounded: 5 per image by default
    assert len(near_duplicates(fc, -1.0, per_image=20)) == 50 * 20
    with pytest.raises(ValueError):
        near_duplicates(fc, 2.0)

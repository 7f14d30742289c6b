"""`cache.join.check_aligned`: caches of the same images pass; any difference in images,
labels, groups, splits or classes is one CacheError naming both files and the first mismatch."""

from __future__ import annotations

import pytest
from conftest import synthetic_cache

from skincache.cache import CacheError, FeatureCache
from skincache.cache.join import check_aligned


def test_two_encoders_of_the_same_images_are_aligned(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", d=16, seed=3))
    b = FeatureCache.open(synthetic_cache(tmp_path / "b.h5", d=8, seed=3))
    check_aligned([a, b])
    check_aligned([a])


def test_other_images_are_refused_naming_both_files_and_the_row(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", seed=3))
    b = FeatureCache.open(synthetic_cache(tmp_path / "b.h5", seed=4))
    with pytest.raises(CacheError) as err:
        check_aligned([a, b])
    msg = str(err.value)
    assert "a.h5" in msg and "b.h5" in msg and "split 'train'" in msg
    assert "\n" not in msg


def test_a_changed_label_is_named(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", seed=3))
    b = FeatureCache.open(synthetic_cache(tmp_path / "b.h5", d=8, seed=3))
    b.split("val")  # the arrays are read lazily: change them in memory as a reader would see
    y = b.splits["val"].labels.copy()
    y[5] = (y[5] + 1) % 3
    b.splits["val"]._have["labels"] = y
    with pytest.raises(CacheError, match=r"split 'val' differs at row 5 .*labels"):
        check_aligned([a, b])


def test_a_missing_split_is_named(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", seed=3))
    b = FeatureCache.open(synthetic_cache(tmp_path / "b.h5", d=8, seed=3))
    del b.splits["test"]
    with pytest.raises(CacheError, match="different splits"):
        check_aligned([a, b])
    check_aligned([a, b], splits=["train", "val"])


def test_info_on_a_cache_written_from_arrays_is_a_summary_not_a_keyerror(tmp_path):
    """Caches the benchmarks write from arrays record no preprocessing or view recipe."""
    from typer.testing import CliRunner

    from skincache.cli import app

    r = CliRunner().invoke(app, ["info", str(synthetic_cache(tmp_path / "a.h5", seed=3))])
    assert r.exit_code == 0, r.output
    assert "not recorded" in r.output and "K=2" in r.output

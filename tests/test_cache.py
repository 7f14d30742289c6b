"""The cache file: what encode writes reads back whole (shapes, labels, text, attributes),
the reader refuses what is not a finished skincache cache, and the lock excludes a second
writer. Corruption, checksums and full disks: tests/test_hostile.py."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from skincache.cache import CacheBusyError, CacheError, CacheHeader, CacheLock, FeatureCache
from skincache.encode import encode_dataset
from skincache.models import TINY_MODEL, ModelSpec
from skincache.prompts import TEMPLATE_SETS
from skincache.views import ViewPolicy

TINY = ModelSpec(TINY_MODEL)
FAST = dict(device="cpu", batch_size=8, chunk_batches=2, num_workers=0, progress=False)


def test_round_trip_shapes_labels_text_and_attrs(demo_dataset, tmp_path, tiny_model):
    res = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=3), cache_dir=tmp_path, **FAST)
    assert res.status == "built" and res.path.suffix == ".h5" and res.n_failed == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [res.path.name]  # no lock, no partial
    fc = FeatureCache.open(res.path)
    assert list(fc.splits) == demo_dataset.splits
    total = 0
    for name, s in fc.splits.items():
        recs = demo_dataset.split_records(name)
        assert s.features.shape == (len(recs), 64)
        assert s.views.shape == (len(recs), 3, 64)
        assert list(s.image_id) == [r.image_id for r in recs]
        assert [fc.classes[i] for i in s.labels] == [r.label for r in recs]
        assert list(s.group_id) == [r.group or "" for r in recs]
        assert all(len(h) == 40 for h in s.sha1)
        assert set(s.meta) >= {"age", "sex", "localization", "dx_type"}
        # views differ from the clean view but describe the same image
        cos = (s.features[:, None] * s.views).sum(-1) / (
            np.linalg.norm(s.features, axis=-1)[:, None] * np.linalg.norm(s.views, axis=-1))
        assert cos.mean() > 0.8 and not np.allclose(s.views[:, 0], s.features)
        total += len(s)
    assert total == len(demo_dataset)
    assert set(fc.text) == set(TEMPLATE_SETS)
    for arr in fc.text.values():
        assert arr.shape == (len(fc.classes), 5, 64) and arr.dtype == np.float32
    assert fc.attrs["model"] == TINY_MODEL and fc.attrs["weights_sha256"] == (
        tiny_model.weights_sha256)
    assert abs(fc.logit_scale - tiny_model.logit_scale) < 1e-4
    with h5py.File(res.path) as f:
        assert f["splits/train/features"].dtype == np.float16


def test_reader_refuses_foreign_and_incomplete_files(tmp_path):
    foreign = tmp_path / "x.h5"
    with h5py.File(foreign, "w") as f:
        f.attrs["a"] = 1
    with pytest.raises(CacheError, match="not a skincache feature cache"):
        FeatureCache.open(foreign)
    (tmp_path / "y.h5").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="not a readable HDF5"):
        FeatureCache.open(tmp_path / "y.h5")
    with pytest.raises(CacheError, match="no such cache"):
        FeatureCache.open(tmp_path / "missing.h5")


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "x.lock"
    with CacheLock(path) as first:
        first.acquire()
        second = CacheLock(path)
        assert not second.try_acquire()
        with pytest.raises(CacheBusyError, match=f"pid {os.getpid()}"):
            second.acquire()
    third = CacheLock(path)
    assert third.try_acquire()
    third.release()


def test_the_header_encode_writes_reads_back_typed(demo_cache):
    """The root attributes have one definition (`CacheHeader`): encode writes it, `header`
    and `summary` read it back."""
    fc = FeatureCache.open(demo_cache)
    h = fc.header
    assert isinstance(h, CacheHeader)
    assert (h.model, h.embed_dim, h.classes) == (TINY_MODEL, 64, fc.classes)
    assert h.views["k"] == 2 and set(h.template_sets) == set(TEMPLATE_SETS)
    assert CacheHeader.from_attrs(h.to_attrs()) == h
    s = fc.summary()
    assert (s["preprocess"], s["views"], s["versions"]) == (h.preprocess, h.views, h.versions)

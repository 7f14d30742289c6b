"""The cache file: what encode writes reads back whole (shapes, labels, text, attributes),
the reader refuses what is not a finished skincache cache, and the lock excludes a second
writer. Corruption, checksums and full disks: tests/test_hostile.py."""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from skincache.cache import (
    CacheBusyError,
    CacheError,
    CacheHeader,
    CacheLock,
    CacheWarning,
    FeatureCache,
    SplitArrays,
    write_cache,
)
from skincache.cache.schema import attr
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
    assert ModelSpec(*h.model_spec()) == TINY  # what predict loads to encode new images


# --------------------------------------------------------------------------- the schema


def _header(**over) -> CacheHeader:
    """A small header with a value other than the default in every field."""
    values = dict(key="k" * 64, model="ViT-X", weights_sha256="w" * 64, embed_dim=4,
                  logit_scale=100.0, precision="fp32", preprocess={"size": [8, 8]},
                  views={"k": 1}, dataset="toy", dataset_kind="csv", dataset_root="/toy",
                  dataset_fingerprint="fp", classes=["a", "b"], class_names=["A", "B"],
                  versions={"numpy": "1"}, created="2026-01-01T00:00:00", template_sets={
                      "clip": ["a photo of {}."]}, skincache_version="9.9", pretrained="tag",
                  checkpoint="/w.pt", checkpoint_sha256="c" * 64, device="cpu",
                  features_normalized=True, chunking={"chunk_size": 2},
                  split_origin={"split_file": "s.csv"})
    values.update(over)
    return CacheHeader(**values)


def _write(path, header: CacheHeader):
    rng = np.random.default_rng(0)
    split = SplitArrays(features=rng.normal(size=(4, 4)), views=rng.normal(size=(4, 1, 4)),
                        labels=np.array([0, 1, 0, 1]), image_id=["i0", "i1", "i2", "i3"],
                        group_id=["g0", "g0", "g1", "g1"], sha1=["0" * 40] * 4,
                        meta={"sex": ["m", "f", "m", "f"]})
    write_cache(path, header, {"train": split}, {}, {})
    return path


def test_every_header_field_round_trips_and_is_covered_by_the_checksum(tmp_path):
    """Each `CacheHeader` field is written, read back equal, and (but `created`, a timestamp)
    covered by the header checksum: an edit of any one of them in the file is refused."""
    header = _header()
    path = _write(tmp_path / "x.h5", header)
    fc = FeatureCache.open(path)
    assert fc.header == header
    for f in dataclasses.fields(CacheHeader):
        if f.name == "created":
            continue
        with h5py.File(path, "r+") as h5:
            old = h5.attrs[f.name]
            h5.attrs[f.name] = json.dumps("edited") if f.metadata["json"] else (
                "edited" if isinstance(getattr(header, f.name), str) else 1)
        with pytest.raises(CacheError, match="do not match their checksum"):
            FeatureCache.open(path)
        with h5py.File(path, "r+") as h5:
            h5.attrs[f.name] = old
    assert FeatureCache.open(path).header == header


@dataclasses.dataclass(kw_only=True)
class _HeaderPlus(CacheHeader):
    """The schema with a throwaway field, as a new cache attribute is added: one line."""

    lens: dict = attr(json=True, required=True, encoding="lens")


class _CachePlus(FeatureCache):
    header_type = _HeaderPlus


def test_a_field_added_to_the_schema_is_written_read_checked_and_keyed(tmp_path):
    """A field declared once (`attr(...)`) reaches every place: the writer stores it (as JSON
    text), the reader decodes it, requires it, the header checksum covers it and, marked with
    an `encoding` name, the encoding key includes it."""
    base = dataclasses.asdict(_header())
    a = _write(tmp_path / "a.h5", _HeaderPlus(**base, lens={"mm": 1}))
    b = _write(tmp_path / "b.h5", _HeaderPlus(**base, lens={"mm": 2}))
    with h5py.File(a) as h5:
        assert json.loads(h5.attrs["lens"]) == {"mm": 1}
    fa, fb = _CachePlus.open(a), _CachePlus.open(b)
    assert fa.header.lens == {"mm": 1} and fb.header.lens == {"mm": 2}
    assert fa.encoding_key != fb.encoding_key  # in the key: a head of one refuses the other
    assert FeatureCache.open(a).encoding_key == FeatureCache.open(b).encoding_key
    with h5py.File(a, "r+") as h5:
        h5.attrs["lens"] = json.dumps({"mm": 3})
    with pytest.raises(CacheError, match="do not match their checksum"):
        _CachePlus.open(a)
    plain = _write(tmp_path / "plain.h5", CacheHeader(**base))  # required: refused without it
    with pytest.raises(CacheError, match="attribute 'lens' is missing"):
        _CachePlus.open(plain)


def test_a_hand_written_schema_1_cache_still_reads(tmp_path):
    """A schema-1 file as the first skincache wrote it (no checksums, no template sets,
    chunking or split origin), written with h5py alone: read with a warning, the fields it
    lacks at their defaults."""
    path = tmp_path / "old.h5"
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(3, 4)).astype(np.float16)
    with h5py.File(path, "w") as f:
        attrs = dict(format="skincache-features", schema_version=1, complete=True,
                     feature_dtype="float16", split_order=json.dumps(["train"]), key="k",
                     model="ViT-B-32", pretrained="openai", weights_sha256="w", embed_dim=4,
                     logit_scale=100.0, precision="fp32", preprocess=json.dumps({"size": 224}),
                     views=json.dumps({"k": 1}), classes=json.dumps(["nv", "mel"]),
                     class_names=json.dumps(["nevus", "melanoma"]), created="2025",
                     versions=json.dumps({}), dataset="ham", dataset_kind="ham10000",
                     dataset_root="/d", dataset_fingerprint="fp")
        f.attrs.update(attrs)
        g = f.create_group("splits/train")
        g["features"], g["views"] = feats, feats[:, None]
        g["labels"] = np.array([0, 1, 0], dtype=np.int16)
        for col in ("image_id", "group_id", "sha1"):
            g.create_dataset(col, data=["x", "y", "z"], dtype=h5py.string_dtype())
    with pytest.warns(CacheWarning, match="schema 1"):
        fc = FeatureCache.open(path)
    h = fc.header
    assert (h.classes, h.class_names, h.template_sets, h.split_origin) == (
        ["nv", "mel"], ["nevus", "melanoma"], {}, {})
    assert ModelSpec(*h.model_spec()) == ModelSpec("ViT-B-32", "openai")
    np.testing.assert_array_equal(fc.split("train").features, feats.astype(np.float32))
    assert list(fc.split("train").labels) == [0, 1, 0] and fc.split("train").meta == {}


def test_the_package_re_exports_lazily_and_the_schema_needs_neither_numpy_nor_h5py():
    """`from skincache.cache import CacheWarning` (the CLI's warning filter) loads the schema
    alone; every public name is still importable from the package."""
    import subprocess
    import sys

    code = ("import sys; from skincache.cache import CacheWarning, CacheHeader; "
            "print('h5py' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
    import skincache.cache as pkg

    assert sorted(pkg.__all__) == sorted([*pkg._EXPORTS, *pkg._DISK])
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = pkg.nope


def test_a_file_that_is_no_hdf5_is_named_as_not_a_cache(tmp_path):
    """A features .npz or a CSV handed as --cache is not "damaged": say what it is not."""
    import numpy as np

    from skincache.cache import CacheError, FeatureCache

    npz = tmp_path / "features.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(CacheError, match="not a skincache cache"):
        FeatureCache.open(npz)
    broken = tmp_path / "cut.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # an HDF5 signature, then nothing
    with pytest.raises(CacheError, match="not a readable HDF5 file") as e:
        FeatureCache.open(broken)
    assert "not a skincache cache" not in str(e.value)  # damaged, not another kind of file


def test_with_cache_lock_holds_the_lock(tmp_path):
    """`with CacheLock(p):` takes the lock (a second holder is refused) and frees it after."""
    from skincache.cache import CacheBusyError, CacheLock

    path = tmp_path / "x.lock"
    with CacheLock(path):
        with pytest.raises(CacheBusyError):
            CacheLock(path).acquire(wait=False)
    other = CacheLock(path)
    other.acquire(wait=False)  # free again after the block
    other.release()

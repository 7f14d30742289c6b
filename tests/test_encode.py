"""`encode`: the cache round trip, no-op re-runs, resume after SIGKILL, locking, bad inputs."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skincache.cache import CacheBusyError, CacheError, CacheLock, FeatureCache, SplitData
from skincache.data import DataError, Dataset, load_dataset
from skincache.encode import encode_dataset
from skincache.models import TINY_MODEL, ModelSpec
from skincache.prompts import TEMPLATE_SETS
from skincache.views import ViewPolicy

TINY = ModelSpec(TINY_MODEL)
FAST = dict(device="cpu", batch_size=8, chunk_batches=2, num_workers=0, progress=False)


def test_cached_features_equal_open_clip_preprocess_then_model(demo_dataset, tmp_path,
                                                               tiny_model):
    res = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=0), cache_dir=tmp_path, **FAST)
    fc = FeatureCache.open(res.path)
    s = fc.split("train")
    by_id = {r.image_id: r for r in demo_dataset.records}
    tf = tiny_model.preprocess.open_clip_transform()
    with torch.no_grad():
        ref = tiny_model.model.encode_image(torch.stack(
            [tf(Image.open(by_id[i].source)) for i in s.image_id[:12]])).numpy()
    got = s.features[:12]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99, cos


def test_second_encode_is_a_no_op_and_force_rebuilds(demo_dataset, tmp_path, monkeypatch):
    first = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                           **FAST)
    mtime = first.path.stat().st_mtime_ns

    def no_model(*a, **k):
        raise AssertionError("a no-op re-encode must not load the model")

    monkeypatch.setattr("skincache.encode.load_model", no_model)
    again = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                           **FAST)
    assert again.status == "exists" and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    forced = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                            force=True, **FAST)
    assert forced.status == "built" and forced.path.stat().st_mtime_ns != mtime


def test_key_changes_with_views_seed_and_split(demo_dataset, demo_root, tmp_path):
    from skincache.encode import encode_key

    base = encode_key(demo_dataset, TINY, ViewPolicy(k=2), "fp32", ["clip"])
    assert base == encode_key(demo_dataset, TINY, ViewPolicy(k=2), "fp32", ["clip"])
    assert base != encode_key(demo_dataset, TINY, ViewPolicy(k=3), "fp32", ["clip"])
    assert base != encode_key(demo_dataset, TINY, ViewPolicy(k=2, seed=1), "fp32", ["clip"])
    assert base != encode_key(demo_dataset, TINY, ViewPolicy(k=2), "bf16", ["clip"])
    assert base != encode_key(demo_dataset, TINY, ViewPolicy(k=2), "fp32", ["dermoscopy"])
    other_split = load_dataset(demo_root, seed=1)
    assert base != encode_key(other_split, TINY, ViewPolicy(k=2), "fp32", ["clip"])


_RUN = textwrap.dedent("""
    import os, signal, sys
    from skincache.cache import PartialCache
    kill_after = int(sys.argv[3])
    if kill_after >= 0:
        original = PartialCache.write_chunk
        def write_chunk(self, i, **arrays):
            original(self, i, **arrays)
            if i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        PartialCache.write_chunk = write_chunk
    from skincache.data import load_dataset
    from skincache.encode import encode_dataset
    from skincache.models import ModelSpec
    from skincache.views import ViewPolicy
    r = encode_dataset(load_dataset(sys.argv[1]), ModelSpec("skincache-tiny"),
                       policy=ViewPolicy(k=2), cache_dir=sys.argv[2], device="cpu",
                       batch_size=8, chunk_batches=1, num_workers=0, progress=False)
    print("STATUS", r.status, r.path)
""")


def _run(root: Path, cache_dir: Path, kill_after: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, str(root), str(cache_dir),
                           str(kill_after)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(demo_root, tmp_path):
    killed = _run(demo_root, tmp_path / "a", kill_after=2)
    assert killed.returncode == -9, killed.stderr
    partial = next((tmp_path / "a").glob("*.partial"))
    assert sorted(p.name for p in partial.glob("chunk_*.npz")) == [
        "chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    assert not list((tmp_path / "a").glob("*.h5"))  # nothing under the final name
    with pytest.raises(CacheError, match="partial"):
        FeatureCache.open(partial)

    resumed = _run(demo_root, tmp_path / "a", kill_after=-1)
    assert "STATUS resumed" in resumed.stdout, resumed.stderr
    clean = _run(demo_root, tmp_path / "b", kill_after=-1)
    assert "STATUS built" in clean.stdout, clean.stderr

    a = FeatureCache.open(next((tmp_path / "a").glob("*.h5")))
    b = FeatureCache.open(next((tmp_path / "b").glob("*.h5")))
    assert not partial.exists()
    assert {k: v for k, v in a.attrs.items() if k != "created"} == {
        k: v for k, v in b.attrs.items() if k != "created"}
    for name in b.splits:
        for col in (*SplitData.COLUMNS, "meta"):
            x, y = getattr(a.splits[name], col), getattr(b.splits[name], col)
            if col == "meta":
                assert x.keys() == y.keys() and all(np.array_equal(x[c], y[c]) for c in x)
            else:
                assert np.array_equal(x, y), (name, col)
    for t in b.text:
        assert np.array_equal(a.text[t], b.text[t])


def test_a_second_run_on_a_locked_cache_stops_with_a_clear_message(demo_dataset, tmp_path):
    from skincache.cache import cache_name
    from skincache.encode import encode_key

    key = encode_key(demo_dataset, TINY, ViewPolicy(k=1), "fp32", list(TEMPLATE_SETS))
    name = cache_name(demo_dataset.name, TINY.slug, 1, key)
    with CacheLock(tmp_path / f"{name}.lock") as lock:
        lock.acquire()
        with pytest.raises(CacheBusyError, match=f"pid {os.getpid()}"):
            encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                           **FAST)
    # released: the same call now runs
    assert encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                          **FAST).status == "built"


def _img_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def messy_csv(tmp_path) -> Path:
    """A path,label CSV whose files include every kind of bad and odd input."""
    rng = np.random.default_rng(0)
    root = tmp_path / "messy"
    root.mkdir()

    def rgb(seed):
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (90, 120, 3),
                                                                     dtype=np.uint8))
    good = _img_bytes(rgb(1), "JPEG")
    files = {
        "good1.jpg": (good, "nv"), "good2.jpg": (_img_bytes(rgb(2), "JPEG"), "mel"),
        "good3.jpg": (_img_bytes(rgb(3), "JPEG"), "nv"),
        "good4.jpg": (_img_bytes(rgb(4), "JPEG"), "mel"),
        "gray.png": (_img_bytes(rgb(5).convert("L"), "PNG"), "nv"),
        "rgba.png": (_img_bytes(rgb(6).convert("RGBA"), "PNG"), "mel"),
        "cmyk.jpg": (_img_bytes(rgb(7).convert("CMYK"), "JPEG"), "nv"),
        "palette.png": (_img_bytes(rgb(8).convert("P"), "PNG"), "mel"),
        "deep.png": (_img_bytes(Image.fromarray(rng.integers(0, 65535, (90, 120),
                                                             dtype=np.uint16)), "PNG"), "nv"),
        "empty.jpg": (b"", "nv"),
        "truncated.jpg": (good[: len(good) // 3], "mel"),
        "corrupt.jpg": (b"\xff\xd8\xff" + rng.bytes(3000), "nv"),
        "notes.jpg": (b"this is a text file, not an image\n", "mel"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, (name, (_, label)) in enumerate(files.items()):
            w.writerow([name, label, "train" if i % 2 == 0 else "val"])
        w.writerow(["gone.jpg", "nv", "train"])  # listed, never written
    return root / "labels.csv"


@pytest.mark.parametrize("loader", ["pillow", "tensor"])
def test_bad_inputs_are_recorded_and_skipped(messy_csv, tmp_path, loader):
    ds = load_dataset(messy_csv)
    res = encode_dataset(ds, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path / loader,
                         loader=loader, **FAST)
    fc = FeatureCache.open(res.path)
    kept = {i for s in fc.splits.values() for i in s.image_id}
    assert kept == {"good1", "good2", "good3", "good4", "gray", "rgba", "cmyk", "palette",
                    "deep"}
    reasons = {row["image_id"]: row["reason"] for row in fc.failed}
    assert set(reasons) == {"empty", "truncated", "corrupt", "notes", "gone"}
    assert "empty file" in reasons["empty"]
    assert "truncated" in reasons["truncated"] or "corrupt" in reasons["truncated"]
    assert "corrupt" in reasons["corrupt"]
    assert "not an image" in reasons["notes"]
    assert reasons["gone"].startswith("missing") and "gone.jpg" in reasons["gone"]
    assert res.n_failed == 5 and sum(res.failed_reasons.values()) == 5
    assert all(row["source"] for row in fc.failed)


def test_tensor_route_gives_the_pillow_routes_features(demo_dataset, tmp_path):
    """The CUDA route's code (nvjpeg decode + views on tensors) run on the CPU."""
    a = FeatureCache.open(encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=2),
                                         cache_dir=tmp_path / "p", loader="pillow",
                                         **FAST).path)
    b = FeatureCache.open(encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=2),
                                         cache_dir=tmp_path / "t", loader="tensor",
                                         **FAST).path)
    for name in a.splits:
        x, y = a.split(name), b.split(name)
        assert list(x.image_id) == list(y.image_id)
        for fa, fb in ((x.features, y.features), (x.views.reshape(-1, 64),
                                                   y.views.reshape(-1, 64))):
            cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
            assert cos.min() > 0.99


def _refuses_before_model(ds: Dataset, tmp_path: Path, monkeypatch, match: str) -> None:
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded for a bad dataset")

    monkeypatch.setattr("skincache.encode.load_model", no_model)
    with pytest.raises(DataError, match=match):
        encode_dataset(ds, TINY, cache_dir=tmp_path, **FAST)


def test_unknown_label_refused_before_model(demo_dataset, tmp_path, monkeypatch):
    recs = list(demo_dataset.records)
    recs[3] = dataclasses.replace(recs[3], label="psoriasis")
    ds = dataclasses.replace(demo_dataset, records=recs)
    _refuses_before_model(ds, tmp_path, monkeypatch, "unknown labels.*psoriasis")


def test_one_class_refused_before_model(demo_dataset, tmp_path, monkeypatch):
    recs = [r for r in demo_dataset.records if r.label == "nv"]
    ds = dataclasses.replace(demo_dataset, records=recs)
    _refuses_before_model(ds, tmp_path, monkeypatch, "only 1 class")


def test_empty_split_refused_before_model(tmp_path, monkeypatch):
    root = tmp_path / "d"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / f"{i}.jpg")
    (root / "l.csv").write_text("path,label\n0.jpg,a\n1.jpg,b\n2.jpg,a\n3.jpg,b\n")
    ds = load_dataset(root / "l.csv")  # 4 images cannot fill train/val/test at 72/19/9
    _refuses_before_model(ds, tmp_path, monkeypatch, "split '(val|test)' is empty")


def test_real_ham10000_subset_encodes(ham10000_dir, tmp_path):
    ds = load_dataset(ham10000_dir)
    keep = {g for g in sorted({r.group for r in ds.records})[:40]}
    ds.records = [r for r in ds.records if r.group in keep]
    ds.classes = sorted({r.label for r in ds.records}) if len(
        {r.label for r in ds.records}) > 1 else ds.classes
    if len({r.split for r in ds.records}) < 2 or len({r.label for r in ds.records}) < 2:
        pytest.skip("subset too small to span splits and classes")
    res = encode_dataset(ds, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path, **FAST)
    fc = FeatureCache.open(res.path)
    assert res.n_failed == 0
    assert sum(len(s) for s in fc.splits.values()) == len(ds.records)
    groups = [set(s.group_id) for s in fc.splits.values()]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])

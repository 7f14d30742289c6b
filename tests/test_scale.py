"""Issue 12: lazy caches, heads that stream, IVF search, and the scale benchmark (CPU, fast)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from skincache.cache import CacheError, FeatureCache
from skincache.heads import create_head
from skincache.heads._torch import memory_budget
from skincache.runs import fit_inputs

ROOT = Path(__file__).resolve().parents[1]


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks/scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scale") / "small.h5"
    _scale_module().write_synthetic(path, n=1500, k=2, dim=32, seed=3)
    return path


def _count_reads(monkeypatch) -> list[str]:
    """Names of the HDF5 datasets whose values are read, one entry per read (h5py's public
    `Dataset.read_direct` / `Dataset.__getitem__`, whichever path the reader takes; a
    shape or dtype lookup reads no values and is not counted)."""
    import h5py

    seen: list[str] = []
    real_direct, real_getitem = h5py.Dataset.read_direct, h5py.Dataset.__getitem__

    def read_direct(self, *args, **kwargs):
        seen.append(self.name.lstrip("/"))
        return real_direct(self, *args, **kwargs)

    def getitem(self, *args, **kwargs):
        seen.append(self.name.lstrip("/"))
        return real_getitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "read_direct", read_direct)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return seen


def test_open_reads_no_split_data_until_asked(small_cache, monkeypatch):
    seen = _count_reads(monkeypatch)
    fc = FeatureCache.open(small_cache)
    assert not [s for s in seen if s.startswith("splits/")]  # text only
    assert all(s.loaded == () for s in fc.splits.values())
    assert len(fc.split("train")) == 1500 and fc.split("train").n_views == 2  # metadata only
    assert not [s for s in seen if s.startswith("splits/")]
    f16 = fc.split("train").features16
    assert f16.dtype == np.float16 and f16.shape == (1500, 32)
    assert [s for s in seen if s.startswith("splits/")] == ["splits/train/features"]
    assert fc.split("train").loaded == ("features16",)  # views, labels, val, test untouched
    assert fc.split("val").loaded == ()
    x = fc.split("train").features
    assert x.dtype == np.float32 and np.array_equal(x, f16.astype(np.float32))
    assert seen.count("splits/train/features") == 1  # read once, float32 made from it


def test_explicit_load_and_release(small_cache):
    fc = FeatureCache.open(small_cache, load=True)
    assert set(fc.split("test").loaded) >= {"features", "views", "labels", "image_id"}
    fc.split("test").release()
    assert fc.split("test").loaded == ()
    assert fc.split("test").labels.dtype == np.int64  # read again on demand


def test_batches_stream_the_split_in_blocks(small_cache):
    fc = FeatureCache.open(small_cache)
    blocks = list(fc.split("train").batches(rows=400))
    assert [s for s, _ in blocks] == [0, 400, 800, 1200]
    assert fc.split("train").loaded == ()  # nothing kept
    whole = np.concatenate([b for _, b in blocks])
    assert whole.dtype == np.float32 and np.array_equal(whole, fc.split("train").features)
    views = np.concatenate([b for _, b in fc.split("val").batches(rows=64, what="views")])
    assert np.array_equal(views, fc.split("val").views)


@pytest.mark.parametrize("dataset", ["splits/train/views", "splits/val/features",
                                     "splits/test/labels"])
def test_a_corrupted_dataset_is_refused_when_read(small_cache, tmp_path, dataset):
    path = tmp_path / "bad.h5"
    path.write_bytes(small_cache.read_bytes())
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(off + 5)
        b = fh.read(1)
        fh.seek(off + 5)
        fh.write(bytes([b[0] ^ 0x40]))
    fc = FeatureCache.open(path)  # lazy: the header is sound, nothing else was read
    split, col = dataset.split("/")[1:]
    other = "labels" if col != "labels" else "features"
    getattr(fc.split(split), other)  # an intact dataset of the same split reads fine
    with pytest.raises(CacheError, match=f"dataset {dataset} does not match its checksum"):
        getattr(fc.split(split), col)
    if col != "labels":
        with pytest.raises(CacheError, match="does not match its checksum"):
            next(FeatureCache.open(path).split(split).batches(what=col))
    with pytest.raises(CacheError, match="does not match its checksum"):
        FeatureCache.open(path).verify()
    with pytest.raises(CacheError, match="does not match its checksum"):
        FeatureCache.open(path, load=True)


def test_a_file_replaced_after_open_is_refused(small_cache, tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(small_cache.read_bytes())
    fc = FeatureCache.open(path)
    _scale_module().write_synthetic(path, n=300, k=2, dim=32, seed=9)
    with pytest.raises(CacheError, match="changed since it was opened"):
        _ = fc.split("train").features


def test_memory_budget_parsing():
    assert memory_budget("512M") == 512 << 20
    assert memory_budget("8G") == 8 << 30 and memory_budget("8GiB") == 8 << 30
    assert memory_budget(100) == 100 << 20  # numbers are MiB
    assert memory_budget(None) == memory_budget("auto") > 0
    with pytest.raises(ValueError, match="max_memory"):
        memory_budget("lots")


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_streamed_feedforward_fit_equals_in_memory(small_cache, name):
    fc = FeatureCache.open(small_cache)
    inputs = fit_inputs(fc, template_set="synthetic")
    assert inputs["X"].dtype == np.float16  # fit-head hands the stored float16 over
    a = create_head(name, epochs=3, seed=4).fit(**inputs)
    b = create_head(name, epochs=3, seed=4, max_memory="64K").fit(**inputs)
    assert not a.streamed_ and b.streamed_
    sa, sb = a.module_.state_dict(), b.module_.state_dict()
    for k in sa:
        assert np.array_equal(sa[k].numpy(), sb[k].numpy()), k
    X = fc.split("test").features
    assert np.allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("use_views", [False, True])
def test_streamed_logreg_matches_in_memory(small_cache, monkeypatch, use_views):
    from skincache.heads import _lbfgs

    fc = FeatureCache.open(small_cache)
    inputs = fit_inputs(fc, template_set="synthetic")
    a = create_head("logreg", C=1.0, use_views=use_views).fit(**inputs)
    real = _lbfgs.RowBlocks.__init__
    monkeypatch.setattr(_lbfgs.RowBlocks, "__init__",
                        lambda self, parts, prep, rows=0: real(self, parts, prep, 256))
    b = create_head("logreg", C=1.0, use_views=use_views, max_memory="64K").fit(**inputs)
    assert not a.streamed_ and b.streamed_
    # the same objective and exact gradients, summed in another order: float32 noise only
    assert np.abs(a.coef_ - b.coef_).max() < 2e-3 * np.abs(a.coef_).max()
    X = fc.split("test").features
    assert (a.predict(X) == b.predict(X)).mean() >= 0.99


def test_ivf_knn_agrees_with_exact_above_a_forced_threshold():
    rng = np.random.default_rng(0)
    n, d = 6000, 48
    centres = rng.normal(size=(40, d))
    y = rng.integers(0, 5, 40)
    which = rng.integers(0, 40, n)
    X = (centres[which] + 0.5 * rng.normal(size=(n, d))).astype(np.float16)
    Q = (centres[rng.integers(0, 40, 400)] + 0.5 * rng.normal(size=(400, d))).astype(np.float32)
    exact = create_head("knn", k=10, index="flat").fit(X, y[which])
    ivf = create_head("knn", k=10, ivf_threshold=1000).fit(X, y[which])  # auto, above it
    assert not exact.approximate_ and ivf.approximate_
    _, ie = exact.kneighbors(Q)
    _, ii = ivf.kneighbors(Q)
    recall = np.mean([len(set(ie[i]) & set(ii[i])) / 10 for i in range(len(Q))])
    assert recall >= 0.95
    assert (exact.predict(Q) == ivf.predict(Q)).mean() >= 0.98


def test_near_duplicates_with_ivf_find_the_exact_pairs(small_cache):
    from skincache.near_duplicates import near_duplicates

    fc = FeatureCache.open(small_cache)
    # threshold -1: every image's 3 most similar of each later split, exact vs IVF
    exact = near_duplicates(fc, threshold=-1.0, per_image=3, index="flat")
    ivf = near_duplicates(fc, threshold=-1.0, per_image=3, ivf_threshold=100)
    key = {(p["split_a"], p["image_a"], p["split_b"], p["image_b"]) for p in exact}
    got = {(p["split_a"], p["image_a"], p["split_b"], p["image_b"]) for p in ivf}
    assert len(key) > 1000
    assert len(key & got) >= 0.9 * len(key)


def test_scale_benchmark_quick_mode_runs(tmp_path):
    out = tmp_path / "scale.json"
    res = _scale_module().main(["--quick", "--heads", "linear,logreg,knn", "--out", str(out),
                                "--plot", str(tmp_path / "scale.png"), "--tmp", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert [(r["n"], r["k"]) for r in saved["rows"]] == [(2000, 0), (2000, 2)]
    for row in res["rows"]:
        assert row["write_s"] > 0 and row["open_s"] > 0
        for h in row["heads"]:
            assert "error" not in h, h
            assert h["fit_s"] > 0 and h["peak_rss_mb"] > 0
        knn = next(h for h in row["heads"] if h["head"] == "knn")
        assert 0.8 <= knn["ivf_recall_at_k"] <= 1.0
    assert (tmp_path / "scale.png").stat().st_size > 1000
    assert not list(tmp_path.glob("skincache-scale-*"))  # the caches were deleted

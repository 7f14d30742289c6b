"""predict: new images through the cache's own encode path, a saved head, nearest cases."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from skincache.cache import FeatureCache
from skincache.data import load_dataset
from skincache.predict import predict_images, write_predictions
from skincache.runs import fit_head_run, load_run


def test_predict_uses_the_encode_path_and_reports_bad_files(demo_cache, tmp_path):
    fit_head_run(demo_cache, "mlp", runs_dir=tmp_path, name="mlp", n_bootstrap=0,
                 plots=False)
    fc = FeatureCache.open(demo_cache)
    train = fc.split("train")
    ds = load_dataset(fc.attrs["dataset_root"])
    src = {r.image_id: r.source for r in ds.records}
    ids = list(train.image_id[:3])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    gray = tmp_path / "gray.png"
    Image.open(src[ids[0]]).convert("L").save(gray)
    preds = predict_images(tmp_path / "mlp", [src[i] for i in ids] + [bad, tmp_path / "no.jpg",
                                                                        gray], neighbors=3)
    assert [p.ok for p in preds] == [True, True, True, False, False, True]
    assert "not an image" in preds[3].error and "no file" in preds[4].error
    head = load_run(tmp_path / "mlp").head
    expected = head.predict_proba(train.features[:3])
    for j, p in enumerate(preds[:3]):
        # a training image finds itself: same decoding, views and model as encode
        assert p.neighbors[0]["image_id"] == ids[j] and p.neighbors[0]["similarity"] > 0.999
        got = np.array([p.probabilities[c] for c in fc.classes])
        assert np.allclose(got, expected[j], atol=2e-3)
        assert p.predicted == fc.classes[int(expected[j].argmax())]
    out = write_predictions(preds, tmp_path / "p.json")
    assert len(json.loads(out.read_text())) == 6


def test_predict_searches_the_saved_neighbor_index_and_fits_no_knn_head(demo_cache, tmp_path,
                                                                       monkeypatch):
    import skincache.heads.knn as knn_mod
    from skincache.heads import KNNHead
    from skincache.heads.knn import neighbor_index_path

    fit_head_run(demo_cache, "zeroshot", runs_dir=tmp_path, name="zs", n_bootstrap=0,
                 plots=False)
    fc = FeatureCache.open(demo_cache)
    saved = neighbor_index_path(tmp_path / "zs" / "head", fc.key)
    assert saved.is_file()  # written with the run at fit time

    def refuse(*a, **k):
        raise AssertionError("predict fitted a kNN head / rebuilt the index")

    monkeypatch.setattr(KNNHead, "fit", refuse)
    monkeypatch.setattr(knn_mod, "build_ip_index", refuse)
    reads = []
    real_read = knn_mod.read_neighbor_index

    def spy(*a, **k):
        reads.append(a)
        return real_read(*a, **k)

    import skincache.predict as predict_mod
    monkeypatch.setattr(predict_mod, "read_neighbor_index", spy)
    train = fc.split("train")
    src = {r.image_id: r.source for r in load_dataset(fc.attrs["dataset_root"]).records}
    preds = predict_images(tmp_path / "zs", [src[train.image_id[0]]], neighbors=2)
    assert reads and preds[0].neighbors[0]["image_id"] == train.image_id[0]


def test_predict_on_an_old_run_builds_the_neighbor_index_once(demo_cache, tmp_path,
                                                              monkeypatch):
    import skincache.heads.knn as knn_mod
    from skincache.heads.knn import neighbor_index_path

    fit_head_run(demo_cache, "zeroshot", runs_dir=tmp_path, name="old", n_bootstrap=0,
                 plots=False)
    fc = FeatureCache.open(demo_cache)
    saved = neighbor_index_path(tmp_path / "old" / "head", fc.key)
    saved.unlink()  # a run folder written before the index was saved with it
    builds = []
    real_build = knn_mod.build_ip_index
    monkeypatch.setattr(knn_mod, "build_ip_index",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    src = {r.image_id: r.source for r in load_dataset(fc.attrs["dataset_root"]).records}
    img = src[fc.split("train").image_id[1]]
    first = predict_images(tmp_path / "old", [img], neighbors=3)
    second = predict_images(tmp_path / "old", [img], neighbors=3)
    assert len(builds) == 1 and saved.is_file()
    assert first[0].neighbors == second[0].neighbors


def test_only_missing_files_are_said_without_loading_the_model(demo_cache, tmp_path,
                                                               monkeypatch):
    """A typo in an image path costs no model load: it is said before the image tower."""
    import skincache.predict as predict_mod

    fit_head_run(demo_cache, "knn", runs_dir=tmp_path, name="knn", n_bootstrap=0, plots=False)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded for images that do not exist")

    monkeypatch.setattr(predict_mod, "load_model", no_load)
    preds = predict_images(tmp_path / "knn", [tmp_path / "nope.jpg", tmp_path / "gone.png"])
    assert [p.ok for p in preds] == [False, False]
    assert all("missing: no file" in p.error for p in preds)

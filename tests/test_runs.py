"""Run folders, evaluate, predict, bench-heads and near-duplicates on a real (tiny) cache."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from skincache.bench import aggregate, bench_heads
from skincache.cache import FeatureCache, SplitData
from skincache.data import load_dataset
from skincache.encode import encode_dataset
from skincache.models import TINY_MODEL, ModelSpec
from skincache.near_duplicates import near_duplicates
from skincache.predict import predict_images, write_predictions
from skincache.runs import RunError, evaluate_run, fit_head_run, load_run
from skincache.views import ViewPolicy


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_head_run_writes_a_consistent_run_folder(demo_cache, tmp_path):
    res = fit_head_run(demo_cache, "logreg", runs_dir=tmp_path, name="lr", n_bootstrap=50)
    run = tmp_path / "lr"
    for rel in ("run.json", "head/head.json", "head/head.safetensors", "metrics/val.json",
                "metrics/test.json", "predictions/test.csv", "plots/test_classwise.png",
                "plots/test_confusion_matrix_normalized.png"):
        assert (run / rel).is_file(), rel
    cfg = json.loads((run / "run.json").read_text())
    fc = FeatureCache.open(demo_cache)
    assert cfg["cache_key"] == fc.key and cfg["head"] == "logreg"
    rows = _read_csv(run / "predictions" / "test.csv")
    bacc = balanced_accuracy_score([r["true"] for r in rows], [r["predicted"] for r in rows])
    assert res.metrics["test"]["balanced_accuracy"] == pytest.approx(bacc)
    assert json.loads((run / "metrics/test.json").read_text())["balanced_accuracy"] == (
        pytest.approx(bacc))
    # the saved head reproduces the run's probabilities
    head = load_run(run).head
    proba = head.predict_proba(fc.split("test").features)
    saved = np.array([[float(r[f"p_{c}"]) for c in fc.classes] for r in rows])
    assert np.allclose(proba, saved, atol=1e-6)
    with pytest.raises(RunError, match="exists"):
        fit_head_run(demo_cache, "logreg", runs_dir=tmp_path, name="lr")


def test_evaluate_accepts_another_dataset_and_refuses_another_model(demo_cache, demo_root,
                                                                    tiny_model, tmp_path):
    import torch

    from skincache.data import make_demo_dataset

    fit_head_run(demo_cache, "knn", runs_dir=tmp_path, name="knn", n_bootstrap=0, plots=False)
    report = evaluate_run(tmp_path / "knn", "val", n_bootstrap=0, plots=False)
    assert report["n_samples"] == len(FeatureCache.open(demo_cache).split("val"))
    # external validation: other images, same model and preprocessing -> accepted
    other_data = make_demo_dataset(tmp_path / "other-data", n_images=40, seed=5)
    external = encode_dataset(load_dataset(other_data), ModelSpec(TINY_MODEL),
                              policy=ViewPolicy(k=0), cache_dir=tmp_path / "ext", device="cpu",
                              num_workers=0, progress=False).path
    assert FeatureCache.open(external).key != FeatureCache.open(demo_cache).key
    ext = evaluate_run(tmp_path / "knn", "val", cache=external, n_bootstrap=0, plots=False)
    assert ext["n_samples"] == len(FeatureCache.open(external).split("val"))
    # other weights -> refused, naming both caches
    sd = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    sd["visual.proj"] = sd["visual.proj"] * -1
    torch.save({"state_dict": sd}, tmp_path / "other.pt")
    other = encode_dataset(load_dataset(demo_root), ModelSpec(TINY_MODEL, None,
                                                              str(tmp_path / "other.pt")),
                           policy=ViewPolicy(k=0), cache_dir=tmp_path / "other", device="cpu",
                           num_workers=0, progress=False).path
    with pytest.raises(RunError, match="meaningless") as e:
        evaluate_run(tmp_path / "knn", "val", cache=other)
    assert other.name in str(e.value) and demo_cache.name in str(e.value)


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


def test_bench_heads_one_json_per_run_then_aggregate(demo_cache, tmp_path):
    res = bench_heads(demo_cache, seeds=2, variants=["zeroshot", "knn-k1", "linear"],
                      out_dir=tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "b" / "runs").glob("*.json"))
    assert files == ["knn-k1_s0.json", "linear_s0.json", "linear_s1.json", "zeroshot_s0.json"]
    runs = [json.loads((tmp_path / "b" / "runs" / f).read_text()) for f in files]
    lin = [r["balanced_accuracy"] for r in runs if r["variant"] == "linear"]
    row = next(r for r in res.rows if r["variant"] == "linear")
    assert row["n_seeds"] == 2 and row["balanced_accuracy_mean"] == pytest.approx(np.mean(lin))
    assert row["balanced_accuracy_std"] == pytest.approx(np.std(lin))
    assert [r["seed"] for r in runs if r["variant"] == "linear"] == [0, 1]
    assert aggregate(runs)[0]["variant"] == "knn-k1"
    md = (tmp_path / "b" / "results.md").read_text()
    assert re.search(r"\| linear( \(val's pick\))? \| all \| 2 \|", md)
    assert "1 (deterministic)" in md
    assert (tmp_path / "b" / "results.csv").is_file()
    with pytest.raises(ValueError, match="unknown variants"):
        bench_heads(demo_cache, variants=["nope"], out_dir=tmp_path / "c")


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


def test_text_heads_refuse_a_cache_without_text(demo_cache, tmp_path):
    fc = FeatureCache.open(demo_cache)
    fc.text = {}
    with pytest.raises(ValueError, match="text features"):
        fit_head_run(fc, "zeroshot", runs_dir=tmp_path, n_bootstrap=0, plots=False)
    shutil.rmtree(tmp_path, ignore_errors=True)

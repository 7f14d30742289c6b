"""Run folders: fit-head runs, evaluate (on another cache too), wrong-cache refusal."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from skincache.cache import FeatureCache
from skincache.data import load_dataset
from skincache.encode import encode_dataset
from skincache.models import TINY_MODEL, ModelSpec
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


def test_text_heads_refuse_a_cache_without_text(demo_cache, tmp_path):
    fc = FeatureCache.open(demo_cache)
    fc.text = {}
    with pytest.raises(ValueError, match="text features"):
        fit_head_run(fc, "zeroshot", runs_dir=tmp_path, n_bootstrap=0, plots=False)
    shutil.rmtree(tmp_path, ignore_errors=True)

"""bench-encoders (the encoder table) and encode --pre-projection (issue 19).

Stand-in encoders: the demo data through the tiny model at K=2 (`demo_cache`) and at K=1 with
pre-projection features (one more encode, shared by the module), and synthetic caches of one
seed at two feature dims. Real-feature numbers are benchmarks/real_encoders.py's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_cache
from typer.testing import CliRunner

from skincache.cache import FeatureCache
from skincache.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pre_cache(demo_dataset, tmp_path_factory) -> tuple[Path, Path]:
    """The demo data encoded with --pre-projection (K=1), and the `.partial/` folder its
    chunks were committed to (kept: its removal is switched off for this encode)."""
    from skincache.cache import PartialCache
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    folder = tmp_path_factory.mktemp("pre")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PartialCache, "remove", lambda self: None)
        res = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=1),
                             cache_dir=folder, device="cpu", num_workers=0, progress=False,
                             batch_size=16, chunk_batches=1, pre_projection=True)
    return res.path, res.path.with_suffix(".partial")


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two stand-in encoders of one synthetic dataset (same seed: same images and splits)."""
    d = tmp_path_factory.mktemp("synth")
    return (synthetic_cache(d / "enc16.h5", n=240, d=16, seed=3),
            synthetic_cache(d / "enc24.h5", n=240, d=24, seed=3))


# ------------------------------------------------------------------ --pre-projection


def test_pre_projection_cache_round_trips_and_is_the_input_of_the_projection(pre_cache,
                                                                             tiny_model):
    path, _ = pre_cache
    fc = FeatureCache.open(path)
    proj = tiny_model.model.visual.proj.detach().numpy()
    assert fc.header.pre_projection_dim == proj.shape[0]
    assert fc.summary()["pre_projection_dim"] == proj.shape[0]
    for name, s in fc.splits.items():
        assert s.has_pre, name
        assert s.features_pre.shape == (len(s), proj.shape[0])
        assert s.views_pre.shape == (len(s), 1, proj.shape[0])
        # the stored pre features, projected, are the stored features (float16 on disk)
        np.testing.assert_allclose(s.features_pre @ proj, s.features, atol=2e-2, rtol=2e-2)
        assert not np.allclose(s.features_pre, s.features, atol=1e-2)


def test_pre_projection_is_part_of_the_key_and_old_caches_still_read(demo_dataset,
                                                                     synth_pair):
    from skincache.encode import encode_key
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    args = (demo_dataset, ModelSpec(TINY_MODEL), ViewPolicy(k=1), "fp32", ["clip"])
    assert encode_key(*args, pre_projection=True) != encode_key(*args)
    assert encode_key(*args, pre_projection=False) == encode_key(*args)
    old = FeatureCache.open(synth_pair[0])  # written without pre features
    assert old.header.pre_projection_dim == 0 and not old.split("train").has_pre
    with pytest.raises(Exception, match="no pre-projection features"):
        _ = old.split("train").features_pre


def test_pre_projection_chunks_carry_the_pre_features_and_a_resume_keeps_them(
        pre_cache, demo_dataset):
    from skincache.cache import PartialCache
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    path, partial = pre_cache
    chunk = PartialCache(partial).read_chunk(0)
    assert chunk["features_pre"].shape[0] == chunk["features"].shape[0] > 0
    assert chunk["views_pre"].shape[1] == 1
    before = FeatureCache.open(path).split("test").features_pre.copy()
    moved = path.with_name("first.h5")
    path.rename(moved)  # the cache gone, its chunks kept: the rerun assembles from them
    res = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=1),
                         cache_dir=path.parent, device="cpu", num_workers=0, progress=False,
                         batch_size=16, chunk_batches=1, pre_projection=True)
    assert res.status == "resumed" and res.path == path
    np.testing.assert_array_equal(FeatureCache.open(path).split("test").features_pre, before)


def test_a_head_fits_on_pre_features_and_its_evaluate_and_predict_use_them(
        pre_cache, tmp_path, demo_root):
    from skincache.predict import predict_images
    from skincache.runs import evaluate, fit_head_run, load_run

    path, _ = pre_cache
    fc = FeatureCache.open(path)
    r = fit_head_run(fc, "logreg", runs_dir=tmp_path, name="pre", features="pre",
                     n_bootstrap=0, plots=False)
    run = load_run(r.path)
    assert run.record.extra["features"] == "pre"
    assert run.head.coef_.shape[-1] == fc.header.pre_projection_dim
    test = fc.split("test")
    want = run.head.predict_proba(test.features_pre)
    assert not np.allclose(want, run.head.predict_proba(test.features))
    ev = evaluate(r.path, "test", n_bootstrap=0, plots=False)
    assert ev.status == "unchanged"  # the same numbers as the fit's own: pre features again
    img = next(iter(sorted(demo_root.rglob("*.jpg"))))
    pred = predict_images(r.path, [img], device="cpu", neighbors=1)[0]
    assert pred.ok and set(pred.probabilities) == set(fc.classes)


def test_features_pre_on_a_cache_without_them_is_one_line(synth_pair, tmp_path):
    r = runner.invoke(app, ["fit-head", "--cache", str(synth_pair[0]), "--head", "logreg",
                            "-p", "features=pre", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "no pre-projection features" in lines[0]
    assert str(synth_pair[0]) in lines[0] and "--pre-projection" in lines[0]
    bad = runner.invoke(app, ["fit-head", "--cache", str(synth_pair[0]), "-p",
                              "features=raw"])
    assert bad.exit_code == 1 and "expected one of projected, pre" in bad.output


@pytest.mark.parametrize("head", ["zeroshot", "cbm"])
def test_features_pre_with_a_text_or_concept_head_is_refused(pre_cache, tmp_path, head):
    r = runner.invoke(app, ["fit-head", "--cache", str(pre_cache[0]), "--head", head,
                            "-p", "features=pre", "--runs-dir", str(tmp_path)])
    assert r.exit_code == 1 and "no text counterpart" in r.output, r.output


# ------------------------------------------------------------------ bench-encoders


def test_bench_encoders_writes_the_table_plot_json_and_markdown(demo_cache, pre_cache,
                                                               tmp_path):
    out = tmp_path / "bench"
    args = ["bench-encoders", "--cache", str(demo_cache), "--cache", str(pre_cache[0]),
            "--bootstrap", "50", "--out-dir", str(out), "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["heads"] == ["logreg", "dermfm-lp", "zeroshot"]  # the tiny model has text
    names = [e["encoder"] for e in res["encoders"]]
    assert len(names) == 2 and len(set(names)) == 2  # one model, told apart by file
    assert len(res["runs"]) == 6 and len(list((out / "runs").glob("*.json"))) == 6
    for run in res["runs"]:
        for m in ("balanced_accuracy", "accuracy", "macro_f1", "auroc"):
            lo, hi = run["ci"][m]
            assert lo <= run[m] <= hi, (run["variant"], m)
    assert [row["encoder"] for row in res["rows"]] == names
    md = (out / "results.md").read_text()
    assert "| encoder | dim | logreg | dermfm-lp | zeroshot |" in md
    assert md.count("### ") == 4 and all(f"| {n} |" in md for n in names)
    assert (out / "encoders.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, args)  # a rerun into the same folder refits nothing
    assert again.exit_code == 0 and "6 run(s) kept" in again.output


def test_a_cache_without_text_gets_no_text_heads_and_cv_fills_the_cells(synth_pair, tmp_path):
    from skincache.study.encoders import bench_encoders, markdown

    res = bench_encoders(list(synth_pair), heads=["logreg", "zeroshot"], cv=3,
                         out_dir=tmp_path / "cv")
    assert {(r["encoder"], r["variant"]) for r in res.runs} == {
        (e["encoder"], "logreg") for e in res.encoders}
    assert all(r["split"] == "cv3" and len(r["folds"]) == 3 and r["refit_test"] for r in
               res.runs)
    assert "no text" in markdown(res) and "3 lesion-grouped" in res.protocol
    dims = {e["encoder"]: e["embed_dim"] for e in res.encoders}
    assert sorted(dims.values()) == [16, 24]


def test_misaligned_caches_are_one_line_naming_the_first_mismatch(synth_pair, tmp_path):
    other = synthetic_cache(tmp_path / "other.h5", n=240, d=16, seed=4)  # other images
    r = runner.invoke(app, ["bench-encoders", "--cache", str(synth_pair[0]), "--cache",
                            str(other), "--out-dir", str(tmp_path / "b"), "--quiet"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert str(other) in lines[0] and str(synth_pair[0]) in lines[0]
    assert not (tmp_path / "b" / "results.json").exists()


def test_bench_encoders_option_mistakes_are_one_line_before_any_fit(synth_pair, tmp_path):
    for extra, needle in ((["--heads", "logreg,nope"], "--heads: unknown head variants nope"),
                          (["--features", "raw"], "--features 'raw'"),
                          (["--models", "ViT-B-32"], "--models needs --data")):
        r = runner.invoke(app, ["bench-encoders", "--cache", str(synth_pair[0]),
                                "--out-dir", str(tmp_path / "x"), *extra])
        assert r.exit_code == 1 and needle in r.output, (extra, r.output)
    assert not (tmp_path / "x").exists()


def test_models_finds_the_cache_encode_made_and_benches_it_beside_a_given_one(
        demo_cache, demo_root, pre_cache, tmp_path):
    """--models goes through encode's own library call: the demo data's tiny-model cache
    (K=2) exists already in that --cache-dir, so it is found, not rebuilt."""
    before = demo_cache.stat().st_mtime_ns
    r = runner.invoke(app, ["bench-encoders", "--cache", str(pre_cache[0]), "--models",
                            "skincache-tiny", "--data", str(demo_root), "--views", "2",
                            "--device", "cpu", "--cache-dir", str(demo_cache.parent),
                            "--heads", "logreg", "--bootstrap", "20", "--out-dir",
                            str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [e["cache"] for e in res["encoders"]] == [str(pre_cache[0]), str(demo_cache)]
    assert demo_cache.stat().st_mtime_ns == before


def test_an_unknown_model_in_models_is_one_line_before_any_encode(synth_pair, tmp_path):
    r = runner.invoke(app, ["bench-encoders", "--models", "ViT-B-32,ViT-Q-99", "--data",
                            str(tmp_path), "--out-dir", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown model 'ViT-Q-99'" in r.output
    assert not (tmp_path / "x").exists()


def test_pre_projection_cuts_timm_towers_at_their_head_and_refuses_a_tower_without_one():
    """The two tower shapes open_clip builds with a separate projection, on stand-in modules
    (no weights): timm's trunk + linear head, and a tower whose projection is inside its
    pooling (the ResNets' attention pool): one line saying so."""
    import torch

    from skincache.encoder import PreProjection
    from skincache.errors import UsageError

    class Trunk(torch.nn.Module):
        num_features = 12

        def forward(self, x):
            return x.flatten(1)[:, :12]

    class Timm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = Trunk()
            self.head = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(12, 5))

        def forward(self, x):
            return self.head(self.trunk(x))

    timm = torch.nn.Module()
    timm.visual = Timm()
    cut = PreProjection.of(timm, "timm-stand-in")
    x = torch.randn(3, 2, 4, 4)
    assert cut.kind == "timm" and cut.dim == 12
    assert cut.pooled(x).shape == (3, 12)
    torch.testing.assert_close(cut.project(cut.pooled(x)), timm.visual(x))

    resnet = torch.nn.Module()
    resnet.visual = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no proj, no trunk/head
    with pytest.raises(UsageError, match="has no separate final projection"):
        PreProjection.of(resnet, "RN50")


def test_pre_projection_of_a_vit_is_exactly_encode_image_and_leaves_proj_in_place(tiny_model):
    import torch

    from skincache.encoder import PreProjection

    model = tiny_model.model
    cut = PreProjection.of(model, "skincache-tiny")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = cut.pooled(x)
        torch.testing.assert_close(cut.project(pooled), model.encode_image(x))
    assert cut.kind == "vit" and pooled.shape == (2, model.visual.proj.shape[0])
    assert model.visual.proj is not None  # restored after the cut forward


def test_an_out_dir_holding_another_benchs_runs_is_refused_not_overwritten(synth_pair,
                                                                         tmp_path):
    from skincache.errors import UsageError
    from skincache.study.encoders import bench_encoders

    out = tmp_path / "o"
    first = bench_encoders(list(synth_pair), heads=["logreg"], n_bootstrap=20, out_dir=out)
    kept = {p.name: p.read_text() for p in (out / "runs").iterdir()}
    with pytest.raises(UsageError, match="n_bootstrap 20 there, 30 now"):
        bench_encoders(list(synth_pair), heads=["logreg"], n_bootstrap=30, out_dir=out)
    assert {p.name: p.read_text() for p in (out / "runs").iterdir()} == kept
    assert len(first.runs) == 2 and (out / "results.json").exists()

"""Several encoders, one head: caches of the same images joined (early fusion), a head per
cache mixed with weights chosen on val (late fusion), the run folder that records every cache,
and the one-line refusals (misaligned caches, text heads without shared text, predict)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_cache
from typer.testing import CliRunner

from skincache.cache import CacheError, FeatureCache, SplitArrays, write_cache
from skincache.cache.joined import join_caches
from skincache.cli import app
from skincache.errors import InputFileError
from skincache.heads.late_fusion import choose_weights, simplex_grid
from skincache.run_record import RUN_FORMAT_VERSION, read_run, write_run
from skincache.runs import RunError, evaluate, fit_head_run

runner = CliRunner()


def _twin(src: Path, out: Path, *, features=None, k: int | None = None, text=None,
          key: str | None = None, rename: tuple[str, int] | None = None) -> Path:
    """A cache of the same images, labels, groups and splits as `src`, its features made by
    `features(split name, X [N, D], views [N, K, D]) -> (X', views')` (another encoder),
    keeping `k` views; `text` replaces the text (None: keep; {}: none); `rename` (split,
    row): that image gets another id."""
    fc = FeatureCache.open(src)
    splits = {}
    for name, s in fc.splits.items():
        X, V = s.features, s.views
        if features is not None:
            X, V = features(name, X, V)
        if k is not None:
            V = V[:, :k]
        ids = [str(i) for i in s.image_id]
        if rename is not None and rename[0] == name:
            ids[rename[1]] = "other-image"
        splits[name] = SplitArrays(
            features=np.asarray(X, np.float16), views=np.asarray(V, np.float16),
            labels=s.labels, image_id=ids,
            group_id=[str(g) for g in s.group_id], sha1=[str(h) for h in s.sha1],
            meta={c: [str(v) for v in vals] for c, vals in s.meta.items()})
    dim = next(iter(splits.values())).features.shape[1]
    header = dataclasses.replace(fc.header, key=key or f"{fc.key}-twin", embed_dim=dim,
                                 views={**fc.header.views, "k": int(
                                     next(iter(splits.values())).views.shape[1])})
    write_cache(out, header, splits, fc.text if text is None else text, {})
    return out


def _noise(seed: int, d: int):
    rng = np.random.default_rng(seed)
    return lambda name, X, V: (rng.normal(size=(len(X), d)),
                               rng.normal(size=(len(X), V.shape[1], d)))


def test_aligned_caches_join_per_image_each_block_unit_norm(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", d=16, seed=3))
    b = FeatureCache.open(synthetic_cache(tmp_path / "b.h5", d=8, seed=3))
    j = join_caches([a, b])
    assert j.dims == [16, 8] and j.n_views == 2 and not j.notes
    for name in ("train", "val", "test"):
        s, sa, sb = j.split(name), a.split(name), b.split(name)
        assert s.features.shape == (len(sa), 24) and s.views.shape == (len(sa), 2, 24)
        assert np.allclose(np.linalg.norm(s.features[:, :16], axis=1), 1, atol=1e-5)
        assert np.allclose(np.linalg.norm(s.features[:, 16:], axis=1), 1, atol=1e-5)
        assert np.allclose(np.linalg.norm(s.views[:, :, 16:], axis=-1), 1, atol=1e-5)
        # the block of B is B's own row, direction kept, and the views pair by index
        fb = sb.features / np.linalg.norm(sb.features, axis=1, keepdims=True)
        assert np.allclose(s.features[:, 16:], fb, atol=1e-5)
        va = sa.views[:, 1] / np.linalg.norm(sa.views[:, 1], axis=1, keepdims=True)
        assert np.allclose(s.views[:, 1, :16], va, atol=1e-5)
        assert (s.labels == sa.labels).all() and list(s.image_id) == list(sa.image_id)
    assert j.key != a.key and j.key == join_caches([a, b]).key != join_caches([b, a]).key
    assert j.text == {} and "no text" in j.text_problem


def test_views_pair_by_index_to_the_smaller_count_and_say_so(tmp_path):
    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    b = _twin(synthetic_cache(tmp_path / "b0.h5", d=8, seed=3), tmp_path / "b.h5", k=1)
    j = join_caches([FeatureCache.open(a), FeatureCache.open(b)])
    assert j.n_views == 1 and j.split("train").views.shape[1:] == (1, 24)
    assert j.notes == ["views paired by index: K = 1 (the caches have 2, 1 augmented views)"]


def test_misaligned_caches_are_one_line_through_the_cli(tmp_path):
    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    b = _twin(a, tmp_path / "b.h5", features=_noise(0, 8), rename=("val", 7))
    r = runner.invoke(app, ["fit-head", "--cache", str(a), "--cache", str(b), "--head",
                            "logreg", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert r.exit_code == 1, r.output
    line = " ".join(r.output.split())
    assert "error:" in line and "a.h5" in line and "b.h5" in line
    assert "split 'val' differs at row 7" in line and "other-image" in line
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    same = runner.invoke(app, ["fit-head", "--cache", str(a), "--cache", str(a), "--quiet",
                               "--runs-dir", str(tmp_path / "runs")])
    assert same.exit_code == 1 and "the same cache" in " ".join(same.output.split())
    late1 = runner.invoke(app, ["fit-head", "--cache", str(a), "--fusion", "late"])
    assert late1.exit_code == 1 and "needs two or more --cache" in late1.output


def test_late_fusion_gives_a_noise_cache_no_weight(tmp_path):
    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    noise = _twin(a, tmp_path / "noise.h5", features=_noise(0, 12))
    res = fit_head_run([a, noise], "logreg", runs_dir=tmp_path / "runs", name="late",
                       fusion="late", n_bootstrap=0, plots=False)
    rec = read_run(res.path)
    fused = rec.extra["late_fusion"]
    assert fused["chosen_on"] == "val" and fused["dims"] == [16, 12]
    assert fused["weights"][1] <= 0.1 and abs(sum(fused["weights"]) - 1) < 1e-9
    # the noise part alone is near chance on val, the signal part well above it
    assert fused["part_val_balanced_accuracy"][0] > fused["part_val_balanced_accuracy"][1] + .2
    alone = fit_head_run(a, "logreg", runs_dir=tmp_path / "runs", name="alone",
                         n_bootstrap=0, plots=False)
    assert res.metrics["test"]["balanced_accuracy"] >= \
        alone.metrics["test"]["balanced_accuracy"] - 0.03


def test_weights_come_from_the_val_labels():
    grid = simplex_grid(3, 4)
    assert len(grid) == 15 and np.allclose(grid.sum(axis=1), 1) and (grid >= 0).all()
    y = np.array([0, 1, 0, 1])
    good = np.eye(2)[y] * 0.8 + 0.1
    bad = np.eye(2)[1 - y] * 0.8 + 0.1
    w, ba = choose_weights([bad, good], y, steps=10)
    assert list(w) == [0.0, 1.0] and ba == 1.0
    w, _ = choose_weights([bad, good], 1 - y, steps=10)  # other labels, the other part
    assert list(w) == [1.0, 0.0]


def test_a_fused_run_records_every_cache_and_evaluates_from_them(tmp_path):
    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    b = synthetic_cache(tmp_path / "b.h5", d=8, seed=3)
    r = runner.invoke(app, ["fit-head", "--cache", str(a), "--cache", str(b), "--head",
                            "logreg", "--runs-dir", str(tmp_path / "runs"), "--name", "early",
                            "--no-plots", "--bootstrap", "0", "--quiet"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "early"
    rec = read_run(run)
    assert rec.fusion == "early" and rec.format_version == RUN_FORMAT_VERSION
    assert [c["path"] for c in rec.caches] == [str(a.resolve()), str(b.resolve())]
    assert [c["key"] for c in rec.caches] == [FeatureCache.open(p).key for p in (a, b)]
    assert rec.cache == str(a.resolve()) and rec.cache_key.startswith("joined-")
    ev = evaluate(run, "test", n_bootstrap=0, plots=False)  # reopens both caches itself
    assert ev.status == "unchanged" and ev.name == "test"
    fit_ba = json.loads((run / "metrics" / "test.json").read_text())["balanced_accuracy"]
    assert ev.report["balanced_accuracy"] == fit_ba
    with pytest.raises(RunError, match="give 2 --cache"):
        evaluate(run, "test", cache=a, n_bootstrap=0, plots=False)
    with pytest.raises(RunError, match="encoded differently"):
        evaluate(run, "test", cache=[b, a], n_bootstrap=0, plots=False)
    again = runner.invoke(app, ["evaluate", str(run), "--cache", str(a), "--cache", str(b),
                                "--bootstrap", "0"])
    assert again.exit_code == 0 and "nothing rewritten" in again.output


def test_run_json_with_caches_round_trips_and_old_ones_still_read(tmp_path):
    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    b = synthetic_cache(tmp_path / "b.h5", d=8, seed=3)
    res = fit_head_run([a, b], "knn", runs_dir=tmp_path / "runs", name="late",
                       fusion="late", n_bootstrap=0, plots=False)
    rec = read_run(res.path)
    assert rec.fusion == "late" and len(rec.caches) == 2
    write_run(tmp_path / "copy.json", rec)
    back = read_run(tmp_path / "copy.json")
    assert back.to_dict() == rec.to_dict() and back.caches == rec.caches
    old = {k: v for k, v in rec.to_dict().items() if k not in ("caches", "fusion")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps({**old, "format_version": 2}))
    assert read_run(tmp_path / "old").caches == [] and read_run(tmp_path / "old").fusion is None
    bad = {**rec.to_dict(), "caches": [rec.caches[0], {"path": "x.h5", "key": ""}]}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text(json.dumps(bad))
    with pytest.raises(InputFileError, match=r"caches\[1\]\.key"):
        read_run(tmp_path / "bad")
    # the late run evaluates from its saved parts: the same numbers as at fit time
    ev = evaluate(res.path, "val", n_bootstrap=0, plots=False)
    assert ev.status == "unchanged"


def test_text_joins_for_zero_shot_and_is_refused_without(demo_cache, tmp_path):
    """A twin of the demo cache (features and text rotated by one orthogonal matrix: another
    encoder with the same zero-shot answers) joins its text; a twin without text refuses a
    text head in one line and `--head all` leaves the text heads out."""
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))[0]
    fc = FeatureCache.open(demo_cache)
    d = int(fc.header.embed_dim)
    rot = rot[:d, :d] if d <= 64 else np.eye(d)
    rotated = _twin(demo_cache, tmp_path / "rot.h5",
                    features=lambda n, X, V: (X @ rot, V @ rot),
                    text={k: v @ rot for k, v in fc.text.items()})
    plain = _twin(demo_cache, tmp_path / "plain.h5", text={}, key="plain")
    j = join_caches([fc, FeatureCache.open(rotated)])
    assert set(j.text) == set(fc.text) and j.text_problem == ""
    t = next(iter(j.text.values()))
    assert t.shape[-1] == 2 * d
    assert np.allclose(np.linalg.norm(t[..., :d], axis=-1), 1, atol=1e-5)
    res = fit_head_run([demo_cache, rotated], "zeroshot", runs_dir=tmp_path / "runs",
                       name="zs", n_bootstrap=0, plots=False)
    one = fit_head_run(demo_cache, "zeroshot", runs_dir=tmp_path / "runs", name="zs1",
                       n_bootstrap=0, plots=False)
    # the rotated twin scores exactly as the original: the joined zero-shot is the same head
    assert res.metrics["val"]["balanced_accuracy"] == pytest.approx(
        one.metrics["val"]["balanced_accuracy"], abs=0.02)
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--cache", str(plain),
                            "--head", "zeroshot", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 1 and "needs text features" in r.output
    assert "has no text features" in " ".join(r.output.split())


def test_bench_heads_fuses_and_keeps_fusions_apart(tmp_path):
    from skincache.bench import bench_heads

    a = synthetic_cache(tmp_path / "a.h5", d=16, seed=3)
    b = synthetic_cache(tmp_path / "b.h5", d=8, seed=3)
    out = tmp_path / "bench"
    early = bench_heads([a, b], seeds=1, variants=["logreg", "knn-k5"], out_dir=out)
    assert {r["variant"] for r in early.rows} == {"logreg", "knn-k5"}
    assert all(r["fusion"] == "early" for r in early.runs)
    meta = json.loads((out / "results.json").read_text())
    assert meta["caches"] == [str(a), str(b)]
    with pytest.raises(Exception, match="fusion differ"):  # a late bench into the same folder
        bench_heads([a, b], seeds=1, variants=["logreg"], out_dir=out, fusion="late")
    late = bench_heads([a, b], seeds=1, variants=["logreg"], out_dir=tmp_path / "late",
                       fusion="late")
    assert late.runs[0]["fusion"] == "late" and late.rows[0]["balanced_accuracy_mean"] > 0.5
    cli = runner.invoke(app, ["bench-heads", "--cache", str(a), "--cache", str(b), "--seeds",
                              "1", "--variants", "knn-k5", "--fusion", "late", "--quiet",
                              "--out-dir", str(tmp_path / "cli")])
    assert cli.exit_code == 0, cli.output
    assert "a.h5 + b.h5" in cli.output
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["rows"][0][
        "variant"] == "knn-k5"


def test_joining_needs_two_different_caches(tmp_path):
    a = FeatureCache.open(synthetic_cache(tmp_path / "a.h5", d=16, seed=3))
    with pytest.raises(CacheError, match="two or more"):
        join_caches([a])


def test_predict_of_a_fused_run_encodes_with_every_cache_and_joins(demo_cache, demo_root,
                                                                   tmp_path):
    """Each image goes through every cache's model; the joined blocks give the head what the
    cached, joined features of the same image give it."""
    from skincache.predict import predict_images

    twin = _twin(demo_cache, tmp_path / "twin.h5", key="twin")  # same model, other key
    res = fit_head_run([demo_cache, twin], "logreg", runs_dir=tmp_path / "runs", name="p",
                       n_bootstrap=0, plots=False)
    j = join_caches([FeatureCache.open(demo_cache), FeatureCache.open(twin)])
    test = j.split("test")
    ids = [str(i) for i in test.image_id[:3]]
    images = [next(demo_root.rglob(f"{i}.jpg")) for i in ids]
    preds = predict_images(res.path, images, device="cpu", neighbors=2)
    assert all(p.ok for p in preds), [p.error for p in preds]
    from skincache.runs import load_run

    want = load_run(res.path).head.predict_proba(test.features[:3])
    got = np.array([[p.probabilities[c] for c in j.classes] for p in preds])
    assert np.allclose(got, want, atol=2e-2)
    assert all(len(p.neighbors) == 2 for p in preds)


def test_what_fusion_does_not_do_yet_is_one_line(tmp_path):
    """cbm (concept prompts: one encoder's text space) and --explain (one image tower) on
    fused caches / runs are refused naming what to do instead."""
    from conftest import synthetic_cache

    from skincache.errors import UsageError
    from skincache.explain import run_explainer
    from skincache.runs import fit_head_run

    a, b = (synthetic_cache(tmp_path / f"{n}.h5", d=d, seed=3) for n, d in (("a", 16), ("b", 8)))
    with pytest.raises(UsageError, match="fit it on one cache"):
        fit_head_run([a, b], "cbm", runs_dir=tmp_path / "runs")
    r = fit_head_run([a, b], "logreg", runs_dir=tmp_path / "runs", name="early", n_bootstrap=0,
                     plots=False)
    with pytest.raises(UsageError, match="fused from 2 caches.*not built yet"):
        run_explainer(r.path, "cpu")

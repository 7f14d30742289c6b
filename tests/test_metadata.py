"""Metadata fusion (issue 18): the encoding learned on train (skincache/metadata.py), refused
fields, heads fit and predicting with `meta`, the encoding saved in head.json, runs / evaluate /
bench passing a cache's metadata through, and `predict --metadata FILE`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import cli_in_fresh_process

from skincache._head_params import parse_params
from skincache.errors import UsageError
from skincache.heads import create_head, load_head
from skincache.metadata import MetadataEncoding, fit_encoding, parse_fields

FIELDS3 = "age,sex,localization"


# ----------------------------------------------------------------------------- the encoding


def test_encoding_unknowns_unseen_categories_and_missing_age():
    train = {"age": np.array(["30", "50", "", "70.0", "nan"]),
             "sex": np.array(["male", "female", "unknown", "", "Male "]),
             "localization": np.array(["back", "face", "back", "unknown", "face"])}
    enc = fit_encoding(["age", "sex", "localization"], train, 5)
    assert enc.version == 1
    assert enc.columns == ("age", "age_missing", "sex=female", "sex=male", "sex=unknown",
                           "localization=back", "localization=face", "localization=unknown")
    # standardised on train's known ages only: 30, 50, 70
    assert enc.fields[0].mean == pytest.approx(50.0)
    assert enc.fields[0].std == pytest.approx(np.std([30.0, 50.0, 70.0]))
    test = {"age": np.array(["50", "abc", "-3", "90"]),
            "sex": np.array(["female", "other", "", "MALE"]),
            "localization": np.array(["scalp", "back", "n/a", "face"])}
    E = enc.transform(test, 4)
    std = np.std([30.0, 50.0, 70.0])
    np.testing.assert_allclose(E[:, 0], [0.0, 0.0, 0.0, 40.0 / std], rtol=1e-6)
    np.testing.assert_array_equal(E[:, 1], [0, 1, 1, 0])  # unparseable, negative: missing
    np.testing.assert_array_equal(E[:, 2:5], [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]])
    # "scalp" was never seen in training: unknown, as the explicit "n/a"
    np.testing.assert_array_equal(E[:, 5:], [[0, 0, 1], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert (E[:, 2:5].sum(axis=1) == 1).all() and (E[:, 5:].sum(axis=1) == 1).all()


def test_the_standardisation_comes_from_train_alone():
    X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.array([0, 1] * 4)
    head = create_head("logreg", metadata="age,sex").fit(
        X[:4], y[:4], X_val=X[4:], y_val=y[4:],
        meta={"age": ["20", "40", "20", "40"], "sex": ["male"] * 4},
        meta_val={"age": ["90", "95", "80", "85"], "sex": ["female"] * 4})
    age, sex = head.metadata_.fields
    assert (age.mean, age.std) == (30.0, 10.0)  # val's ages did not move it
    assert sex.categories == ("male",)  # val's "female" is unknown to this head
    enc = head.metadata_
    assert np.array_equal(enc.transform({"age": ["40"], "sex": ["female"]}, 1),
                          [[1.0, 0.0, 0.0, 1.0]])
    assert fit_encoding(["age"], {"age": np.array(["", "x"])}, 2).fields[0].std == 1.0


def test_dx_type_and_unknown_fields_are_refused_with_the_reason():
    with pytest.raises(UsageError, match="'dx_type' is refused: it is label leakage"):
        parse_fields("age,dx_type")
    with pytest.raises(UsageError, match="unknown metadata field 'agee'; known fields: age, "
                                         "sex, localization"):
        parse_fields("agee")
    with pytest.raises(UsageError, match="repeated"):
        parse_fields("age,age")
    assert parse_fields(" age , sex ") == ("age", "sex") and parse_fields(None) == ()
    with pytest.raises(UsageError, match=r"-p metadata=dx_type: .*label leakage"):
        parse_params("logreg", {"metadata": "dx_type"})
    with pytest.raises(UsageError, match="has no parameter 'metadata'"):
        parse_params("knn", {"metadata": "age"})  # a head that takes none says so
    with pytest.raises(UsageError, match="label leakage"):  # Python users: fit checks too
        create_head("mlp", metadata="dx_type").fit(np.eye(4, dtype=np.float32),
                                                   np.array([0, 1, 0, 1]))


def test_refused_fields_are_one_cli_line_before_torch_loads(tmp_path):
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"not read: the value is refused first")
    cases = [("logreg", "metadata=dx_type", "label leakage"),
             ("mlp", "metadata=age,site", "known fields: age, sex, localization"),
             ("linear", "metadata=sex,sex", "repeated")]
    args = [["fit-head", "--cache", str(cache), "--runs-dir", str(tmp_path / "runs"),
             "--head", h, "-p", p] for h, p, _ in cases]
    for (code, output, heavy), (_, _, expected) in zip(cli_in_fresh_process(args), cases,
                                                       strict=True):
        assert code == 1 and output.startswith("error: ") and output.count("\n") == 1, output
        assert expected in output and "torch" not in heavy, output
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- heads


def _site_problem(n: int = 600, d: int = 24, seed: int = 0):
    """Noise image features; the class is written in the site (and the age): only a head that
    reads the metadata can beat chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    site = np.array(["back", "face", "foot"])[y].astype(object)
    site[rng.random(n) < 0.15] = "unknown"
    age = np.where(rng.random(n) < 0.1, "", (30 + 20 * y + rng.normal(0, 4, n)).round()
                   .astype(str)).astype(object)
    sex = rng.choice(["male", "female", ""], n).astype(object)
    X = rng.normal(size=(n, d)).astype(np.float32)
    views = (X[:, None, :] + 0.1 * rng.normal(size=(n, 2, d))).astype(np.float32)
    return X, views, y, {"age": age, "sex": sex, "localization": site}


def _rows(meta, s):
    return {k: v[s] for k, v in meta.items()}


@pytest.mark.parametrize("name,params", [("logreg", {}), ("linear", {}),
                                         ("mlp", {})])
def test_metadata_carries_the_signal_and_round_trips(name, params, tmp_path):
    from skincache.metrics import balanced_accuracy

    X, views, y, meta = _site_problem()
    tr, va, te = slice(0, 360), slice(360, 480), slice(480, 600)
    kw = dict(views=views[tr], X_val=X[va], y_val=y[va])
    with_meta = create_head(name, metadata=FIELDS3, **params).fit(
        X[tr], y[tr], meta=_rows(meta, tr), meta_val=_rows(meta, va), **kw)
    without = create_head(name, **params).fit(X[tr], y[tr], meta=_rows(meta, tr), **kw)
    p = with_meta.predict_proba(X[te], meta=_rows(meta, te))
    assert balanced_accuracy(y[te], p.argmax(1)) > 0.8
    assert balanced_accuracy(y[te], without.predict_proba(X[te]).argmax(1)) < 0.5
    assert with_meta.n_features_in_ == 24 + with_meta.metadata_.width
    assert with_meta.metadata_fields() == ("age", "sex", "localization")
    assert with_meta.linear_form() is None  # not a function of the image features alone
    # TTA: the views take their image's metadata
    tta = with_meta.predict_proba_tta(X[te], views[te], meta=_rows(meta, te))
    assert balanced_accuracy(y[te], tta.argmax(1)) > 0.8
    # saved as JSON in head.json, the same probabilities after loading
    with_meta.save(tmp_path / "h")
    saved = json.loads((tmp_path / "h" / "head.json").read_text())
    assert saved["metadata"]["version"] == 1
    assert MetadataEncoding.from_json(saved["metadata"]) == with_meta.metadata_
    loaded = load_head(tmp_path / "h")
    np.testing.assert_allclose(
        loaded.predict_proba_tta(X[te], views[te], meta=_rows(meta, te)), tta, atol=1e-6)
    # refusals: no metadata for a metadata head (naming the fields), a field missing, and
    # metadata given to a head fit without it
    with pytest.raises(UsageError, match=r"takes metadata \(age, sex, localization\)"):
        loaded.predict_proba(X[te])
    with pytest.raises(UsageError, match="no metadata field localization"):
        loaded.predict_proba(X[te], meta={"age": meta["age"][te], "sex": meta["sex"][te]})
    with pytest.raises(UsageError, match="fit without metadata"):
        without.predict_proba(X[te], meta=_rows(meta, te))


def test_a_metadata_head_fit_without_meta_names_the_fields():
    X, _, y, _ = _site_problem(60)
    with pytest.raises(UsageError, match=r"takes metadata \(age, sex\)"):
        create_head("logreg", metadata="age,sex").fit(X, y)


def test_a_hand_edited_metadata_encoding_is_one_line_naming_head_json(tmp_path):
    from skincache.errors import InputFileError

    X, _, y, meta = _site_problem(120)
    create_head("logreg", metadata="age,sex").fit(X, y, meta=meta).save(tmp_path / "h")
    cfg = tmp_path / "h" / "head.json"
    good = json.loads(cfg.read_text())
    for edit, needle in ((lambda c: c["metadata"].update(version=9), "version 9"),
                         (lambda c: c["metadata"]["fields"][0].update(std=0), "std > 0"),
                         (lambda c: c["metadata"]["fields"][1].update(name="dx_type"),
                          "not one skincache encodes"),
                         (lambda c: c.pop("metadata"), "no metadata encoding was saved"),
                         (lambda c: c["params"].update(metadata="age"), "params ask for age")):
        bad = json.loads(json.dumps(good))
        edit(bad)
        cfg.write_text(json.dumps(bad))
        with pytest.raises(InputFileError, match=needle) as e:
            load_head(tmp_path / "h")
        assert str(cfg) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- runs, predict


def test_fit_head_evaluate_and_predict_with_the_caches_metadata(demo_cache, tmp_path,
                                                                monkeypatch):
    import skincache.predict as predict_mod
    from skincache.cache import FeatureCache
    from skincache.data import load_dataset
    from skincache.predict import predict_images
    from skincache.runs import evaluate, fit_head_run

    res = fit_head_run(demo_cache, "logreg", {"metadata": FIELDS3}, runs_dir=tmp_path,
                       name="m", n_bootstrap=0, plots=False, tta=True)
    plain = fit_head_run(demo_cache, "logreg", None, runs_dir=tmp_path, name="p",
                         n_bootstrap=0, plots=False)
    assert res.metrics["test"]["posthoc"]["tta"]
    ev = evaluate(tmp_path / "m", "test", n_bootstrap=0, plots=False)
    assert ev.status == "unchanged"  # evaluate passes the cache's metadata as fit-head did
    fc = FeatureCache.open(demo_cache)
    test = fc.split("test")
    ds = load_dataset(fc.attrs["dataset_root"])
    src = {r.image_id: r.source for r in ds.records}
    ids = list(test.image_id[:3])
    sheet = tmp_path / "meta.csv"
    with sheet.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "age", "sex", "localization"])
        for i in ids[:2]:  # the third image has no row
            r = next(r for r in ds.records if r.image_id == i)
            w.writerow(["L", i + ".jpg", r.meta["age"], r.meta["sex"], r.meta["localization"]])
    preds = predict_images(tmp_path / "m", [src[i] for i in ids], neighbors=0,
                           metadata=sheet, device="cpu")
    assert [p.ok for p in preds] == [True, True, False]
    assert "no row for image id" in preds[2].error and str(sheet) in preds[2].error
    from skincache.runs import load_run

    head = load_run(tmp_path / "m").head
    expected = head.predict_proba(test.features[:2], meta={k: test.meta[k][:2] for k in
                                                           ("age", "sex", "localization")})
    for j in range(2):
        got = np.array([preds[j].probabilities[c] for c in fc.classes])
        np.testing.assert_allclose(got, expected[j], atol=2e-3)

    # refused before the model loads: no --metadata for a metadata run, one for a plain run,
    # a CSV without a field column
    def no_model(*a, **k):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(predict_mod, "load_model", no_model)
    with pytest.raises(UsageError, match=r"fit with metadata \(age, sex, localization\); "
                                         "give them with --metadata FILE"):
        predict_images(tmp_path / "m", [src[ids[0]]])
    with pytest.raises(UsageError, match="fit without metadata; --metadata"):
        predict_images(tmp_path / "p", [src[ids[0]]], metadata=sheet)
    thin = tmp_path / "thin.csv"
    thin.write_text("image_id,age\nx,3\n")
    with pytest.raises(UsageError, match=r"thin.csv: no 'sex', 'localization' column"):
        predict_images(tmp_path / "m", [src[ids[0]]], metadata=thin)
    assert plain.metrics  # the plain run is a run


def test_predict_cli_refuses_a_metadata_run_without_the_file(demo_cache, tmp_path):
    from typer.testing import CliRunner

    from skincache.cli import app
    from skincache.runs import fit_head_run

    fit_head_run(demo_cache, "mlp", {"metadata": "sex", "epochs": 2}, runs_dir=tmp_path,
                 name="m", n_bootstrap=0, plots=False)
    img = tmp_path / "x.jpg"
    img.write_bytes(b"")
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "m"), str(img)])
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1
    assert "--metadata FILE" in r.output, r.output


def test_bench_runs_metadata_variants_only_where_the_cache_has_the_fields(demo_cache,
                                                                          tmp_path):
    from conftest import synthetic_cache

    from skincache.bench import bench_heads
    from skincache.cache import FeatureCache

    res = bench_heads(demo_cache, seeds=1, variants=["logreg", "logreg-meta"],
                      out_dir=tmp_path / "b")
    assert {r["variant"] for r in res.rows} == {"logreg", "logreg-meta"}
    bare = synthetic_cache(tmp_path / "bare.h5", n=90)
    assert not FeatureCache.open(bare).split("train").meta
    with pytest.raises(UsageError, match="logreg-meta: cache .* has no metadata age"):
        bench_heads(bare, seeds=1, variants=["logreg-meta"], out_dir=tmp_path / "c")


def test_finetune_head_init_refuses_a_metadata_head(tmp_path):
    from skincache.errors import InputFileError
    from skincache.finetune.model import fitted_head

    X, _, y, meta = _site_problem(120)
    create_head("logreg", metadata="sex").fit(X, y, meta=meta).save(tmp_path / "h")
    with pytest.raises(InputFileError, match=r"fit with metadata \(sex\); --head-init takes"):
        fitted_head(tmp_path / "h", 100.0, 3, 24, ["a", "b", "c"])


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_explain_refuses_a_metadata_head_in_one_line(name):
    """Saliency goes through the image features alone; a head that also reads metadata (an
    mlp's module takes the appended columns) is refused, never fed the wrong width."""
    from skincache.explain import head_scorer

    X, _, y, meta = _site_problem(120)
    head = create_head(name, metadata="sex").fit(X, y, meta=meta)
    with pytest.raises(UsageError, match=r"fit with metadata \(sex\).*not built yet"):
        head_scorer(head)


def test_late_fusion_of_metadata_heads_passes_the_metadata_to_every_part():
    """Two noise 'encoders' (blocks of 12); the class is in the site: late fusion of two
    metadata heads must read it (fit, val weights, predict), and refuses to predict without."""
    from skincache.heads.late_fusion import LateFusion

    X, _, y, meta = _site_problem(600)
    tr, va = slice(0, 400), slice(400, 600)
    m_tr = {k: v[tr] for k, v in meta.items()}
    m_va = {k: v[va] for k, v in meta.items()}
    fused = LateFusion([create_head("logreg", metadata="localization") for _ in range(2)],
                       dims=[12, 12])
    fused.fit(X[tr], y[tr], X_val=X[va], y_val=y[va], meta=m_tr, meta_val=m_va)
    assert fused.metadata_fields() == ("localization",)
    acc = (fused.predict(X[va], m_va) == y[va]).mean()
    assert acc > 0.75  # chance is 1/3: the site carries the class
    cal, _ = fused.predict_proba_pair(X[va], None, m_va)
    np.testing.assert_allclose(cal, fused.predict_proba(X[va], m_va))
    with pytest.raises(UsageError, match="localization"):
        fused.predict_proba(X[va])

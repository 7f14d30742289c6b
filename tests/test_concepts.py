"""Concepts: the shipped list and its refusals, `/concepts/` in the cache and in its key, old
caches without it, MONET-style scores and their standardisation, the `cbm` head, and predict
listing a cbm run's concepts. The tiny model is random, so no test here claims a concept means
anything clinically; what they check is said in each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skincache.cache import CacheError, FeatureCache
from skincache.cli import app
from skincache.concept_report import concept_bank, concept_report, concept_scores
from skincache.concepts import (
    ConceptBank,
    Standardizer,
    l2n,
    load_concepts,
    parse_concepts,
)
from skincache.errors import InputFileError, UsageError
from skincache.heads import create_head, load_head

runner = CliRunner()


def _list(**over) -> dict:
    d = {"format": "skincache.concepts", "name": "mine",
         "prompts": [{"template": "dermoscopy of {}", "reference": "dermoscopy"}],
         "concepts": [{"name": "veil", "terms": ["blue-whitish veil", "blue veil"]},
                      {"name": "dots", "terms": ["irregular dots"]}]}
    d.update(over)
    return d


# ----------------------------------------------------------------------------- the list


def test_the_shipped_list_holds_the_7_point_checklist_and_clinical_signs():
    cl = load_concepts()
    names = set(cl.names)
    assert {"atypical pigment network", "blue-whitish veil", "atypical vascular pattern",
            "irregular streaks", "irregular dots and globules", "irregular blotches",
            "regression structures", "milia-like cysts", "comedo-like openings",
            "arborizing vessels", "ulceration", "scale", "erythema"} <= names
    assert all(len(c.terms) >= 2 for c in cl.concepts)
    assert len(cl.prompts) >= 2 and all("{}" not in p.reference for p in cl.prompts)
    prompts, concept, template, refs = cl.texts()
    assert len(prompts) == sum(len(c.terms) for c in cl.concepts) * len(cl.prompts)
    assert prompts[0] == cl.prompts[0].template.format(cl.concepts[0].terms[0])
    assert concept.max() == len(cl.concepts) - 1 and template.max() == len(cl.prompts) - 1


@pytest.mark.parametrize("edit, needle", [
    ({"format": "other"}, "format must be"),
    ({"colour": 1}, "unknown keys ['colour']"),
    ({"prompts": []}, "'prompts' must be a non-empty list"),
    ({"prompts": [{"template": "no slot", "reference": "r"}]}, "exactly one '{}'"),
    ({"prompts": [{"template": "{} {}", "reference": "r"}]}, "exactly one '{}'"),
    ({"prompts": [{"template": "of {}"}]}, "exactly 'template' and 'reference'"),
    ({"concepts": []}, "'concepts' must be a non-empty list"),
    ({"concepts": [{"name": "a", "terms": ["x"]}, {"name": "a", "terms": ["y"]}]},
     "concept 'a' is listed twice"),
    ({"concepts": [{"name": "a", "terms": []}]}, "'terms' must be a list"),
    ({"concepts": [{"name": "a", "terms": [""]}]}, "concepts[0].terms[0] must be a non-empty"),
    ({"concepts": [{"name": "a"}]}, "must be an object with 'name', 'terms'"),
])
def test_a_bad_concept_list_is_one_line_naming_the_file_and_field(tmp_path, edit, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(_list(**edit)))
    with pytest.raises(InputFileError) as e:
        load_concepts(p)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_unreadable_concept_files_are_one_line(tmp_path):
    for name, raw in (("a.json", b"{not json"), ("b.json", b"\xff\xfe"), ("c.json", b"[]")):
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(InputFileError, match=str(p)):
            load_concepts(p)
    with pytest.raises(Exception, match="nope.json"):
        load_concepts(tmp_path / "nope.json")


def test_encode_refuses_a_bad_concepts_file_in_one_line_before_the_data(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_list(prompts=[{"template": "x", "reference": "y"}])))
    r = runner.invoke(app, ["encode", "--data", str(tmp_path / "no-data"), "--model",
                            "skincache-tiny", "--concepts", str(bad), "--cache-dir",
                            str(tmp_path / "c")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert str(bad) in r.output and "exactly one '{}'" in r.output
    r = runner.invoke(app, ["encode", "--data", "x", "--concepts", str(bad), "--no-concepts"])
    assert r.exit_code == 1 and "not both" in r.output


# ----------------------------------------------------------------------------- the cache


def test_encode_writes_the_concepts_the_text_tower_gives(demo_cache, tiny_model):
    fc = FeatureCache.open(demo_cache)
    cl = load_concepts()
    assert fc.header.concepts == {"name": cl.name, "sha256": cl.sha256,
                                  "n_concepts": len(cl.concepts)}
    c = fc.concepts
    assert list(c["names"]) == cl.names
    prompts, concept, template, refs = cl.texts()
    assert list(c["prompts"]) == prompts and list(c["references"]) == refs
    np.testing.assert_array_equal(c["prompt_concept"], concept)
    np.testing.assert_array_equal(c["prompt_template"], template)
    # the stored embeddings are the text tower's own, prompt by prompt
    want = tiny_model.encode_text(prompts[:5] + refs[:1]).numpy()
    np.testing.assert_allclose(c["prompt_embeddings"][:5], want[:5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c["reference_embeddings"][:1], want[5:], rtol=1e-4, atol=1e-5)
    assert FeatureCache.open(demo_cache).summary()["concepts"]["stored"] == len(cl.names)


def test_the_key_follows_the_concept_list(demo_dataset):
    """The list's content is part of the cache key; without concepts the key is the one
    caches had before concepts existed (so they are still found)."""
    from skincache.encode import encode_key
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.prompts import TEMPLATE_SETS
    from skincache.views import ViewPolicy

    args = (demo_dataset, ModelSpec(TINY_MODEL), ViewPolicy(k=2), "fp32", list(TEMPLATE_SETS),
            "fingerprint")
    shipped, none = encode_key(*args, concepts=load_concepts()), encode_key(*args,
                                                                           concepts=False)
    assert encode_key(*args) == shipped  # the default is encode's: the shipped list
    mine = encode_key(*args, concepts=parse_concepts(_list()))
    reworded = encode_key(*args, concepts=parse_concepts(_list(
        prompts=[{"template": "dermoscopy image of {}", "reference": "dermoscopy"}])))
    assert len({shipped, none, mine, reworded}) == 4
    assert encode_key(*args, concepts=parse_concepts(_list(description="other words"))) == mine


def test_encode_with_a_users_list_and_without_concepts(demo_dataset, tmp_path):
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    p = tmp_path / "mine.json"
    p.write_text(json.dumps(_list()))
    kw = dict(policy=ViewPolicy(k=0), cache_dir=tmp_path, device="cpu", num_workers=0,
              progress=False)
    mine = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), concepts=load_concepts(p), **kw)
    fc = FeatureCache.open(mine.path)
    assert list(fc.concepts["names"]) == ["veil", "dots"]
    assert fc.concepts["prompt_embeddings"].shape == (3, fc.header.embed_dim)
    bare = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), concepts=False, **kw)
    assert bare.path != mine.path and FeatureCache.open(bare.path).concepts == {}


def test_an_old_cache_without_concepts_reads_and_says_re_encode_in_one_line(tmp_path,
                                                                           monkeypatch):
    from conftest import synthetic_cache

    path = synthetic_cache(tmp_path / "old.h5", n=90)
    fc = FeatureCache.open(path)
    assert fc.concepts == {} and concept_bank(fc) is None
    assert fc.summary()["concepts"]["stored"] == 0
    with pytest.raises(CacheError, match="no concept embeddings.*re-encode"):
        concept_scores(fc, "test")
    r = runner.invoke(app, ["concepts", str(path)])
    assert r.exit_code == 1 and "re-encode" in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1
    with pytest.raises(UsageError, match="needs the cache's concept embeddings"):
        create_head("cbm").fit(fc.split("train").features, fc.split("train").labels)
    from skincache import runs

    monkeypatch.setattr(runs, "fit_head_run", lambda cache, head, *a, **k: head)
    served = runs.fit_heads(fc)  # `fit-head --head all`: the heads this cache can serve
    assert "cbm" not in served and "logreg" in served


# ----------------------------------------------------------------------------- scores


def test_concept_scores_are_z_scored_against_train_only(demo_cache):
    fc = FeatureCache.open(demo_cache)
    train, names = concept_scores(fc, "train")
    test, _ = concept_scores(fc, "test")
    k = len(load_concepts().names)
    assert names == load_concepts().names
    assert train.shape == (len(fc.split("train")), k) and test.shape == (len(fc.split("test")), k)
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=0), 1, atol=1e-3)
    # test rows use train's mean and spread (not their own: test's own mean is not 0)
    bank = concept_bank(fc)
    raw_train = bank.presence(fc.split("train").features, fc.logit_scale)
    raw_test = bank.presence(fc.split("test").features, fc.logit_scale)
    np.testing.assert_allclose(test, Standardizer.fit(raw_train)(raw_test), atol=1e-4)
    assert np.abs(test.mean(axis=0)).max() > 1e-3
    assert ((raw_test > 0) & (raw_test < 1)).all()  # MONET's scores are probabilities


def test_presence_is_monets_contrast_against_the_reference():
    """Computed by hand for one image, one concept, two templates: the mean over templates
    of softmax([scale * cos(x, concept), scale * cos(x, reference)])[0]."""
    rng = np.random.default_rng(0)
    targets = l2n(rng.standard_normal((1, 2, 8)))
    refs = l2n(rng.standard_normal((2, 8)))
    x = rng.standard_normal((1, 8)) * 3
    xn = x / np.linalg.norm(x)
    want = np.mean([np.exp(10 * xn @ targets[0, t]) / (np.exp(10 * xn @ targets[0, t])
                    + np.exp(10 * xn @ refs[t])) for t in range(2)])
    got = ConceptBank(["a"], targets, refs).presence(x, 10.0)
    np.testing.assert_allclose(got, [[want]], rtol=1e-5)


def test_images_made_to_show_a_concept_score_it_highest(demo_cache):
    """What this checks, since the tiny model is random: its text tower still gives each
    concept's prompts their own direction, so images synthesised as a concept's embedding plus
    noise must score that concept above the unrelated ones (z-scored over those images:
    chance is 1/21) and rank above the other images on it (AUROC; chance 0.5). A score with
    the contrast reversed, the wrong rows or the wrong concept order fails this. A few
    concepts the random tower words almost alike (cosine ~0.99) are allowed to be confused."""
    fc = FeatureCache.open(demo_cache)
    bank = concept_bank(fc)
    k, _, d = bank.targets.shape
    rng = np.random.default_rng(0)
    own = l2n(bank.targets.mean(axis=1))
    X = np.concatenate([own[i] + 0.03 * rng.standard_normal((20, d)) for i in range(k)])
    lab = np.repeat(np.arange(k), 20)
    s = bank.presence(X, fc.logit_scale)
    z = Standardizer.fit(s)(s)
    assert (z.argmax(axis=1) == lab).mean() >= 0.8
    auroc = np.mean([(s[lab == i, i][:, None] > s[lab != i, i][None, :]).mean()
                     for i in range(k)])
    assert auroc >= 0.85
    # a control: random directions show no concept, so no concept wins more than by chance
    Xr = rng.standard_normal((20 * k, d))
    sr = bank.presence(Xr, fc.logit_scale)
    assert (Standardizer.fit(sr)(sr).argmax(axis=1) == lab).mean() < 0.3


def test_cli_concepts_prints_the_table_writes_the_plot_and_one_image(demo_cache, tmp_path):
    fc = FeatureCache.open(demo_cache)
    img = str(fc.split("test").image_id[0])
    png = tmp_path / "c.png"
    r = runner.invoke(app, ["concepts", str(demo_cache), "--image", img, "--plot", str(png),
                            "--top", "4"])
    assert r.exit_code == 0, r.output
    assert "blue-whitish veil" in r.output and "random weights" in r.output
    assert f"{img} (test split" in r.output
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    rep = concept_report(demo_cache, split="val", plot=tmp_path / "v.png")
    assert rep.means.shape == (len(fc.classes), len(rep.names)) and sum(rep.counts) == len(
        fc.split("val"))
    r = runner.invoke(app, ["concepts", str(demo_cache), "--image", "nope", "--plot",
                            str(png)])
    assert r.exit_code == 1 and "no image 'nope'" in r.output


# ----------------------------------------------------------------------------- cbm


def _bank_problem(seed: int = 0, n: int = 300):
    """Three classes, each shown by one of six concepts (features = its embedding + noise)."""
    rng = np.random.default_rng(seed)
    d = 24
    targets = l2n(rng.standard_normal((6, 2, d)))
    refs = l2n(targets.mean(axis=0) + 0.05 * rng.standard_normal((2, d)))
    bank = ConceptBank([f"c{i}" for i in range(6)], targets, refs)

    def split(m):
        y = rng.integers(0, 3, m)
        return (targets[y].mean(axis=1) + 0.15 * rng.standard_normal((m, d))).astype(
            np.float32), y

    return bank, split(n), split(n // 2)


def test_cbm_reads_the_concept_behind_each_class_and_gets_sparser_with_the_penalty():
    bank, (X, y), (Xv, yv) = _bank_problem()
    head = create_head("cbm").fit(X, y, X_val=Xv, y_val=yv, concepts=bank, logit_scale=20.0)
    assert (head.predict(Xv) == yv).mean() > 0.9
    # each class's largest weight is on the concept that shows it
    assert [int(np.argmax(head.coef_[c])) for c in range(3)] == [0, 1, 2]
    nz = {c: int((create_head("cbm", C=c).fit(X, y, concepts=bank, logit_scale=20.0).coef_
                  != 0).sum()) for c in (0.01, 0.1, 10.0)}
    assert nz[0.01] < nz[0.1] < nz[10.0]
    # contributions + intercept are the head's own logits
    logits = head.contributions(Xv).sum(axis=2) + head.intercept_
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
                               head._raw_proba(Xv), rtol=1e-4, atol=1e-6)
    top = head.top_concepts(Xv[:5], k=2)
    assert all(len(t) <= 2 and all(s > 0 for _, s in t) for t in top)


def test_cbm_run_writes_its_weights_and_predict_lists_concepts(demo_cache, demo_root, tmp_path):
    from skincache.predict import predict_images
    from skincache.runs import fit_head_run

    res = fit_head_run(demo_cache, "cbm", runs_dir=tmp_path, name="c", n_bootstrap=0,
                       plots=False)
    md = (res.path / "concepts.md").read_text()
    weights = json.loads((res.path / "concepts.json").read_text())["weights"]
    fc = FeatureCache.open(demo_cache)
    assert set(weights) == set(fc.classes) and "**mel** <-" in md
    head = load_head(res.path / "head")
    assert weights["mel"] == {n: round(float(w), 4) for n, w in
                              sorted(zip(head.concept_names_, head.coef_[fc.classes.index(
                                  "mel")], strict=True), key=lambda kv: -abs(kv[1])) if w}
    train = fc.split("train")
    img = next(Path(demo_root).rglob(f"{train.image_id[0]}.jpg"))
    [pred] = predict_images(res.path, [img], device="cpu", neighbors=0)
    assert pred.ok and pred.concepts
    want = head.top_concepts(train.features[:1])[0]
    assert [c["concept"] for c in pred.concepts] == [n for n, _ in want]
    shares = [c["share"] for c in pred.concepts]
    assert shares == sorted(shares, reverse=True) and min(shares) > 0
    r = runner.invoke(app, ["predict", str(res.path), str(img), "--device", "cpu"])
    assert r.exit_code == 0 and f"<- {pred.concepts[0]['concept']}" in r.output

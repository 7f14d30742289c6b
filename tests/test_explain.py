"""`predict --explain`: Grad-CAM through the run's own head, and the checks that can fail.

Everything runs on the shipped random `skincache-tiny` (64 px, patch 16: a 4 x 4 grid), so
these tests check the mechanism (shapes, the head in the loop, the class and the weights
mattering, a planted answer found), never that a map is clinically meaningful.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from typer.testing import CliRunner

from skincache.cache import FeatureCache
from skincache.cli import app
from skincache.errors import UsageError
from skincache.explain import (
    OVERLAY_DPI,
    OVERLAY_INCHES,
    cascade_stages,
    differentiable_heads,
    explain_images,
    gradcam,
    head_scorer,
    overlay_figure,
    predict_run,
    randomisation_check,
    run_explainer,
)
from skincache.models import TINY_MODEL
from skincache.predict import predict_images
from skincache.runs import fit_head_run, load_run

CPU = torch.device("cpu")
GRID = (4, 4)  # skincache-tiny: 64 px / patch 16
PNG_SIZE = (round(OVERLAY_INCHES[0] * OVERLAY_DPI), round(OVERLAY_INCHES[1] * OVERLAY_DPI))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's tensors are too small to share out: on the busy 2-core machine one
    torch thread ran a Grad-CAM in 22 ms where two took 440 ms (load average 19)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(demo_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explain-runs")
    for head in ("logreg", "mlp", "knn"):
        fit_head_run(demo_cache, head, runs_dir=root, name=head, n_bootstrap=0, plots=False)
    return root


@pytest.fixture(scope="module")
def sources(demo_cache, demo_dataset) -> list[str]:
    """Eight validation images of the demo cache, as files."""
    src = {r.image_id: r.source for r in demo_dataset.records}
    return [src[i] for i in FeatureCache.open(demo_cache).split("val").image_id[:8]]


def _x(explainer, source: str) -> torch.Tensor:
    pixels, reason = explainer.pixels(Path(source))
    assert pixels is not None, reason
    return explainer.normalize(torch.from_numpy(pixels)[None])


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a.ravel(), b.ravel())[0])


@pytest.mark.parametrize("head", differentiable_heads())
def test_the_scorer_is_the_runs_own_head(runs, demo_cache, head, tmp_path):
    """softmax(scorer(features)) is the head's predict_proba, for every head --explain takes:
    the map's target score is what the run predicts with (post-hoc logit adjustment and
    temperature included)."""
    if not (runs / head).is_dir():
        fit_head_run(demo_cache, head, runs_dir=tmp_path, name=head, n_bootstrap=0,
                     plots=False)
    h = load_run((runs if (runs / head).is_dir() else tmp_path) / head).head
    X = np.asarray(FeatureCache.open(demo_cache).split("val").features, np.float32)
    p = torch.softmax(head_scorer(h)(torch.from_numpy(X)), dim=-1).detach().numpy()
    np.testing.assert_allclose(p, h.predict_proba(X), atol=1e-5)


def test_map_shape_and_overlay_png(runs, sources, tmp_path):
    preds = explain_images(runs / "logreg", sources[:2], explain_dir=tmp_path / "ov",
                           device="cpu", neighbors=2)
    plain = predict_images(runs / "logreg", sources[:2], device="cpu", neighbors=2)
    for p, q in zip(preds, plain, strict=True):
        assert p.ok and p.predicted == q.predicted and p.probabilities == q.probabilities
        assert p.neighbors == q.neighbors
        path = Path(p.overlay)
        assert path.parent == tmp_path / "ov" and path.name.endswith(f"_{p.predicted}.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == PNG_SIZE
            px = np.asarray(im.convert("L"), np.float64)
        assert px.std() > 20  # not blank
        # the title band (top 8%) holds dark text pixels in the middle third
        band = px[: int(0.08 * px.shape[0]), px.shape[1] // 3: 2 * px.shape[1] // 3]
        assert (band < 100).sum() > 50
    ex = run_explainer(runs / "logreg", CPU)
    sal = gradcam(ex.visual, ex.scorer, _x(ex, sources[0]))
    assert sal.map.shape == GRID and np.isfinite(sal.raw).all()
    assert sal.raw.std() > 0 and sal.map.max() == 1.0 and sal.map.min() >= 0.0
    # the title a person reads: predicted class, its probability, the model
    fig = overlay_figure(np.zeros((64, 64, 3), np.uint8), sal.map, "nv 0.812 · model")
    assert fig._suptitle is not None and fig._suptitle.get_text() == "nv 0.812 · model"
    p0 = preds[0]
    title = _overlay_title(runs / "logreg", sources[0], tmp_path)
    assert f"predicted {p0.predicted} (p = {p0.probabilities[p0.predicted]:.3f})" in title
    assert "random weights" in title  # the tiny model's maps mean nothing, and say so


def _overlay_title(run: Path, source: str, tmp_path: Path) -> str:
    """The suptitle explain_images gave the overlay (caught where it is drawn)."""
    import skincache.explain as ex_mod

    seen = []
    real = ex_mod.overlay_figure

    def spy(image, heat, title, *rest):
        seen.append(title)
        return real(image, heat, title, *rest)

    ex_mod.overlay_figure = spy
    try:
        explain_images(run, [source], explain_dir=tmp_path / "t", device="cpu", neighbors=0)
    finally:
        ex_mod.overlay_figure = real
    assert len(seen) == 1 and TINY_MODEL in seen[0]
    return seen[0]


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_the_map_changes_with_the_target_class(runs, sources, head):
    """Each image's map for the predicted class against its maps for the other classes. A
    map blind to the class would give rank correlation 1; with 16 patches independent maps
    give rho ~ 0 +- 0.26, so a mean below 0.5 over 4 images x 6 other classes (sd ~0.05)
    cannot be chance agreement with a class-blind map (measured on 8 images: -0.16 logreg,
    -0.24 mlp)."""
    ex = run_explainer(runs / head, CPU)
    rhos = []
    for s in sources[:4]:
        x = _x(ex, s)
        top = gradcam(ex.visual, ex.scorer, x)
        for c in range(len(ex.classes)):
            if c != top.target:
                rhos.append(_rho(top.raw, gradcam(ex.visual, ex.scorer, x, c).raw))
    assert np.mean(rhos) < 0.5, rhos
    # and the same class twice is the same map (the difference is the class, not noise)
    x = _x(ex, sources[0])
    np.testing.assert_array_equal(gradcam(ex.visual, ex.scorer, x, 1).raw,
                                  gradcam(ex.visual, ex.scorer, x, 1).raw)


def test_model_randomisation_sanity_check(runs, sources):
    """Adebayo et al. (2018): re-initialise the image tower cascading from the top (the
    projection and final norm, then block 1, block 0, the patch/position embeddings); a map
    that explains the model must change. Bound: the mean rank correlation with the original
    map over 8 images stays below 0.6 at every stage and below 0.35 once all is re-drawn
    (a map unchanged by the weights, e.g. an edge detector of the image, gives ~1; the
    mean of 8 independent 16-patch rhos has sd ~0.09; measured: 0.09, 0.40, 0.37, 0.09).
    The tiny model is random to start with, so this shows the map depends on the weights,
    not that the trained weights' maps are meaningful."""
    ex = run_explainer(runs / "logreg", CPU)
    before = {k: v.clone() for k, v in ex.visual.state_dict().items()}
    pixels = [ex.pixels(Path(s))[0] for s in sources]
    rows = randomisation_check(ex, pixels)
    assert [r["stage"] for r in rows] == ["none", "ln_post + proj", "block 1", "block 0",
                                          "embeddings"]
    assert rows[0]["rho"] == pytest.approx([1.0] * len(pixels))  # the untouched copy
    means = [r["mean_rho"] for r in rows[1:]]
    assert max(means) < 0.6 and means[-1] < 0.35, means
    after = ex.visual.state_dict()  # the check works on a copy
    assert all(torch.equal(before[k], after[k]) for k in before)
    # every parameter of the tower is in exactly one stage
    stages = cascade_stages(ex.visual)
    ids = [id(p) for _, ps in stages for p in ps]
    assert len(ids) == len(set(ids)) == len(list(ex.visual.parameters()))


def test_planted_evidence_is_found_in_its_patch(runs):
    """A known answer: a grey image with a bright square inside one patch, and a head whose
    class 0 is "looks like this image rather than the plain grey one" (w = the normalised
    features' difference). The map's peak must be the square's patch, for every one of the 16
    positions (a map that ignored where the evidence is would hit 1 in 16 by chance)."""
    ex = run_explainer(runs / "logreg", CPU)
    v = ex.visual
    grey = np.full((3, 64, 64), 128, np.uint8)
    for i in range(GRID[0]):
        for j in range(GRID[1]):
            img = grey.copy()
            img[:, 16 * i + 3:16 * i + 13, 16 * j + 3:16 * j + 13] = 250
            x, xg = (ex.normalize(torch.from_numpy(a)[None]) for a in (img, grey))
            with torch.no_grad():
                w = F.normalize(v(x), dim=-1) - F.normalize(v(xg), dim=-1)
            W = torch.cat([w, -w])

            def scorer(f, W=W):
                return F.normalize(f, dim=-1) @ W.T

            sal = gradcam(v, scorer, x, 0)
            assert np.unravel_index(np.argmax(sal.raw), GRID) == (i, j)


def test_a_head_that_is_not_differentiable_is_one_line(runs, sources):
    with pytest.raises(UsageError) as e:
        explain_images(runs / "knn", sources[:1], device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "'knn' is not differentiable" in msg
    assert all(h in msg for h in ("logreg", "mlp", "linear", "finetune"))
    r = CliRunner().invoke(app, ["predict", str(runs / "knn"), sources[0], "--explain",
                                 "--device", "cpu"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not differentiable" in lines[0]


def test_a_tower_that_is_not_a_vit_is_one_line():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    with pytest.raises(UsageError, match="not an open_clip VisionTransformer") as e:
        gradcam(conv, lambda f: f, torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(e.value) and "Sequential" in str(e.value)


def test_target_class_option_and_a_wrong_class(runs, sources, tmp_path):
    preds = explain_images(runs / "mlp", sources[:1], explain_dir=tmp_path, device="cpu",
                           target_class="mel", neighbors=0)
    assert preds[0].overlay.endswith("_mel.png") and Path(preds[0].overlay).is_file()
    with pytest.raises(UsageError, match="not one of this run's classes"):
        explain_images(runs / "mlp", sources[:1], explain_dir=tmp_path, device="cpu",
                       target_class="melanoma")


def test_cli_predict_explain_says_where_each_overlay_went(runs, sources, tmp_path):
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", str(runs / "mlp"), *sources[:2], "--explain",
                                 "--explain-dir", str(tmp_path / "ov"), "--device", "cpu",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    shown = [ln.split("overlay: ", 1)[1] for ln in r.output.splitlines() if "overlay: " in ln]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(shown) == 2 and [row["overlay"] for row in rows] == shown
    assert all(Path(s).is_file() and Path(s).parent == tmp_path / "ov" for s in shown)
    r = CliRunner().invoke(app, ["predict", str(runs / "mlp"), sources[0], "--explain-class",
                                 "mel"])
    assert r.exit_code != 0 and "go with --explain" in r.output
    # without --explain the file keeps its columns
    r = CliRunner().invoke(app, ["predict", str(runs / "mlp"), sources[0], "--device", "cpu",
                                 "--out", str(out)])
    assert r.exit_code == 0 and "overlay" not in out.read_text().splitlines()[0]


def test_finetune_run_predict_explain_writes_overlays(demo_root, sources, tmp_path):
    """A finetune run is explained through its own checkpoint (backbone + head): the
    probabilities are the run's own predictions for its val images, and overlays are
    written (default folder: <run>/explain)."""
    from skincache.finetune import FinetuneConfig, run_finetune

    cfg = FinetuneConfig.from_setup("base", data=str(demo_root), model=TINY_MODEL,
                                    pretrained=None, epochs=1, batch_size=8, device="cpu",
                                    runs_dir=str(tmp_path), workers=0, n_bootstrap=0,
                                    plots=False, lr=1e-3, name="ft")
    res = run_finetune(cfg, progress=False)
    with open(res.run_dir / "predictions" / "val.csv", newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    val = [s for s in sources if Path(s).stem in rows][:2]
    assert val
    preds = explain_images(res.run_dir, val, device="cpu")
    classes = json.loads((res.run_dir / "run.json").read_text())["classes"]
    for p in preds:
        assert p.ok and Path(p.overlay).parent == res.run_dir / "explain"
        with Image.open(p.overlay) as im:
            assert im.size == PNG_SIZE
        row = rows[Path(p.path).stem]
        np.testing.assert_allclose([p.probabilities[c] for c in classes],
                                   [float(row[f"p_{c}"]) for c in classes], atol=2e-3)
    plain = predict_run(res.run_dir, val, device="cpu")  # predict without --explain
    for p, q in zip(plain, preds, strict=True):
        assert p.predicted == q.predicted and p.probabilities == pytest.approx(
            q.probabilities, abs=1e-5)
    assert not any(p.overlay for p in plain)
    r = CliRunner().invoke(app, ["predict", str(res.run_dir), val[0], "--explain",
                                 "--device", "cpu"])
    assert r.exit_code == 0 and "overlay: " in r.output, r.output
    assert "random weights" in r.output
    # a finetune run folder without its checkpoints is one line
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text((res.run_dir / "run.json").read_text())
    r = CliRunner().invoke(app, ["predict", str(bare), val[0], "--device", "cpu"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and "without a checkpoint" in lines[0]

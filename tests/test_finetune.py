"""`finetune`: the Table 1 setups end to end on the tiny model, zero-shot start and WiSE-FT,
fit-head heads as a start, resume after SIGKILL, DDP on 2 CPU processes, re-encoding with the
fine-tuned checkpoint, and bad images skipped and listed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from skincache.cache import FeatureCache
from skincache.data import load_dataset
from skincache.encode import encode_dataset
from skincache.encoder import ImageEncoder
from skincache.finetune import SETUPS, FinetuneConfig, run_finetune
from skincache.finetune import state as st
from skincache.finetune.images import ImageStore, base_image, cut_crops, epoch_seed
from skincache.finetune.model import (
    ClipClassifier,
    fitted_head,
    interpolate,
    param_groups,
    zeroshot_head,
)
from skincache.heads import create_head
from skincache.heads.base import softmax
from skincache.loaders import load_views
from skincache.models import TINY_MODEL, ModelSpec, load_model
from skincache.prompts import template_set_order
from skincache.runs import fit_head_run
from skincache.views import Normalizer, ViewMaker, ViewPolicy, decode_image, view_params

TIMING = ("train_seconds", "train_images_per_s", "eval_seconds", "save_seconds")


def _cfg(data, runs_dir, **kw) -> FinetuneConfig:
    """A short run on the tiny model: 1 epoch, batch 8, no bootstrap, no plots unless asked."""
    setup = kw.pop("setup", "base")
    base = dict(data=str(data), model=TINY_MODEL, pretrained=None, epochs=1, batch_size=8,
                device="cpu", runs_dir=str(runs_dir), workers=0, n_bootstrap=0, plots=False)
    return FinetuneConfig.from_setup(setup, **{**base, **kw})


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def _probs_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("p_")]
    return [r["image_id"] for r in rows], np.array([[float(r[c]) for c in cols] for r in rows])


def _clean_pixels(records, loaded) -> torch.Tensor:
    maker = ViewMaker(loaded.preprocess, ViewPolicy(k=0))
    return torch.from_numpy(np.stack([load_views(r, maker)[1][0] for r in records]))


def _zeroshot_proba(records, classes, template_set="all") -> np.ndarray:
    """What `heads.ZeroShotHead` predicts from fp32 features of the un-tuned tiny model, with
    the text `fit-head --templates all` gives it (the three sets side by side, sorted)."""
    loaded = load_model(ModelSpec(TINY_MODEL))
    enc = ImageEncoder(loaded, ViewPolicy(k=0), torch.device("cpu"))
    X = enc.features(_clean_pixels(records, loaded)[:, None])[:, 0]
    sets = template_set_order(template_set)
    text = np.concatenate([enc.text_features(classes, s) for s in sets], axis=1)
    head = create_head("zeroshot").fit(X, np.zeros(len(X), int), text=text,
                                       logit_scale=loaded.logit_scale)
    return head.predict_proba(X)


# ----------------------------------------------------------------------------- config


def test_setups_are_table1_and_every_value_is_overridable():
    base = FinetuneConfig.from_setup("base", data="d")
    assert (base.lr, base.batch_size, base.epochs, base.weight_decay, base.augment) == (
        5e-5, 16, 20, 0.0, False)
    assert base.schedule == "cosine" and base.warmup_ratio > 0
    assert FinetuneConfig.from_setup("regularization", data="d").weight_decay == 0.01
    aug = FinetuneConfig.from_setup("augmented", data="d")
    assert aug.augment and (aug.aug_resize, aug.aug_crop, aug.aug_hflip) == (256, 224, 0.5)
    assert set(SETUPS) == {"base", "regularization", "augmented"}
    # overrides win; None means "the default" except for pretrained (random init)
    o = FinetuneConfig.from_setup("regularization", data="d", weight_decay=0.1, lr=1e-4,
                                  epochs=None, pretrained=None)
    assert (o.weight_decay, o.lr, o.epochs, o.pretrained) == (0.1, 1e-4, 20, None)
    assert FinetuneConfig.from_dict(o.to_dict()) == o
    with pytest.raises(ValueError, match="unknown setup"):
        FinetuneConfig.from_setup("fancy", data="d")
    with pytest.raises(ValueError, match="wise"):
        FinetuneConfig(data="d", wise=1.5)
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneConfig(data="d", layer_decay=0.0)


# ----------------------------------------------------------------------------- pipeline


def test_images_decode_once_clean_views_and_fresh_seeded_crops(demo_dataset):
    """Base setups train on the model's eval preprocessing; augmented crops are cut per epoch
    from one resized image, reproducibly, and the stream fallback gives the same pixels."""
    loaded = load_model(ModelSpec(TINY_MODEL))
    recs = demo_dataset.split_records("train")[:6]
    maker = ViewMaker(loaded.preprocess, ViewPolicy(k=0))
    store = ImageStore(recs, list(range(6)), maker, keep_base=True, mode="memory", workers=0,
                       split="train")
    assert torch.equal(store.clean, _clean_pixels(recs, loaded))
    assert store.clean.dtype == torch.uint8 and store.clean.shape[1:] == (3, 64, 64)
    img = decode_image(Path(recs[2].source).read_bytes(), maker.aug_resize)
    base = torch.from_numpy(base_image(img, maker))
    assert min(base.shape[1:]) == maker.aug_resize == round(256 * 64 / 224)
    c1, c1b, c2 = store.crops(0, 1), store.crops(0, 1), store.crops(0, 2)
    assert all(torch.equal(a, b) for a, b in zip(c1, c1b, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(c1, c2, strict=True))
    # the crop of image 2 in epoch 1 is the augmented view `views.ViewMaker` cuts (the
    # reference augmentation) with that epoch's seed
    pol = ViewPolicy(k=1, seed=epoch_seed(0, 1))
    want = torch.from_numpy(ViewMaker(loaded.preprocess, pol).from_pil(img, recs[2].image_id)[1])
    top, left, flip = view_params(recs[2].image_id, pol, tuple(base.shape[1:]), (64, 64))[0]
    assert [int(c[2]) for c in c1] == [top, left, int(flip)]
    order = [2, 0, 5]
    (px, y), = list(store.batches(order, 8, torch.device("cpu"), c1))
    assert torch.equal(px[0], want) and y.tolist() == order
    # a list of bases (mixed sizes) is cut the same way as the stacked tensor
    idx = torch.tensor(order)
    looped = cut_crops(list(store.base), idx, *(c[idx] for c in c1), (64, 64))
    assert torch.equal(looped, px)
    # the per-device normaliser is views.Normalizer, bit for bit
    assert torch.equal(Normalizer(loaded.preprocess, torch.device("cpu"))(px),
                       Normalizer(loaded.preprocess, px.device)(px))
    stream = ImageStore(recs, list(range(6)), maker, keep_base=True, mode="stream", workers=0,
                        split="train")
    assert stream.clean is None and stream.base is None and stream.base_hw == store.base_hw
    lean = ImageStore(recs, list(range(6)), maker, keep_base=True, keep_clean=False,
                      mode="memory", workers=0, split="train")  # the augmented training store
    assert lean.clean is None and torch.equal(lean.base, store.base)
    for crops in (None, c1):
        a = [p for p, _ in store.batches(order, 2, torch.device("cpu"), crops)]
        b = [p for p, _ in stream.batches(order, 2, torch.device("cpu"), crops)]
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_zero_shot_start_reproduces_the_zero_shot_head(demo_dataset):
    loaded = load_model(ModelSpec(TINY_MODEL))
    recs = demo_dataset.split_records("val")
    w, b = zeroshot_head(loaded, demo_dataset.classes, "dermoscopy")
    model = ClipClassifier(loaded.model.visual, w, b, loaded.logit_scale).eval()
    with torch.no_grad():
        px = _clean_pixels(recs, loaded)
        logits = model(Normalizer(loaded.preprocess, px.device)(px))
    np.testing.assert_allclose(softmax(logits.numpy()),
                               _zeroshot_proba(recs, demo_dataset.classes, "dermoscopy"),
                               atol=1e-6)


def test_zero_shot_start_equals_the_zero_shot_head_of_fit_head(demo_cache, tmp_path):
    """The fine-tune's zero-shot start (`--head-init zeroshot`, `--templates all`) is the
    `zeroshot` head `fit-head --templates all` fits on the cache of the same model: the same
    linear form, so the same logits. Both read the template sets through
    `prompts.template_set_order`; this fails if either side orders them differently."""
    from skincache.heads import load_head

    loaded = load_model(ModelSpec(TINY_MODEL))
    cache = FeatureCache.open(demo_cache)
    run = fit_head_run(cache, "zeroshot", runs_dir=tmp_path, plots=False, n_bootstrap=0)
    W, b = load_head(run.path / "head").linear_form(posthoc=False)  # before its val-tuned steps
    w0, b0 = zeroshot_head(loaded, cache.classes, "all")
    np.testing.assert_allclose(W / loaded.logit_scale, w0.numpy(), atol=1e-6)
    assert not b.any() and not b0.any()
    X = cache.split("val").features
    ours = torch.nn.functional.normalize(torch.from_numpy(X), dim=-1) @ w0.T
    np.testing.assert_allclose(loaded.logit_scale * ours.numpy(),
                               torch.nn.functional.normalize(torch.from_numpy(X), dim=-1).numpy()
                               @ W.T, rtol=1e-5, atol=1e-4)


def test_head_init_from_a_fit_head_run_keeps_its_predictions(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 64)).astype(np.float32), np.arange(60) % 7
    text = rng.normal(size=(7, 3, 64)).astype(np.float32)
    Xn = torch.nn.functional.normalize(torch.from_numpy(X), dim=-1)
    scale = 14.285714
    for name, params in [("logreg", {"C": 1.0}), ("linear", {"epochs": 3, "patience": None}),
                         ("zs-linear", {"epochs": 3, "patience": None}), ("zeroshot", {})]:
        head = create_head(name, **params).fit(X, y, text=text, logit_scale=20.0)
        head.save(tmp_path / name / "head")  # a fit-head run folder holds head/
        w, b = fitted_head(tmp_path / name, scale, 7, 64, [str(i) for i in range(7)])
        ours = softmax((scale * Xn @ w.T + b).numpy())
        np.testing.assert_allclose(ours, head.predict_proba(X), atol=1e-5, err_msg=name)
    create_head("knn").fit(X, y).save(tmp_path / "knn")
    with pytest.raises(ValueError, match="not a linear classifier"):
        fitted_head(tmp_path / "knn", scale, 7, 64, list("abcdefg"))
    with pytest.raises(ValueError, match="features"):
        fitted_head(tmp_path / "logreg", scale, 7, 128, list("abcdefg"))
    (tmp_path / "logreg" / "run.json").write_text(json.dumps(
        {"kind": "head", "model": "ViT-B-32", "classes": [str(i) for i in range(7)],
         "head": "logreg", "cache": "c.h5", "cache_key": "k", "encoding_key": "e"}))
    with pytest.raises(ValueError, match="fit on ViT-B-32 features"):
        fitted_head(tmp_path / "logreg", scale, 7, 64, [str(i) for i in range(7)], TINY_MODEL)
    with pytest.raises(ValueError, match="classes"):
        fitted_head(tmp_path / "logreg", scale, 7, 64, list("abcdefg"))
    with pytest.raises(FileNotFoundError, match="no saved head"):
        fitted_head(tmp_path / "nothing", scale, 7, 64, list("abcdefg"))


def test_param_groups_head_lr_layer_decay_and_no_decay():
    loaded = load_model(ModelSpec(TINY_MODEL))
    w = torch.zeros(7, 64)
    model = ClipClassifier(loaded.model.visual, w, torch.zeros(7), 10.0)
    groups = param_groups(model, lr=1e-4, head_lr=1e-2, weight_decay=0.1, layer_decay=0.5)
    by = {g["name"]: g for g in groups}
    assert by["head.weight"]["lr"] == 1e-2 and by["head.weight"]["weight_decay"] == 0.1
    assert by["head.bias"]["weight_decay"] == 0.0
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))  # every parameter exactly once
    vis = [g for g in groups if g["name"].startswith("visual")]
    depth = {g["name"]: int(g["name"].split("depth")[1].split(".")[0]) for g in vis}
    top = max(depth.values())
    assert top == 3  # embeddings 0, two blocks, final norm + projection 3
    for g in vis:
        assert g["lr"] == pytest.approx(1e-4 * 0.5 ** (top - depth[g["name"]]))
        assert (g["weight_decay"] == 0.0) == g["name"].endswith("no_decay")
    names = {id(p): n for n, p in model.visual.named_parameters()}
    no_decay = {names[id(p)] for g in vis if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "ln_post.weight" in no_decay and "positional_embedding" in no_decay
    assert "proj" not in no_decay and "transformer.resblocks.0.attn.in_proj_weight" not in no_decay
    assert by["visual.depth3"]["params"][0] is model.visual.proj
    # WiSE interpolation: 0 is the start, 1 the end, 0.5 the midpoint
    s0, s1 = {"a": torch.zeros(2), "n": torch.tensor(1)}, {"a": torch.ones(2), "n": torch.tensor(2)}
    assert torch.equal(interpolate(s0, s1, 0.0)["a"], s0["a"])
    assert torch.equal(interpolate(s0, s1, 0.5)["a"], torch.full((2,), 0.5))
    assert interpolate(s0, s1, 0.3)["n"] == 2


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def setup_runs(demo_root, tmp_path_factory):
    """One 1-epoch run per Table 1 setup (lr 1e-3 so one epoch visibly moves the weights)."""
    runs_dir = tmp_path_factory.mktemp("runs")
    out = {}
    for setup in SETUPS:
        aug = setup == "augmented"  # plots and the WiSE sweep once, not three times
        cfg = _cfg(demo_root, runs_dir, setup=setup, lr=1e-3, name=setup, plots=aug,
                   wise_sweep=aug, n_bootstrap=20)
        out[setup] = run_finetune(cfg, progress=False)
    return out


@pytest.mark.parametrize("setup", list(SETUPS))
def test_each_setup_runs_one_epoch_and_writes_its_outputs(setup_runs, demo_dataset, setup):
    res = setup_runs[setup]
    run = res.run_dir
    assert run.name == setup and res.is_main and res.best_epoch == 1
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "finetune" and meta["status"] == "complete"
    assert meta["config"]["setup"] == setup and meta["config"]["augment"] == (setup == "augmented")
    assert meta["dataset"]["fingerprint"] == demo_dataset.fingerprint()
    assert meta["model"]["name"] == TINY_MODEL and "torch" in meta["versions"]
    hist = json.loads((run / "history.json").read_text())
    assert len(hist["epochs"]) == 1 and hist["init"]["balanced_accuracy"] is not None
    row = hist["epochs"][0]
    for key in ("train_loss", "train_accuracy", "val_balanced_accuracy", "val_accuracy",
                "val_loss", "train_images_per_s"):
        assert np.isfinite(row[key]), key
    assert row["train_images"] == len(demo_dataset.split_records("train"))
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert last["epoch"] == best["epoch"] == 1 and "optimizer" in last and "optimizer" not in best
    wds = {g["weight_decay"] for g in last["optimizer"]["param_groups"]}
    assert wds == ({0.0, 0.01} if setup == "regularization" else {0.0})
    assert isinstance(last["rng"]["torch"], torch.Tensor)
    # the backbone moved: the saved CLIP visual weights differ from the tiny model's
    init = load_model(ModelSpec(TINY_MODEL)).model.state_dict()
    assert set(best["state_dict"]) == set(init)  # the full CLIP state dict, text tower too
    assert not torch.equal(best["state_dict"]["visual.proj"], init["visual.proj"])
    assert torch.equal(best["state_dict"]["text_projection"], init["text_projection"])
    for split in ("val", "test"):
        rep = json.loads((run / "metrics" / f"{split}.json").read_text())
        assert rep == res.metrics[split] and rep["n_samples"] == len(
            demo_dataset.split_records(split))
        assert next(iter(rep)) == "n_samples" and "balanced_accuracy" in rep
        ids, p = _probs_csv(run / "predictions" / f"{split}.csv")
        assert ids == [r.image_id for r in demo_dataset.split_records(split)]
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    if setup == "augmented":
        for name in ("val_confusion_matrix_counts", "test_classwise", "test_reliability",
                     "curves", "wise_curve"):
            assert (run / "plots" / f"{name}.png").stat().st_size > 0, name
        best_alpha = max(r["balanced_accuracy"] for r in res.wise_curve)
        chosen = next(r for r in res.wise_curve if r["alpha"] == res.wise_alpha)
        assert chosen["balanced_accuracy"] == best_alpha  # the sweep picks alpha on val
        assert meta["wise_alpha"] == res.wise_alpha
        assert (run / "wise.pt").is_file() == (res.wise_alpha != 1.0)
    assert json.loads((run / "failed.json").read_text()) == []
    assert not list(run.glob("*.tmp"))


def test_setups_differ_where_table1_says(setup_runs):
    """Same seed, same order: weight decay changes the weights a little, augmentation changes
    what the model saw (so the training loss)."""
    loss = {s: r.history[0]["train_loss"] for s, r in setup_runs.items()}
    assert loss["base"] == pytest.approx(loss["regularization"], rel=1e-3)
    assert loss["augmented"] != pytest.approx(loss["base"], rel=1e-4)
    w = {s: torch.load(r.run_dir / "best.pt", weights_only=True)["state_dict"]["visual.proj"]
         for s, r in setup_runs.items()}
    assert not torch.equal(w["base"], w["regularization"])


def test_wise_alpha_zero_is_the_zero_shot_model_and_the_sweep_is_reported(demo_root,
                                                                          demo_dataset,
                                                                          tmp_path):
    res = run_finetune(_cfg(demo_root, tmp_path, lr=1e-3, wise=0.0, wise_sweep=True),
                       progress=False)
    assert res.run_dir.parent == tmp_path and res.run_dir.name.startswith("finetune-base-")
    val = demo_dataset.split_records("val")
    zs = _zeroshot_proba(val, demo_dataset.classes)
    ids, p = _probs_csv(res.run_dir / "predictions" / "val.csv")
    assert ids == [r.image_id for r in val]
    np.testing.assert_allclose(p, zs, atol=1e-6)  # alpha 0 = zero-shot CLIP exactly
    # ... which is also what the zero-shot start scored before training
    y = np.array([demo_dataset.label_index(r.label) for r in val])
    assert res.init_val["accuracy"] == pytest.approx(float((zs.argmax(1) == y).mean()))
    curve = res.wise_curve
    assert [r["alpha"] for r in curve] == [round(0.1 * i, 1) for i in range(11)]
    assert curve[0]["balanced_accuracy"] == pytest.approx(res.init_val["balanced_accuracy"])
    assert curve[0]["loss"] == pytest.approx(res.init_val["loss"], rel=1e-9)
    assert curve[-1]["loss"] == pytest.approx(res.history[0]["val_loss"], rel=1e-9)
    assert len({round(r["loss"], 9) for r in curve}) == 11  # the weights really move
    assert res.wise_alpha == 0.0
    assert json.loads((res.run_dir / "metrics" / "wise_curve.json").read_text()) == curve
    wise = torch.load(res.run_dir / "wise.pt", weights_only=True)
    init = load_model(ModelSpec(TINY_MODEL)).model.state_dict()
    assert torch.equal(wise["state_dict"]["visual.proj"], init["visual.proj"])


_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from skincache.finetune import FinetuneConfig, run_finetune
    from skincache.finetune import state as st

    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    if mode == "kill":  # die the instant epoch 1's last.pt is on disk
        save = st.save_checkpoint
        def save_then_die(payload, path):
            out = save(payload, path)
            if Path(path).name == "last.pt" and payload["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        st.save_checkpoint = save_then_die
    r = run_finetune(FinetuneConfig(**cfg), progress=False)
    if r.is_main:
        print("RESULT " + json.dumps({"history": r.history, "resumed": r.resumed,
                                      "metrics": r.metrics, "run_dir": str(r.run_dir)}))
""")


def _py(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kw)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[-1][7:])


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(demo_root, tmp_path):
    kw = dict(data=str(demo_root), model=TINY_MODEL, pretrained=None, epochs=2, batch_size=8,
              lr=1e-3, device="cpu", runs_dir=str(tmp_path), workers=0, n_bootstrap=20,
              plots=False, setup="augmented")
    killed = _py([sys.executable, "-c", _SCRIPT, "kill", json.dumps({**kw, "name": "killed"})])
    whole = _py([sys.executable, "-c", _SCRIPT, "run", json.dumps({**kw, "name": "whole"})])
    killed.communicate(timeout=300)
    assert killed.returncode == -9  # SIGKILL: no cleanup ran
    run = tmp_path / "killed"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "metrics").exists()
    resumed = _result(_py([sys.executable, "-c", _SCRIPT, "run",
                           json.dumps({"resume": str(run), "device": "cpu", "workers": 0})]))
    ref = _result(whole)
    assert resumed["resumed"] and len(resumed["history"]) == 2
    assert resumed["history"][0] == last["history"][0]  # epoch 1 was not trained again
    assert _untimed(resumed["history"]) == _untimed(ref["history"])
    assert resumed["metrics"] == ref["metrics"]
    for name in ("best.pt", "last.pt"):
        a = torch.load(run / name, weights_only=True)
        b = torch.load(tmp_path / "whole" / name, weights_only=True)
        for k, v in b["state_dict"].items():
            torch.testing.assert_close(a["state_dict"][k], v, atol=1e-6, rtol=0)
        torch.testing.assert_close(a["head"], b["head"], atol=1e-6, rtol=0)
    opt_a = torch.load(run / "last.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["optimizer"]["state"]
    for i in opt_b:
        torch.testing.assert_close(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"], atol=1e-9,
                                   rtol=1e-5)
    # a finished run given to resume is read back, not trained again
    again = run_finetune(FinetuneConfig(resume=str(run), device="cpu"), progress=False)
    assert again.resumed and _untimed(again.history) == _untimed(ref["history"])
    assert again.metrics == ref["metrics"]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(demo_root, demo_dataset, tmp_path):
    n_train = len(demo_dataset.split_records("train"))
    assert n_train % 2 == 0  # no padded duplicate: both runs see the same global batches
    kw = dict(data=str(demo_root), model=TINY_MODEL, pretrained=None, epochs=2, batch_size=8,
              lr=1e-3, device="cpu", runs_dir=str(tmp_path), workers=0, n_bootstrap=0,
              plots=False, setup="augmented")
    script = tmp_path / "finetune_script.py"
    script.write_text(_SCRIPT)
    ddp = _py([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(script), "run",
               json.dumps({**kw, "name": "ddp"})])
    one = run_finetune(FinetuneConfig(**{**kw, "name": "one"}), progress=False)
    two = _result(ddp)
    meta = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert meta["world_size"] == 2 and json.loads((tmp_path / "one" / "run.json").read_text())[
        "world_size"] == 1
    for a, b in zip(two["history"], one.history, strict=True):
        assert a["train_images"] == b["train_images"] == n_train
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["train_accuracy"] == b["train_accuracy"]
        assert a["val_balanced_accuracy"] == b["val_balanced_accuracy"]
    assert two["metrics"]["test"]["accuracy"] == one.metrics["test"]["accuracy"]
    wa = torch.load(tmp_path / "ddp" / "best.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "one" / "best.pt", weights_only=True)["state_dict"]
    for k, v in wb.items():
        a = wa[k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias's true gradient is exactly 0 (softmax ignores a shift shared by all
            # keys); Adam turns the float noise there into lr-sized steps of random sign, so
            # only the query and value biases can be compared.
            a, v = torch.cat([a[:64], a[128:]]), torch.cat([v[:64], v[128:]])
        # Adam divides by sqrt(v): where a gradient is ~0, all-reduce round-off (a different
        # summation order than one process) becomes a visible step of up to lr (1e-3 here);
        # the losses, accuracies and test probabilities above and below are compared tightly,
        # and a wrong gradient average moves every weight, not a few elements.
        torch.testing.assert_close(a, v, atol=1e-3, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
    _, pa = _probs_csv(tmp_path / "ddp" / "predictions" / "test.csv")
    _, pb = _probs_csv(tmp_path / "one" / "predictions" / "test.csv")
    np.testing.assert_allclose(pa, pb, atol=1e-4)
    assert not (tmp_path / "ddp" / "last.pt.tmp").exists()


_FAST_ENCODE = dict(policy=ViewPolicy(k=0), device="cpu", batch_size=16, num_workers=0,
                   progress=False)


@pytest.fixture(scope="module")
def plain_cache(demo_dataset, tmp_path_factory) -> FeatureCache:
    """The demo data encoded by the un-tuned tiny model (every template set)."""
    out = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL),
                         cache_dir=tmp_path_factory.mktemp("cache"), **_FAST_ENCODE)
    return FeatureCache.open(out.path)


def test_head_init_from_a_real_fit_head_run(plain_cache, demo_root, tmp_path):
    head_run = fit_head_run(plain_cache, "logreg", {"C": 10.0}, runs_dir=tmp_path, name="lr",
                            n_bootstrap=0, plots=False)
    # lr 0: the run's model is its starting point, the head fit-head wrote
    res = run_finetune(_cfg(demo_root, tmp_path, lr=0.0, head_init=str(head_run.path)),
                       progress=False)
    ids, ours = _probs_csv(res.run_dir / "predictions" / "val.csv")
    ids_head, theirs = _probs_csv(head_run.path / "predictions" / "val.csv")
    assert ids == ids_head
    np.testing.assert_allclose(ours, theirs, atol=5e-3)  # the cache holds float16 features
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.9


def test_best_checkpoint_reencodes_with_the_finetuned_backbone(setup_runs, demo_dataset,
                                                                plain_cache, tmp_path):
    res = setup_runs["base"]
    ckpt = res.run_dir / "best.pt"
    tuned = FeatureCache.open(encode_dataset(
        demo_dataset, ModelSpec(TINY_MODEL, None, str(ckpt)), cache_dir=tmp_path,
        **_FAST_ENCODE).path)
    plain = plain_cache
    assert tuned.path != plain.path and tuned.attrs["checkpoint_sha256"]
    fv, pv = tuned.split("val").features, plain.split("val").features
    assert np.abs(fv - pv).max() > 1e-2  # the backbone is the fine-tuned one
    # the checkpoint's backbone + head reproduce the run's own predictions from the cache
    head = torch.load(ckpt, weights_only=True)["head"]
    xn = torch.nn.functional.normalize(torch.from_numpy(fv), dim=-1)
    p = softmax((head["logit_scale"] * xn @ head["weight"].T + head["bias"]).numpy())
    _, p_run = _probs_csv(res.run_dir / "predictions" / "val.csv")
    np.testing.assert_allclose(p, p_run, atol=2e-2)
    assert (p.argmax(1) == p_run.argmax(1)).mean() >= 0.9
    # ... and heads fit on it as on any cache
    tr = tuned.split("train")
    create_head("logreg", C=1.0).fit(tr.features, tr.labels, n_classes=7).predict_proba(fv)


def test_unreadable_images_are_skipped_and_listed(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    ds = load_dataset(data)
    bad_train, bad_val = ds.split_records("train")[3], ds.split_records("val")[1]
    raw = Path(bad_train.source).read_bytes()
    Path(bad_train.source).write_bytes(raw[: len(raw) // 3])  # truncated JPEG
    Path(bad_val.source).write_bytes(b"")  # zero bytes
    res = run_finetune(_cfg(data, tmp_path / "runs", workers=2, setup="augmented"),
                       progress=False)
    failed = {f["image_id"]: f for f in res.failed}
    assert set(failed) == {bad_train.image_id, bad_val.image_id}
    assert failed[bad_val.image_id]["reason"].startswith("empty file")
    assert "truncated" in failed[bad_train.image_id]["reason"]
    assert failed[bad_train.image_id]["split"] == "train"
    assert json.loads((res.run_dir / "failed.json").read_text()) == res.failed
    assert res.history[0]["train_images"] == len(ds.split_records("train")) - 1
    ids, _ = _probs_csv(res.run_dir / "predictions" / "val.csv")
    assert bad_val.image_id not in ids and len(ids) == len(ds.split_records("val")) - 1
    assert json.loads((res.run_dir / "run.json").read_text())["dataset"]["failed"] == 2


def test_options_run_and_the_stream_store_trains_like_the_memory_store(demo_root, tmp_path):
    kw = dict(setup="augmented", lr=1e-3, head_lr=1e-2, layer_decay=0.7, grad_clip=1.0,
              balance="loss", label_smoothing=0.1, head_init="random", template_set="clip")
    mem = run_finetune(_cfg(demo_root, tmp_path, name="memory", **kw), progress=False)
    stream = run_finetune(_cfg(demo_root, tmp_path, name="stream", image_store="stream", **kw),
                          progress=False)
    assert json.loads((stream.run_dir / "run.json").read_text())["image_store"] == "stream"
    assert _untimed(stream.history) == _untimed(mem.history)
    a = torch.load(mem.run_dir / "last.pt", weights_only=True)
    b = torch.load(stream.run_dir / "last.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    groups = {g["name"]: g for g in a["optimizer"]["param_groups"]}
    assert groups["head.weight"]["initial_lr"] == 1e-2
    assert groups["visual.depth3"]["initial_lr"] == pytest.approx(1e-3)
    assert groups["visual.depth0"]["initial_lr"] == pytest.approx(1e-3 * 0.7 ** 3)
    assert all(g["lr"] == 0.0 for g in groups.values())  # the cosine ends at 0
    assert mem.history[-1]["lr"] == 0.0


def test_early_stopping_and_run_names(demo_root, tmp_path):
    # lr 0: validation never improves after epoch 1, so patience 1 stops after epoch 2
    res = run_finetune(_cfg(demo_root, tmp_path, epochs=4, lr=0.0, patience=1, name="es"),
                       progress=False)
    assert res.stopped_early and [r["epoch"] for r in res.history] == [1, 2]
    assert res.best_epoch == 1
    assert torch.load(res.run_dir / "last.pt", weights_only=True)["stopped"] is True
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_finetune(_cfg(demo_root, tmp_path, name="es"), progress=False)
    with pytest.raises(ValueError, match="not a skincache fine-tuning checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "x.pt")
        st.load_checkpoint(tmp_path / "x.pt")


# ----------------------------------------------------------------------------- options once


def test_cli_options_and_the_config_agree_and_a_mismatch_is_named():
    import dataclasses
    import inspect

    from skincache import cli
    from skincache.finetune.config import cli_mismatch, config_from_cli

    fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    params = [p for p in inspect.signature(cli.finetune.finetune).parameters if p != "ctx"]
    assert cli_mismatch(fields, params) == []
    # a field added without a flag, a flag without a field, a stale table entry: each named
    assert "'new_knob'" in " ".join(cli_mismatch(fields + ["new_knob"], params))
    assert "'extra_flag'" in " ".join(cli_mismatch(fields, params + ["extra_flag"]))
    bad = cli_mismatch([f for f in fields if f != "eval_batch_size"], params)
    assert bad and "NO_CLI_FLAG lists 'eval_batch_size'" in bad[0]
    with pytest.raises(RuntimeError, match="extra_flag"):
        config_from_cli({p: None for p in params} | {"extra_flag": 1})
    # None means the setup's value; names differing from the field are mapped
    values = {p: None for p in params} | {"setup": "augmented", "data": "d", "no_plots": True,
                                          "wise_sweep": False, "templates": "clip",
                                          "bootstrap": 7, "runs_dir": Path("r")}
    cfg = config_from_cli(values)
    assert (cfg.augment, cfg.plots, cfg.template_set, cfg.n_bootstrap, cfg.runs_dir,
            cfg.epochs) == (True, False, "clip", 7, "r", 20)


# ----------------------------------------------------------------------------- train state


def test_train_state_observes_epochs_and_round_trips_the_checkpoint_format():
    ts = st.TrainState()
    assert ts.observe({"epoch": 1, "val_balanced_accuracy": 0.5}, patience=2)
    assert not ts.observe({"epoch": 2, "val_balanced_accuracy": 0.5}, patience=2)  # not >
    assert not ts.stopped
    assert not ts.observe({"epoch": 3, "val_balanced_accuracy": 0.4}, patience=2)
    assert ts.stopped and (ts.best_epoch, ts.best_score, ts.since_best, ts.epoch) == (1, 0.5, 2, 3)
    # without a val split every epoch is the best and patience never stops the run
    free = st.TrainState()
    assert all(free.observe({"epoch": e}, patience=1) for e in (1, 2, 3)) and not free.stopped
    # a last.pt as written before TrainState existed (format version 1) reads back
    old = {"epoch": 3, "history": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}],
           "best": {"epoch": 1, "score": 0.5}, "since_best": 2, "stopped": True,
           "init_val": {"balanced_accuracy": 0.25}}
    back = st.TrainState.from_checkpoint(old)
    assert back.to_checkpoint() == old
    assert (back.best_epoch, back.epoch, back.stopped, back.init_val) == (
        1, 3, True, {"balanced_accuracy": 0.25})


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_resumes(demo_root, tmp_path,
                                                                        monkeypatch):
    """ENOSPC from the file under torch's zip writer (which would say "unexpected pos"): one
    DiskError line, the previous last.pt still loads, no temp file, and --resume finishes."""
    import errno

    import skincache._io as sio
    from skincache.errors import DiskError

    real_open, opened = open, []

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def full_on_second_last(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        if Path(path).name == "last.pt.tmp":
            opened.append(path)
            if len(opened) == 2:  # epoch 2's last.pt
                return Full(fh)
        return fh

    monkeypatch.setattr(sio, "open", full_on_second_last, raising=False)
    cfg = _cfg(demo_root, tmp_path, epochs=2, name="full")
    with pytest.raises(DiskError) as info:
        run_finetune(cfg, progress=False)
    msg = str(info.value)
    assert msg.startswith("disk full writing") and "last.pt.tmp" in msg
    assert f"--resume {tmp_path / 'full'}" in msg and "\n" not in msg
    run = tmp_path / "full"
    assert st.load_checkpoint(run / "last.pt")["epoch"] == 1
    assert not list(run.glob("*.tmp"))
    monkeypatch.undo()
    res = run_finetune(FinetuneConfig(resume=str(run), device="cpu", workers=0),
                       progress=False)
    assert res.resumed and [r["epoch"] for r in res.history] == [1, 2]
    last = st.load_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["best"] == {"epoch": res.best_epoch,
                                                   "score": res.best_val_balanced_accuracy}
    # the keys of format version 1, as written before TrainState: old runs still resume
    assert set(last) == {"format", "format_version", "kind", "epoch", "classes", "model",
                         "state_dict", "head", "val_balanced_accuracy", "optimizer",
                         "scheduler", "scaler", "rng", "history", "best", "since_best",
                         "stopped", "init_val", "world_size", "config"}


def test_a_file_size_limit_is_one_error_line_and_the_run_resumes(demo_root, tmp_path):
    """`ulimit -f 5000` (checkpoints of the tiny model are bigger): exit 1, one `error:`
    line, no traceback, no temp file left, and the run continues once the limit is lifted."""
    import resource

    limit = 5000 * 1024

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "capped"
    args = [sys.executable, "-m", "skincache.cli", "finetune", "--data", str(demo_root),
            "--model", TINY_MODEL, "--pretrained", "", "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--workers", "0", "--bootstrap", "0", "--no-plots", "--quiet",
            "--runs-dir", str(tmp_path), "--name", "capped"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, preexec_fn=cap,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and err.count("error:") == 1
    assert "file size limit reached" in err and "--resume" in err
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not list(run.glob("*.tmp")) and not list(run.glob("*.pt"))
    res = run_finetune(FinetuneConfig(resume=str(run), device="cpu", workers=0),
                       progress=False)
    assert [r["epoch"] for r in res.history] == [1] and (run / "best.pt").is_file()

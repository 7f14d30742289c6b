"""The derm encoder registry and the hf-hub path, offline.

Every real derm model loads through `hf-hub:org/repo`: open_clip reads `open_clip_config.json`
and `open_clip_model.safetensors` from the Hugging Face cache. Here that cache is built in a
tmp dir (the layout huggingface_hub reads: `models--org--name/snapshots/<rev>/`, `refs/main`)
with small configs and random weights, so the code path runs end to end without a network and
without any real weights. No derm weights are loaded in these tests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image
from typer.testing import CliRunner

from skincache import derm_models
from skincache.cli import app
from skincache.errors import ModelError, UsageError
from skincache.models import ModelSpec, load_model, resolve_pretrained, state_dict_sha256

runner = CliRunner()
REV = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache: Path, repo_id: str, model_cfg: dict, preprocess_cfg: dict,
                 seed: int = 123) -> str:
    """Write `repo_id` into the HF cache `cache` as open_clip publishes a model: the config
    and random weights of `model_cfg` (seeded). Returns the weights' sha256 as skincache
    computes it, so a test can tell loaded weights from a fresh random init."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cls = open_clip.CustomTextCLIP if "hf_model_name" in model_cfg["text_cfg"] else \
        open_clip.CLIP
    model = cls(**copy.deepcopy(model_cfg))
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (snap / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(snap / "open_clip_model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return state_dict_sha256(model)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF cache in tmp, offline mode on, no token: only what a test writes loads."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return cache


def _tiny_cfg() -> dict:
    cfg = json.loads((Path(derm_models.__file__).parent / "model_configs" /
                      "skincache-tiny.json").read_text())
    return cfg


def test_encode_through_hf_hub_offline_end_to_end(demo_root, tmp_path):
    """`skincache encode --model hf-hub:...` in a fresh process whose only Hub is a local
    cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1): the config's preprocessing and the snapshot's
    weights (not a random init) end up in the cache header."""
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    pre = {"mean": [0.5, 0.25, 0.125], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
           "resize_mode": "squash"}
    sha = hub_snapshot(hub, "skincache-test/tiny-hub", _tiny_cfg(), pre)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               COLUMNS="200")
    out = tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "skincache.cli", "encode", "--data",
                        str(demo_root), "--model", "hf-hub:skincache-test/tiny-hub",
                        "--device", "cpu", "--views", "1", "--workers", "0", "--cache-dir",
                        str(out), "--quiet"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    from skincache.cache import FeatureCache

    (path,) = out.glob("*.h5")
    s = FeatureCache.open(path).summary()
    assert s["model"] == "hf-hub:skincache-test/tiny-hub"
    assert s["weights_sha256"] == sha  # the snapshot's weights, not a seed-0 random init
    pp = s["preprocess"]
    assert tuple(pp["size"]) == (64, 64) and pp["interpolation"] == "bilinear"
    assert pp["resize_mode"] == "squash"
    assert np.allclose(pp["mean"], pre["mean"]) and np.allclose(pp["std"], pre["std"])
    assert s["embed_dim"] == 64


def _shrunk(arch: str) -> dict:
    """open_clip's config of `arch` with small widths and depths; image size, patch size,
    context length and vocabulary kept, so the preprocessing and token shapes are the real
    ones."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    assert cfg is not None, arch
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(width=64, layers=1, head_width=32)
    cfg["text_cfg"].update(width=32, heads=2, layers=1)
    return cfg


def _architectures() -> dict[str, derm_models.DermModel]:
    """One registry entry per distinct open_clip architecture that stock open_clip builds."""
    import open_clip

    out = {}
    for e in derm_models.registry().values():
        if e.architecture in open_clip.list_models():
            out.setdefault(e.architecture, e)
    return out


def test_registry_names_the_stock_architectures_it_relies_on():
    assert set(_architectures()) == {"ViT-B-16", "ViT-L-14", "ViT-B-16-quickgelu",
                                    "ViT-L-14-quickgelu"}


@pytest.mark.parametrize("arch", ["ViT-B-16", "ViT-L-14", "ViT-B-16-quickgelu",
                                  "ViT-L-14-quickgelu"])
def test_each_registered_architecture_builds_records_preprocessing_and_encodes(
        arch, offline_hub):
    entry = _architectures()[arch]
    pre = {"mean": list(entry.mean), "std": list(entry.std),
           "interpolation": entry.interpolation}
    sha = hub_snapshot(offline_hub, f"skincache-test/{arch}", _shrunk(arch), pre)
    loaded = load_model(ModelSpec(f"hf-hub:skincache-test/{arch}"))
    assert loaded.weights_sha256 == sha
    p = loaded.preprocess
    assert p.size == (entry.input_size, entry.input_size)
    assert np.allclose(p.mean, entry.mean) and np.allclose(p.std, entry.std)
    assert p.interpolation == entry.interpolation
    assert loaded.embed_dim == 32
    from open_clip.transformer import QuickGELU

    quick = any(isinstance(m, QuickGELU) for m in loaded.model.modules())
    assert quick == arch.endswith("-quickgelu")  # OpenAI weights were trained with QuickGELU
    tf = p.open_clip_transform()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            for h, w in ((300, 400), (450, 600))]
    batch = torch.stack([tf(im) for im in imgs])
    assert batch.shape == (2, 3, entry.input_size, entry.input_size)
    with torch.no_grad():
        feats = loaded.model.encode_image(batch)
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()
    assert loaded.encode_text(["a dermoscopic image of melanoma."]).shape == (1, 32)


def test_biomedclip_builds_or_says_it_needs_transformers():
    e = derm_models.by_name("biomedclip")
    if "transformers" not in e.missing_packages():
        pytest.skip("transformers is installed: building BiomedCLIP offline would need its "
                    "BiomedBERT config in the local HF cache (not built in this test yet)")
    for name in ("biomedclip", e.model):  # the short name and the id itself
        with pytest.raises(ModelError) as info:
            load_model(ModelSpec(name))
        msg = str(info.value)
        assert "\n" not in msg and "transformers" in msg and "pip install" in msg


def test_panderm_needs_the_fork_in_one_line():
    for name in ("dermlip-panderm", "hf-hub:redlessone/DermLIP_PanDerm-base-w-PubMed-256"):
        with pytest.raises(ModelError) as info:
            load_model(ModelSpec(name))
        msg = str(info.value)
        assert "\n" not in msg and "Derm1M fork" in msg and "not built" in msg


def test_registry_entries_are_consistent():
    """Guards edits of derm_models.json: ids well formed, architectures and tags known to this
    open_clip, short names lowercase, checkpoint entries say where the file comes from."""
    import open_clip

    from skincache.models import pretrained_tags

    for e in derm_models.registry().values():
        assert e.name == e.name.lower() and " " not in e.name, e.name
        if e.is_hub:
            assert e.repo_id.count("/") == 1 and e.pretrained is None, e.name
        else:
            assert e.model in open_clip.list_models(), e.name
            if e.pretrained:
                assert e.pretrained in pretrained_tags(e.model), e.name
        assert e.weights in ("hub", "checkpoint") and (e.weights == "hub") == (
            not e.checkpoint_note), e.name
        assert len(e.mean) == len(e.std) == 3 and e.input_size > 0, e.name
        assert e.verified, f"{e.name}: say what was checked"
        assert derm_models.entry_for(e.name) is e
        if e.is_hub:
            assert derm_models.entry_for(e.model) is e


def test_short_names_resolve_to_ids_and_tags():
    assert ModelSpec("dermlip-b16").name == "hf-hub:redlessone/DermLIP_ViT-B-16"
    assert ModelSpec("DermLIP-B16").name == "hf-hub:redlessone/DermLIP_ViT-B-16"
    assert ModelSpec("ViT-B-16").name == "ViT-B-16"  # anything else is left alone
    assert resolve_pretrained("clip-b16", None) == "openai"
    assert resolve_pretrained("clip-b16", "") is None  # random init stays possible
    assert resolve_pretrained("dermlip-b16", None) is None  # the hub id brings its weights
    assert ModelSpec("clip-b16", "openai").name == "ViT-B-16-quickgelu"


def test_monet_needs_a_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="--checkpoint FILE") as info:
        resolve_pretrained("monet", None)
    assert "\n" not in str(info.value)
    ckpt = tmp_path / "monet.pt"
    ckpt.write_bytes(b"x")
    assert resolve_pretrained("monet", None, str(ckpt)) is None
    assert ModelSpec("monet", None, str(ckpt)).name == "ViT-L-14-quickgelu"


def test_gated_model_without_token_is_one_line(offline_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    gated = dataclasses.replace(derm_models.by_name("make"), gated=True)
    msg = derm_models.load_problem(gated)
    assert "\n" not in msg and "gated" in msg and "HF_TOKEN" in msg
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert derm_models.load_problem(gated) == ""


def test_hub_refusing_access_is_one_line_naming_the_token(monkeypatch):
    """A 401 from the Hub (a gated repo, no token) is one line saying what to do, whatever
    open_clip wraps it in."""
    import open_clip

    def refuse(*a, **k):
        try:
            raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/x\n"
                          "Access to model x is restricted.")
        except OSError as inner:
            raise RuntimeError("Failed initial config/weights load from HF Hub x") from inner

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import skincache.data.fetch as fetch

    monkeypatch.setattr(fetch, "check_online", lambda *a, **k: None)  # "online"
    with pytest.raises(ModelError) as info:
        load_model(ModelSpec("dermfm-zero"))
    msg = str(info.value)
    assert "\n" not in msg and "HF_TOKEN" in msg and "redlessone/DermFM-Zero" in msg


def test_status_says_cached_once_the_snapshot_is_in_the_local_cache(offline_hub):
    from skincache.models import derm_status

    e = derm_models.by_name("dermlip-b16")
    assert derm_status(e) == "yes, from the Hub"
    hub_snapshot(offline_hub, e.repo_id, _tiny_cfg(), {})
    assert derm_status(e) == "yes, cached"
    biomed = derm_models.by_name("biomedclip")
    assert derm_status(biomed).startswith("no: needs") == bool(biomed.missing_packages())


def test_models_derm_lists_every_entry():
    r = runner.invoke(app, ["models", "--derm"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for e in derm_models.registry().values():
        assert e.name in r.output and e.model in r.output
    assert "needs the Derm1M fork" in r.output


def test_unknown_short_name_is_one_line_with_the_known_ones(tmp_path):
    from skincache._options import check_model

    check_model("dermlip-b16")  # known: no error
    with pytest.raises(UsageError) as info:
        check_model("dermlip-b32")
    msg = str(info.value)
    assert "did you mean dermlip-b16" in msg and "\n" not in msg
    for name in derm_models.short_names():
        assert name in msg
    r = runner.invoke(app, ["encode", "--data", str(tmp_path), "--model", "dermlip-b32"])
    assert r.exit_code != 0 and "dermlip-b16" in r.output
    assert "Traceback" not in r.output

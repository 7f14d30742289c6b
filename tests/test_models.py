"""Model loading: the shipped tiny config, checkpoints, and failing fast without a network."""

from __future__ import annotations

import time

import pytest
import torch
from huggingface_hub import constants

from skincache.models import TINY_MODEL, ModelSpec, file_sha256, load_model


def test_tiny_model_is_deterministic_and_records_its_preprocessing(tiny_model):
    again = load_model(ModelSpec(TINY_MODEL))
    assert again.weights_sha256 == tiny_model.weights_sha256
    assert tiny_model.preprocess.size == (64, 64) and tiny_model.embed_dim == 64
    assert tiny_model.preprocess.interpolation == "bicubic"


def test_local_checkpoint_loads_with_weights_only_and_changes_identity(tiny_model, tmp_path):
    sd = {k: v.clone() for k, v in tiny_model.model.state_dict().items()}
    sd["visual.proj"] = sd["visual.proj"] * 2
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd}, path)
    spec = ModelSpec(TINY_MODEL, None, str(path))
    loaded = load_model(spec)
    assert torch.equal(loaded.model.state_dict()["visual.proj"], sd["visual.proj"])
    assert loaded.weights_sha256 != tiny_model.weights_sha256
    assert spec.identity()["checkpoint_sha256"] == file_sha256(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(ModelSpec(TINY_MODEL, None, str(tmp_path / "none.pt")))


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(RuntimeError, match="unknown model 'ViT-Nope'"):
        load_model(ModelSpec("ViT-Nope", "openai"))


def test_hub_weights_fail_fast_without_network(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not in the local Hugging Face cache"):
        load_model(ModelSpec("hf-hub:skincache-tests/not-a-model"))
    assert time.monotonic() - t0 < 30
    assert constants.HF_HUB_OFFLINE is False  # offline mode was only for the load


def test_a_quickgelu_tag_builds_quickgelu_on_a_gelu_architecture():
    """open_clip 3.x builds `ViT-B-32` with GELU even for the `openai` tag (trained with
    QuickGELU) and only warns; load_model asks for the activation the tag's metadata names."""
    from skincache.models import ModelSpec, _tag_wants_quick_gelu

    assert _tag_wants_quick_gelu(ModelSpec("ViT-B-32", "openai"))
    assert _tag_wants_quick_gelu(ModelSpec("ViT-L-14", "dfn2b"))
    assert not _tag_wants_quick_gelu(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert not _tag_wants_quick_gelu(ModelSpec("ViT-B-32-quickgelu", "openai"))
    assert not _tag_wants_quick_gelu(ModelSpec("ViT-B-32", None))


def test_load_model_passes_the_tags_activation_to_open_clip(monkeypatch):
    """No weights can be downloaded here: open_clip.create_model is replaced by a recorder."""
    import open_clip

    from skincache.errors import ModelError
    from skincache.models import ModelSpec, load_model

    seen = {}

    def record(name, **kw):
        seen.update(kw, name=name)
        raise RuntimeError("recorded")

    monkeypatch.setattr(open_clip, "create_model", record)
    with pytest.raises(ModelError):
        load_model(ModelSpec("ViT-B-32", "openai"))
    assert seen["name"] == "ViT-B-32" and seen["force_quick_gelu"] is True
    with pytest.raises(ModelError):
        load_model(ModelSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert seen["force_quick_gelu"] is False

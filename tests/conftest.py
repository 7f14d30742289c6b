"""Shared fixtures: the shipped tiny model, a small synthetic dataset, the real data if present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the real data: $SKINCACHE_SHARED_DATA, else ../shared/data beside the repository
SHARED_DATA = Path(os.environ.get("SKINCACHE_SHARED_DATA")
                   or REPO / ".." / "shared" / "data").resolve()


def shared_data(sub: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it lives outside the repo)")
    return path


@pytest.fixture
def ham10000_dir() -> Path:
    """The real HAM10000 images (200x150) and metadata, or skip."""
    return shared_data("ham10000")


@pytest.fixture
def isic2018_dir() -> Path:
    """The real ISIC 2018 Task 3 test images and ground truth, or skip."""
    return shared_data("isic2018-test")


@pytest.fixture(scope="session")
def tiny_model():
    from skincache.models import TINY_MODEL, ModelSpec, load_model

    return load_model(ModelSpec(TINY_MODEL))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from skincache.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n_images=70, seed=0)


@pytest.fixture(scope="session")
def demo_dataset(demo_root):
    from skincache.data import load_dataset

    return load_dataset(demo_root)


@pytest.fixture(scope="session")
def demo_cache(demo_dataset, tmp_path_factory) -> Path:
    """The demo dataset encoded with the tiny model, K=2 (shared by the head/run tests)."""
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    res = encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=2),
                         cache_dir=tmp_path_factory.mktemp("cache"), device="cpu",
                         num_workers=0, progress=False)
    return res.path

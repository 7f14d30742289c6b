"""Shared fixtures: the shipped tiny model, a small synthetic dataset, the real data if present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: the real data: $SKINCACHE_SHARED_DATA, else ../shared/data beside the repository
SHARED_DATA = Path(os.environ.get("SKINCACHE_SHARED_DATA")
                   or REPO / ".." / "shared" / "data").resolve()


SYNTHETIC_CLASSES = ("akiec", "bcc", "nv")


def synthetic_cache(path: Path, n: int = 360, d: int = 16, seed: int = 0,
                    cache_key: str | None = None
                    ) -> Path:
    """A cache written from arrays (no model): three separable-ish classes; lesions of 1-3
    images (every 7th image has no lesion id), split train/val/test by lesion. The same `seed`
    gives the same images, labels and splits whatever `d` is (two stand-in encoders of one
    dataset); `cache_key` names the encoding (default `synthetic-<seed>`)."""
    from skincache.cache import CacheHeader, SplitArrays, write_cache

    rng = np.random.default_rng(seed)
    labels, groups, lesion = [], [], 0
    while len(labels) < n:
        c = int(rng.choice(len(SYNTHETIC_CLASSES), p=[0.2, 0.3, 0.5]))
        for _ in range(int(rng.integers(1, 4))):
            labels.append(c)
            groups.append("" if len(labels) % 7 == 0 else f"L{lesion}")
        lesion += 1
    y = np.array(labels[:n])
    g = np.array(groups[:n])
    # drawn after the labels, from their own stream: the labels do not depend on d
    centres = np.random.default_rng([seed, d]).normal(size=(len(SYNTHETIC_CLASSES), d)) * 1.5
    x = (centres[y] + rng.normal(size=(n, d))).astype(np.float16)
    views = (x[:, None, :] + 0.1 * rng.normal(size=(n, 2, d))).astype(np.float16)
    # split by lesion: last digit of the lesion number (no-lesion images by their row)
    key = np.array([int(s[1:]) if s else i for i, s in enumerate(g)]) % 10
    where = np.where(key < 6, "train", np.where(key < 8, "val", "test"))
    splits = {}
    for name in ("train", "val", "test"):
        m = where == name
        splits[name] = SplitArrays(features=x[m], views=views[m], labels=y[m],
                                   image_id=[f"img{i}" for i in np.flatnonzero(m)],
                                   group_id=list(g[m]), sha1=[""] * int(m.sum()), meta={})
    header = CacheHeader(
        key=cache_key or f"synthetic-{seed}-d{d}", model="synthetic", pretrained="none",
        logit_scale=100.0,
        weights_sha256="", embed_dim=d, precision="fp16", classes=list(SYNTHETIC_CLASSES),
        class_names=list(SYNTHETIC_CLASSES), preprocess={}, views={"k": 2}, dataset="synthetic",
        dataset_kind="synthetic", dataset_root="", dataset_fingerprint="", versions={})
    write_cache(path, header, splits, {}, {})
    return path


_CLI_IN_FRESH_PROCESS = (
    "import json, sys\n"
    "from typer.testing import CliRunner\n"
    "from skincache.cli import app\n"
    "out = []\n"
    "for args in json.loads(sys.argv[1]):\n"
    "    r = CliRunner().invoke(app, args)\n"
    "    out.append([r.exit_code, r.output, sorted(m for m in ('torch', 'open_clip')\n"
    "                                             if m in sys.modules)])\n"
    "print(json.dumps(out))\n")


def cli_in_fresh_process(arg_lists: list[list[str]]) -> list[tuple[int, str, list[str]]]:
    """Each CLI invocation's (exit code, output, heavy modules loaded: torch / open_clip),
    all in one new Python process, so that "refused before torch loads" is a fact about a
    process that had not imported torch, not about the test session (which has)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CLI_IN_FRESH_PROCESS, json.dumps(arg_lists)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


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

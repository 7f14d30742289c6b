"""`skincache demo`: the whole encode path, offline, on synthetic HAM10000-shaped data."""

from __future__ import annotations

from pathlib import Path

from skincache.data import load_dataset, make_demo_dataset
from skincache.encode import DEFAULT_CACHE_DIR, EncodeResult, encode_dataset
from skincache.models import TINY_MODEL, ModelSpec
from skincache.views import ViewPolicy


def run_demo(cache_dir: str | Path = DEFAULT_CACHE_DIR, *, n_images: int = 280, seed: int = 0,
             views: int = 2, data_dir: str | Path | None = None,
             progress: bool = True) -> EncodeResult:
    """Generate the synthetic dataset (deterministic by seed; kept between runs) and encode it
    with the shipped tiny model on the CPU. A second run is a no-op that says so."""
    cache_dir = Path(cache_dir)
    root = make_demo_dataset(Path(data_dir) if data_dir else cache_dir / "demo-data",
                             n_images=n_images, seed=seed)
    ds = load_dataset(root)
    ds.name = f"demo-s{seed}"
    return encode_dataset(ds, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=views),
                          cache_dir=cache_dir, device="cpu", progress=progress)

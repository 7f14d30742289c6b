"""skincache: encode skin-lesion images once with open_clip, then train heads in seconds.

The public Python API (the CLI is a thin layer over these)::

    from skincache import load_dataset, ModelSpec, ViewPolicy, encode_dataset, FeatureCache
    ds = load_dataset("../data/HAM10000")
    result = encode_dataset(ds, ModelSpec("ViT-B-32", "openai"), policy=ViewPolicy(k=4))
    cache = FeatureCache.open(result.path)
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning. Set before torch loads (a default only: an
# explicit OMP_WAIT_POLICY wins). On a machine shared with other processes, spinning threads
# that wait for a descheduled sibling made a head fit 2-3x slower here (logreg C sweep with 3
# busy processes on 2 cores: 34.4 s spinning, 14.5 s passive).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from skincache._io import __version__  # noqa: E402

_EXPORTS = {
    "load_dataset": "skincache.data",
    "make_demo_dataset": "skincache.data",
    "audit_dataset": "skincache.data",
    "Dataset": "skincache.data",
    "Record": "skincache.data",
    "ModelSpec": "skincache.models",
    "load_model": "skincache.models",
    "ViewPolicy": "skincache.views",
    "encode_dataset": "skincache.encode",
    "FeatureCache": "skincache.cache",
    "fit_head_run": "skincache.runs",
    "evaluate_run": "skincache.runs",
    "predict_images": "skincache.predict",
    "bench_heads": "skincache.bench",
    "create_head": "skincache.heads",
    "load_head": "skincache.heads",
    "FinetuneConfig": "skincache.finetune",
    "FinetuneResult": "skincache.finetune",
    "run_finetune": "skincache.finetune",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Lazy re-exports: `import skincache` stays cheap (no torch until something needs it)."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'skincache' has no attribute {name!r}")

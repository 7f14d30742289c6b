"""Near-duplicate images across splits, found through the cache's features (faiss).

Byte-identical files are caught by sha1 (`skincache.data.audit`); the same lesion photographed
twice, re-compressed or resized is not. Pairs of images in different splits whose clean-view
features have cosine similarity above a threshold are candidates to look at. Search is exact
up to `IVF_THRESHOLD` images in the searched split and IVF above (the kNN head's index): each
split's float16 features are normalised into one float32 copy, never the whole cache at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skincache.cache import FeatureCache
from skincache.defaults import SPLIT_RATIOS
from skincache.errors import UsageError
from skincache.heads.knn import IVF_THRESHOLD, build_ip_index, unit_rows


def near_duplicates(cache: FeatureCache, threshold: float = 0.95,
                    per_image: int = 5, index: str = "auto",
                    ivf_threshold: int = IVF_THRESHOLD) -> list[dict]:
    """Cross-split pairs with cosine similarity >= threshold, most similar first.

    Each image contributes at most its `per_image` most similar images of every later split,
    so the report stays bounded (N x per_image) even when a threshold is too low for the
    model (a random-initialised model puts every pair above 0.95)."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    names = list(cache.splits)
    pairs: list[dict] = []
    for i, a in enumerate(names):
        xa = unit_rows(cache.splits[a].features16)
        for b in names[i + 1:]:
            sb = cache.splits[b]
            found = build_ip_index(unit_rows(sb.features16), index, threshold=ivf_threshold)
            sims, rows = found.search(xa, min(per_image, len(sb)))
            for qa, j in zip(*np.nonzero(sims >= threshold), strict=True):
                rb = rows[qa, j]
                ga, gb = cache.splits[a].group_id[qa], sb.group_id[rb]
                pairs.append({
                    "split_a": a, "image_a": str(cache.splits[a].image_id[qa]),
                    "split_b": b, "image_b": str(sb.image_id[rb]),
                    "similarity": float(sims[qa, j]), "same_group": bool(ga and ga == gb),
                })
    pairs.sort(key=lambda p: -p["similarity"])
    return pairs


@dataclass
class Audit:
    """What `audit` found: `report` is the JSON `skincache audit --json` writes (the dataset's
    leak report, and `near_duplicates` when a cache was searched); the rest is for showing it."""

    report: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)  # of the dataset (empty: no --data)
    split_origin: dict[str, Any] = field(default_factory=dict)
    pairs: list[dict] | None = None  # None: no cache searched
    threshold: float = 0.95
    random_note: str | None = None  # the cache's model is random-initialised: pairs mean little


def audit(data: str | None = None, cache: str | Path | None = None, *,
          threshold: float = 0.95, per_image: int = 5,
          split_ratios: tuple[float, ...] = SPLIT_RATIOS, split_seed: int = 0,
          test: str | None = None, split_file: str | Path | None = None,
          drop_lesion_mates: bool = False, hash_images: bool = True,
          progress: bool = True) -> Audit:
    """The split-leakage audit of a dataset (lesions in several splits, byte-identical
    images) and/or of a cache (near-identical images across splits by feature), as one report:
    the library builds the JSON so that `--json` and a caller get the same document."""
    from skincache._progress import progress_bar
    from skincache._sanity import random_init_warning
    from skincache.data import audit_dataset, load_dataset

    found = Audit(threshold=threshold)
    if data is not None:
        ds = load_dataset(data, split_ratios=split_ratios, seed=split_seed, test=test,
                          split_file=split_file, drop_lesion_mates=drop_lesion_mates)
        found.classes, found.split_origin = list(ds.classes), dict(ds.split_origin or {})
        with progress_bar(len(ds), "hash images", enabled=progress and hash_images) as adv:
            found.report = audit_dataset(ds, hash_images=hash_images, progress=adv).to_dict()
    if cache is not None:
        fc = FeatureCache.open(cache)
        found.pairs = near_duplicates(fc, threshold, per_image)
        found.random_note = random_init_warning(fc.attrs, "feature similarities, and so these "
                                                          "near-duplicate pairs,")
        found.report["near_duplicates"] = {"threshold": threshold, "pairs": found.pairs,
                                           "random_init_model": bool(found.random_note)}
    return found

"""Near-duplicate images across splits, found through the cache's features (faiss).

Byte-identical files are caught by sha1 (`skincache.data.audit`); the same lesion photographed
twice, re-compressed or resized is not. Pairs of images in different splits whose clean-view
features have cosine similarity above a threshold are candidates to look at. Search is exact
up to `IVF_THRESHOLD` images in the searched split and IVF above (the kNN head's index): each
split's float16 features are normalised into one float32 copy, never the whole cache at once.
"""

from __future__ import annotations

import numpy as np

from skincache.cache import FeatureCache
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

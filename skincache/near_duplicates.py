"""Near-duplicate images across splits, found through the cache's features (faiss).

Byte-identical files are caught by sha1 (`skincache.data.audit`); the same lesion photographed
twice, re-compressed or resized is not. Pairs of images in different splits whose clean-view
features have cosine similarity above a threshold are candidates to look at.
"""

from __future__ import annotations

import faiss
import numpy as np

from skincache.cache import FeatureCache
from skincache.errors import UsageError


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def near_duplicates(cache: FeatureCache, threshold: float = 0.95,
                    per_image: int = 5) -> list[dict]:
    """Cross-split pairs with cosine similarity >= threshold, most similar first.

    Each image contributes at most its `per_image` most similar images of every later split,
    so the report stays bounded (N x per_image) even when a threshold is too low for the
    model (a random-initialised model puts every pair above 0.95)."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    names = list(cache.splits)
    pairs: list[dict] = []
    for i, a in enumerate(names):
        xa = _unit(cache.splits[a].features)
        for b in names[i + 1:]:
            sb = cache.splits[b]
            index = faiss.IndexFlatIP(xa.shape[1])
            index.add(_unit(sb.features))
            sims, rows = index.search(xa, min(per_image, len(sb)))
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

"""Near-duplicate images across splits, found through the cache's features (faiss).

Byte-identical files are caught by sha1 (`skincache.data.audit`); the same lesion photographed
twice, re-compressed or resized is not. Pairs of images in different splits whose clean-view
features have cosine similarity above a threshold are candidates to look at.
"""

from __future__ import annotations

import faiss
import numpy as np

from skincache.cache import FeatureCache


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def near_duplicates(cache: FeatureCache, threshold: float = 0.95) -> list[dict]:
    """Cross-split pairs with cosine similarity >= threshold, most similar first."""
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    names = list(cache.splits)
    pairs: list[dict] = []
    for i, a in enumerate(names):
        xa = _unit(cache.splits[a].features)
        for b in names[i + 1:]:
            sb = cache.splits[b]
            index = faiss.IndexFlatIP(xa.shape[1])
            index.add(_unit(sb.features))
            lims, sims, rows = index.range_search(xa, float(threshold))
            for qa in range(len(xa)):
                for s, rb in zip(sims[lims[qa]:lims[qa + 1]], rows[lims[qa]:lims[qa + 1]],
                                 strict=True):
                    ga, gb = cache.splits[a].group_id[qa], sb.group_id[rb]
                    pairs.append({
                        "split_a": a, "image_a": str(cache.splits[a].image_id[qa]),
                        "split_b": b, "image_b": str(sb.image_id[rb]),
                        "similarity": float(s), "same_group": bool(ga and ga == gb),
                    })
    pairs.sort(key=lambda p: -p["similarity"])
    return pairs

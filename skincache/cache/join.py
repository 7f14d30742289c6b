"""Are several caches of the same images? The one check behind every multi-cache feature.

Two encoders of one dataset (fusion in `fit-head --cache A --cache B`, the encoder table of
`bench-encoders`) can only be compared or joined image by image when the caches hold the same
images, in the same order, with the same labels, groups and splits. This module says so or
names the first difference; it reads ids, labels and groups only (never features).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from skincache.cache.reader import FeatureCache
from skincache.cache.schema import CacheError


def _first_diff(a: np.ndarray, b: np.ndarray) -> int | None:
    if len(a) != len(b):
        return min(len(a), len(b))
    bad = np.flatnonzero(np.asarray(a) != np.asarray(b))
    return int(bad[0]) if bad.size else None


def check_aligned(caches: Sequence[FeatureCache], splits: Sequence[str] | None = None) -> None:
    """Raise one `CacheError` naming both files and the first mismatch (class list, split
    names, split sizes, then per split the first image whose id, label or group differs) unless
    every cache holds the same images in the same order with the same labels and splits.

    `splits`: only these splits (default: every split of the first cache, and the caches must
    have the same split names)."""
    if len(caches) < 2:
        return
    ref = caches[0]
    for other in caches[1:]:
        where = f"{other.path} vs {ref.path}"
        if list(other.classes) != list(ref.classes):
            raise CacheError(f"{where}: different class lists ({other.classes} vs "
                             f"{ref.classes})")
        names = list(splits) if splits is not None else list(ref.splits)
        if splits is None and sorted(other.splits) != sorted(ref.splits):
            raise CacheError(f"{where}: different splits ({sorted(other.splits)} vs "
                             f"{sorted(ref.splits)})")
        for name in names:
            a, b = ref.split(name), other.split(name)
            if len(a) != len(b):
                raise CacheError(f"{where}: split '{name}' has {len(b)} images vs {len(a)}")
            for col in ("image_id", "labels", "group_id"):
                i = _first_diff(getattr(a, col), getattr(b, col))
                if i is not None:
                    ida = str(a.image_id[i]) if i < len(a) else "?"
                    raise CacheError(
                        f"{where}: split '{name}' differs at row {i} (image {ida}): "
                        f"{col} {getattr(b, col)[i]!r} vs {getattr(a, col)[i]!r}")

"""What the model "sees": concept scores of cached images, per class and per image.

`concept_scores(cache, split)` scores every image of a split against the cache's concept prompts
(`concepts.ConceptBank.presence`, MONET's contrast against reference prompts, at the model's
logit scale) and z-scores each concept with the mean and spread of the **train** split's
scores, whichever split is asked for: val and test rows are scored, never used to fit anything.
`concept_report` is `skincache concepts`: the per-class mean table, the heatmap PNG, and one
image's scores with `image`. No image tower runs: the cache holds the features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from skincache._disk import disk_error
from skincache._sanity import is_random_init
from skincache._sanity import model_label as _model_label
from skincache.cache import CacheError, FeatureCache
from skincache.concepts import ConceptBank, Standardizer
from skincache.errors import NotFoundError
from skincache.plots import plot_concept_heatmap

#: the split whose scores set each concept's mean and spread
STANDARDIZE_ON = "train"


def concept_bank(cache: FeatureCache) -> ConceptBank | None:
    """The cache's concept embeddings (`/concepts/`), or None for a cache without them."""
    if not getattr(cache, "concepts", None):  # a cache written before concepts
        return None
    try:
        return ConceptBank.from_arrays(cache.concepts)
    except ValueError as e:
        raise CacheError(f"{cache.path}: /concepts/: {e}; re-encode it") from None


def model_label(attrs: dict) -> str:
    return _model_label(str(attrs.get("model", "?")), attrs.get("pretrained"),
                        attrs.get("checkpoint"))


def _bank(cache: FeatureCache) -> ConceptBank:
    bank = concept_bank(cache)
    if bank is None:
        raise CacheError(f"{cache.path}: no concept embeddings (/concepts/): encoded before "
                         "concepts existed or with --no-concepts; re-encode it (the same "
                         "`skincache encode` command writes a new cache with them)")
    return bank


def _presence(cache: FeatureCache, bank: ConceptBank, split: str) -> np.ndarray:
    data = cache.split(split)
    parts = [bank.presence(block, cache.logit_scale) for _, block in data.batches()]
    return np.concatenate(parts) if parts else np.zeros((0, len(bank.names)), np.float32)


def concept_scores(cache: FeatureCache | str | Path, split: str = "test"
                   ) -> tuple[np.ndarray, list[str]]:
    """(scores [N, n_concepts], concept names) for the rows of `split`, in the split's order:
    MONET presence scores z-scored per concept with the train split's mean and spread (the
    standardisation never looks at val or test rows)."""
    fc = cache if isinstance(cache, FeatureCache) else FeatureCache.open(cache)
    bank = _bank(fc)
    fc.split(split)  # a missing split: one line before any scoring
    train = _presence(fc, bank, STANDARDIZE_ON)
    std = Standardizer.fit(train)
    raw = train if split == STANDARDIZE_ON else _presence(fc, bank, split)
    return std(raw).astype(np.float32), list(bank.names)


@dataclass
class ConceptReport:
    """What `skincache concepts` shows: per-class means (z-scores) of one split, and one
    image's scores when asked for."""

    cache: Path
    split: str
    names: list[str]
    classes: list[str]
    means: np.ndarray  # [C, K] mean z-score per class (NaN: no image of the class)
    counts: list[int]
    model: str
    cache_attrs: dict = field(default_factory=dict)  # for the random-weights warning
    plot: Path | None = None
    image: dict = field(default_factory=dict)  # id, split, label, scores {concept: z}

    @property
    def random_init(self) -> bool:
        """Scores of a random-initialised model: they mean nothing about lesions."""
        return is_random_init(self.cache_attrs)


def concept_report(cache: str | Path, *, split: str = STANDARDIZE_ON, image: str | None = None,
                   plot: str | Path | None = None) -> ConceptReport:
    """The per-class mean concept scores of `split` (z-scored against the train split), the
    heatmap written to `plot` (default: `<cache stem>.concepts-<split>.png` beside the cache),
    and with `image` that image's scores (looked up in every split)."""
    fc = FeatureCache.open(cache)
    scores, names = concept_scores(fc, split)
    y = fc.split(split).labels
    c = len(fc.classes)
    counts = [int((y == i).sum()) for i in range(c)]
    means = np.full((c, len(names)), np.nan)
    for i in range(c):
        if counts[i]:
            means[i] = scores[y == i].mean(axis=0)
    label = f"{model_label(fc.attrs)} · {fc.header.dataset} {split} split (n={len(y):,})"
    out = Path(plot) if plot else fc.path.with_name(f"{fc.path.stem}.concepts-{split}.png")
    report = ConceptReport(fc.path, split, names, list(fc.classes), means, counts,
                           model_label(fc.attrs), dict(fc.attrs))
    try:
        report.plot = plot_concept_heatmap(means, names, fc.classes, counts, out, label=label)
    except OSError as e:
        de = disk_error(e, out, "writing")
        if de is None:
            raise
        raise de from None
    if image is not None:
        report.image = _one_image(fc, image, split, scores)
    return report


def _one_image(fc: FeatureCache, image: str, split: str, scores: np.ndarray) -> dict:
    for name, data in fc.splits.items():
        rows = np.flatnonzero(np.asarray(data.image_id, dtype=object) == image)
        if len(rows):
            s = scores if name == split else concept_scores(fc, name)[0]
            row = s[int(rows[0])]
            return {"id": image, "split": name, "label": fc.classes[int(data.labels[rows[0]])],
                    "scores": {n: float(v) for n, v in zip(_bank(fc).names, row, strict=True)}}
    raise NotFoundError(f"{fc.path}: no image {image!r} in any split (ids are as `skincache "
                        "info` counts them, e.g. ISIC_0024306)")

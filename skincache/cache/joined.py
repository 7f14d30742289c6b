"""Several caches of the same images as one: early fusion of encoders, with the split
interface every head and run already reads.

`join_caches([A, B])` checks that the caches hold the same images, labels, groups and splits
(`check_aligned`), then offers what `FeatureCache` offers (`splits`, `split(name)`, `text`,
`classes`, `key`, `encoding_key`, `header`, `attrs`), with each image's features joined: each
cache's block L2-normalised, then concatenated, so no encoder outweighs another by its scale or
width. The augmented views are paired by index (view j of A beside view j of B; K is the
smaller view count). The text is joined the same way, per template set, when every cache has
it for the same classes and templates; a zero-shot head on the joined text then scores the sum
of each encoder's cosine logits. Otherwise `text` is empty and `text_problem` says why.

Nothing is read until a split's column is asked for; joined arrays are float32 in memory.
HDF5 and numpy only, like the rest of `cache/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from skincache.cache.join import check_aligned
from skincache.cache.reader import FeatureCache, SplitData
from skincache.cache.schema import CacheError, CacheHeader


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows L2-normalised along the last axis, as float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def join_blocks(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Each block L2-normalised along its last axis, then concatenated there: [..., sum D]."""
    return np.concatenate([_unit(b) for b in blocks], axis=-1)


def _digest(parts: Sequence[str]) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class JoinedSplit(SplitData):
    """One split of a `JoinedCache`: features and views joined on first use; ids, labels,
    groups and metadata are the first cache's (`check_aligned` made them everyone's)."""

    def __init__(self, parts: Sequence[SplitData], k: int):
        super().__init__()
        self._parts = list(parts)
        self._k = k

    def _get(self, col: str) -> np.ndarray:
        if col not in self._have:
            if col == "features":
                self._have[col] = join_blocks([p.features16 for p in self._parts])
            elif col == "views":
                self._have[col] = join_blocks([p.views16[:, :self._k] for p in self._parts])
            else:
                self._have[col] = getattr(self._parts[0], col)
        return self._have[col]

    def _get16(self, col: str) -> np.ndarray:
        return self._get(col)  # joined arrays are float32: there is no stored float16 copy

    @property
    def meta(self) -> dict[str, np.ndarray]:
        return self._parts[0].meta

    @property
    def n_views(self) -> int:
        return self._k

    def __len__(self) -> int:
        return len(self._parts[0])

    def release(self) -> None:
        self._have.clear()
        for p in self._parts:
            p.release()


class JoinedCache:
    """Caches of the same images, features joined per image (module docstring). Built by
    `join_caches`; `parts` are the caches, `dims` their feature widths in joined order."""

    def __init__(self, parts: Sequence[FeatureCache]):
        self.parts = list(parts)
        self.dims = [int(c.header.embed_dim) for c in self.parts]
        ks = [min(c.split(s).n_views for s in c.splits) if c.splits else 0 for c in self.parts]
        self.n_views = min(ks)
        #: what a caller should say beside the results (views cut to the smaller count)
        self.notes: list[str] = []
        if len(set(ks)) > 1:
            self.notes.append(f"views paired by index: K = {self.n_views} (the caches have "
                              f"{', '.join(map(str, ks))} augmented views)")
        self.splits: dict[str, SplitData] = {
            s: JoinedSplit([c.split(s) for c in self.parts], self.n_views)
            for s in self.parts[0].splits}
        self.text, self.text_problem = self._join_text()
        self.failed: list[dict] = []

    # -- what FeatureCache offers
    @property
    def path(self) -> Path:
        """The first cache's path (messages and plots name it; `paths` lists them all)."""
        return self.parts[0].path

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self.parts]

    @property
    def key(self) -> str:
        return "joined-" + _digest([c.key for c in self.parts])

    @property
    def encoding_key(self) -> str:
        """What the joined features mean: the encodings, in order (so a fused head may be
        evaluated on another dataset encoded by the same models, given in the same order)."""
        return "joined-" + _digest([c.encoding_key for c in self.parts])

    @property
    def classes(self) -> list[str]:
        return self.parts[0].classes

    @property
    def class_names(self) -> list[str]:
        return self.parts[0].class_names

    @property
    def concepts(self) -> dict[str, np.ndarray]:
        """None to offer: concept prompts live in one encoder's text space (a concept head
        on fused caches is refused by `runs.check_fusion`)."""
        return {}

    @property
    def logit_scale(self) -> float:
        return float(np.mean([c.logit_scale for c in self.parts]))

    def split(self, name: str) -> SplitData:
        if name not in self.splits:
            raise CacheError(f"{self.path}: no split '{name}' (has {list(self.splits)})")
        return self.splits[name]

    @cached_property
    def header(self) -> CacheHeader:
        """The first cache's header, naming every model (`A+B`) and the joined width."""
        h = [c.header for c in self.parts]
        return dataclasses.replace(
            h[0], key=self.key, model="+".join(x.model for x in h),
            pretrained="+".join(x.pretrained or "none" for x in h),
            embed_dim=sum(self.dims), logit_scale=self.logit_scale,
            views={**h[0].views, "k": self.n_views})

    @cached_property
    def attrs(self) -> dict:
        """The attributes warnings read: those of a part with random weights (no pretrained
        tag, checkpoint or hub weights) if there is one, so that its warning names it; else
        the first cache's."""
        def random_init(a: dict) -> bool:
            return not (a.get("pretrained") or a.get("checkpoint") or a.get("checkpoint_sha256")
                        or str(a.get("model", "")).startswith("hf-hub:"))

        return dict(next((c.attrs for c in self.parts if random_init(c.attrs)),
                         self.parts[0].attrs))

    def records(self) -> list[dict]:
        """One entry per cache for run.json: path, key, encoding key, model, width."""
        return [{"path": str(c.path.resolve()), "key": c.key, "encoding_key": c.encoding_key,
                 "model": c.header.model, "pretrained": c.header.pretrained or "",
                 "dim": d} for c, d in zip(self.parts, self.dims, strict=True)]

    # -- text
    def _join_text(self) -> tuple[dict[str, np.ndarray], str]:
        """(template set -> joined [C, T, sum D], "") or ({}, why the text cannot be joined)."""
        for c in self.parts:
            if not c.text:
                return {}, f"{c.path} has no text features"
            if list(c.class_names) != list(self.parts[0].class_names):
                return {}, (f"{c.path} has other class names than {self.parts[0].path} "
                            "(its prompts say other things)")
        names = [n for n in self.parts[0].text if all(n in c.text for c in self.parts)]
        joined = {}
        for n in names:
            shapes = [c.text[n].shape[:2] for c in self.parts]
            if len(set(shapes)) == 1:
                joined[n] = join_blocks([c.text[n] for c in self.parts])
        if not joined:
            return {}, ("the caches share no template set with the same classes and "
                        "templates")
        return joined, ""


def join_caches(caches: Sequence[FeatureCache]) -> JoinedCache:
    """The caches as one `JoinedCache`, after `check_aligned` (one CacheError naming both
    files and the first mismatch). Fewer than two caches, or one cache given twice, is an
    error: there is nothing to fuse."""
    if len(caches) < 2:
        raise CacheError("fusion needs two or more caches")
    seen: dict[str, Path] = {}
    for c in caches:
        if c.key in seen:
            raise CacheError(f"{c.path}: the same cache as {seen[c.key]} (key {c.key}); "
                             "fuse caches of different encoders")
        seen[c.key] = c.path
    check_aligned(caches)
    return JoinedCache(caches)

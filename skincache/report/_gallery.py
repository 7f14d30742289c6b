"""The gallery: the test images val's pick got wrong, most confident first, each beside its three
nearest training cases, as small JPEG thumbnails.

Where the pixels come from: the cache header's dataset root, read through skincache's own data
sources (`load_dataset`: folders, CSV layouts, parquet shards), falling back to a search for
`<image_id>.<ext>` below the root. Neighbours come from the run's saved faiss index of the train
split (`predict.neighbor_index`), the same ones `predict` lists. An image that cannot be found
is a card saying so, never a broken image in the page.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from skincache.cache import FeatureCache
from skincache.data import load_dataset, read_image_bytes
from skincache.data._files import IMAGE_EXTS
from skincache.errors import SkincacheError
from skincache.heads.knn import search_ip
from skincache.predict import neighbor_index
from skincache.report._collect import RunEntry

THUMB_PX = 128
N_NEIGHBOURS = 3


@dataclass
class Case:
    """One image card: where its thumbnail is (a data: URI) or why there is none."""

    image_id: str
    label: str
    thumb: str | None
    note: str = ""
    similarity: float | None = None


@dataclass
class Miss:
    """A misclassified test image: true class, predicted class and its probability."""

    case: Case
    true: str
    predicted: str
    probability: float
    neighbours: list[Case] = field(default_factory=list)


@dataclass
class Gallery:
    run: str
    split: str
    misses: list[Miss]
    n_wrong: int
    n_total: int
    capped: bool
    notes: list[str] = field(default_factory=list)


def thumbnail(data: bytes, px: int = THUMB_PX) -> str:
    """A JPEG data: URI of at most px x px (aspect kept): a few kB, so a gallery of 48 images
    with neighbours stays under a megabyte."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_locator(root: str) -> Callable[[str], str | None]:
    """image_id -> a source `read_image_bytes` reads, for the dataset at `root` (None: not
    found). The dataset's own loader first; a file search below the root if that fails."""
    sources: dict[str, str] = {}
    try:
        sources = {r.image_id: r.source for r in load_dataset(root).records}
    except (SkincacheError, OSError, ValueError):
        pass
    if not sources and Path(root).is_dir():
        for p in Path(root).rglob("*"):
            if p.suffix.lower() in IMAGE_EXTS:
                sources.setdefault(p.stem, str(p))
    return sources.get


def _case(locate: Callable[[str], str | None], image_id: str, label: str) -> Case:
    source = locate(image_id)
    if source is None:
        return Case(image_id, label, None, "image not found below the dataset root")
    try:
        return Case(image_id, label, thumbnail(read_image_bytes(source)))
    except (OSError, SkincacheError, ValueError) as e:
        return Case(image_id, label, None, f"unreadable: {str(e).splitlines()[0][:80]}")


def _predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def build_gallery(run: RunEntry, split: str, limit: int,
                  advance: Callable[[int], None] = lambda n=1: None) -> Gallery | None:
    """The gallery of `run` on `split` (None when the run has no predictions file for it);
    at most `limit` images, the most confident mistakes first."""
    pred_file = run.path / "predictions" / f"{split}.csv"
    if not pred_file.is_file():
        return None
    rows = _predictions(pred_file)
    wrong = [r for r in rows if r.get("true") and r.get("predicted") != r.get("true")]
    wrong.sort(key=lambda r: -float(r.get(f"p_{r['predicted']}", 0) or 0))
    shown = wrong[:limit]
    gallery = Gallery(run.name, split, [], len(wrong), len(rows), len(wrong) > limit)
    fc = None
    if run.record.cache:
        try:
            fc = FeatureCache.open(run.record.cache)
        except SkincacheError as e:
            gallery.notes.append(f"cache unavailable, no thumbnails or neighbours: {e}")
    if fc is None:
        for r in shown:
            gallery.misses.append(Miss(Case(r["image_id"], r["true"], None, "no cache"),
                                       r["true"], r["predicted"],
                                       float(r.get(f"p_{r['predicted']}", 0) or 0)))
        return gallery
    locate = image_locator(fc.header.dataset_root)
    neighbours = _neighbours(run, fc, split, [r["image_id"] for r in shown], gallery.notes)
    for r in shown:
        miss = Miss(_case(locate, r["image_id"], r["true"]), r["true"], r["predicted"],
                    float(r.get(f"p_{r['predicted']}", 0) or 0))
        for image_id, label, sim in neighbours.get(r["image_id"], []):
            case = _case(locate, image_id, label)
            case.similarity = sim
            miss.neighbours.append(case)
        gallery.misses.append(miss)
        advance(1)
    return gallery


def _neighbours(run: RunEntry, fc: FeatureCache, split: str, ids: list[str],
                notes: list[str]) -> dict[str, list[tuple[str, str, float]]]:
    """image id -> its N_NEIGHBOURS nearest training cases (id, class, cosine similarity)."""
    if not ids or split not in fc.splits:
        return {}
    data = fc.split(split)
    row_of = {str(i): n for n, i in enumerate(data.image_id)}
    rows = [row_of[i] for i in ids if i in row_of]
    if len(rows) < len(ids):
        notes.append(f"{len(ids) - len(rows)} images of the predictions are not in the cache's "
                     f"{split} split: no neighbours for them")
    if not rows:
        return {}
    X = np.asarray(data.features16[np.array(rows)], dtype=np.float32)
    train = fc.split("train")
    sims, keys = search_ip(neighbor_index(run.path, fc), X, N_NEIGHBOURS)
    out = {}
    for j, row in enumerate(rows):
        out[str(data.image_id[row])] = [
            (str(train.image_id[k]), fc.classes[int(train.labels[k])], float(s))
            for s, k in zip(sims[j], keys[j], strict=True)]
    return out

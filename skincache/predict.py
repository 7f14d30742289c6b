"""`predict`: new images through the cache's own model and preprocessing, then a saved head.

The images go through `ImageEncoder` (the encode code path: same decoding, same clean view,
same precision), so a prediction sees exactly what the head was trained on. Each image also
gets its most similar training cases from the cache (cosine similarity of clean-view features),
which is what a clinician asks next: "what did similar lesions turn out to be?".
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from skincache._io import atomic_write_text, write_json
from skincache.cache import FeatureCache
from skincache.cache.joined import JoinedCache, join_blocks
from skincache.data import Record
from skincache.data._files import IMAGE_EXTS
from skincache.device import resolve_device, resolve_precision
from skincache.encoder import ImageEncoder
from skincache.errors import UsageError
from skincache.heads.knn import (
    build_neighbor_index,
    read_neighbor_index,
    search_ip,
    write_neighbor_index,
)
from skincache.models import ModelSpec, load_model
from skincache.runs import RunError, load_run
from skincache.views import ViewPolicy


@dataclass
class Prediction:
    path: str
    error: str = ""
    predicted: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    neighbors: list[dict] = field(default_factory=list)  # image_id, label, similarity

    @property
    def ok(self) -> bool:
        return not self.error


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given (even unreadable ones, to report them), folders searched recursively.
    A path the OS refuses to look at (too long, no permission) is kept as a file: it gets its
    own error line while the other images are predicted."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        try:
            if p.is_dir():
                out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS)
                continue
        except OSError:
            pass
        out.append(p)
    return out


def _lexists(p: Path) -> bool:
    """The path names something (a file, a dangling link, a FIFO: the loader says which);
    a path the OS refuses to look at (too long) counts as there, for the loader's own line."""
    try:
        os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        pass
    return True


def neighbor_index(run: Path, fc: FeatureCache) -> faiss.Index:
    """The index of `fc`'s train split that `fit-head` saved beside the head; for a run
    written before it did (or another cache given with --cache) it is built once and saved
    there, so later calls only read it. A run folder that cannot be written to still
    predicts, with the index built in memory."""
    train = fc.split("train")
    head_dir = run / "head"
    index = read_neighbor_index(head_dir, fc.key, len(train), train.features16.shape[1])
    if index is not None:
        return index
    index = build_neighbor_index(train.features16)
    with contextlib.suppress(OSError):
        write_neighbor_index(head_dir, fc.key, index)
    return index


def _encode(fc: FeatureCache, paths: list[Path], todo: list[int],
            results: dict[int, Prediction], dev, batch_size: int) -> dict[int, np.ndarray]:
    """Clean-view features of the images `todo` through the model, weights, preprocessing
    and precision `fc` was encoded with (row position -> feature); images that fail to
    decode get their error in `results`."""
    header = fc.header
    spec = ModelSpec(*header.model_spec())
    model = load_model(spec, dev)
    if model.weights_sha256 != header.weights_sha256:
        raise RunError(f"the weights loaded for {spec.name} (sha256 {model.weights_sha256[:12]}) "
                       f"differ from those cache {fc.path} was encoded with "
                       f"({header.weights_sha256[:12]}); predictions would not match the head")
    encoder = ImageEncoder(model, ViewPolicy(k=0), dev, header.precision or
                           resolve_precision("auto", dev))
    records = [Record(image_id=p.stem, source=str(p), label="") for p in paths]
    feats: dict[int, np.ndarray] = {}
    for batch in encoder.batches(records, todo, batch_size, num_workers=0):
        for pos, _, reason in batch.failed:
            results[pos].error = reason
        if len(batch.index):
            f = encoder.features(batch.pixels)[:, 0]
            feats.update(zip(batch.index, f, strict=True))
    return feats


def predict_images(
    run: str | Path,
    inputs: list[str | Path],
    *,
    cache: str | Path | list[str | Path] | None = None,
    device: str = "auto",
    neighbors: int = 5,
    batch_size: int = 32,
) -> list[Prediction]:
    """Class probabilities and nearest training cases for each image (or a per-file error).
    No image at all (an empty folder) is a UsageError before the model loads. A fused run
    encodes each image with every cache's model and joins the blocks as its fit did; the
    nearest cases are then searched in the joined features (`cache`: one path per cache)."""
    paths = expand_inputs(inputs)
    if not paths:
        raise UsageError(f"no images in {' '.join(str(i) for i in inputs)} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTS))} files); name image files or "
                         "folders that hold them")
    results = {i: Prediction(str(p)) for i, p in enumerate(paths)}
    for i, p in enumerate(paths):  # said before the model loads (seconds), not after
        if not _lexists(p):
            results[i].error = f"missing: no file at {p}"
    todo = [i for i in results if not results[i].error]
    loaded_run = load_run(run)
    if not todo:
        return [results[i] for i in range(len(paths))]
    fc = loaded_run.open_cache(cache)
    dev = resolve_device(device)
    # a fused run: each image through every cache's own model, blocks joined as at fit time
    parts = fc.parts if isinstance(fc, JoinedCache) else [fc]
    blocks = [_encode(part, paths, todo, results, dev, batch_size) for part in parts]
    feats: dict[int, np.ndarray] = {}
    if len(blocks) == 1:
        feats = blocks[0]
    else:
        for i in sorted(set.intersection(*(set(b) for b in blocks))):
            feats[i] = join_blocks([b[i] for b in blocks])
    ok = sorted(feats)
    if ok:
        X = np.stack([feats[i] for i in ok])
        proba = loaded_run.head.predict_proba(X)
        train = fc.split("train")
        sims, rows = search_ip(neighbor_index(loaded_run.path, fc), X, neighbors) if neighbors \
            else (np.zeros((len(ok), 0)), np.zeros((len(ok), 0), dtype=int))
        for j, i in enumerate(ok):
            r = results[i]
            r.probabilities = {c: float(p) for c, p in zip(fc.classes, proba[j], strict=True)}
            r.predicted = fc.classes[int(proba[j].argmax())]
            r.neighbors = [{"image_id": str(train.image_id[row]),
                            "label": fc.classes[int(train.labels[row])],
                            "similarity": float(s)} for s, row in zip(sims[j], rows[j],
                                                                     strict=True)]
    return [results[i] for i in range(len(paths))]


def write_predictions(preds: list[Prediction], path: str | Path) -> Path:
    """Predictions as JSON (everything) or CSV (one row per image, p_<class> columns), written
    atomically."""
    import csv
    import io

    path = Path(path)
    if path.suffix.lower() == ".json":
        return write_json(path, [p.__dict__ for p in preds])
    classes = next((list(p.probabilities) for p in preds if p.ok), [])
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["path", "predicted", *(f"p_{c}" for c in classes), "nearest", "error"])
    for p in preds:
        nearest = ";".join(f"{n['image_id']}:{n['label']}:{n['similarity']:.6f}"
                           for n in p.neighbors)
        w.writerow([p.path, p.predicted, *(p.probabilities.get(c, "") for c in classes),
                    nearest, p.error])
    return atomic_write_text(path, buf.getvalue())

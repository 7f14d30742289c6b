"""`predict`: new images through the cache's own model and preprocessing, then a saved head.

The images go through `ImageEncoder` (the encode code path: same decoding, same clean view,
same precision), so a prediction sees exactly what the head was trained on. Each image also
gets its most similar training cases from the cache (cosine similarity of clean-view features),
which is what a clinician asks next: "what did similar lesions turn out to be?".

A head fit with metadata (`-p metadata=age,sex,localization`) takes the same fields from a CSV
(`metadata=FILE`, as HAM10000_metadata.csv: an `image_id` column, or ISIC's `image`, and one
column per field). An image is matched by its file name without the extension, as datasets
match ids to files; an image with no row in the CSV is reported failed (its fields are never
guessed: a row with empty cells encodes them as unknown on purpose).
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
from skincache.data._files import IMAGE_EXTS, read_csv_rows
from skincache.device import resolve_device, resolve_precision
from skincache.encoder import ImageEncoder
from skincache.errors import UsageError
from skincache.heads.knn import (
    build_neighbor_index,
    read_neighbor_index,
    search_ip,
    write_neighbor_index,
)
from skincache.models import LoadedModel, ModelSpec, load_model
from skincache.runs import RunError, load_run, run_features
from skincache.views import ViewPolicy


@dataclass
class Prediction:
    path: str
    error: str = ""
    predicted: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    neighbors: list[dict] = field(default_factory=list)  # image_id, label, similarity
    overlay: str = ""  # the saliency overlay PNG (`predict --explain`, skincache.explain)
    #: a concept-bottleneck run's top contributing concepts to the predicted class: name,
    #: share of its logit (weight x z-score); empty for other heads
    concepts: list[dict] = field(default_factory=list)

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


#: the id column of a metadata CSV: HAM10000's, then ISIC's
ID_COLUMNS = ("image_id", "image", "isic_id")


def read_metadata_csv(path: str | Path, fields: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{image id: {field: value}} from a metadata CSV; UsageError (one line naming the file)
    for a missing id or field column, an empty id or an id given twice."""
    path = Path(path)
    header, rows = read_csv_rows(path)
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    missing = [f for f in fields if f not in header]
    if id_col is None or missing:
        need = ([f"an id column ({' or '.join(ID_COLUMNS)})"] if id_col is None else []) + \
            [f"'{f}'" for f in missing]
        raise UsageError(f"--metadata {path}: no {', '.join(need)} column (header: "
                         f"{','.join(header) or 'empty'}); the run takes {','.join(fields)}")
    out: dict[str, dict[str, str]] = {}
    for line, row in rows:
        image_id = row[id_col]
        stem, ext = os.path.splitext(image_id)
        image_id = stem if ext.lower() in IMAGE_EXTS else image_id
        if not image_id:
            raise UsageError(f"--metadata {path}, line {line}: empty {id_col}")
        if image_id in out:
            raise UsageError(f"--metadata {path}, line {line}: {id_col} {image_id!r} given "
                             "twice")
        out[image_id] = {f: row[f] for f in fields}
    return out


def check_metadata_option(run: Path, fields: tuple[str, ...], metadata: str | Path | None
                          ) -> dict[str, dict[str, str]] | None:
    """The rows of `--metadata` for a run whose head takes `fields`; UsageError for a run
    fit with metadata and no file, or a file for a run that takes none (it would be ignored)."""
    if fields and metadata is None:
        raise UsageError(f"run {run} was fit with metadata ({', '.join(fields)}); give them "
                         "with --metadata FILE (a CSV with image_id and these columns, as "
                         "HAM10000_metadata.csv)")
    if not fields and metadata is not None:
        raise UsageError(f"run {run} was fit without metadata; --metadata {metadata} would be "
                         "ignored (fit a head with -p metadata=FIELDS to use it)")
    return read_metadata_csv(metadata, fields) if metadata is not None else None


def _encode(fc: FeatureCache, paths: list[Path], todo: list[int],
            results: dict[int, Prediction], dev, batch_size: int, *, pre: bool = False,
            loaded: LoadedModel | None = None
            ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(clean-view features, what the head takes) of the images `todo` through the model,
    weights, preprocessing and precision `fc` was encoded with (row position -> feature; the
    head takes the pre-projection features of a `-p features=pre` run, else the same);
    images that fail to decode get their error in `results`. `loaded`: that model, already
    loaded (`explain` passes its own: one load, not two)."""
    header = fc.header
    spec = ModelSpec(*header.model_spec())
    model = loaded if loaded is not None else load_model(spec, dev)
    if model.weights_sha256 != header.weights_sha256:
        raise RunError(f"the weights loaded for {spec.name} (sha256 {model.weights_sha256[:12]}) "
                       f"differ from those cache {fc.path} was encoded with "
                       f"({header.weights_sha256[:12]}); predictions would not match the head")
    encoder = ImageEncoder(model, ViewPolicy(k=0), dev, header.precision or
                           resolve_precision("auto", dev), pre_projection=pre)
    records = [Record(image_id=p.stem, source=str(p), label="") for p in paths]
    feats: dict[int, np.ndarray] = {}
    head_in: dict[int, np.ndarray] = {}
    for batch in encoder.batches(records, todo, batch_size, num_workers=0):
        for pos, _, reason in batch.failed:
            results[pos].error = reason
        if len(batch.index):
            f, p = encoder.encode(batch.pixels)
            feats.update(zip(batch.index, f[:, 0], strict=True))
            head_in.update(zip(batch.index, (f if p is None else p)[:, 0], strict=True))
    return feats, head_in


def predict_images(
    run: str | Path,
    inputs: list[str | Path],
    *,
    cache: str | Path | list[str | Path] | None = None,
    device: str = "auto",
    neighbors: int = 5,
    batch_size: int = 32,
    loaded: LoadedModel | None = None,
    metadata: str | Path | None = None,
) -> list[Prediction]:
    """Class probabilities and nearest training cases for each image (or a per-file error).
    No image at all (an empty folder) is a UsageError before the model loads, as is a
    metadata run without `metadata` (a CSV, see the module doc) or a CSV for another run.
    A fused run encodes each image with every cache's model and joins the blocks as its fit
    did; the nearest cases are then searched in the joined features (`cache`: one path per
    cache). `loaded`: the cache's model already loaded on `device` (one cache only)."""
    paths = expand_inputs(inputs)
    if not paths:
        raise UsageError(f"no images in {' '.join(str(i) for i in inputs)} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTS))} files); name image files or "
                         "folders that hold them")
    results = {i: Prediction(str(p)) for i, p in enumerate(paths)}
    for i, p in enumerate(paths):  # said before the model loads (seconds), not after
        if not _lexists(p):
            results[i].error = f"missing: no file at {p}"
    loaded_run = load_run(run)
    fields = getattr(loaded_run.head, "metadata_fields", tuple)()  # late fusion: none
    rows = check_metadata_option(loaded_run.path, fields, metadata)
    if rows is not None:
        for i, p in enumerate(paths):
            if not results[i].error and p.stem not in rows:
                results[i].error = f"no metadata: no row for image id {p.stem!r} in {metadata}"
    todo = [i for i in results if not results[i].error]
    if not todo:
        return [results[i] for i in range(len(paths))]
    fc = loaded_run.open_cache(cache)
    dev = resolve_device(device)
    pre = run_features(loaded_run.record) == "pre"  # the head was fit before the projection
    # a fused run: each image through every cache's own model, blocks joined as at fit time
    parts = fc.parts if isinstance(fc, JoinedCache) else [fc]
    if len(parts) > 1 and pre:
        raise UsageError(f"run {loaded_run.path}: predict of a fused run on pre-projection "
                         "features is not built yet")
    blocks = [_encode(part, paths, todo, results, dev, batch_size, pre=pre,
                      loaded=loaded if len(parts) == 1 else None) for part in parts]
    if len(blocks) == 1:
        feats, head_in = blocks[0]
    else:
        feats = {i: join_blocks([b[0][i] for b in blocks])
                 for i in sorted(set.intersection(*(set(b[0]) for b in blocks)))}
        head_in = feats
    ok = sorted(feats)
    if ok:
        X = np.stack([feats[i] for i in ok])
        head_X = np.stack([head_in[i] for i in ok])
        if rows is None:
            proba = loaded_run.head.predict_proba(head_X)
        else:
            meta = {f: np.array([rows[paths[i].stem][f] for i in ok], dtype=object)
                    for f in fields}
            proba = loaded_run.head.predict_proba(head_X, meta)
        top_concepts = getattr(loaded_run.head, "top_concepts", None)  # a `cbm` run
        explained = top_concepts(X) if top_concepts is not None else [[] for _ in ok]
        train = fc.split("train")
        sims, nn = search_ip(neighbor_index(loaded_run.path, fc), X, neighbors) if neighbors \
            else (np.zeros((len(ok), 0)), np.zeros((len(ok), 0), dtype=int))
        for j, i in enumerate(ok):
            r = results[i]
            r.probabilities = {c: float(p) for c, p in zip(fc.classes, proba[j], strict=True)}
            r.predicted = fc.classes[int(proba[j].argmax())]
            r.neighbors = [{"image_id": str(train.image_id[row]),
                            "label": fc.classes[int(train.labels[row])],
                            "similarity": float(s)} for s, row in zip(sims[j], nn[j],
                                                                     strict=True)]
            r.concepts = [{"concept": n, "share": s} for n, s in explained[j]]
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
    overlay = ["overlay"] if any(p.overlay for p in preds) else []  # only with --explain
    w.writerow(["path", "predicted", *(f"p_{c}" for c in classes), "nearest", "error",
                "concepts", *overlay])
    for p in preds:
        nearest = ";".join(f"{n['image_id']}:{n['label']}:{n['similarity']:.6f}"
                           for n in p.neighbors)
        concepts = ";".join(f"{c['concept']}:{c['share']:+.3f}" for c in p.concepts)
        w.writerow([p.path, p.predicted, *(p.probabilities.get(c, "") for c in classes),
                    nearest, p.error, concepts, *([p.overlay] if overlay else [])])
    return atomic_write_text(path, buf.getvalue())

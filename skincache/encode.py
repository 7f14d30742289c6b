"""`encode_dataset`: one pass over a dataset into a feature cache, crash-safe and resumable.

Decode every image once, cut its views (`loaders`), run the image tower (`encoder`), and
commit each chunk of images as its own file in `<name>.partial/`; a killed run resumes after
the last committed chunk, and the `.h5` is assembled at the end (`cache.write_cache`). The key
is decided and the data checked before any model loads; a lock keeps two runs of the same key
apart. The image tower runs in bf16 autocast on CUDA and fp32 elsewhere; features are stored
float16.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skincache._disk import check_writable_dir, disk_error, make_disk_error
from skincache._io import __version__, now_iso, versions
from skincache._progress import progress_bar
from skincache.cache import (
    SCHEMA_VERSION,
    CacheHeader,
    CacheLock,
    PartialCache,
    SplitArrays,
    cache_key,
    cache_name,
    estimate_cache_bytes,
    write_cache,
)
from skincache.concepts import ConceptList, load_concepts
from skincache.data import Dataset, Record
from skincache.data.classes import display_name
from skincache.defaults import CACHE_DIR, is_rank0
from skincache.device import default_workers, resolve_device, resolve_precision
from skincache.distributed import DistContext, on_main
from skincache.encoder import ImageEncoder, encode_concepts
from skincache.errors import DiskError
from skincache.loaders import Batch, route
from skincache.models import ModelSpec, load_model
from skincache.prompts import TEMPLATE_SETS
from skincache.views import ViewPolicy

DEFAULT_CACHE_DIR = Path(CACHE_DIR)


@contextlib.contextmanager
def _share_cores(device: torch.device, workers: int):
    """While decode workers run, a CPU model gets only the cores they leave: torch's threads
    spinning against the decoders made the CPU route 4-5x slower on 2 cores."""
    if device.type != "cpu" or workers == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the run


@dataclass
class EncodeResult:
    path: Path
    status: str  # "built", "resumed" or "exists"
    n_images: int = 0
    n_failed: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)
    stale_partial: Path | None = None  # a leftover partial folder removed beside the cache
    spec: ModelSpec | None = None  # the model encoded with (set by `pipeline.encode_source`)

    @property
    def images_per_s(self) -> float:
        return (self.n_images + self.n_failed) / self.seconds if self.seconds else 0.0

    def cache_summary(self) -> dict:
        """The summary of the cache at `path`, as `skincache info` shows it (every dataset
        verified)."""
        from skincache.cache import FeatureCache

        return FeatureCache.open(self.path).summary()

    def concept_report(self, plot: Path | None = None):
        """`skincache concepts` on this cache (`concept_report.concept_report`): the per-class
        mean concept scores of its train split, the heatmap beside the cache."""
        from skincache.concept_report import concept_report

        return concept_report(self.path, plot=plot)


def encode_key(dataset: Dataset, spec: ModelSpec, policy: ViewPolicy, precision: str,
               template_sets: list[str], fingerprint: str | None = None,
               follow_symlinks: bool = False, pre_projection: bool = False,
               concepts: ConceptList | bool | None = True) -> str:
    """The cache key; pass `fingerprint` when it is already known (it stats every file).
    `follow_symlinks` changes which images are read, and `pre_projection` what the cache
    holds, so each is part of the key when set (and absent otherwise, so the keys of
    existing caches stay as they were); so is the concept list's content (`concepts` as
    `encode_dataset` takes it: True, the default, is the shipped list; False or None, none,
    and then the key is the one caches had before concepts existed)."""
    if concepts is True:
        concepts = load_concepts()
    extra: dict = {"follow_symlinks": True} if follow_symlinks else {}
    if pre_projection:
        extra["pre_projection"] = True
    if isinstance(concepts, ConceptList):
        extra["concepts"] = concepts.sha256
    return cache_key({**extra,
        "schema": SCHEMA_VERSION,
        "model": spec.identity(),
        "precision": precision,
        "views": policy.to_dict(),
        "dataset": fingerprint or dataset.fingerprint(),
        "classes": dataset.classes,
        "templates": {k: TEMPLATE_SETS[k] for k in template_sets},
    })


def encode_dataset(
    dataset: Dataset,
    spec: ModelSpec,
    *,
    policy: ViewPolicy | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    chunk_batches: int = 8,
    num_workers: int | None = None,
    loader: str = "auto",
    template_sets: list[str] | None = None,
    force: bool = False,
    wait: bool = False,
    progress: bool = True,
    follow_symlinks: bool = False,
    pre_projection: bool = False,
    concepts: ConceptList | bool = True,
) -> EncodeResult:
    """Encode `dataset` with the model `spec` into `cache_dir/<name>.h5` (see the module doc).
    `pre_projection`: also store each view's pooled output before the image tower's final
    projection (`features_pre`, `views_pre`; `encoder.PreProjection`).

    Checks the data (labels, splits, classes) before loading any model; a cache that already
    exists for the same key is left alone unless `force`; an unfinished run is resumed.
    `concepts`: the concept list whose prompts go into `/concepts/` (True: the shipped one,
    False: none)."""
    policy = policy or ViewPolicy()
    concept_list = load_concepts() if concepts is True else (concepts or None)
    template_sets = list(TEMPLATE_SETS) if template_sets is None else template_sets
    dataset.validate()
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    fingerprint = dataset.fingerprint()
    key = encode_key(dataset, spec, policy, precision, template_sets, fingerprint,
                     follow_symlinks, pre_projection, concept_list or False)
    cache_dir = Path(cache_dir)
    name = cache_name(dataset.name, spec.slug + ("-pre" if pre_projection else ""), policy.k,
                      key)
    final = cache_dir / f"{name}.h5"
    # an interrupted --force rebuild is continued by any rerun, --force or not
    force = force or PartialCache(cache_dir / f"{name}.partial").forced_rebuild_pending(key)
    if final.exists() and not force:
        # under torchrun every rank sees the finished cache; only rank 0 sweeps its leftovers
        swept = _sweep_leftovers(cache_dir, name) if is_rank0() else None
        return EncodeResult(final, "exists", stale_partial=swept)
    check_writable_dir(cache_dir, "--cache-dir")

    t0 = time.perf_counter()
    ctx = DistContext.from_env(dev)  # a world of one without torchrun
    try:
        result = _encode_run(
            ctx, dataset, spec=spec, policy=policy, dev=ctx.device, precision=precision,
            fingerprint=fingerprint, key=key, final=final, cache_dir=cache_dir, name=name,
            force=force, wait=wait, batch_size=batch_size, chunk_batches=chunk_batches,
            num_workers=num_workers, loader=loader, template_sets=template_sets,
            progress=progress, root=None if follow_symlinks else _folder_of(dataset),
            pre_projection=pre_projection, concepts=concept_list)
    finally:
        ctx.close()
    result.seconds = time.perf_counter() - t0
    return result


def _encode_run(ctx: DistContext, dataset: Dataset, *, spec: ModelSpec, policy: ViewPolicy,
                dev: torch.device, precision: str, fingerprint: str, key: str, final: Path,
                cache_dir: Path, name: str, force: bool, wait: bool, batch_size: int,
                chunk_batches: int, num_workers: int | None, loader: str,
                template_sets: list[str], progress: bool, root: str | None,
                pre_projection: bool = False, concepts: ConceptList | None = None
                ) -> EncodeResult:
    """The encode itself, on one process or as one rank of a torchrun job. Everything after
    the dataset is keyword-only: seventeen settings of like types (three bools, three ints)
    are never matched by position.

    Sharding: rank 0 takes the lock and starts (or resumes) the `.partial/` folder; the chunks
    still missing are dealt round-robin to the ranks, each rank commits its own chunk files
    into the shared folder, and rank 0 assembles the `.h5` once all are there. Chunk contents
    depend only on the records in them (views are seeded per image id), so any split of the
    work gives the same cache as one process, and a killed run (any rank) resumes with the
    chunks still missing."""
    # before any file is written, the lock included: a model that fails to load leaves none
    loaded = load_model(spec, dev)
    encoder = ImageEncoder(loaded, policy, dev, precision, pre_projection)
    partial = PartialCache(cache_dir / f"{name}.partial")
    with contextlib.ExitStack() as stack:
        try:
            def start() -> dict | None:
                lock = CacheLock(cache_dir / f"{name}.lock")
                lock.acquire(wait=wait)
                stack.enter_context(lock)  # held already: released when the stack closes
                if final.exists() and not force:  # another run finished it while we waited
                    return None
                return _start_partial(dataset, encoder, partial, key, force, batch_size,
                                      chunk_batches, template_sets)

            plan = on_main(ctx, start)
            if plan is None:
                return EncodeResult(final, "exists")
            mine = plan["missing"][ctx.rank::ctx.world]
            workers = default_workers(ctx.local_world) if num_workers is None else num_workers
            chunk_size = plan["chunk_size"]
            n_mine = sum(min(chunk_size, len(dataset.records) - i * chunk_size) for i in mine)
            with progress_bar(n_mine, f"encode {dataset.name}" + (
                    f" (rank {ctx.rank}/{ctx.world})" if ctx.active else ""),
                    enabled=progress and ctx.main) as advance, \
                    _share_cores(dev, workers if route(loader, dev) == "pillow" else 0):
                _run_chunks(encoder, dataset.records, mine, partial, chunk_size,
                            plan["batch_size"], workers, loader, advance, root)
            ctx.barrier()  # every rank's chunks are committed

            def finish() -> EncodeResult:
                result = _assemble(final, partial, dataset, fingerprint, encoder, key,
                                   plan["n_chunks"], template_sets, plan["manifest"],
                                   concepts)
                # the cache is complete: from here on only litter is removed (a kill now
                # leaves litter that the next run sweeps, see `_sweep_leftovers`)
                partial.remove()
                # safe while held: a process waiting on the old inode re-checks `final`
                (cache_dir / f"{name}.lock").unlink(missing_ok=True)
                return result

            result = on_main(ctx, finish)
            result.status = "resumed" if plan["resumed"] else "built"
            return result
        except OSError as e:
            done = partial.n_chunks() if partial.folder.exists() else 0
            after = (f"nothing is lost ({done} finished chunk(s) kept in {partial.folder}): "
                     "free space (or fix the folder) and run the same command again to resume")
            if isinstance(e, DiskError):
                raise make_disk_error(e.errno or 0, f"{e}; {after}") from None
            inside = e.filename is None or Path(str(e.filename)).resolve().is_relative_to(
                cache_dir.resolve())
            de = disk_error(e, e.filename or partial.folder, "writing", after) if inside else None
            if de is not None:  # (an unreadable checkpoint elsewhere keeps its own message)
                raise de from None
            raise


def _folder_of(dataset: Dataset) -> str:
    """The dataset folder symlinks may not lead out of (a CSV source's own folder)."""
    root = Path(dataset.root)
    return str(root.parent if root.is_file() else root)


def _sweep_leftovers(cache_dir: Path, name: str) -> Path | None:
    """The cache exists: remove what a run killed after its final rename (or an interrupted
    --force rebuild) left behind (the `.partial/` folder, the `.lock` file, a `.h5.tmp`), if no
    process holds the lock. Returns the partial folder if one was removed, to say so."""
    partial = PartialCache(cache_dir / f"{name}.partial")
    lock_path = cache_dir / f"{name}.lock"
    tmp = cache_dir / f"{name}.h5.tmp"
    if not (partial.folder.exists() or lock_path.exists() or tmp.exists()):
        return None
    had_partial = partial.folder.is_dir()
    lock = CacheLock(lock_path)
    try:
        if not lock.try_acquire():
            return None
    except OSError:  # a read-only cache folder: nothing can be swept, the cache still reads
        return None
    try:
        partial.remove()
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            lock_path.unlink()
    finally:
        lock.release()
    return partial.folder if had_partial and not partial.folder.exists() else None


def _start_partial(dataset: Dataset, encoder: ImageEncoder, partial: PartialCache, key: str,
                   force: bool, batch_size: int, chunk_batches: int,
                   template_sets: list[str]) -> dict:
    """Rank 0, under the lock: start or resume the partial folder, write the text features,
    and list the chunks still missing (every rank gets this plan)."""
    records = dataset.records
    # a --force rebuild resumes its own partial folder like any run (chunks depend only on
    # the key, and each is checked before it is kept); the manifest records it was forced
    manifest = partial.start({
        "key": key, "n_records": len(records), "batch_size": batch_size,
        "chunk_size": batch_size * chunk_batches, "started": now_iso(), "forced": force,
    })
    chunk_size = manifest["chunk_size"]
    n_chunks = math.ceil(len(records) / chunk_size)
    fields = CHUNK_FIELDS + (PRE_FIELDS if encoder.pre is not None else ())
    missing = [i for i in range(n_chunks) if not partial.keep_chunk(i, fields)]
    if partial.read_array("text") is None:
        partial.write_array("text", **{s: encoder.text_features(dataset.classes, s)
                                       for s in template_sets})
    return {"manifest": manifest, "chunk_size": chunk_size,
            "batch_size": manifest["batch_size"], "n_chunks": n_chunks, "missing": missing,
            "resumed": len(missing) < n_chunks}


def _run_chunks(encoder: ImageEncoder, records: list[Record], chunks: list[int],
                partial: PartialCache, chunk_size: int, batch_size: int,
                num_workers: int | None, loader: str, advance, root: str | None = None
                ) -> None:
    """Model loop over `chunks` (in order, in one loader pass); commits one chunk file per
    chunk (batches never straddle two chunks)."""
    if not chunks:
        return

    def size(c: int) -> int:
        return min(chunk_size, len(records) - c * chunk_size)

    positions = [p for c in chunks for p in range(c * chunk_size, c * chunk_size + size(c))]
    todo = iter(chunks)
    chunk = next(todo)
    acc: list[Batch] = []
    feats: list[tuple[np.ndarray, np.ndarray | None]] = []
    seen = 0
    # every chunk but the dataset's last holds a multiple of batch_size records, so batches
    # never straddle two chunks and are the very batches a one-process run makes
    for batch in encoder.batches(records, positions, batch_size, num_workers, loader, root):
        acc.append(batch)
        if len(batch.index):
            feats.append(encoder.encode(batch.pixels))
        seen += batch.n_records
        advance(batch.n_records)
        if seen == size(chunk):
            _commit(partial, chunk, acc, feats, encoder)
            acc, feats, seen = [], [], 0
            chunk = next(todo, -1)
    if acc:
        raise RuntimeError("internal: loader ended inside a chunk")


#: the arrays every committed chunk holds (`_commit` writes them, `_assemble` reads them)
CHUNK_FIELDS = ("index", "features", "views", "sha1", "failed_index", "failed_sha1",
                "failed_reason")
#: and those of a --pre-projection encode
PRE_FIELDS = ("features_pre", "views_pre")


def _commit(partial: PartialCache, chunk: int, batches: list[Batch],
            feats: list[tuple[np.ndarray, np.ndarray | None]], encoder: ImageEncoder) -> None:
    k, d = encoder.policy.k, encoder.loaded.embed_dim
    f = np.concatenate([x[0] for x in feats]) if feats else np.zeros((0, 1 + k, d), np.float32)
    failed = [x for b in batches for x in b.failed]
    pre = {}
    if encoder.pre is not None:
        p = (np.concatenate([x[1] for x in feats]) if feats  # type: ignore[misc]
             else np.zeros((0, 1 + k, encoder.pre_dim), np.float32))
        pre = {"features_pre": p[:, 0].astype(np.float16),
               "views_pre": p[:, 1:].astype(np.float16)}
    partial.write_chunk(
        chunk, **pre,
        index=np.array([i for b in batches for i in b.index], dtype=np.int64),
        features=f[:, 0].astype(np.float16),
        views=f[:, 1:].astype(np.float16),
        sha1=np.array([s for b in batches for s in b.sha1], dtype="U40"),
        failed_index=np.array([x[0] for x in failed], dtype=np.int64),
        failed_sha1=np.array([x[1] for x in failed], dtype="U40"),
        failed_reason=np.array([x[2] for x in failed], dtype=str),
    )


def _assemble(final: Path, partial: PartialCache, dataset: Dataset, fingerprint: str,
              encoder: ImageEncoder,
              key: str, n_chunks: int, template_sets: list[str], manifest: dict,
              concepts: ConceptList | None = None) -> EncodeResult:
    parts = [partial.read_chunk(i) for i in range(n_chunks)]
    records = dataset.records
    index = np.concatenate([p["index"] for p in parts])
    feats = np.concatenate([p["features"] for p in parts])
    views = np.concatenate([p["views"] for p in parts])
    sha1 = np.concatenate([p["sha1"] for p in parts])
    f_index = np.concatenate([p["failed_index"] for p in parts])
    f_reason = np.concatenate([p["failed_reason"] for p in parts])
    pre = ({c: np.concatenate([p[c] for p in parts]) for c in PRE_FIELDS}
           if encoder.pre is not None else None)
    split_of = np.array([r.split for r in records], dtype=object)[index]
    meta_cols = sorted({c for r in records for c in r.meta})
    splits: dict[str, SplitArrays] = {}
    for s in dataset.splits:
        rows = np.flatnonzero(split_of == s)
        recs = [records[i] for i in index[rows]]
        splits[s] = SplitArrays(
            features=feats[rows], views=views[rows],
            features_pre=None if pre is None else pre["features_pre"][rows],
            views_pre=None if pre is None else pre["views_pre"][rows],
            labels=np.array([dataset.label_index(r.label) for r in recs], dtype=np.int64),
            image_id=[r.image_id for r in recs], group_id=[r.group or "" for r in recs],
            sha1=[str(x) for x in sha1[rows]],
            meta={c: [r.meta.get(c, "") for r in recs] for c in meta_cols},
        )
    text = partial.read_array("text") or {}
    # the concept prompts go through the text tower here, at assembly (a second or less):
    # nothing of them waits in the partial folder, whose chunks are what a resume needs
    concept_arrays = ({} if concepts is None else
                      encode_concepts(encoder.loaded, concepts, encoder.device))
    loaded = encoder.loaded
    header = CacheHeader(
        key=key,
        skincache_version=__version__,
        model=loaded.spec.name,
        pretrained=loaded.spec.pretrained or "",
        checkpoint=str(Path(loaded.spec.checkpoint).resolve()) if loaded.spec.checkpoint
        else "",
        checkpoint_sha256=loaded.spec.identity()["checkpoint_sha256"] or "",
        weights_sha256=loaded.weights_sha256,
        embed_dim=loaded.embed_dim,
        pre_projection_dim=encoder.pre_dim,
        logit_scale=loaded.logit_scale,
        precision=encoder.precision,
        device=encoder.device.type,
        preprocess=json.loads(loaded.preprocess.to_json()),
        views={**encoder.policy.to_dict(), "scaled_resize": encoder.maker.aug_resize,
               "scaled_crop": list(encoder.maker.crop_hw)},
        features_normalized=False,
        dataset=dataset.name,
        dataset_kind=dataset.kind,
        dataset_root=str(dataset.root),
        dataset_fingerprint=fingerprint,
        split_origin=dict(dataset.split_origin),
        classes=list(dataset.classes),
        class_names=[display_name(c) for c in dataset.classes],
        template_sets={k: TEMPLATE_SETS[k] for k in template_sets},
        chunking={"chunk_size": manifest["chunk_size"], "batch_size": manifest["batch_size"]},
        concepts={"name": concepts.name, "sha256": concepts.sha256,
                  "n_concepts": len(concepts.concepts)} if concepts is not None else {},
        created=now_iso(),
        versions=versions("torch", "open_clip", "torchvision", "pillow", "numpy"),
    )
    failed = {
        "image_id": [records[i].image_id for i in f_index],
        "source": [records[i].source for i in f_index],
        "split": [records[i].split or "" for i in f_index],
        "reason": [str(r) for r in f_reason],
    }
    need = estimate_cache_bytes(splits, text, failed) + sum(
        a.size * 8 for a in concept_arrays.values())
    free = shutil.disk_usage(final.parent).free
    if free < need:
        raise make_disk_error(errno.ENOSPC, f"disk full: assembling {final} needs about "
                              f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free")
    write_cache(final, header, splits, text, failed, concept_arrays)
    reasons = Counter(r.split(":")[0] for r in failed["reason"])
    return EncodeResult(final, "built", n_images=len(index), n_failed=len(f_index),
                        failed_reasons=dict(reasons),
                        splits={s: len(a.labels) for s, a in splits.items()})


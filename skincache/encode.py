"""One pass: decode every image once, cut its views, run the image tower, write the cache.

Two loaders feed one model loop:
- CPU (any device without nvjpeg): a torch DataLoader whose worker processes read, decode with
  Pillow in JPEG draft mode and cut the views; batches travel as uint8.
- CUDA: a background thread reads bytes and decodes JPEG batches with nvjpeg on a side CUDA
  stream (`torchvision.io.decode_jpeg(device="cuda")`), cuts the views on the GPU, and so
  overlaps the next batch's decode with the model on the current one. Non-JPEG or
  unreadable-by-nvjpeg files fall back to the Pillow route, one by one.
The image tower runs in bf16 autocast on CUDA and fp32 elsewhere; features are stored float16.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skincache._io import __version__, now_iso, versions
from skincache._progress import progress_bar
from skincache.cache import (
    SCHEMA_VERSION,
    CacheLock,
    PartialCache,
    SplitArrays,
    cache_key,
    cache_name,
    check_writable_dir,
    disk_error,
    estimate_cache_bytes,
    make_disk_error,
    write_cache,
)
from skincache.data import Dataset, Record, read_image_bytes
from skincache.data.classes import display_name
from skincache.device import autocast_dtype, default_workers, resolve_device, resolve_precision
from skincache.errors import DiskError, InputFileError, UsageError
from skincache.models import LoadedModel, ModelSpec, load_model
from skincache.prompts import TEMPLATE_SETS, class_prompts
from skincache.views import (
    DecodeError,
    Normalizer,
    ViewMaker,
    ViewPolicy,
    decode_image,
    probe_size,
)

DEFAULT_CACHE_DIR = Path("cache")
#: Seconds a decode worker may take for one batch before the run stops with an error.
LOADER_TIMEOUT_S = 600


# --------------------------------------------------------------------------- decoding


@dataclass
class Batch:
    """Views of the images that decoded, plus what happened to the others."""

    index: list[int]  # positions in the record list of the rows in `pixels`
    pixels: torch.Tensor  # uint8 [n, 1+K, 3, H, W]
    sha1: list[str]
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (index, sha1, reason)

    @property
    def n_records(self) -> int:
        return len(self.index) + len(self.failed)


def read_record(record: Record) -> tuple[bytes | None, str, str]:
    """(bytes or None, sha1, failure reason) for one record's image, never raising."""
    try:
        data = read_image_bytes(record.source)
    except FileNotFoundError:
        return None, "", f"missing: no file at {record.source}"
    except InputFileError as e:  # a FIFO, a device, a file over the byte cap
        return None, "", f"unreadable: {e}"
    except OSError as e:
        return None, "", f"unreadable: {e}"
    except Exception as e:  # a bad parquet row, ...: one image never ends the run
        return None, "", f"unreadable: {type(e).__name__}: {e}"
    return data, hashlib.sha1(data).hexdigest(), ""


def load_views(record: Record, maker: ViewMaker) -> tuple[str, np.ndarray | None, str]:
    """(sha1, uint8 views or None, failure reason) for one record, never raising: whatever
    one image does (even MemoryError inside a decode worker) is recorded for that image and
    the run goes on."""
    data, sha1, reason = read_record(record)
    if data is None:
        return sha1, None, reason
    try:
        img = decode_image(data, maker.draft_shortest())
        return sha1, maker.from_pil(img, record.image_id), ""
    except DecodeError as e:
        return sha1, None, str(e)
    except Exception as e:
        return sha1, None, f"failed to decode: {type(e).__name__}: {e}"


class _ViewDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[Record], positions: list[int], maker: ViewMaker):
        self.records, self.positions, self.maker = records, positions, maker

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        pos = self.positions[i]
        sha1, views, reason = load_views(self.records[pos], self.maker)
        return pos, sha1, views, reason


def _collate(items) -> Batch:
    ok = [(p, s, v) for p, s, v, r in items if v is not None]
    failed = [(p, s, r) for p, s, v, r in items if v is None]
    if ok:
        pixels = torch.from_numpy(np.stack([v for _, _, v in ok]))
    else:
        pixels = torch.empty(0, dtype=torch.uint8)
    return Batch([p for p, _, _ in ok], pixels, [s for _, s, _ in ok], failed)


def cpu_batches(records: list[Record], positions: list[int], maker: ViewMaker, batch_size: int,
                num_workers: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Pillow route: worker processes decode (draft mode) and cut views; uint8 batches."""
    loader = torch.utils.data.DataLoader(
        _ViewDataset(records, positions, maker), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
        # a batch lost between a worker and this process (shared memory full, a worker
        # killed) is an error after this long, not a wait forever
        timeout=LOADER_TIMEOUT_S if num_workers else 0,
    )
    yield from loader


def tensor_batches(records: list[Record], positions: list[int], maker: ViewMaker,
                   batch_size: int, device: torch.device, io_threads: int = 8,
                   prefetch: int = 2) -> Iterator[Batch]:
    """nvjpeg route (also runs on the CPU with torchvision's decoder, which is how it is tested).

    A producer thread reads and decodes batch i+1 (on its own CUDA stream) while the caller
    runs the model on batch i."""
    from torchvision.io import ImageReadMode, decode_jpeg

    use_cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if use_cuda else None
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def make_batch(chunk: list[int], pool: ThreadPoolExecutor) -> Batch:
        # hashing ~1 GB/s of JPEGs in the I/O pool, not serially in this thread
        raw = list(pool.map(lambda pos: read_record(records[pos]), chunk))
        index, views, sha1s, failed = [], [], [], []
        jpeg_pos, jpeg_data = [], []
        fallback = []
        digest = {pos: h for pos, (_, h, _) in zip(chunk, raw, strict=True)}
        for pos, (data, _, reason) in zip(chunk, raw, strict=True):
            if data is None:
                failed.append((pos, "", reason))
            elif data[:3] == b"\xff\xd8\xff":
                try:  # nvjpeg has no bomb guard: size from the header first
                    probe_size(data)
                except DecodeError as e:
                    failed.append((pos, digest[pos], str(e)))
                    continue
                jpeg_pos.append(pos)
                jpeg_data.append(data)
            else:
                fallback.append((pos, data))
        decoded: dict[int, torch.Tensor] = {}
        if jpeg_data:
            tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpeg_data]
            try:
                imgs = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
                decoded = dict(zip(jpeg_pos, imgs, strict=True))
            except Exception:  # one bad file fails the batch call: decode one by one
                for pos, t in zip(jpeg_pos, tensors, strict=True):
                    try:
                        decoded[pos] = decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
                    except Exception:  # Pillow decides below, and names the problem
                        pass
        by_pos = dict(zip(jpeg_pos, jpeg_data, strict=True))
        fallback += [(p, d) for p, d in by_pos.items() if p not in decoded]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for pos in chunk:
            if pos in decoded:
                by_shape.setdefault(tuple(decoded[pos].shape), []).append(pos)
        for same in by_shape.values():  # one resize per image size, not per image
            try:
                cut = maker.from_tensor_batch(torch.stack([decoded[p] for p in same]),
                                              [records[p].image_id for p in same])
            except Exception:  # e.g. out of memory for the group: one image at a time
                cut = None
            for j, pos in enumerate(same):
                if cut is None:
                    try:
                        v = maker.from_tensor(decoded[pos], records[pos].image_id)
                    except Exception as e:
                        failed.append((pos, digest[pos],
                                       f"failed to cut views: {type(e).__name__}: {e}"))
                        continue
                else:
                    v = cut[j]
                index.append(pos)
                sha1s.append(digest[pos])
                views.append(v)
        for pos, data in fallback:  # Pillow decides: converts odd modes or names the problem
            sha1 = digest[pos]
            try:
                img = decode_image(data)
                v = torch.from_numpy(maker.from_pil(img, records[pos].image_id)).to(device)
                index.append(pos)
                sha1s.append(sha1)
                views.append(v)
            except DecodeError as e:
                failed.append((pos, sha1, str(e)))
            except Exception as e:
                failed.append((pos, sha1, f"failed to decode: {type(e).__name__}: {e}"))
        if views:
            order = np.argsort(index, kind="stable")
            index = [index[i] for i in order]
            sha1s = [sha1s[i] for i in order]
            pixels = torch.stack([views[i] for i in order])
        else:
            pixels = torch.empty(0, dtype=torch.uint8, device=device)
        return Batch(index, pixels, sha1s, failed)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(io_threads) as pool:
                for start in range(0, len(positions), batch_size):
                    if stop.is_set():
                        return
                    chunk = positions[start:start + batch_size]
                    if use_cuda:
                        with torch.cuda.stream(stream):
                            b = make_batch(chunk, pool)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        b, event = make_batch(chunk, pool), None
                    q.put((b, event))
            q.put(None)
        except BaseException as e:  # surface producer errors in the consumer
            q.put(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            b, event = item
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                b.pixels.record_stream(torch.cuda.current_stream(device))
            yield b
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


# --------------------------------------------------------------------------- model


class ImageEncoder:
    """The loaded model plus the view recipe and device: pixels in, features out.

    `predict` and `finetune` re-use it so that every image reaches the model the same way."""

    def __init__(self, loaded: LoadedModel, policy: ViewPolicy, device: torch.device,
                 precision: str = "fp32"):
        self.loaded = loaded
        self.policy = policy
        self.device = device
        self.precision = precision
        self.maker = ViewMaker(loaded.preprocess, policy)
        self.normalize = Normalizer(loaded.preprocess, device)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 [n, V, 3, H, W] -> float32 [n, V, D] (not normalised)."""
        n, v = pixels.shape[:2]
        x = pixels.reshape(n * v, *pixels.shape[2:]).to(self.device, non_blocking=True)
        x = self.normalize(x)
        dtype = autocast_dtype(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            f = self.loaded.model.encode_image(x)
        return f.float().reshape(n, v, -1).cpu().numpy()

    @torch.no_grad()
    def text_features(self, classes: list[str], template_set: str) -> np.ndarray:
        """float32 [C, T, D] prompt embeddings (fp32, not normalised)."""
        prompts = class_prompts(classes, template_set)
        flat = [p for per_class in prompts for p in per_class]
        f = self.loaded.encode_text(flat, self.device)
        return f.cpu().numpy().reshape(len(classes), len(prompts[0]), -1)

    def batches(self, records: list[Record], positions: list[int], batch_size: int,
                num_workers: int | None = None, loader: str = "auto") -> Iterator[Batch]:
        """The device's own loader: nvjpeg on CUDA, Pillow workers elsewhere."""
        if _route(loader, self.device) == "tensor":
            return tensor_batches(records, positions, self.maker, batch_size, self.device)
        workers = default_workers() if num_workers is None else num_workers
        return cpu_batches(records, positions, self.maker, batch_size, workers,
                           pin_memory=self.device.type == "cuda")


def _route(loader: str, device: torch.device) -> str:
    if loader == "auto":
        return "tensor" if device.type == "cuda" else "pillow"
    if loader not in ("tensor", "pillow"):
        raise UsageError(f"loader must be auto, tensor or pillow, got {loader!r}")
    return loader


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

    @property
    def images_per_s(self) -> float:
        return (self.n_images + self.n_failed) / self.seconds if self.seconds else 0.0


def encode_key(dataset: Dataset, spec: ModelSpec, policy: ViewPolicy, precision: str,
               template_sets: list[str], fingerprint: str | None = None) -> str:
    """The cache key; pass `fingerprint` when it is already known (it stats every file)."""
    return cache_key({
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
) -> EncodeResult:
    """Encode `dataset` with the model `spec` into `cache_dir/<name>.h5` (see the module doc).

    Checks the data (labels, splits, classes) before loading any model; a cache that already
    exists for the same key is left alone unless `force`; an unfinished run is resumed."""
    policy = policy or ViewPolicy()
    template_sets = list(TEMPLATE_SETS) if template_sets is None else template_sets
    dataset.validate()
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    fingerprint = dataset.fingerprint()
    key = encode_key(dataset, spec, policy, precision, template_sets, fingerprint)
    cache_dir = Path(cache_dir)
    name = cache_name(dataset.name, spec.slug, policy.k, key)
    final = cache_dir / f"{name}.h5"
    if final.exists() and not force:
        swept = _sweep_leftovers(cache_dir, name)
        return EncodeResult(final, "exists", stale_partial=swept)
    check_writable_dir(cache_dir, "--cache-dir")

    t0 = time.perf_counter()
    # before any file is written, the lock included: a model that fails to load leaves none
    loaded = load_model(spec, dev)
    partial = PartialCache(cache_dir / f"{name}.partial")
    try:
        with CacheLock(cache_dir / f"{name}.lock") as lock:
            lock.acquire(wait=wait)
            if final.exists() and not force:  # another run finished it while we waited
                return EncodeResult(final, "exists")
            result, status = _encode_locked(dataset, loaded, policy, dev, precision, fingerprint,
                                            key, final, partial, force, batch_size,
                                            chunk_batches, num_workers, loader, template_sets,
                                            progress)
            # the cache is complete: from here on only litter is removed (a kill now leaves
            # litter that the next run sweeps, see `_sweep_leftovers`)
            partial.remove()
            # safe while held: a process waiting on the old inode re-checks `final` once it has it
            lock.path.unlink(missing_ok=True)
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
    result.status = status
    result.seconds = time.perf_counter() - t0
    return result


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


def _encode_locked(dataset: Dataset, loaded: LoadedModel, policy: ViewPolicy, dev: torch.device,
                   precision: str, fingerprint: str, key: str, final: Path,
                   partial: PartialCache, force: bool, batch_size: int, chunk_batches: int,
                   num_workers: int | None, loader: str, template_sets: list[str],
                   progress: bool) -> tuple[EncodeResult, str]:
    """The run itself, under the lock: chunks (resumed), assembly."""
    if force:
        partial.remove()
    records = dataset.records
    manifest = partial.start({
        "key": key, "n_records": len(records), "batch_size": batch_size,
        "chunk_size": batch_size * chunk_batches, "started": now_iso(),
    })
    chunk_size, batch_size = manifest["chunk_size"], manifest["batch_size"]
    n_chunks = math.ceil(len(records) / chunk_size)
    done = [i for i in range(n_chunks) if partial.has_chunk(i)]
    first = len(done) if done == list(range(len(done))) else 0
    status = "resumed" if first else "built"

    encoder = ImageEncoder(loaded, policy, dev, precision)
    if partial.read_array("text") is None:
        partial.write_array("text", **{s: encoder.text_features(dataset.classes, s)
                                       for s in template_sets})
    positions = list(range(first * chunk_size, len(records)))
    workers = default_workers() if num_workers is None else num_workers
    with progress_bar(len(records), f"encode {dataset.name}", enabled=progress) as advance, \
            _share_cores(dev, workers if _route(loader, dev) == "pillow" else 0):
        advance(first * chunk_size)
        _run_chunks(encoder, records, positions, partial, first, chunk_size, batch_size,
                    num_workers, loader, advance)
    result = _assemble(final, partial, dataset, fingerprint, encoder, key, n_chunks,
                       template_sets, manifest)
    return result, status


def _run_chunks(encoder: ImageEncoder, records: list[Record], positions: list[int],
                partial: PartialCache, first_chunk: int, chunk_size: int, batch_size: int,
                num_workers: int | None, loader: str, advance) -> None:
    """Model loop; commits one chunk file per `chunk_size` records (batches never straddle)."""
    chunk = first_chunk
    acc: list[Batch] = []
    feats: list[np.ndarray] = []
    seen = 0
    limit = min(chunk_size, len(records) - chunk * chunk_size)
    for batch in encoder.batches(records, positions, batch_size, num_workers, loader):
        acc.append(batch)
        if len(batch.index):
            feats.append(encoder.features(batch.pixels))
        seen += batch.n_records
        advance(batch.n_records)
        if seen == limit:
            _commit(partial, chunk, acc, feats, encoder)
            chunk += 1
            acc, feats, seen = [], [], 0
            limit = min(chunk_size, len(records) - chunk * chunk_size)
    if acc:
        raise RuntimeError("internal: loader ended inside a chunk")


def _commit(partial: PartialCache, chunk: int, batches: list[Batch], feats: list[np.ndarray],
            encoder: ImageEncoder) -> None:
    k, d = encoder.policy.k, encoder.loaded.embed_dim
    f = np.concatenate(feats) if feats else np.zeros((0, 1 + k, d), np.float32)
    failed = [x for b in batches for x in b.failed]
    partial.write_chunk(
        chunk,
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
              key: str, n_chunks: int, template_sets: list[str], manifest: dict) -> EncodeResult:
    parts = [partial.read_chunk(i) for i in range(n_chunks)]
    records = dataset.records
    index = np.concatenate([p["index"] for p in parts])
    feats = np.concatenate([p["features"] for p in parts])
    views = np.concatenate([p["views"] for p in parts])
    sha1 = np.concatenate([p["sha1"] for p in parts])
    f_index = np.concatenate([p["failed_index"] for p in parts])
    f_reason = np.concatenate([p["failed_reason"] for p in parts])
    split_of = np.array([r.split for r in records], dtype=object)[index]
    meta_cols = sorted({c for r in records for c in r.meta})
    splits: dict[str, SplitArrays] = {}
    for s in dataset.splits:
        rows = np.flatnonzero(split_of == s)
        recs = [records[i] for i in index[rows]]
        splits[s] = SplitArrays(
            features=feats[rows], views=views[rows],
            labels=np.array([dataset.label_index(r.label) for r in recs], dtype=np.int64),
            image_id=[r.image_id for r in recs], group_id=[r.group or "" for r in recs],
            sha1=[str(x) for x in sha1[rows]],
            meta={c: [r.meta.get(c, "") for r in recs] for c in meta_cols},
        )
    text = partial.read_array("text") or {}
    loaded = encoder.loaded
    attrs = {
        "key": key,
        "skincache_version": __version__,
        "model": loaded.spec.name,
        "pretrained": loaded.spec.pretrained or "",
        "checkpoint": str(Path(loaded.spec.checkpoint).resolve()) if loaded.spec.checkpoint
        else "",
        "checkpoint_sha256": loaded.spec.identity()["checkpoint_sha256"] or "",
        "weights_sha256": loaded.weights_sha256,
        "embed_dim": loaded.embed_dim,
        "logit_scale": loaded.logit_scale,
        "precision": encoder.precision,
        "device": encoder.device.type,
        "preprocess": loaded.preprocess.to_json(),
        "views": json.dumps({**encoder.policy.to_dict(),
                             "scaled_resize": encoder.maker.aug_resize,
                             "scaled_crop": list(encoder.maker.crop_hw)}),
        "features_normalized": False,
        "dataset": dataset.name,
        "dataset_kind": dataset.kind,
        "dataset_root": str(dataset.root),
        "dataset_fingerprint": fingerprint,
        "classes": json.dumps(dataset.classes),
        "class_names": json.dumps([display_name(c) for c in dataset.classes]),
        "template_sets": json.dumps({k: TEMPLATE_SETS[k] for k in template_sets}),
        "chunking": json.dumps({"chunk_size": manifest["chunk_size"],
                                "batch_size": manifest["batch_size"]}),
        "created": now_iso(),
        "versions": json.dumps(versions("torch", "open_clip", "torchvision", "pillow", "numpy")),
    }
    failed = {
        "image_id": [records[i].image_id for i in f_index],
        "source": [records[i].source for i in f_index],
        "split": [records[i].split or "" for i in f_index],
        "reason": [str(r) for r in f_reason],
    }
    need = estimate_cache_bytes(splits, text, failed)
    free = shutil.disk_usage(final.parent).free
    if free < need:
        raise make_disk_error(errno.ENOSPC, f"disk full: assembling {final} needs about "
                              f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free")
    write_cache(final, attrs, splits, text, failed)
    reasons = Counter(r.split(":")[0] for r in failed["reason"])
    return EncodeResult(final, "built", n_images=len(index), n_failed=len(f_index),
                        failed_reasons=dict(reasons),
                        splits={s: len(a.labels) for s, a in splits.items()})


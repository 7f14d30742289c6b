"""Batches of uint8 views for the image tower, from two loaders that cut the same views:

- Pillow (`cpu_batches`; any device without nvjpeg): a torch DataLoader whose worker processes
  read, decode with Pillow in JPEG draft mode and cut the views; batches travel as uint8.
- tensor (`tensor_batches`; CUDA): a background thread reads bytes and decodes JPEG batches with
  nvjpeg on a side CUDA stream (`torchvision.io.decode_jpeg(device="cuda")`), cuts the views on
  the GPU, and so overlaps the next batch's decode with the model on the current one. Non-JPEG
  or unreadable-by-nvjpeg files fall back to the Pillow route, one by one. (On the CPU it runs
  with torchvision's decoder, which is how it is tested.)
Whatever one image does is recorded in the batch's `failed` with the reason; the run goes on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from skincache._disk import make_disk_error
from skincache.data import Record, read_image_bytes
from skincache.errors import DiskError, InputFileError, UsageError
from skincache.views import DecodeError, ViewMaker, decode_image, probe_size

#: Seconds a decode worker may take for one batch before the run stops with an error.
LOADER_TIMEOUT_S = 600


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


def link_out_of(source: str, root: str | None) -> str | None:
    """Where `source` really is when it lies in the dataset folder `root` but a symlink takes
    it outside (refused unless `encode --follow-symlinks`: a link can make a dataset read any
    file on the machine); None otherwise. A path the metadata itself names outside the folder
    is not a link out and is read as named."""
    if root is None or "::" in source:
        return None
    top = os.path.realpath(root)
    inside = os.path.abspath(source)
    if not (inside == top or inside.startswith(os.path.join(top, ""))):
        return None
    real = os.path.realpath(inside)
    return None if real.startswith(os.path.join(top, "")) else real


def read_record(record: Record, root: str | None = None) -> tuple[bytes | None, str, str]:
    """(bytes or None, sha1, failure reason) for one record's image, never raising; with
    `root`, an image reached by a symlink out of that folder is a failure naming the link."""
    target = link_out_of(record.source, root)
    if target is not None and os.path.isfile(target):  # (a device or FIFO: refused below)
        return None, "", (f"symlink: {record.source} is a link to {target}, outside the "
                          "dataset folder; pass --follow-symlinks to read it")
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


def load_views(record: Record, maker: ViewMaker, root: str | None = None
               ) -> tuple[str, np.ndarray | None, str]:
    """(sha1, uint8 views or None, failure reason) for one record, never raising: whatever
    one image does (even MemoryError inside a decode worker) is recorded for that image and
    the run goes on."""
    data, sha1, reason = read_record(record, root)
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
    def __init__(self, records: list[Record], positions: list[int], maker: ViewMaker,
                 root: str | None = None):
        self.records, self.positions, self.maker, self.root = records, positions, maker, root

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        pos = self.positions[i]
        sha1, views, reason = load_views(self.records[pos], self.maker, self.root)
        return pos, sha1, views, reason


class _HandOverError(RuntimeError):
    """A decode worker could not put a batch in shared memory (raised in the worker, so the
    DataLoader hands it to the main process instead of losing the batch)."""


def _collate(items) -> Batch:
    ok = [(p, s, v) for p, s, v, r in items if v is not None]
    failed = [(p, s, r) for p, s, v, r in items if v is None]
    if ok:
        pixels = torch.from_numpy(np.stack([v for _, _, v in ok]))
    else:
        pixels = torch.empty(0, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        # Moved into shared memory here, where a failure is an exception the DataLoader
        # forwards. Left to its queue's feeder thread, a failure there (a file size limit,
        # /dev/shm full: "unable to resize file </torch_...>") prints a traceback in every
        # worker and the batch never arrives, so the main process waits for it.
        try:
            pixels.share_memory_()
        except RuntimeError as e:
            raise _HandOverError(f"{e} ({pixels.numel():,} bytes)") from None
    return Batch([p for p, _, _ in ok], pixels, [s for _, s, _ in ok], failed)


def _hand_over_failed(e: BaseException) -> DiskError:
    """The one line for a batch a worker could not hand over (the DataLoader wraps the
    worker's exception with its traceback: only its last line is the worker's message)."""
    last = str(e).strip().splitlines()[-1].split(": ", 1)[-1]
    if "File too large" in last or "(27)" in last:
        return make_disk_error(errno.EFBIG, "file size limit reached (ulimit -f): decode "
                               "workers cannot hand a batch over in shared memory "
                               f"({last}); raise the limit (ulimit -f unlimited) or pass "
                               "--workers 0")
    return make_disk_error(errno.ENOSPC, f"shared memory (/dev/shm) full: decode workers "
                           f"cannot hand a batch over ({last}); free /dev/shm, or pass "
                           "--workers 0")


def cpu_batches(records: list[Record], positions: list[int], maker: ViewMaker, batch_size: int,
                num_workers: int, pin_memory: bool = False, root: str | None = None
                ) -> Iterator[Batch]:
    """Pillow route: worker processes decode (draft mode) and cut views; uint8 batches."""
    loader = torch.utils.data.DataLoader(
        _ViewDataset(records, positions, maker, root), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
        # a batch lost between a worker and this process (shared memory full, a worker
        # killed) is an error after this long, not a wait forever
        timeout=LOADER_TIMEOUT_S if num_workers else 0,
    )
    try:
        yield from loader
    except _HandOverError as e:
        raise _hand_over_failed(e) from None


def tensor_batches(records: list[Record], positions: list[int], maker: ViewMaker,
                   batch_size: int, device: torch.device, io_threads: int = 8,
                   prefetch: int = 2, root: str | None = None) -> Iterator[Batch]:
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
        raw = list(pool.map(lambda pos: read_record(records[pos], root), chunk))
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


def route(loader: str, device: torch.device) -> str:
    """Which loader runs: "auto" is the tensor (nvjpeg) route on CUDA, Pillow elsewhere."""
    if loader == "auto":
        return "tensor" if device.type == "cuda" else "pillow"
    if loader not in ("tensor", "pillow"):
        raise UsageError(f"loader must be auto, tensor or pillow, got {loader!r}")
    return loader


"""Fine-tuning's image pipeline: decode every image once, keep uint8 pixels, cut batches.

Why: a fine-tuning epoch on HAM10000 at batch 16 runs hundreds of images/s on one GPU, more than
Pillow decodes 600x450 JPEGs on a few cores, and the same images come back every epoch. So each
image is decoded once (worker processes, JPEG draft mode, the code `encode` uses) and kept:
- the clean view (the model's eval preprocessing, uint8 [3, H, W]) for evaluation and for the
  setups that train on it (base, regularization);
- for the augmented setup, the training image resized once (shortest side 256, scaled to the
  model's input size); each epoch cuts fresh crops from it. The crop positions and flips come
  from `views.view_params` seeded by (seed, epoch, image id): the same run gives the same crops,
  a resumed run included, whatever the batch order or the number of processes.
Pixels stay uint8 (a quarter of float32) and live on the GPU when they fit, so a batch is one
indexing kernel. When memory does not allow (a dataset far larger than HAM10000), the store
streams instead: worker processes decode each epoch's batches again, with the same crops.
Unreadable images are found in the first pass and listed, never in the middle of training.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from skincache.data import Record
from skincache.errors import InputFileError
from skincache.loaders import read_record
from skincache.views import DecodeError, ViewMaker, ViewPolicy, decode_image, view_params


@dataclass(frozen=True)
class Failure:
    """An image that could not be used (recorded in `failed.json` and `run.json`)."""

    image_id: str
    source: str
    split: str
    reason: str


def decode_record(record: Record, maker: ViewMaker, keep_base: bool
                  ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(clean uint8 [3,H,W], resized base uint8 [3,h,w] or None, failure reason); never raises.

    Reading is `loaders.read_record`, so a failure reads the same in a cache's `/failed` table
    and in a fine-tuning run's `failed.json`."""
    data, _, reason = read_record(record)
    if data is None:
        return None, None, reason
    draft = maker.draft_shortest()
    if keep_base:
        draft = max(draft, maker.aug_resize)
    try:
        img = decode_image(data, draft)
    except DecodeError as e:
        return None, None, str(e)
    clean = maker.from_pil(img, record.image_id)[0]
    return clean, (base_image(img, maker) if keep_base else None), ""


def base_image(img: Image.Image, maker: ViewMaker) -> np.ndarray:
    """The image resized once for random crops: the first step of `ViewMaker.from_pil`'s
    augmented views (shortest side = the policy's resize, scaled to the model's size)."""
    return maker.aug_base(img)


def epoch_crops(image_ids: list[str], base_hw: list[tuple[int, int]], maker: ViewMaker,
                seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) per training image for one epoch: one augmented view per image, drawn
    by `views.view_params` from (seed, epoch, image id) alone."""
    pol = maker.policy
    policy = ViewPolicy(k=1, resize=pol.resize, crop=pol.crop, hflip=pol.hflip,
                        seed=epoch_seed(seed, epoch))
    params = [view_params(i, policy, hw, maker.crop_hw)[0]
              for i, hw in zip(image_ids, base_hw, strict=True)]
    top = torch.tensor([p[0] for p in params], dtype=torch.long)
    left = torch.tensor([p[1] for p in params], dtype=torch.long)
    flip = torch.tensor([p[2] for p in params], dtype=torch.bool)
    return top, left, flip


def epoch_seed(seed: int, epoch: int) -> int:
    """One integer per (run seed, epoch): fresh crops every epoch, reproducible across runs."""
    return int(seed) * 100_003 + int(epoch)


def cut_crops(base: torch.Tensor | list[torch.Tensor], idx: torch.Tensor, top: torch.Tensor,
              left: torch.Tensor, flip: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [B, 3, ch, cw] crops (flipped where asked) of the base images `idx`.

    Same-size bases (HAM10000's are all 600x450) are cut in one gather on their device; a list
    of differently sized bases is cut one by one, exactly as `ViewMaker` cuts its views."""
    ch, cw = crop_hw
    if isinstance(base, torch.Tensor):
        dev = base.device
        rows = top[:, None] + torch.arange(ch, device=dev)  # [B, ch]
        cols = left[:, None] + torch.arange(cw, device=dev)  # [B, cw]
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
        chan = torch.arange(base.shape[1], device=dev)
        return base[idx[:, None, None, None], chan[None, :, None, None],
                    rows[:, None, :, None], cols[:, None, None, :]]
    out = []
    for i, t, lft, f in zip(idx.tolist(), top.tolist(), left.tolist(), flip.tolist(),
                            strict=True):
        crop = base[i][:, t:t + ch, lft:lft + cw]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


class _DecodeSet(torch.utils.data.Dataset):
    def __init__(self, records: list[Record], maker: ViewMaker, keep_base: bool):
        self.records, self.maker, self.keep_base = records, maker, keep_base

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return (i, *decode_record(self.records[i], self.maker, self.keep_base))


def _as_list(items):
    return items


def decode_all(records: list[Record], maker: ViewMaker, keep_base: bool, workers: int,
               advance=None) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, str]]:
    """Decode `records` in a worker pool (Pillow, draft mode); yields (position, clean, base,
    reason) in record order."""
    loader = torch.utils.data.DataLoader(
        _DecodeSet(records, maker, keep_base), batch_size=8, shuffle=False,
        num_workers=workers, collate_fn=_as_list, prefetch_factor=4 if workers else None,
    )
    for batch in loader:
        yield from batch
        if advance is not None:
            advance(len(batch))


class ImageStore:
    """The decoded images of one split: labels, ids, clean views and (train, augmented) bases.

    `mode` is "memory" (pixels kept; `to(device)` moves them) or "stream" (decoded again for
    every batch by worker processes; only which images are usable is kept). The augmented
    setup's training store keeps only the resized bases (`keep_clean=False`)."""

    def __init__(self, records: list[Record], labels: list[int], maker: ViewMaker, *,
                 keep_base: bool, mode: str, workers: int, split: str, keep_clean: bool = True,
                 advance=None):
        self.maker, self.keep_base, self.mode, self.workers = maker, keep_base, mode, workers
        self.failed: list[Failure] = []
        keep_records, keep_labels, clean, bases = [], [], [], []
        self.base_hw: list[tuple[int, int]] = []
        for pos, c, b, reason in decode_all(records, maker, keep_base, workers, advance):
            rec = records[pos]
            if c is None:
                self.failed.append(Failure(rec.image_id, rec.source, split, reason))
                continue
            keep_records.append(rec)
            keep_labels.append(labels[pos])
            if b is not None:
                self.base_hw.append((int(b.shape[1]), int(b.shape[2])))
            if mode == "memory":
                if keep_clean:
                    clean.append(torch.from_numpy(c))
                if b is not None:
                    bases.append(torch.from_numpy(b))
        self.records = keep_records
        self.image_ids = [r.image_id for r in keep_records]
        self.labels = torch.tensor(keep_labels, dtype=torch.long)
        self.clean: torch.Tensor | None = torch.stack(clean) if clean else None
        self.base: torch.Tensor | list[torch.Tensor] | None = None
        if mode == "memory" and bases:
            same = len({tuple(b.shape) for b in bases}) == 1
            self.base = torch.stack(bases) if same else bases

    def __len__(self) -> int:
        return len(self.records)

    def nbytes(self) -> int:
        n = self.clean.numel() if self.clean is not None else 0
        if isinstance(self.base, torch.Tensor):
            n += self.base.numel()
        elif self.base:
            n += sum(b.numel() for b in self.base)
        return n

    def to(self, device: torch.device) -> ImageStore:
        """Move the kept pixels and labels to `device` (a GPU: a batch is then one gather)."""
        if self.clean is not None:
            self.clean = self.clean.to(device)
        if isinstance(self.base, torch.Tensor):
            self.base = self.base.to(device)
        elif self.base:
            self.base = [b.to(device) for b in self.base]
        self.labels = self.labels.to(device)
        return self

    @property
    def pixel_device(self) -> torch.device:
        return self.labels.device

    def crops(self, seed: int, epoch: int):
        return epoch_crops(self.image_ids, self.base_hw, self.maker, seed, epoch)

    def batches(self, order: list[int], batch_size: int, device: torch.device,
                crops: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 [b, 3, H, W], labels [b]) on `device` for consecutive slices of `order`:
        clean views, or, with `crops` (from `crops(seed, epoch)`), that epoch's crops.

        The whole order (and the epoch's crop table) goes to the pixels' device once, so a
        batch costs one gather and no host-device synchronisation."""
        order_cpu = torch.as_tensor(order, dtype=torch.long)
        if self.mode == "stream":
            chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            for b, px in zip(chunks, self._stream(chunks, crops), strict=True):
                y = self.labels[torch.as_tensor(b, dtype=torch.long)]
                yield px.to(device, non_blocking=True), y.to(device, non_blocking=True)
            return
        dev = self.pixel_device
        order_dev = order_cpu.to(dev)
        if crops is not None:
            stacked = isinstance(self.base, torch.Tensor)
            crops = tuple(c.to(dev if stacked else "cpu") for c in crops)
        for i in range(0, len(order), batch_size):
            idx = order_dev[i:i + batch_size]
            if crops is None:
                assert self.clean is not None
                px = self.clean[idx]
            else:
                assert self.base is not None
                sel = idx if isinstance(self.base, torch.Tensor) else order_cpu[i:i + batch_size]
                top, left, flip = (c[sel] for c in crops)
                px = cut_crops(self.base, sel, top, left, flip, self.maker.crop_hw)
            yield px.to(device, non_blocking=True), self.labels[idx].to(device, non_blocking=True)

    def _stream(self, batches, crops) -> Iterator[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            _StreamSet(self.records, self.maker, crops), batch_sampler=batches,
            num_workers=self.workers, prefetch_factor=4 if self.workers else None,
        )
        yield from loader


class _StreamSet(torch.utils.data.Dataset):
    """Decode-per-batch fallback: the same pixels the memory store would give."""

    def __init__(self, records: list[Record], maker: ViewMaker, crops):
        self.records, self.maker, self.crops = records, maker, crops

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        rec = self.records[i]
        clean, base, reason = decode_record(rec, self.maker, self.crops is not None)
        if clean is None:
            raise InputFileError(f"{rec.source}: decoded at the start of the run, fails now "
                               f"({reason}); was the file changed during training?")
        if self.crops is None:
            return torch.from_numpy(clean)
        top, left, flip = (c[i:i + 1] for c in self.crops)
        return cut_crops([torch.from_numpy(base)], torch.zeros(1, dtype=torch.long), top, left,
                         flip, self.maker.crop_hw)[0]


def available_memory() -> int | None:
    """Bytes of memory the OS can give without swapping (Linux), else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_bytes(n_clean: int, n_base: int, maker: ViewMaker) -> int:
    """Pixels the memory store would hold (bases assumed 4:3, HAM10000's aspect)."""
    h, w = maker.preprocess.size
    r = maker.aug_resize
    return 3 * (n_clean * h * w + n_base * r * (r * 4 // 3 + 1))


def choose_mode(requested: str, need_bytes: int, sharers: int) -> str:
    """"memory" when the pixels fit in half the available memory (shared by the processes of
    one machine), else "stream"; an explicit request wins."""
    if requested in ("memory", "stream"):
        return requested
    avail = available_memory()
    if avail is None:
        return "memory"
    return "memory" if need_bytes * max(1, sharers) < avail // 2 else "stream"

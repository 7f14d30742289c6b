"""Decode an image once, then cut its clean view and K augmented views from it.

Shared by `encode`, `predict` and `finetune` (its decode-once image store and per-epoch
crops). Two routes produce the same views:
- Pillow (CPU workers): JPEG draft mode shrinks a large JPEG while decoding, then the geometric
  part of open_clip's own eval transform and the augmentation run on the PIL image;
- tensors (any torch device; the CUDA route feeds it nvjpeg-decoded images): the very same
  torchvision geometric transforms on a uint8 tensor.
Views leave both routes as uint8 [1+K, 3, H, W]; normalisation happens on the model's device.
The augmentation's random draws come from the image id and the seed alone, so a rerun, a resumed
run or the other route gives the same views whatever the batch or worker order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from skincache.errors import UsageError
from skincache.models import PreprocessSpec


@dataclass(frozen=True)
class ViewPolicy:
    """The augmentation recipe for the K cached views.

    The default is the reference paper's: Resize 256, RandomCrop 224, HorizontalFlip p=0.5,
    expressed for a 224-pixel model and scaled to the model's input size (a 64-pixel model
    resizes to 73 and crops 64).
    """

    k: int = 4
    resize: int = 256
    crop: int = 224
    hflip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise UsageError(f"views: K must be >= 0, got {self.k}")
        if self.resize < self.crop:
            raise UsageError(f"views: resize ({self.resize}) must be >= crop ({self.crop})")
        if not 0.0 <= self.hflip <= 1.0:
            raise UsageError(f"views: hflip probability must be in [0, 1], got {self.hflip}")

    def to_dict(self) -> dict:
        return {"policy": "resize-randomcrop-hflip", **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def scaled(self, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """(shortest-side resize, (crop h, crop w)) for a model of input `size` (h, w)."""
        return round(self.resize * min(size) / self.crop), size


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason recorded in the cache."""


_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

#: Most pixels an image may have: Pillow's own decompression-bomb limit (about 89 MP), applied
#: from the header on every route, so that the nvjpeg route refuses what the Pillow route does.
MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
#: Longest / shortest side above which an image is refused: a 1 x 1,000,000 strip is a few KB
#: as a PNG, but a shortest-side resize to 224 would make it 224 x 224,000,000 pixels.
MAX_ASPECT: float = 50.0


def check_image_size(width: int, height: int) -> None:
    """Refuse, from the header alone, an image whose decode or resize could exhaust memory."""
    if width < 1 or height < 1:
        raise DecodeError(f"image has no pixels (size {width}x{height})")
    # "reason: details": `info` groups failures by the text before the first colon
    if width * height > MAX_PIXELS:
        raise DecodeError(f"image too large: {width}x{height} = {width * height:,} pixels "
                          f"(limit {MAX_PIXELS:,})")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise DecodeError(f"image too elongated: {width}x{height}, aspect ratio {aspect:.0f} "
                          f"to 1 (limit {MAX_ASPECT:.0f} to 1)")


def probe_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header (Pillow's lazy open reads no pixels), checked by
    `check_image_size`; DecodeError when the header cannot be read or the size is refused.

    The nvjpeg route calls this before handing bytes to the GPU decoder, which has no guard."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"corrupt image: {e}") from None
    check_image_size(w, h)
    return w, h


def decode_image(data: bytes, draft_shortest: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, or DecodeError with a reason a person can act on.

    `draft_shortest` lets a JPEG decode at a reduced scale (1/2, 1/4, 1/8) as long as its
    shortest side stays >= that many pixels: most of the decoding work is skipped for images
    far larger than the model's input. Pillow's decompression-bomb guard stays on, and the
    size is checked from the header (`check_image_size`: pixel and aspect-ratio caps) before a
    single pixel is decoded.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # the header check below refuses what Pillow would warn about, with the same
            # message as the tensor route's `probe_size` (the two routes must agree)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            check_image_size(*img.size)
            if draft_shortest and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
                w, h = img.size
                s = draft_shortest / min(w, h)
                if s < 1:
                    img.draft("RGB" if img.mode != "CMYK" else None,
                              (math.ceil(w * s), math.ceil(h * s)))
            img.load()
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown or corrupt format)") from None
    except OSError as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"corrupt image: {e}") from None
    if img.size[0] < 1 or img.size[1] < 1:
        raise DecodeError(f"image has no pixels (size {img.size})")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (16-bit and float images are scaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def view_params(
    image_id: str, policy: ViewPolicy, resized_hw: tuple[int, int], crop_hw: tuple[int, int]
) -> list[tuple[int, int, bool]]:
    """(top, left, flip) for each of the K views, drawn from (seed, image id) alone."""
    digest = hashlib.sha256(f"{policy.seed}:{image_id}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    (h, w), (ch, cw) = resized_hw, crop_hw
    out = []
    for _ in range(policy.k):
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        flip = bool(rng.random() < policy.hflip)
        out.append((top, left, flip))
    return out


class ViewMaker:
    """Cuts the clean view (the model's eval preprocessing, minus normalisation) and the K
    augmented views from one decoded image, on a PIL image or a uint8 tensor."""

    def __init__(self, preprocess: PreprocessSpec, policy: ViewPolicy):
        self.preprocess = preprocess
        self.policy = policy
        # open_clip's eval transform ends with convert-mode, to-tensor, normalise; the rest is the
        # geometry, which torchvision applies identically to PIL images and tensors.
        self.clean = torch.nn.Sequential(*preprocess.open_clip_transform().transforms[:-3])
        self.aug_resize, self.crop_hw = policy.scaled(preprocess.size)
        self.interpolation = (
            InterpolationMode.BILINEAR
            if preprocess.interpolation == "bilinear"
            else InterpolationMode.BICUBIC
        )

    @property
    def n_views(self) -> int:
        return 1 + self.policy.k

    def draft_shortest(self) -> int:
        """The smallest shortest side a decoded image needs for every view to be exact."""
        need = max(self.preprocess.size)
        if self.preprocess.resize_mode == "longest":
            need = need * 4  # a very elongated image's short side; never shrink below this
        return max(need, self.aug_resize if self.policy.k else 0)

    def from_pil(self, img: Image.Image, image_id: str) -> np.ndarray:
        """uint8 [1+K, 3, H, W] from an RGB PIL image."""
        clean = np.asarray(self.clean(img), dtype=np.uint8).transpose(2, 0, 1)
        out = np.empty((self.n_views, *clean.shape), dtype=np.uint8)
        out[0] = clean
        if self.policy.k:
            self._cut(self.aug_base(img), image_id, out, flip=lambda a: a[:, :, ::-1])
        return out

    def aug_base(self, img: Image.Image) -> np.ndarray:
        """uint8 [3, h, w]: the image resized once (shortest side = the scaled resize), from
        which the augmented crops are cut (also kept in memory by finetune)."""
        base = TF.resize(img, [self.aug_resize], interpolation=self.interpolation)
        return np.ascontiguousarray(np.asarray(base, dtype=np.uint8).transpose(2, 0, 1))

    def from_tensor(self, img: torch.Tensor, image_id: str) -> torch.Tensor:
        """uint8 [1+K, 3, H, W] from a uint8 [3, H, W] tensor on any device."""
        clean = self.clean(img)
        out = torch.empty((self.n_views, *clean.shape), dtype=torch.uint8, device=img.device)
        out[0] = clean
        if self.policy.k:
            base = TF.resize(img, [self.aug_resize], interpolation=self.interpolation,
                             antialias=True)
            self._cut(base, image_id, out, flip=lambda a: a.flip(-1))
        return out

    def from_tensor_batch(self, imgs: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
        """uint8 [B, 1+K, 3, H, W] from same-sized uint8 [B, 3, H, W] images: one resize
        kernel per batch instead of one per image (what keeps the GPU route fast)."""
        clean = self.clean(imgs)
        out = torch.empty((len(imgs), self.n_views, *clean.shape[1:]), dtype=torch.uint8,
                          device=imgs.device)
        out[:, 0] = clean
        if self.policy.k:
            base = TF.resize(imgs, [self.aug_resize], interpolation=self.interpolation,
                             antialias=True)
            for b, image_id in enumerate(image_ids):
                self._cut(base[b], image_id, out[b], flip=lambda a: a.flip(-1))
        return out

    def _cut(self, base, image_id: str, out, flip) -> None:
        ch, cw = self.crop_hw
        hw = (base.shape[-2], base.shape[-1])
        for i, (top, left, do_flip) in enumerate(view_params(image_id, self.policy, hw,
                                                             self.crop_hw)):
            crop = base[:, top:top + ch, left:left + cw]
            out[1 + i] = flip(crop) if do_flip else crop


class Normalizer:
    """uint8 pixels -> normalised float, with the mean/std tensors built once on the device:
    building them per batch is a host-to-device copy from pageable memory, which waits for the
    GPU queue to drain and so stalls every batch."""

    def __init__(self, preprocess: PreprocessSpec, device: torch.device | str = "cpu"):
        self.mean = torch.tensor(preprocess.mean, device=device, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess.std, device=device, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) / 255.0 - self.mean) / self.std

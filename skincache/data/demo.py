"""A small synthetic dataset shaped like HAM10000, for the offline demo and the tests.

Same layout as the real download (`HAM10000_metadata.csv` with the real columns, JPEGs in
`HAM10000_images_part_1/` and `_part_2/`), the same traits that matter for the pipeline (class
imbalance like HAM10000's, several images per lesion, 600x450 JPEGs, a few missing ages), and
images a classifier can learn from: each class draws a lesion blob with its own colour, outline
and texture on a skin-tone background; the images of one lesion share it, jittered.

Deterministic: the same arguments give the same bytes (with the same Pillow). Fast: the picture
is drawn with numpy at half size and enlarged by Pillow while being turned into a JPEG.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from skincache.defaults import HAM10000_COLUMNS, HAM10000_METADATA
from skincache.errors import UsageError

from ._record import DataError
from .classes import HAM10000_CLASSES, HAM10000_COUNTS

MARKER = ".skincache-demo.json"
METADATA = HAM10000_METADATA
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
COLUMNS = HAM10000_COLUMNS
_VERSION = 1
MIN_PER_CLASS = 8  # so that, split 72/19/9 by lesion, every split gets every class


@dataclass(frozen=True)
class _Look:
    """How a class is drawn: lesion colours, outline and texture."""

    colour: tuple[int, int, int]
    second: tuple[int, int, int]  # texture / secondary colour
    radius: float  # fraction of the image height
    irregular: float  # outline wobble amplitude
    lobes: int  # outline wobble frequency
    aspect: float  # ellipse stretch
    texture: str  # reticular | stripes | dots | noise | ring | clods | patches
    freq: float
    dx_types: tuple[str, ...]


LOOKS: dict[str, _Look] = {
    "akiec": _Look((196, 104, 92), (236, 214, 200), 0.30, 0.16, 5, 1.2, "noise", 0.0,
                   ("histo",)),
    "bcc": _Look((214, 158, 160), (170, 30, 45), 0.26, 0.10, 4, 1.1, "stripes", 18.0,
                 ("histo",)),
    "bkl": _Look((170, 128, 84), (110, 78, 50), 0.30, 0.08, 3, 1.5, "dots", 22.0,
                 ("histo", "consensus", "confocal")),
    "df": _Look((128, 84, 62), (238, 226, 218), 0.17, 0.04, 2, 1.1, "ring", 0.0,
                ("histo", "consensus")),
    "mel": _Look((58, 36, 32), (70, 90, 130), 0.34, 0.28, 3, 1.3, "patches", 6.0,
                 ("histo",)),
    "nv": _Look((126, 80, 48), (84, 52, 30), 0.24, 0.03, 2, 1.05, "reticular", 30.0,
                ("follow_up", "histo", "consensus")),
    "vasc": _Look((152, 34, 64), (90, 10, 50), 0.20, 0.12, 6, 1.0, "clods", 14.0,
                  ("consensus", "histo")),
}

_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest",
          "foot", "neck", "scalp", "hand", "unknown")
_SITE_P = np.array([22, 21, 14, 11, 10, 7, 4, 3, 2, 2, 1, 3], dtype=float)


def class_counts(n_images: int) -> dict[str, int]:
    """Images per class: HAM10000's proportions (largest remainder) on top of a floor of
    MIN_PER_CLASS (or n_images // 7 for tiny sets) so that every class reaches every split."""
    k = len(HAM10000_CLASSES)
    if n_images < 2 * k:
        raise UsageError(f"n_images={n_images}: the demo needs at least {2 * k} images")
    floor = min(MIN_PER_CLASS, n_images // k)
    rest = n_images - floor * k
    total = sum(HAM10000_COUNTS.values())
    exact = {c: rest * HAM10000_COUNTS[c] / total for c in HAM10000_CLASSES}
    counts = {c: floor + int(exact[c]) for c in HAM10000_CLASSES}
    by_remainder = sorted(HAM10000_CLASSES, key=lambda c: (-(exact[c] - int(exact[c])), c))
    for c in by_remainder[: n_images - sum(counts.values())]:
        counts[c] += 1
    return counts


def _lesion_sizes(n: int, rng: np.random.Generator) -> list[int]:
    """Split n images into lesions of 1-4 images (mostly 1-2, like HAM10000), capped so that a
    class has at least 3 lesions."""
    cap = max(1, min(4, n // 3))
    sizes: list[int] = []
    while n > 0:
        s = int(min(rng.choice([1, 2, 3, 4], p=[0.5, 0.3, 0.12, 0.08]), cap, n))
        sizes.append(s)
        n -= s
    return sizes


def _plan(n_images: int, seed: int) -> list[dict[str, str]]:
    """The metadata rows: one per image, lesions of each class, in a seeded order."""
    rng = np.random.default_rng(seed)
    lesions: list[tuple[str, int]] = []
    for c, n in class_counts(n_images).items():
        lesions.extend((c, s) for s in _lesion_sizes(n, rng))
    order = rng.permutation(len(lesions))
    lesion_nums = rng.permutation(len(lesions))
    image_nums = rng.permutation(n_images)
    rows: list[dict[str, str]] = []
    for li, idx in enumerate(order):
        dx, size = lesions[idx]
        look = LOOKS[dx]
        age = "" if rng.random() < 0.02 else f"{float(rng.integers(2, 18) * 5):.1f}"
        meta = {
            "lesion_id": f"HAM_{9_000_000 + int(lesion_nums[li]):07d}",
            "dx": dx,
            "dx_type": str(rng.choice(look.dx_types)),
            "age": age,
            "sex": str(rng.choice(["male", "female", "unknown"], p=[0.53, 0.46, 0.01])),
            "localization": str(rng.choice(_SITES, p=_SITE_P / _SITE_P.sum())),
        }
        for _ in range(size):
            num = int(image_nums[len(rows)])
            rows.append({**meta, "image_id": f"ISIC_{9_000_000 + num:07d}"})
    return rows


class _Painter:
    """Draws lesion images at half size, then doubles them (nearest: the JPEG and any later
    resize smooth the 2x2 blocks). Arrays are channels-first (numpy broadcasts a trailing axis
    of 3 slowly); grids, vignette and a noise tile are built once, so a picture costs a handful
    of array operations."""

    _PAD = 32  # noise tile margin: each image takes a window at a random offset

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size
        w, h = max(8, (size[0] + 1) // 2), max(8, (size[1] + 1) // 2)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        self.y = (ys - h / 2) / h  # units of image height
        self.x = (xs - w / 2) / h
        self.shape = (h, w)
        self.vignette = 1 - 0.35 * np.clip((self.x**2 + self.y**2) * 1.6 - 0.15, 0, 1)
        tile_rng = np.random.default_rng(12345)
        self.noise = tile_rng.standard_normal((1, h + self._PAD, w + self._PAD), np.float32) * 4

    def paint(self, look: _Look, lesion_rng: np.random.Generator,
              image_rng: np.random.Generator) -> Image.Image:
        # Python floats, not numpy float64 scalars, so the float32 arrays stay float32.
        lp = lesion_rng.random(8).tolist()  # shared by every image of the lesion
        ip = image_rng.random(7).tolist()  # per-image jitter
        h, w = self.shape
        skin = (np.array([222, 178, 150], np.float32) + (lp[0] - 0.5) * 40
                + (lp[1] - 0.5) * np.array([10, 20, 25], np.float32))
        cx = (lp[2] - 0.5) * 0.25 + (ip[0] - 0.5) * 0.08
        cy = (lp[3] - 0.5) * 0.15 + (ip[1] - 0.5) * 0.08
        rot = lp[4] * 2 * np.pi + (ip[2] - 0.5) * 0.6
        radius = look.radius * (0.85 + 0.3 * lp[5]) * (0.95 + 0.1 * ip[3])
        dx, dy = self.x - cx, self.y - cy
        c, s = float(np.cos(rot)), float(np.sin(rot))
        u, v = (c * dx + s * dy) / look.aspect, c * dy - s * dx
        rr = np.sqrt(u * u + v * v) + 1e-6
        r = rr / radius
        # Outline wobble sin(k*theta + phase) as Im(e^{i theta})^k: cheaper than arctan2.
        e1 = (u + 1j * v).astype(np.complex64) / rr
        ek = e1 ** look.lobes
        wobble = (ek * complex(np.exp(1j * lp[6] * 6.28))).imag \
            + 0.5 * (ek * e1 * e1 * complex(np.exp(1j * lp[7] * 6.28))).imag
        mask = np.clip((1 + look.irregular * wobble - r) * 12, 0, 1)
        t = self._texture(look, u, v, r, lp, image_rng).astype(np.float32, copy=False)
        # colour = skin + mask * (lesion - skin), lesion = colour + t * (second - colour)
        colour = np.array(look.colour, np.float32)
        first = (colour - skin)[:, None, None]
        step = (np.array(look.second, np.float32) - colour)[:, None, None]
        img = step * (mask * t)
        img += first * mask
        img += skin[:, None, None]
        img *= self.vignette * (0.94 + 0.12 * ip[4])
        oy, ox = int(ip[5] * self._PAD), int(ip[6] * self._PAD)
        img += self.noise[:, oy:oy + h, ox:ox + w]
        np.clip(img, 0, 255, out=img)
        planes = img.astype(np.uint8)
        out = Image.merge("RGB", [Image.fromarray(p) for p in planes])
        return out.resize(self.size, Image.NEAREST)

    @staticmethod
    def _texture(look: _Look, u: np.ndarray, v: np.ndarray, r: np.ndarray, lp: list[float],
                 rng: np.random.Generator) -> np.ndarray:
        """A 0..1 map of where the secondary colour shows, one pattern per class."""
        f = look.freq
        if look.texture == "reticular":
            return 0.5 * (np.abs(np.sin(f * u) * np.sin(f * v)) > 0.5)
        if look.texture == "stripes":
            return np.clip(np.sin(f * (u + 0.6 * v) + lp[0] * 6) * 3 - 2.2, 0, 1)
        if look.texture == "dots":
            return 0.8 * ((np.sin(f * u) + np.sin(f * v)) > 1.4)
        if look.texture == "noise":
            return np.clip(rng.standard_normal(u.shape, dtype=np.float32) * 0.3 + 0.35, 0, 1)
        if look.texture == "ring":
            return np.clip(1.6 * r - 0.5, 0, 1)
        if look.texture == "clods":
            return 0.7 * (np.sin(f * r + 3 * np.sin(3 * u)) > 0.3)
        return np.clip(np.sin(f * u + lp[1] * 6) * np.sin(f * 0.7 * v + lp[2] * 6) * 2, 0, 1)


def _marker(n_images: int, seed: int, size: tuple[int, int]) -> dict[str, object]:
    return {"version": _VERSION, "n_images": n_images, "seed": seed, "size": list(size)}


def _is_done(root: Path, marker: dict[str, object]) -> bool:
    try:
        if json.loads((root / MARKER).read_text()) != marker:
            return False
        with open(root / METADATA, newline="") as f:
            ids = [row["image_id"] for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return False
    return len(ids) == marker["n_images"] and all(
        any((root / p / f"{i}.jpg").is_file() for p in PARTS) for i in ids
    )


def make_demo_dataset(root: Path, n_images: int = 280, seed: int = 0,
                      size: tuple[int, int] = (600, 450)) -> Path:
    """Write a HAM10000-shaped synthetic dataset into `root` and return `root`.

    A no-op when `root` already holds the same demo (same arguments, all files present).
    Refuses (DataError) to write over a HAM10000_metadata.csv that is not a demo's.
    """
    root = Path(root)
    marker = _marker(n_images, seed, tuple(size))
    if _is_done(root, marker):
        return root
    if (root / METADATA).exists() and not (root / MARKER).exists():
        raise DataError(f"{root}: holds a {METADATA} that is not a skincache demo; "
                        f"refusing to overwrite it")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    for part in PARTS:
        shutil.rmtree(root / part, ignore_errors=True)
        (root / part).mkdir()

    rows = _plan(n_images, seed)
    painter = _Painter(tuple(size))
    half = (n_images + 1) // 2
    ranked = {i: k for k, i in enumerate(sorted(r["image_id"] for r in rows))}
    lesion_index: dict[str, int] = {}
    for k, row in enumerate(rows):
        li = lesion_index.setdefault(row["lesion_id"], len(lesion_index))
        img = painter.paint(LOOKS[row["dx"]], np.random.default_rng([seed, li]),
                            np.random.default_rng([seed, li, k]))
        part = PARTS[0] if ranked[row["image_id"]] < half else PARTS[1]
        img.save(root / part / f"{row['image_id']}.jpg", "JPEG", quality=90)

    tmp = root / (METADATA + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(root / METADATA)
    (root / MARKER).write_text(json.dumps(marker))
    return root


def synthetic_features(
    seed: int = 0, d: int = 512, k_views: int = 4, n_templates: int = 8, val_frac: float = 0.1,
    test_frac: float = 0.2, scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """A HAM10000-sized feature problem shaped like CLIP's, for head benchmarks: train split
    of HAM10000's class counts (10,015 images at `scale` 1; at least 3 per class otherwise),
    val/test with the same proportions, K augmented views, C x T prompt embeddings. Features
    are unit vectors: a large shared component, a weaker class direction, per-image noise.
    Keys: X, y, views, X_val, y_val, X_test, y_test, text."""
    rng = np.random.default_rng(seed)
    counts = np.array([HAM10000_COUNTS[c] for c in HAM10000_CLASSES])
    if scale != 1.0:
        counts = np.maximum(3, np.round(counts * scale)).astype(int)
    c = len(counts)
    common = _unit(rng.standard_normal(d))
    means = _unit(rng.standard_normal((c, d)))

    def images(n_per_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(c), n_per_class)
        rng.shuffle(y)
        x = 3.0 * common + 0.35 * means[y] + rng.standard_normal((len(y), d)) / np.sqrt(d) * 2.2
        return _unit(x).astype(np.float32), y

    X, y = images(counts)
    X_val, y_val = images(np.maximum(1, np.round(counts * val_frac)).astype(int))
    X_test, y_test = images(np.maximum(1, np.round(counts * test_frac)).astype(int))
    noise = rng.standard_normal((len(X), k_views, d)) / np.sqrt(d) * 0.8
    views = _unit(X[:, None, :] + noise).astype(np.float32)
    # Prompts: a shared "photo of a lesion" direction, the class direction, template noise.
    text = _unit(
        2.0 * common + 0.5 * means[:, None, :]
        + rng.standard_normal((c, n_templates, d)) / np.sqrt(d) * 1.5
    ).astype(np.float32)
    return {"X": X, "y": y, "views": views, "X_val": X_val, "y_val": y_val,
            "X_test": X_test, "y_test": y_test, "text": text}


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

"""Copy a few hundred real HAM10000 images into a small HAM10000-layout folder for the GPU check.

The GPU machine reaches no network and receives only the repository's working tree (plus the
ignored paths a call carries), so `benchmarks/gpu_check.py` takes its real images from a folder
inside the checkout: by default `.gpu-data/ham10000/` (git-ignored). This picks whole lesions,
class by class (about the same number of images per class, so the rare classes are there too),
in a seeded order, copies their images and writes a `HAM10000_metadata.csv` with their rows:
`skincache.load_dataset` reads the folder as HAM10000.

    python benchmarks/gpu_data.py                       # 400 images from ../shared/data/ham10000
    python benchmarks/gpu_data.py --src DIR --n 300 --to .gpu-data/ham10000

The shared copy's images are 200x150 JPEGs of about 4 KB: 400 of them take about 1.6 MB.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "ham10000"
DEFAULT_TO = REPO / ".gpu-data" / "ham10000"
METADATA = "HAM10000_metadata.csv"


def _index_images(src: Path) -> dict[str, Path]:
    out = {}
    for dirpath, _, names in os.walk(src):
        for n in names:
            if n.lower().endswith(".jpg"):
                out[n[:-4]] = Path(dirpath) / n
    return out


def select(rows: list[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    """About n rows, whole lesions, classes as even as their sizes allow, in a seeded order."""
    lesions: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        lesions[r["dx"]][r["lesion_id"]].append(r)
    rng = random.Random(seed)
    queues = {}
    for dx in sorted(lesions):
        ids = sorted(lesions[dx])
        rng.shuffle(ids)
        queues[dx] = [lesions[dx][i] for i in ids]
    picked: list[dict[str, str]] = []
    while len(picked) < n and any(queues.values()):
        for dx in sorted(queues):  # one lesion per class per round
            if queues[dx] and len(picked) < n:
                picked.extend(queues[dx].pop())
    return picked


def copy_subset(src: Path, dest: Path, n: int = 400, seed: int = 0) -> Path:
    """Write `dest/HAM10000_metadata.csv` and `dest/images/*.jpg`; returns `dest`."""
    src, dest = Path(src), Path(dest)
    meta = src / METADATA
    if not meta.is_file():
        raise SystemExit(f"{src}: no {METADATA} here (give --src, the HAM10000 folder)")
    with open(meta, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    images = _index_images(src)
    rows = [r for r in rows if r["image_id"] in images]
    picked = select(rows, n, seed)
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    for r in picked:
        shutil.copyfile(images[r["image_id"]], dest / "images" / f"{r['image_id']}.jpg")
    with open(dest / METADATA, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(picked)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--to", type=Path, default=DEFAULT_TO)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dest = copy_subset(args.src, args.to, args.n, args.seed)
    files = list((dest / "images").iterdir())
    size = sum(p.stat().st_size for p in files)
    with open(dest / METADATA, newline="") as f:
        counts: dict[str, int] = defaultdict(int)
        for r in csv.DictReader(f):
            counts[r["dx"]] += 1
    print(f"{dest}: {len(files)} images, {size / 2**20:.1f} MiB; per class "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The synthetic HAM10000-shaped demo set: layout, shape, determinism, learnability."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skincache.data import HAM10000_CLASSES, DataError, load_dataset, make_demo_dataset
from skincache.data.classes import HAM10000_COUNTS

N = 120  # small: the test must stay fast on 2 shared cores


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "ham", n_images=N, seed=0)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(root: Path) -> list[dict[str, str]]:
    with open(root / "HAM10000_metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_shape(demo: Path) -> None:
    meta = rows(demo)
    assert list(meta[0]) == ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                             "localization"]
    assert len(meta) == N and len({r["image_id"] for r in meta}) == N
    assert all(r["lesion_id"].startswith("HAM_") and len(r["lesion_id"]) == 11 for r in meta)
    assert all(r["image_id"].startswith("ISIC_") and len(r["image_id"]) == 12 for r in meta)
    parts = {p.parent.name for p in demo.rglob("*.jpg")}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert len(list(demo.rglob("*.jpg"))) == N
    with Image.open(next(demo.rglob("*.jpg"))) as im:
        assert im.format == "JPEG" and im.size == (600, 450) and im.mode == "RGB"

    # class imbalance like HAM10000: same order of class sizes at the extremes, every class
    # with enough images to reach every split
    counts = Counter(r["dx"] for r in meta)
    assert set(counts) == set(HAM10000_CLASSES)
    assert counts.most_common(1)[0][0] == max(HAM10000_COUNTS, key=HAM10000_COUNTS.get)
    assert counts["nv"] > 0.4 * N and min(counts.values()) >= 6

    # several images per lesion (1-4), one label and one set of metadata per lesion
    per_lesion: dict[str, list[dict[str, str]]] = {}
    for r in meta:
        per_lesion.setdefault(r["lesion_id"], []).append(r)
    sizes = Counter(len(v) for v in per_lesion.values())
    assert max(sizes) <= 4 and sizes[1] > 0 and sum(n for s, n in sizes.items() if s > 1) > 0
    for group in per_lesion.values():
        assert len({(r["dx"], r["age"], r["sex"], r["localization"]) for r in group}) == 1


def test_loads_with_every_class_in_every_split(demo: Path) -> None:
    ds = load_dataset(demo)
    assert ds.kind == "ham10000" and len(ds) == N and ds.missing == []
    ds.validate()
    for split, counts in ds.class_counts().items():
        assert all(n > 0 for n in counts.values()), (split, counts)


def test_class_is_visible_in_the_pixels(demo: Path) -> None:
    """A nearest-centroid classifier on mean colours of the lesion centre beats chance
    clearly on held-out lesions: the images carry class signal."""
    ds = load_dataset(demo, seed=0)

    def feature(src: str) -> np.ndarray:
        with Image.open(src) as im:
            im.draft("RGB", (75, 56))
            a = np.asarray(im.convert("RGB").resize((32, 24)), dtype=np.float32)
        return np.concatenate([a[6:18, 8:24].mean((0, 1)), a[6:18, 8:24].std((0, 1))])

    train = [r for r in ds.records if r.split == "train"]
    held = [r for r in ds.records if r.split != "train"]
    cent = {c: np.mean([feature(r.source) for r in train if r.label == c], 0)
            for c in HAM10000_CLASSES}
    hits = [min(cent, key=lambda c: np.linalg.norm(feature(r.source) - cent[c])) == r.label
            for r in held]
    assert np.mean(hits) > 0.6  # chance with 7 classes ~0.14, majority class ~0.55


def test_deterministic_and_rerun_is_noop(demo: Path, tmp_path: Path) -> None:
    before = tree_digest(demo)
    mtimes = {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()}
    make_demo_dataset(demo, n_images=N, seed=0)
    assert tree_digest(demo) == before
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()} == mtimes
    # same seed elsewhere: same bytes; another seed: different data
    again = make_demo_dataset(tmp_path / "again", n_images=N, seed=0)
    assert tree_digest(again) == before
    other = make_demo_dataset(tmp_path / "other", n_images=N, seed=1)
    assert rows(other) != rows(demo)
    # regenerating in place with other arguments replaces the old demo cleanly
    make_demo_dataset(tmp_path / "again", n_images=60, seed=2)
    assert len(list((tmp_path / "again").rglob("*.jpg"))) == 60
    assert len(rows(tmp_path / "again")) == 60


def test_refuses_to_overwrite_real_data(tmp_path: Path) -> None:
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\n")
    with pytest.raises(DataError, match="refusing"):
        make_demo_dataset(tmp_path, n_images=20)
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path / "tiny", n_images=5)

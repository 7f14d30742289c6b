"""Published splits in, leaks out: `--split-file` (encode, audit), the lesion leak into test
that audit reports, and `encode --drop-lesion-mates`; on synthetic records, on the demo data
through the CLI, and on the real HAM10000 with the DermFM-Zero test split (613 of 1,503 test
images leak), skipped when ../shared/data is absent."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skincache.cache import FeatureCache
from skincache.cli import app
from skincache.data import (
    DataError,
    Dataset,
    Record,
    apply_split_file,
    drop_test_lesion_mates,
    load_dataset,
    read_split_file,
)
from skincache.data.audit import lesion_leak
from skincache.data.classes import HAM10000_CLASSES
from skincache.errors import InputFileError, NotFoundError

runner = CliRunner()
CLASSES = list(HAM10000_CLASSES)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- reading the file


@pytest.mark.parametrize(("text", "layout", "expected"), [
    ("image_id,split\na,train\nb,validation\nc,TEST\n", "id+split",
     {"a": "train", "b": "val", "c": "test"}),
    ("# published test ids\n\n/data/x/a.jpg\nb.PNG\nc\n", "test ids",
     {"a": "test", "b": "test", "c": "test"}),
    ("image_id\na\nb\n", "test ids", {"a": "test", "b": "test"}),
    ("filename,true_label,predicted_label,probability_class_0\n/h/ISIC_1.jpg,2,2,0.3\n"
     "/h/ISIC_2.jpg,1,0,0.1\n", "test ids", {"ISIC_1": "test", "ISIC_2": "test"}),
    ("a,train\nb,val\nc,test\n", "id+split", {"a": "train", "b": "val", "c": "test"}),
    ("a.b.c\n", "test ids", {"a.b.c": "test"}),  # only an image extension is removed
])
def test_read_split_file_layouts(tmp_path: Path, text: str, layout: str, expected: dict) -> None:
    sf = read_split_file(_write(tmp_path / "split.csv", text))
    assert sf.layout == layout
    assert sf.splits == expected
    assert list(sf.splits) == list(expected)  # file order kept


@pytest.mark.parametrize(("text", "words"), [
    ("", "no image ids"),
    ("image_id,split\n", "header only"),
    ("image_id,split\na,fold1\n", "line 2: split 'fold1'"),
    ("image_id,split\na,train\nb,test\na,test\n", "line 4: a is given split test"),
    ("image_id,split\n,train\n", "line 2: empty image id"),
    ("lesion,dx,age\nx,nv,3\n", "no image id column"),
    ("a\x00b\n", "NUL bytes"),
    ('image_id\n"a\n', "malformed CSV"),
])
def test_read_split_file_refuses_in_one_line(tmp_path: Path, text: str, words: str) -> None:
    path = _write(tmp_path / "split.csv", text)
    with pytest.raises((DataError, InputFileError)) as e:
        read_split_file(path)
    assert words in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_read_split_file_refuses_a_fifo_and_a_missing_file(tmp_path: Path) -> None:
    fifo = tmp_path / "split.fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputFileError, match="not a regular file"):
        read_split_file(fifo)  # refused at once, never waited on
    with pytest.raises(NotFoundError, match="does not exist"):
        read_split_file(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- synthetic records


def _dataset() -> Dataset:
    """40 lesions of 1-3 images over two classes: lesion L<k> has k % 3 + 1 images."""
    records = []
    for k in range(40):
        for j in range(k % 3 + 1):
            records.append(Record(f"im{k}_{j}", f"/nowhere/im{k}_{j}.jpg",
                                  "nv" if k % 2 else "mel", None, f"L{k}"))
    return Dataset("synthetic", records, CLASSES, root="/nowhere")


def _groups_by_split(records: list[Record]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in records:
        out[r.group].add(r.split)
    return out


def test_apply_split_file_keeps_the_test_ids_and_splits_the_rest_by_lesion(
        tmp_path: Path) -> None:
    ds = _dataset()
    test_ids = [r.image_id for r in ds.records if r.image_id.endswith("_0")][::3]  # image-level
    sf = read_split_file(_write(tmp_path / "test.txt", "\n".join(test_ids)))
    out = apply_split_file(ds, sf, (0.72, 0.19, 0.09), seed=3)
    assert [r.image_id for r in out.records] == [r.image_id for r in ds.records]
    assert {r.image_id for r in out.records if r.split == "test"} == set(test_ids)
    rest = [r for r in out.records if r.split != "test"]
    assert {r.split for r in rest} == {"train", "val"}
    # the unlisted images of a lesion share one split (test aside: the file decides that)
    assert all(len(s) == 1 for s in _groups_by_split(rest).values())
    assert out.split_origin["split_by_seed"] == len(rest)
    assert out.split_origin["listed"] == {"test": len(test_ids)}
    assert out.split_origin["sha256"] == sf.sha256 and out.name.startswith("synthetic-split")
    again = apply_split_file(ds, sf, (0.72, 0.19, 0.09), seed=3)
    assert [r.split for r in again.records] == [r.split for r in out.records]
    out.validate()


def test_the_fingerprint_covers_the_file_content_not_its_place(tmp_path: Path) -> None:
    ds = _dataset()
    text = "im0_0\nim3_0\n"

    def fingerprint(path: Path, content: str) -> str:
        return apply_split_file(ds, read_split_file(_write(path, content)), (0.8, 0.2),
                                0).fingerprint()

    first = fingerprint(tmp_path / "a.txt", text)
    assert fingerprint(tmp_path / "b.txt", text) == first  # moved: same cache
    # the same ids, other bytes: the key follows the file's sha256
    assert fingerprint(tmp_path / "a.txt", "# v2\n" + text) != first


def test_a_split_file_naming_unknown_ids_is_one_line_naming_a_few(tmp_path: Path) -> None:
    ds = _dataset()
    path = _write(tmp_path / "split.txt", "im0_0\nghost1\nghost2\nghost3\nghost4\nghost5\n")
    with pytest.raises(DataError) as e:
        apply_split_file(ds, read_split_file(path), (0.8, 0.2), 0)
    msg = str(e.value)
    assert "5 of its 6 image ids" in msg and "ghost1, ghost2, ghost3" in msg
    assert "ghost4" not in msg and str(path) in msg and "\n" not in msg


def test_an_id_split_file_listing_every_image_needs_val(tmp_path: Path) -> None:
    ds = _dataset()
    rows = [f"{r.image_id},{'test' if i % 4 == 0 else 'train'}"
            for i, r in enumerate(ds.records)]
    path = _write(tmp_path / "split.csv", "image_id,split\n" + "\n".join(rows))
    with pytest.raises(DataError, match="no image in val"):
        apply_split_file(ds, read_split_file(path), (0.8, 0.2), 0)


def test_lesion_leak_and_drop_test_lesion_mates() -> None:
    recs = [
        Record("t1", "s", "nv", "test", "A"), Record("t2", "s", "nv", "test", "A"),
        Record("m1", "s", "nv", "train", "A"),  # A: 2 test images affected, 1 mate
        Record("t3", "s", "mel", "test", "B"), Record("m2", "s", "mel", "val", "B"),
        Record("m3", "s", "mel", "train", "B"),  # B: 1 affected, 2 mates
        Record("t4", "s", "nv", "test", "C"),  # C: test only
        Record("t5", "s", "nv", "test", None), Record("u", "s", "nv", "train", None),
        Record("x1", "s", "mel", "train", "D"), Record("x2", "s", "mel", "val", "D"),
    ]
    leak = lesion_leak(recs)
    assert (leak.test_images, leak.test_images_affected, leak.test_lesions_affected,
            leak.mates_outside_test, leak.mates_by_split) == (5, 3, 2, 3, {"train": 2, "val": 1})
    ds = Dataset("toy", recs, CLASSES, missing=["m2", "t1"])
    clean = drop_test_lesion_mates(ds)
    assert [r.image_id for r in clean.records] == ["t1", "t2", "t3", "t4", "t5", "u", "x1", "x2"]
    assert clean.missing == ["t1"]
    assert clean.split_origin == {"lesion_mates_dropped": 3, "lesions_with_mates_dropped": 2}
    assert lesion_leak(clean.records).test_images_affected == 0
    assert clean.fingerprint() != Dataset("toy", clean.records, CLASSES).fingerprint()
    assert lesion_leak([r for r in recs if r.split != "test"]) is None
    with pytest.raises(DataError, match="needs a test split"):
        drop_test_lesion_mates(Dataset("toy", recs[9:], CLASSES))


# --------------------------------------------------------------------------- the CLI, demo data


def _metadata(root: Path) -> dict[str, str]:
    """image id -> lesion id, read straight from the metadata CSV (not through skincache)."""
    with open(root / "HAM10000_metadata.csv", newline="") as f:
        return {row["image_id"]: row["lesion_id"] for row in csv.DictReader(f)}


def _expected_leak(lesion: dict[str, str], test: set[str]) -> tuple[int, int]:
    """(test images with a lesion mate outside test, images outside test of test lesions)."""
    outside = {lesion[i] for i in lesion if i not in test}
    test_lesions = {lesion[i] for i in test}
    return (sum(lesion[i] in outside for i in test),
            sum(lesion[i] in test_lesions for i in lesion if i not in test))


def _ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _assert_no_lesion_crosses(cache: Path) -> dict[str, list[str]]:
    fc = FeatureCache.open(cache)
    ids = {s: [str(x) for x in d.image_id] for s, d in fc.splits.items()}
    where: dict[str, set[str]] = defaultdict(set)
    for s, d in fc.splits.items():
        for g in d.group_id:
            if str(g):
                where[str(g)].add(s)
    assert where and all(len(s) == 1 for s in where.values())
    return ids


def test_cli_audit_and_encode_with_a_split_file_on_demo(demo_root: Path, tmp_path: Path) -> None:
    lesion = _metadata(demo_root)
    test = set(sorted(lesion)[::4])  # an image-level split: lesions cut in two
    affected, mates = _expected_leak(lesion, test)
    assert affected and mates  # the demo has multi-image lesions, so this split leaks
    split = _write(tmp_path / "test_ids.txt", "".join(f"{i}.jpg\n" for i in sorted(test)))

    out = tmp_path / "audit.json"
    _ok(["audit", "--data", str(demo_root), "--split-file", str(split), "--no-hash", "--quiet",
         "--json", str(out)])
    leak = json.loads(out.read_text())["test_leakage"]
    assert (leak["test_images"], leak["test_images_affected"],
            leak["mates_outside_test"]) == (len(test), affected, mates)
    _ok(["audit", "--data", str(demo_root), "--split-file", str(split), "--drop-lesion-mates",
         "--no-hash", "--quiet", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["test_leakage"]["test_images_affected"] == 0 and rep["leak_free"]
    assert rep["split_origin"]["lesion_mates_dropped"] == mates

    r = _ok(["encode", "--data", str(demo_root), "--split-file", str(split),
             "--drop-lesion-mates", "--model", "skincache-tiny", "--pretrained", "",
             "--device", "cpu", "--views", "0", "--workers", "0", "--quiet",
             "--cache-dir", str(tmp_path / "cache")])
    assert f"left out {mates} train/val images" in r.output
    cache = next((tmp_path / "cache").glob("*.h5"))
    ids = _assert_no_lesion_crosses(cache)
    assert set(ids["test"]) == test
    assert sum(map(len, ids.values())) == len(lesion) - mates
    origin = FeatureCache.open(cache).header.split_origin
    assert origin["lesion_mates_dropped"] == mates and origin["file"] == str(split)


def test_cli_split_file_errors_are_one_line(demo_root: Path, tmp_path: Path) -> None:
    split = _write(tmp_path / "split.txt", "nope_1\nnope_2\n")
    r = runner.invoke(app, ["encode", "--data", str(demo_root), "--split-file", str(split),
                            "--model", "skincache-tiny", "--device", "cpu", "--quiet",
                            "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.count("error:") == 1 and "2 of its 2 image ids" in r.output
    assert not (tmp_path / "cache").exists()  # refused before any model loaded
    r = runner.invoke(app, ["audit", "--cache", str(tmp_path / "x.h5"), "--split-file",
                            str(split)])
    assert r.exit_code == 1 and "--split-file needs --data" in r.output
    r = runner.invoke(app, ["audit", "--cache", str(tmp_path / "x.h5"), "--drop-lesion-mates"])
    assert r.exit_code == 1 and "--drop-lesion-mates needs --data" in r.output


# --------------------------------------------------------------------------- the real data


@pytest.fixture
def published(ham10000_dir: Path) -> Path:
    """The DermFM-Zero prediction files beside the real HAM10000, or skip."""
    path = ham10000_dir.parent / "published"
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is absent (it lives outside the repo)")
    return path


@pytest.mark.parametrize("name", ["lp-HAM-MONET.csv", "lp-HAM-DINOv3-L16.csv"])
def test_real_published_split_leaks_613_of_1503(name: str, ham10000_dir: Path,
                                                 published: Path, tmp_path: Path) -> None:
    ham, split = ham10000_dir, published / name
    out = tmp_path / "audit.json"
    _ok(["audit", "--data", str(ham), "--split-file", str(split), "--no-hash", "--quiet",
         "--json", str(out)])
    rep = json.loads(out.read_text())
    leak = rep["test_leakage"]
    assert (leak["test_images"], leak["test_images_affected"]) == (1503, 613)
    with open(split, newline="") as f:
        test = {Path(row["filename"]).stem for row in csv.DictReader(f)}
    assert (leak["test_images_affected"], leak["mates_outside_test"]) == \
        _expected_leak(_metadata(ham), test)
    assert rep["totals"]["test"] == 1503 and rep["split_origin"]["layout"] == "test ids"


def test_real_drop_lesion_mates_gives_a_leak_free_split(ham10000_dir: Path,
                                                        published: Path) -> None:
    """The split assignment and the drop on the whole real metadata (no image is read)."""
    ham, split = ham10000_dir, published / "lp-HAM-MONET.csv"
    ds = load_dataset(ham, split_file=split, drop_lesion_mates=True)
    ds.validate()
    assert len(ds.split_records("test")) == 1503
    assert all(len(s) == 1 for s in _groups_by_split(ds.records).values())
    assert len(ds) == 10015 - ds.split_origin["lesion_mates_dropped"]
    assert lesion_leak(ds.records).test_images_affected == 0


def test_real_encode_split_file_drop_lesion_mates_writes_a_leak_free_cache(
        ham10000_dir: Path, published: Path, tmp_path: Path) -> None:
    """The whole real HAM10000 encoded (tiny model, no views) under the published test split
    made leak-free: no lesion crosses splits in the cache, the test split is the file's."""
    ham, split = ham10000_dir, published / "lp-HAM-MONET.csv"
    _ok(["encode", "--data", str(ham), "--split-file", str(split), "--drop-lesion-mates",
         "--model", "skincache-tiny", "--pretrained", "", "--device", "cpu", "--views", "0",
         "--workers", "0", "--quiet", "--cache-dir", str(tmp_path)])
    cache = next(tmp_path.glob("*.h5"))
    ids = _assert_no_lesion_crosses(cache)
    with open(split, newline="") as f:
        assert set(ids["test"]) == {Path(row["filename"]).stem for row in csv.DictReader(f)}
    origin = FeatureCache.open(cache).header.split_origin
    assert sum(map(len, ids.values())) == 10015 - origin["lesion_mates_dropped"]
    assert origin["lesion_mates_dropped"] == _expected_leak(_metadata(ham), set(ids["test"]))[1]

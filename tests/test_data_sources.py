"""Each data source on small files written here, auto-detection, prefixes and errors."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from skincache.data import (
    HAM10000_CLASSES,
    DataError,
    detect_kind,
    load_dataset,
    read_image_bytes,
)
from skincache.data.sources import load_isic2018

HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
ISIC_HEADER = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def jpeg_bytes(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny JPEG whose colour (hence bytes) depends on `seed`."""
    buf = io.BytesIO()
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def write_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --- HAM10000 -------------------------------------------------------------------------------


def make_ham(root: Path, missing: tuple[str, ...] = ()) -> list[list[object]]:
    """A HAM10000-layout folder: metadata + images split over part_1 / part_2."""
    rows: list[list[object]] = []
    k = 0
    for c, cls in enumerate(HAM10000_CLASSES):
        for lesion in range(4):
            for _ in range(1 + lesion % 2):
                rows.append([f"HAM_{c}{lesion:06d}", f"ISIC_{k:07d}", cls, "histo",
                             "" if k == 3 else f"{40 + k}.0", "male", "back"])
                k += 1
    write_csv(root / "HAM10000_metadata.csv", HAM_HEADER, rows)
    for i, row in enumerate(rows):
        if row[1] in missing:
            continue
        part = "HAM10000_images_part_1" if i % 2 == 0 else "HAM10000_images_part_2/sub"
        write_jpeg(root / part / f"{row[1]}.jpg", i)
    return rows


def test_ham10000_folder(tmp_path: Path) -> None:
    rows = make_ham(tmp_path, missing=("ISIC_0000005",))
    ds = load_dataset(tmp_path)
    assert ds.kind == "ham10000" and ds.name == "ham10000"
    assert ds.classes == HAM10000_CLASSES
    assert [r.image_id for r in ds.records] == [row[1] for row in rows]  # metadata order
    rec = {r.image_id: r for r in ds.records}
    first = rec["ISIC_0000000"]
    assert first.group == "HAM_0000000" and first.label == "akiec"
    assert first.meta == {"dx_type": "histo", "age": "40.0", "sex": "male", "localization": "back"}
    assert rec["ISIC_0000003"].meta["age"] == ""
    # images found in both part folders, even nested; sources are absolute existing paths
    assert "HAM10000_images_part_2" in rec["ISIC_0000001"].source
    assert all(os.path.isabs(r.source) for r in ds.records)
    # the missing image is kept, with the expected (absent) path, and counted
    assert ds.missing == ["ISIC_0000005"]
    gone = rec["ISIC_0000005"]
    assert not os.path.exists(gone.source) and gone.source.endswith("ISIC_0000005.jpg")
    assert all(os.path.exists(r.source) for r in ds.records if r is not gone)
    assert all(r.split in ("train", "val", "test") for r in ds.records)


def test_ham10000_metadata_csv_path_and_missing_columns(tmp_path: Path) -> None:
    make_ham(tmp_path)
    ds = load_dataset(tmp_path / "HAM10000_metadata.csv")
    assert ds.kind == "ham10000" and len(ds) == 42
    write_csv(tmp_path / "bad" / "HAM10000_metadata.csv", ["lesion_id", "image_id"], [["a", "b"]])
    with pytest.raises(DataError, match="dx"):
        load_dataset(tmp_path / "bad")


# --- ISIC 2018 ------------------------------------------------------------------------------


def make_isic(root: Path, name: str = "ISIC2018_Task3_Test_GroundTruth.csv") -> Path:
    rows = []
    for i, col in enumerate(ISIC_HEADER[1:] * 2):
        onehot = [1.0 if c == col else 0.0 for c in ISIC_HEADER[1:]]
        rows.append([f"ISIC_{9000 + i:07d}", *onehot])
        write_jpeg(root / "images" / f"ISIC_{9000 + i:07d}.jpg", i)
    return write_csv(root / name, ISIC_HEADER, rows)


def test_isic2018(tmp_path: Path) -> None:
    csv_path = make_isic(tmp_path)
    for spec in (tmp_path, csv_path, f"isic2018:{csv_path}"):
        ds = load_dataset(spec)
        assert ds.kind == "isic2018" and ds.name == "isic2018-test"
        assert len(ds) == 14 and ds.missing == []
        assert {r.split for r in ds.records} == {"test"}
        assert all(r.group is None for r in ds.records)
        assert ds.records[0].label == "mel" and ds.records[1].label == "nv"
        assert ds.records[6].label == "vasc"
        assert ds.class_counts()["test"] == dict.fromkeys(HAM10000_CLASSES, 2)
    assert {r.split for r in load_isic2018(csv_path, split="val").records} == {"val"}


def test_isic2018_not_one_hot(tmp_path: Path) -> None:
    csv_path = make_isic(tmp_path)
    lines = csv_path.read_text().splitlines()
    lines[3] = "ISIC_0009002,1.0,0.0,1.0,0.0,0.0,0.0,0.0"  # two classes on line 4
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_dataset(csv_path)
    assert str(csv_path) in str(e.value) and "line 4" in str(e.value)
    lines[3] = "ISIC_0009002,0.0,0.0,0.0,0.0,0.0,0.0,0.0"  # no class
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="one-hot"):
        load_dataset(csv_path)


def test_isic2018_missing_image_kept(tmp_path: Path) -> None:
    csv_path = make_isic(tmp_path)
    (tmp_path / "images" / "ISIC_0009003.jpg").unlink()
    ds = load_dataset(csv_path)
    assert len(ds) == 14 and ds.missing == ["ISIC_0009003"]


# --- parquet --------------------------------------------------------------------------------

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_shard(path: Path, start: int, n: int, row_group_size: int = 2) -> list[bytes]:
    images = [jpeg_bytes(start + i) for i in range(n)]
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": f"{start + i}.jpg"} for i, b in enumerate(images)],
                          type=IMAGE_TYPE),
        "image_id": [f"ISIC_{start + i:07d}" for i in range(n)],
        "lesion_id": [f"HAM_{(start + i) // 2:07d}" for i in range(n)],
        "dx": [HAM10000_CLASSES[(start + i) % 7] for i in range(n)],
        "dx_type": ["histo"] * n,
        "age": [None if i == 0 else 50.0 for i in range(n)],
        "sex": ["female"] * n,
        "localization": ["face"] * n,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return images


def make_parquet(root: Path) -> dict[str, list[bytes]]:
    return {
        "train": write_shard(root / "data" / "train-00000-of-00001.parquet", 0, 7),
        "val": write_shard(root / "data" / "validation-00000-of-00001.parquet", 100, 3),
        "test": write_shard(root / "data" / "test-00000-of-00001.parquet", 200, 5),
    }


def test_parquet_folder(tmp_path: Path) -> None:
    images = make_parquet(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.kind == "parquet" and ds.classes == HAM10000_CLASSES
    assert [r.split for r in ds.records] == ["train"] * 7 + ["val"] * 3 + ["test"] * 5
    first = ds.records[0]
    assert first.image_id == "ISIC_0000000" and first.group == "HAM_0000000"
    assert first.label == "akiec"
    assert first.meta == {"dx_type": "histo", "age": "", "sex": "female", "localization": "face"}
    assert ds.records[1].meta["age"] == "50.0"
    train_file = (tmp_path / "data" / "train-00000-of-00001.parquet").resolve()
    assert first.source == f"{train_file}::0"
    assert ds.records[10].source.endswith("test-00000-of-00001.parquet::0")
    # bytes come back per row, in and out of order, across row groups and files
    expected = images["train"] + images["val"] + images["test"]
    assert [read_image_bytes(r.source) for r in ds.records] == expected
    order = [14, 0, 6, 3, 9, 3]
    assert [read_image_bytes(ds.records[i].source) for i in order] == [expected[i] for i in order]


def test_parquet_listing_does_not_read_images(tmp_path: Path, monkeypatch) -> None:
    make_parquet(tmp_path)
    seen: list[object] = []
    real = pq.read_table

    def spy(path, columns=None, **kw):
        seen.append(columns)
        return real(path, columns=columns, **kw)

    monkeypatch.setattr(pq, "read_table", spy)
    load_dataset(tmp_path)
    assert seen and all(cols is not None and "image" not in cols for cols in seen)


def test_parquet_single_file_and_row_errors(tmp_path: Path) -> None:
    write_shard(tmp_path / "valid-0.parquet", 0, 3)
    ds = load_dataset(f"parquet:{tmp_path / 'valid-0.parquet'}")
    assert {r.split for r in ds.records} == {"val"}
    write_shard(tmp_path / "hf" / "validation" / "0000.parquet", 0, 2)
    write_shard(tmp_path / "hf" / "test_runs" / "0000.parquet", 5, 2)
    assert [r.split for r in load_dataset(tmp_path / "hf", seed=1).records[:2]] == ["val", "val"]
    path = str((tmp_path / "valid-0.parquet").resolve())
    with pytest.raises(IndexError, match="row 3"):
        read_image_bytes(f"{path}::3")
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        read_image_bytes(f"{tmp_path / 'gone.parquet'}::0")


def test_parquet_without_split_in_name_gets_assigned(tmp_path: Path) -> None:
    write_shard(tmp_path / "shard-0.parquet", 0, 14, row_group_size=5)
    ds = load_dataset(tmp_path, split_ratios=(0.5, 0.5))
    assert {r.split for r in ds.records} <= {"train", "val"}
    assert all(r.split is not None for r in ds.records)


def test_parquet_rewritten_file_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    first = write_shard(path, 0, 2)
    assert read_image_bytes(f"{path}::1") == first[1]
    second = write_shard(path, 50, 3)
    os.utime(path, ns=(1, 10**18))  # make sure the modification time changed
    assert read_image_bytes(f"{path}::1") == second[1]


# --- generic CSV and class folders ----------------------------------------------------------


def test_generic_csv(tmp_path: Path) -> None:
    for i in range(6):
        write_jpeg(tmp_path / "img" / f"{i}.png", i)
    rows = [[f"img/{i}.png", "cat" if i % 2 else "dog", "", f"g{i // 2}", f"x{i}"]
            for i in range(6)]
    rows[0][2] = "validation"
    rows.append(["img/nothere.jpg", "cat", "test", "", ""])
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "label", "split", "group", "note"],
                         rows)
    ds = load_dataset(csv_path, seed=3)
    assert ds.kind == "csv" and ds.classes == ["cat", "dog"]
    assert ds.records[0].image_id == "img/0" and ds.records[0].split == "val"
    assert ds.records[0].meta == {"note": "x0"}
    assert ds.records[-1].split == "test" and ds.records[-1].group is None
    assert ds.missing == ["img/nothere.jpg"]
    assert ds.records[3].source == str((tmp_path / "img" / "3.png").resolve())
    # group g0 = images 0 and 1: image 1 follows image 0 into val
    assert ds.records[1].split == "val"
    assert read_image_bytes(ds.records[2].source) == jpeg_bytes(2)


def test_class_folders(tmp_path: Path) -> None:
    for cls, n in (("benign", 3), ("malignant", 2)):
        for i in range(n):
            write_jpeg(tmp_path / "My Set" / cls / f"{i}.jpg", i)
    write_jpeg(tmp_path / "My Set" / "malignant" / "deep" / "x.JPEG", 9)
    (tmp_path / "My Set" / "benign" / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path / "My Set")
    assert ds.kind == "folder" and ds.name == "my-set"
    assert ds.classes == ["benign", "malignant"]
    ids = [r.image_id for r in ds.records]
    assert ids == ["benign/0", "benign/1", "benign/2", "malignant/0", "malignant/1",
                   "malignant/deep/x"]
    assert [r.label for r in ds.records] == ["benign"] * 3 + ["malignant"] * 3


def test_class_folders_with_split_folders(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        for cls in ("a", "b"):
            write_jpeg(tmp_path / split / cls / "0.jpg", 1)
    ds = load_dataset(f"folder:{tmp_path}")
    assert [(r.split, r.label) for r in ds.records] == [
        ("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")]


# --- detection, prefixes, errors -------------------------------------------------------------


def test_detection_and_prefixes(tmp_path: Path) -> None:
    make_ham(tmp_path / "ham")
    make_isic(tmp_path / "isic")
    make_parquet(tmp_path / "pq")
    write_jpeg(tmp_path / "folder" / "a" / "0.jpg", 0)
    csv_path = write_csv(tmp_path / "list.csv", ["path", "label"], [["folder/a/0.jpg", "a"]])
    assert detect_kind(tmp_path / "ham") == "ham10000"
    assert detect_kind(tmp_path / "isic") == "isic2018"
    assert detect_kind(tmp_path / "pq") == "parquet"
    assert detect_kind(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet") == "parquet"
    assert detect_kind(tmp_path / "folder") == "folder"
    assert detect_kind(csv_path) == "csv"
    # a prefix (or kind=) overrides detection: the HAM folder read as class folders
    ds = load_dataset(f"folder:{tmp_path / 'ham'}")
    assert ds.kind == "folder" and "HAM10000_images_part_1" in ds.classes
    assert load_dataset(tmp_path / "ham", kind="folder").kind == "folder"
    with pytest.raises(DataError, match="disagrees"):
        load_dataset(f"csv:{csv_path}", kind="parquet")
    with pytest.raises(DataError, match="unknown dataset kind"):
        load_dataset(csv_path, kind="zip")


def test_unrecognised_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    odd = write_csv(tmp_path / "odd.csv", ["file", "class"], [["a.jpg", "x"]])
    (tmp_path / "notes.txt").write_text("hi")
    for path in (tmp_path / "empty", odd, tmp_path / "notes.txt", tmp_path / "nope"):
        with pytest.raises(DataError) as e:
            load_dataset(path)
        msg = str(e.value)
        assert str(path) in msg
        assert "HAM10000_metadata.csv" in msg and "parquet" in msg and "path,label" in msg


def test_read_image_bytes_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        read_image_bytes(str(tmp_path / "absent.jpg"))
    p = write_jpeg(tmp_path / "a.jpg", 4)
    assert read_image_bytes(str(p)) == jpeg_bytes(4)


# --- the source registry: adding a source is one @register_source -------------------------

TALLY = "TALLY.txt"


@pytest.fixture
def tally_source():
    """A throwaway source registered for one test and removed afterwards: a folder holding
    TALLY.txt, one `<image file>,<label>` per line. Its detector is CERTAIN, the built-in
    `folder` source only LIKELY on the same folder, so it wins though it is declared last."""
    from skincache.data._record import Dataset, Record
    from skincache.data._registry import Confidence, unregister_source
    from skincache.data.sources import register_source

    def detect(probe):
        return Confidence.CERTAIN if probe.is_dir and (probe.path / TALLY).is_file() \
            else Confidence.NO

    @register_source("tally", layout=f"a folder holding {TALLY}", detect=detect, priority=99,
                     split="assigned", group="none")
    def load_tally(root: Path) -> Dataset:
        lines = (root / TALLY).read_text().split()
        records = [Record(image_id=f, source=str(root / f), label=label)
                   for f, label in (line.split(",") for line in lines)]
        return Dataset(name="tally", records=records,
                       classes=sorted({r.label for r in records}), kind="tally")

    yield load_tally
    unregister_source("tally")


def make_tally(root: Path) -> Path:
    """Class folders (what `folder` would read) plus a TALLY.txt that relabels them."""
    for i in range(12):
        write_jpeg(root / "a" / f"{i}.jpg", i)
    (root / TALLY).write_text("".join(f"a/{i}.jpg,{'xy'[i % 2]}\n" for i in range(12)))
    return root


def test_a_registered_source_is_detected_prefixed_listed_and_loaded(tmp_path, tally_source):
    from skincache.data.sources import expected_text, list_sources, sources_help

    root = make_tally(tmp_path / "t")
    assert detect_kind(root) == "tally"
    ds = load_dataset(root)
    assert ds.kind == "tally" and ds.classes == ["x", "y"] and len(ds.records) == 12
    assert {r.split for r in ds.records} <= {"train", "val", "test"}  # splits assigned
    assert load_dataset(f"tally:{root}").kind == "tally"
    assert load_dataset(root, kind="folder").kind == "folder"  # the prefix still overrides
    assert list_sources()[-1].name == "tally"
    assert f"a folder holding {TALLY} (tally:)" in expected_text()
    assert f"tally: a folder holding {TALLY}" in sources_help()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{TALLY}"):  # the "expected one of" error names it
        load_dataset(tmp_path / "empty")


def test_a_source_registered_before_the_cli_loads_is_in_its_help(tmp_path):
    """The CLI's --data help is built from the registry: a plugin module imported first shows."""
    import subprocess
    import sys

    code = (
        "from skincache.data._registry import Confidence\n"
        "from skincache.data.sources import register_source\n"
        "register_source('tally', layout='a folder holding TALLY.txt', priority=99,\n"
        "    detect=lambda p: Confidence.NO, split='assigned', group='none')(lambda p: None)\n"
        "from typer.testing import CliRunner\n"
        "from skincache.cli import app\n"
        "print(CliRunner().invoke(app, ['encode', '--help']).output)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "COLUMNS": "400"}).stdout
    assert "tally: a folder holding TALLY.txt" in out
    assert "ham10000: a folder holding HAM10000_metadata.csv" in out


def test_the_throwaway_source_is_gone_after_its_test(tmp_path):
    from skincache.data.sources import expected_text

    root = make_tally(tmp_path / "t")
    assert detect_kind(root) == "folder"
    assert "tally" not in expected_text()
    with pytest.raises(DataError, match="unknown dataset kind 'tally'"):
        load_dataset(root, kind="tally")


def test_registering_a_taken_or_prefix_breaking_name_is_refused():
    from skincache.data._registry import get_source, source_names
    from skincache.data.sources import load_csv, register_source

    def never(probe):
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="already registered"):
        register_source("csv", layout="x", detect=never, priority=1, split="", group="")(
            lambda p: None)
    with pytest.raises(ValueError, match="no ':'"):
        register_source("a:b", layout="x", detect=never, priority=1, split="", group="")(
            lambda p: None)
    assert get_source("csv").load is load_csv  # the refused registration replaced nothing
    assert "a:b" not in source_names()


def test_confidence_settles_what_two_sources_both_claim(tmp_path):
    """A CSV with the ISIC one-hot header and the HAM columns is ISIC (its exact header is
    certain, HAM columns only likely); a folder holding HAM10000_metadata.csv and an ISIC CSV
    is HAM10000 (both certain: the earlier source wins); a path,label CSV with the HAM columns
    is HAM10000 (both likely: the earlier wins)."""
    both = write_csv(tmp_path / "both.csv", [*ISIC_HEADER, "lesion_id", "image_id", "dx"],
                     [["ISIC_1", 1, 0, 0, 0, 0, 0, 0, "L1", "ISIC_1", "mel"]])
    assert detect_kind(both) == "isic2018"
    make_ham(tmp_path / "ham")
    make_isic(tmp_path / "ham")
    assert detect_kind(tmp_path / "ham") == "ham10000"
    ham_csv = write_csv(tmp_path / "hamlist.csv", ["path", "label", "lesion_id", "image_id",
                                                    "dx"], [["a.jpg", "mel", "L", "a", "mel"]])
    assert detect_kind(ham_csv) == "ham10000"


def test_a_fifo_named_like_a_source_is_unrecognised_without_being_opened(tmp_path):
    """Detectors look at regular files only: a FIFO named labels.csv (or .parquet) is "not a
    source" at once; reading its header would wait for a writer forever. Run in a child so
    that a regression fails on the subprocess timeout instead of hanging the suite."""
    import subprocess
    import sys

    code = ("import sys\nfrom skincache.data import load_dataset\n"
            "for p in sys.argv[1:]:\n"
            "    try: load_dataset(p)\n"
            "    except Exception as e: print(type(e).__name__, e)\n")
    fifos = [tmp_path / "labels.csv", tmp_path / "shard.parquet"]
    for f in fifos:
        os.mkfifo(f)
    out = subprocess.run([sys.executable, "-c", code, *map(str, fifos)], capture_output=True,
                         text=True, timeout=120).stdout.splitlines()
    assert len(out) == len(fifos)
    for line, f in zip(out, fifos, strict=True):
        assert line.startswith("DataError") and f"{f}: unrecognised file type" in line, line


def test_the_readme_source_table_is_the_registry():
    """README's Data sources table: one row per registered source (by prefix), with the
    registry's split and group text; a source added or changed without its row fails here."""
    from skincache.data.sources import list_sources

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Data sources", 1)[1].split("\n\n| source |", 1)[1]
    rows = [[c.strip().replace("`", "") for c in line.strip("|").split("|")]
            for line in section.split("\n\n", 1)[0].splitlines()[2:]]
    table = {prefix: (split, group) for _name, prefix, _layout, split, group in rows}
    assert table == {s.prefix: (s.split, s.group) for s in list_sources()}

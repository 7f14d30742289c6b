"""The leakage audit finds planted cross-split lesions and byte-identical images."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from skincache.data import AuditReport, Dataset, Record, audit_dataset
from skincache.data.classes import HAM10000_CLASSES


def write_jpeg(path: Path, seed: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, seed * 90 % 256, 7)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue())
    return str(path)


def planted(tmp_path: Path) -> Dataset:
    """Clean except: lesion L1 spans train and test; b.jpg == e.jpg (val/test); the second 'dup'
    (val) and 'a2' (test) share d.jpg; a missing file; image id 'dup' used twice."""
    src = {k: write_jpeg(tmp_path / f"{k}.jpg", i) for i, k in enumerate("abcd")}
    (tmp_path / "e.jpg").write_bytes(Path(src["b"]).read_bytes())
    records = [
        Record("a", src["a"], "nv", "train", "L1"),
        Record("c", src["c"], "mel", "train", "L2"),
        Record("b", src["b"], "nv", "val", "L3"),
        Record("a2", src["d"], "nv", "test", "L1"),
        Record("e", str(tmp_path / "e.jpg"), "nv", "test", None),
        Record("gone", str(tmp_path / "gone.jpg"), "mel", "test", "L4"),
        Record("dup", src["c"], "mel", "train", "L2"),
        Record("dup", src["d"], "bcc", "val", "L5"),
    ]
    return Dataset("planted", records, list(HAM10000_CLASSES))


def test_audit_finds_what_was_planted(tmp_path: Path) -> None:
    ds = planted(tmp_path)
    ticks: list[int] = []
    rep = audit_dataset(ds, progress=ticks.append)
    assert isinstance(rep, AuditReport) and sum(ticks) == len(ds)
    assert [(g.group, g.splits, g.image_ids) for g in rep.cross_split_groups] == [
        ("L1", ["train", "test"], ["a", "a2"])]
    # c and the first "dup" share bytes within train: a duplicate, but not across splits
    assert [(d.image_ids, d.splits, d.cross_split) for d in rep.duplicates] == [
        (["c", "dup"], ["train"], False),
        (["b", "e"], ["val", "test"], True),
        (["a2", "dup"], ["val", "test"], True),
    ]
    cross = rep.cross_split_duplicates
    assert [d.image_ids for d in cross] == [["b", "e"], ["a2", "dup"]]
    assert [u.image_id for u in rep.unreadable] == ["gone"]
    assert "FileNotFoundError" in rep.unreadable[0].reason
    assert [(r.image_id, r.count, r.splits) for r in rep.repeated_image_ids] == [
        ("dup", 2, ["train", "val"])]
    assert rep.totals == {"train": 3, "val": 2, "test": 3}
    assert rep.class_counts["test"]["nv"] == 2 and rep.class_counts["val"]["bcc"] == 1
    assert rep.n_images == 8 and rep.n_groups == 6  # L1..L5 + the ungrouped record
    assert not rep.leak_free
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["cross_split_groups"][0]["group"] == "L1" and d["leak_free"] is False
    assert [x["image_ids"] for x in d["cross_split_duplicates"]] == [["b", "e"], ["a2", "dup"]]
    assert d["repeated_image_ids"][0]["image_id"] == "dup" and len(d["duplicates"]) == 3


def test_audit_clean_and_without_hashing(tmp_path: Path) -> None:
    ds = planted(tmp_path)
    clean = Dataset("clean", [r for r in ds.records if r.image_id in ("a", "c", "b")],
                    ds.classes)
    rep = audit_dataset(clean)
    assert rep.leak_free and rep.duplicates == [] and rep.unreadable == []
    fast = audit_dataset(ds, hash_images=False)
    assert fast.duplicates == [] and fast.unreadable == [] and not fast.hashed
    assert [g.group for g in fast.cross_split_groups] == ["L1"]


def test_audit_reads_parquet_rows_and_reports_records_without_split(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    blob = Path(write_jpeg(tmp_path / "x.jpg", 3)).read_bytes()
    t = pa.table({"image": pa.array([{"bytes": blob, "path": "x"}] * 2,
                                    type=pa.struct([("bytes", pa.binary()),
                                                    ("path", pa.string())]))})
    pq.write_table(t, tmp_path / "s.parquet")
    f = (tmp_path / "s.parquet").resolve()
    ds = Dataset("pq", [Record("p0", f"{f}::0", "nv", "train"),
                        Record("p1", f"{f}::1", "nv", None)], ["nv"])
    rep = audit_dataset(ds)
    assert rep.splits == ["train", "-"] and rep.totals == {"train": 1, "-": 1}
    assert [d.image_ids for d in rep.cross_split_duplicates] == [["p0", "p1"]]

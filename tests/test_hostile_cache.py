"""Hostile inputs, part two (issue 15): hangs and tracebacks at the edges of the cache reader,
the CSV readers, the encode loop under a file-size limit, damaged `.partial/` folders, the
`--force` resume promise and symlinks out of the dataset folder.

Every case that could hang runs in a subprocess with a timeout (a hang fails the test, never
the suite); no test times anything."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from skincache.cache import CacheError, CacheWarning, FeatureCache, PartialCache
from skincache.encode import encode_dataset
from skincache.views import ViewPolicy
from tests.test_hostile import (  # noqa: F401  (cache_copy: a fixture, used by name)
    FAST,
    SKINCACHE,
    TINY,
    _cli,
    _limit_file_size,
    cache_copy,
)

PY = sys.executable


def _heap_address(path: Path, dataset: str) -> int:
    """The file offset of the global heap collection that holds `dataset`'s first string
    (from the dataset's raw storage: length, collection address, index per element)."""
    with h5py.File(path, "r") as f:
        off = f[dataset].id.get_offset()
    with open(path, "rb") as fh:
        fh.seek(off)
        _length, addr, _index = struct.unpack("<IQI", fh.read(16))
    return addr


def _zero(path: Path, offset: int, n: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * n)


def _one_error_line(proc: subprocess.CompletedProcess, *names: str) -> str:
    """The failure is exactly one `error:` line naming each of `names`, and no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- damaged HDF5


@pytest.mark.parametrize("dataset", ["splits/train/sha1", "splits/val/image_id"])
def test_a_zeroed_string_heap_is_one_line_not_a_hang(cache_copy, dataset):  # noqa: F811
    """Hang 1: the heap objects' headers zeroed (the collection's signature kept) made h5py's
    string reader loop for ever; now the bounded reader refuses it, naming the dataset."""
    FeatureCache.open(cache_copy).verify()  # sound before
    addr = _heap_address(cache_copy, dataset)
    _zero(cache_copy, addr + 16, 4096 - 16)
    proc = _cli("info", str(cache_copy), timeout=120)
    _one_error_line(proc, str(cache_copy), "is damaged")
    with pytest.raises(CacheError, match="dataset .* is damaged"):
        FeatureCache.open(cache_copy).load()


def test_a_zeroed_heap_string_is_caught_by_the_checksum(cache_copy):  # noqa: F811
    """Bytes of one string zeroed, the heap's structure intact: it still parses, and the
    dataset's checksum refuses it."""
    addr = _heap_address(cache_copy, "splits/train/sha1")
    _zero(cache_copy, addr + 16 + 16, 8)  # the first object's first 8 data bytes
    with pytest.raises(CacheError, match="does not match its checksum|is damaged"):
        FeatureCache.open(cache_copy).verify()


_SWEEP = """
import sys
from skincache.cache import FeatureCache
from skincache.errors import SkincacheError
try:
    FeatureCache.open(sys.argv[1]).verify().load()
except SkincacheError as e:
    print("refused:", e)
    sys.exit(1)
print("clean")
"""


def test_random_zeroed_blocks_open_cleanly_or_give_one_line(cache_copy, tmp_path):  # noqa: F811
    """30 zeroed 4 KB blocks at random offsets: each a clean open or one refusal, never a hang
    (a subprocess with a timeout) and never a traceback."""
    size = cache_copy.stat().st_size
    rng = random.Random(15)
    outcomes = []
    for i in range(30):
        bad = tmp_path / f"bad{i}.h5"
        shutil.copy(cache_copy, bad)
        _zero(bad, rng.randrange(0, size - 1024), 4096)
        proc = subprocess.run([PY, "-c", _SWEEP, str(bad)], capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out, (i, out[-3000:])
        assert proc.returncode in (0, 1), (i, out[-3000:])
        outcomes.append(out.split(":")[0].strip())
        if proc.returncode == 1:
            assert str(bad) in out, out
    assert "refused" in outcomes  # the sweep did damage something


def test_a_damaged_btree_or_object_header_is_one_cache_error(cache_copy):  # noqa: F811
    """Case 2: damaged object headers / B-trees ("wrong B-tree signature") raise from h5py's
    `visititems` walk as RuntimeError; the reader's one boundary turns them into CacheError."""
    with h5py.File(cache_copy, "r") as f:
        addr = h5py.h5o.get_info(f["splits"].id).addr
    _zero(cache_copy, addr, 4096)
    with pytest.raises(CacheError, match=str(cache_copy)):
        FeatureCache.open(cache_copy).verify().load()


# --------------------------------------------------------------------------- FIFOs as CSVs


@pytest.mark.parametrize("name", ["HAM10000_metadata.csv", "ISIC2018_Task3_Test_GroundTruth.csv"])
@pytest.mark.parametrize("command", ["encode", "audit"])
def test_a_fifo_named_like_a_metadata_csv_is_one_line_not_a_hang(tmp_path, name, command):
    """Hang 2: the CSV readers open non-blocking and check fstat, so a FIFO in place of a
    metadata or ground-truth CSV is refused at once (the test's timeout catches a hang)."""
    data = tmp_path / "data"
    data.mkdir()
    os.mkfifo(data / name)
    args = ["audit", "--data", str(data)] if command == "audit" else [
        "encode", "--data", str(data), "--model", "skincache-tiny", "--pretrained", "",
        "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "c")]
    _one_error_line(_cli(*args, timeout=120), str(data / name), "not a regular file")


def test_the_csv_readers_refuse_a_fifo_without_opening_it_for_reading(tmp_path):
    from skincache.data._files import read_csv_header, read_csv_rows
    from skincache.errors import InputFileError

    fifo = tmp_path / "x.csv"
    os.mkfifo(fifo)
    for read in (read_csv_header, read_csv_rows):
        with pytest.raises(InputFileError, match="not a regular file"):
            read(fifo)


# --------------------------------------------------------------------------- ulimit -f


def test_a_small_file_size_limit_is_one_line_not_worker_tracebacks_and_a_hang(demo_root,
                                                                              tmp_path):
    """Hang 4: under `ulimit -f 40` the decode workers cannot put a batch in shared memory;
    the worker's failure reaches the main process as one line (nothing lost), never eight
    worker tracebacks and a wait, and the same command without the limit then finishes."""
    args = [*SKINCACHE, "encode", "--data", str(demo_root), "--model", "skincache-tiny",
            "--pretrained", "", "--device", "cpu", "--quiet", "--views", "1",
            "--batch-size", "8", "--workers", "2", "--cache-dir", str(tmp_path / "c")]
    env = {**os.environ, "COLUMNS": "5000"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_limit_file_size(40 << 10))
    line = _one_error_line(proc, "file size limit", "nothing is lost")
    assert "run the same command again" in line
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list((tmp_path / "c").glob("*.h5"))) == 1


# --------------------------------------------------------------------------- .partial/ and --force


OPTS = {**FAST, "batch_size": 8}
POLICY = ViewPolicy(k=1)


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def _interrupted(dataset, cache_dir: Path, monkeypatch, after: int, **kw) -> list[int]:
    """An encode killed once `after` chunks are committed; returns the chunks written."""
    real = PartialCache.write_chunk
    written: list[int] = []

    def write(self, i, **arrays):
        if len(written) == after:
            raise _Killed
        written.append(i)
        return real(self, i, **arrays)

    monkeypatch.setattr(PartialCache, "write_chunk", write)
    with pytest.raises(_Killed):
        encode_dataset(dataset, TINY, policy=POLICY, cache_dir=cache_dir, **OPTS, **kw)
    monkeypatch.setattr(PartialCache, "write_chunk", real)
    return written


def _counting(monkeypatch) -> list[int]:
    real = PartialCache.write_chunk
    written: list[int] = []

    def write(self, i, **arrays):
        written.append(i)
        return real(self, i, **arrays)

    monkeypatch.setattr(PartialCache, "write_chunk", write)
    return written


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_damaged_chunks_are_discarded_and_encoded_again_never_unpickled(demo_dataset, tmp_path,
                                                                        monkeypatch):
    """Case 5: a truncated chunk and an object-array (pickle) chunk: one warning each, both
    re-encoded, the payload never run, and the cache complete."""
    _interrupted(demo_dataset, tmp_path, monkeypatch, after=3)
    part = next(tmp_path.glob("*.partial"))
    c0 = part / "chunk_000000.npz"
    c0.write_bytes(c0.read_bytes()[:100])
    marker = tmp_path / "unpickled"
    np.savez(part / "chunk_000001.npz", index=np.array([_Payload(marker)], dtype=object))
    written = _counting(monkeypatch)
    with pytest.warns(CacheWarning, match="damaged chunk") as seen:
        res = encode_dataset(demo_dataset, TINY, policy=POLICY, cache_dir=tmp_path, **OPTS)
    assert sum("damaged chunk" in str(w.message) for w in seen) == 2
    assert not marker.exists()
    assert 0 in written and 1 in written and 2 not in written  # chunk 2 was kept
    fc = FeatureCache.open(res.path, load=True)
    assert sum(len(s) for s in fc.splits.values()) + len(fc.failed) == len(demo_dataset.records)


def test_an_invalid_manifest_starts_the_partial_folder_afresh(demo_dataset, tmp_path,
                                                              monkeypatch):
    _interrupted(demo_dataset, tmp_path, monkeypatch, after=2)
    (next(tmp_path.glob("*.partial")) / "manifest.json").write_text("{not json")
    written = _counting(monkeypatch)
    with pytest.warns(CacheWarning, match="starting the partial folder afresh"):
        res = encode_dataset(demo_dataset, TINY, policy=POLICY, cache_dir=tmp_path, **OPTS)
    assert res.status == "built" and 0 in written
    FeatureCache.open(res.path).verify()


@pytest.mark.parametrize("rerun_force", [False, True])
def test_an_interrupted_force_rebuild_resumes_with_or_without_force(demo_dataset, tmp_path,
                                                                    monkeypatch, rerun_force):
    """Case 6, the README's promise: an interrupted `--force` is continued by the same command
    (with --force again, or without it: not "up to date" with the partial folder deleted)."""
    first = encode_dataset(demo_dataset, TINY, policy=POLICY, cache_dir=tmp_path, **OPTS)
    done = _interrupted(demo_dataset, tmp_path, monkeypatch, after=3, force=True)
    part = next(tmp_path.glob("*.partial"))
    assert json.loads((part / "manifest.json").read_text())["forced"] is True
    written = _counting(monkeypatch)
    res = encode_dataset(demo_dataset, TINY, policy=POLICY, cache_dir=tmp_path, **OPTS,
                         force=rerun_force)
    assert res.status == "resumed"
    assert written and not set(written) & set(done)  # the forced run's chunks were kept
    assert not part.exists() and res.path == first.path
    FeatureCache.open(res.path).verify()
    # finished: a plain rerun is up to date again
    assert encode_dataset(demo_dataset, TINY, policy=POLICY, cache_dir=tmp_path,
                          **OPTS).status == "exists"


# --------------------------------------------------------------------------- symlinks out


def test_a_symlink_out_of_the_dataset_folder_is_refused_unless_followed(demo_root, tmp_path):
    """Case 7: an image in the dataset folder that is a symlink to a file outside it is a
    failure in /failed naming the link (a link can make a dataset read any file); with
    `follow_symlinks` (`encode --follow-symlinks`) it is read."""
    from skincache.data import load_dataset

    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    image = sorted(p for p in data.rglob("*.jpg"))[0]
    outside = tmp_path / "elsewhere.jpg"
    shutil.move(image, outside)
    image.symlink_to(outside)
    ds = load_dataset(data)
    refused = encode_dataset(ds, TINY, policy=POLICY, cache_dir=tmp_path / "c", **OPTS)
    reasons = [r["reason"] for r in FeatureCache.open(refused.path).failed]
    assert len(reasons) == 1 and reasons[0].startswith("symlink:")
    assert str(image) in reasons[0] and "--follow-symlinks" in reasons[0]
    followed = encode_dataset(ds, TINY, policy=POLICY, cache_dir=tmp_path / "c", **OPTS,
                              follow_symlinks=True)
    assert followed.path != refused.path  # a different key: different images read
    assert FeatureCache.open(followed.path).failed == []

"""Hostile input and faults (issue 8): every case the adversarial pass found, kept fixed.

Each numbered case of the issue has its own test here (the number is in the test's docstring);
`test_cli_prints_no_traceback_for_any_hostile_case` then runs the real `skincache` command over
the whole set and asserts that no Python traceback, hang or crash comes out of any of them.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from skincache.cache import (
    CacheBusyError,
    CacheError,
    CacheLock,
    CacheWarning,
    FeatureCache,
)
from skincache.cache.digest import _header_digest
from skincache.data import DataError, Record, load_dataset, read_image_bytes
from skincache.encode import encode_dataset
from skincache.errors import DiskError, InputFileError
from skincache.models import TINY_MODEL, ModelSpec
from skincache.views import DecodeError, ViewPolicy, decode_image, probe_size

TINY = ModelSpec(TINY_MODEL)
FAST = dict(device="cpu", batch_size=4, chunk_batches=1, num_workers=0, progress=False)
SKINCACHE = [sys.executable, "-m", "skincache.cli"]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _jpeg(seed: int, size=(96, 72)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bomb() -> bytes:
    """A small valid JPEG whose SOF header claims 30000 x 30000 pixels (what a 10 MB bomb
    tells the decoder): nvjpeg would try to allocate 2.7 GB (x4 for the batch) for it."""
    data = bytearray(_jpeg(0))
    i = data.index(b"\xff\xc0")  # baseline SOF0: FFC0 len(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = (30000).to_bytes(2, "big") * 2
    return bytes(data)


def long_strip() -> bytes:
    """1 x 1,000,000 pixels in ~1 KB of PNG: a shortest-side resize makes it gigapixels."""
    return _png(Image.new("L", (1, 1_000_000)))


HOSTILE = ("fifo", "zero", "urandom", "strip", "tall", "bomb")


def make_hostile_csv(root: Path) -> Path:
    """A `path,label,split` dataset: 12 good JPEGs and one file of each hostile kind."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(12):
        (root / f"good{i}.jpg").write_bytes(_jpeg(i + 1))
        rows.append((f"good{i}.jpg", "nv" if i % 2 else "mel",
                     ("train", "train", "val", "test")[i % 4]))
    os.mkfifo(root / "fifo.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink("/dev/urandom", root / "urandom.jpg")
    (root / "strip.png").write_bytes(long_strip())
    (root / "tall.png").write_bytes(_png(Image.new("L", (60000, 1))))
    (root / "bomb.jpg").write_bytes(jpeg_bomb())
    for name in ("fifo.jpg", "zero.jpg", "urandom.jpg", "strip.png", "tall.png", "bomb.jpg"):
        rows.append((name, "nv", "train"))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return root / "labels.csv"


@pytest.fixture
def hostile_csv(tmp_path) -> Path:
    return make_hostile_csv(tmp_path / "hostile")


# --------------------------------------------------------------------------- cases 1-4


def test_fifo_and_device_symlinks_are_refused_without_reading(hostile_csv):
    """Cases 1 and 2: a FIFO is never opened for a blocking read, /dev/zero is never read."""
    root = hostile_csv.parent
    with deadline(20):
        for name, kind in (("fifo", "FIFO"), ("zero", "character device"),
                           ("urandom", "character device")):
            with pytest.raises(InputFileError, match=f"{name}.jpg: not a regular file .*{kind}"):
                read_image_bytes(str(root / f"{name}.jpg"))
    big = root / "big.jpg"
    big.write_bytes(b"\xff" * 2000)
    with pytest.raises(InputFileError, match="over the 1,000-byte image limit"):
        read_image_bytes(str(big), max_bytes=1000)
    assert read_image_bytes(str(big), max_bytes=2000) == b"\xff" * 2000


def test_header_caps_refuse_strips_and_bombs_before_decoding():
    """Cases 3 and 4: the size comes from the header, before any pixel is decoded."""
    for data, reason in ((long_strip(), "too elongated"), (jpeg_bomb(), "too large")):
        with pytest.raises(DecodeError, match=reason):
            probe_size(data)
        with pytest.raises(DecodeError, match=reason):
            decode_image(data, draft_shortest=224)
    assert probe_size(_jpeg(1)) == (96, 72)
    with pytest.raises(DecodeError, match="too elongated"):
        decode_image(_png(Image.new("L", (60000, 1))))


@pytest.mark.parametrize("loader", ["pillow", "tensor"])
def test_hostile_files_are_recorded_and_the_run_finishes(hostile_csv, tmp_path, loader,
                                                         monkeypatch):
    """Cases 1-4 on both routes: each hostile file is one row of /failed, the rest encode.
    On the tensor (nvjpeg) route the bomb never reaches the JPEG decoder."""
    import torchvision.io

    seen: list[bytes] = []
    real = torchvision.io.decode_jpeg

    def spy(data, *a, **k):
        for t in data if isinstance(data, list) else [data]:
            seen.append(bytes(t.numpy()))
        return real(data, *a, **k)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    with deadline(240):
        res = encode_dataset(load_dataset(hostile_csv), TINY, policy=ViewPolicy(k=1),
                             cache_dir=tmp_path / "c", loader=loader, **FAST)
    fc = FeatureCache.open(res.path)
    reasons = {r["image_id"]: r["reason"] for r in fc.failed}
    assert set(reasons) == set(HOSTILE)
    assert "FIFO" in reasons["fifo"] and "character device" in reasons["zero"]
    assert "too elongated" in reasons["strip"] and "too elongated" in reasons["tall"]
    assert "too large" in reasons["bomb"]
    assert res.failed_reasons["image too elongated"] == 2  # grouped by the text before ':'
    assert res.failed_reasons["image too large"] == 1
    assert sum(len(s) for s in fc.splits.values()) == 12
    if loader == "tensor":
        assert seen and jpeg_bomb() not in seen


def test_an_exception_inside_a_decode_worker_fails_one_image_only(hostile_csv, tmp_path,
                                                                  monkeypatch):
    """Case 3's rule, 'nothing one image does ends the run', in a real DataLoader worker:
    a MemoryError while cutting one image's views is recorded for that image."""
    from skincache.views import ViewMaker

    real = ViewMaker.from_pil

    def boom(self, img, image_id):
        if image_id == "good5":
            raise MemoryError("simulated")
        return real(self, img, image_id)

    monkeypatch.setattr(ViewMaker, "from_pil", boom)
    ds = load_dataset(hostile_csv)
    ds.records = [r for r in ds.records if r.image_id.startswith("good")]
    opts = {**FAST, "num_workers": 1}
    with deadline(240):
        res = encode_dataset(ds, TINY, policy=ViewPolicy(k=0), cache_dir=tmp_path, **opts)
    fc = FeatureCache.open(res.path)
    assert [r["image_id"] for r in fc.failed] == ["good5"]
    assert "MemoryError" in fc.failed[0]["reason"]
    assert sum(len(s) for s in fc.splits.values()) == 11


# --------------------------------------------------------------------------- cases 5-7


def _no_model(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded for bad metadata")

    monkeypatch.setattr("skincache.encode.load_model", refuse)


def _good_csv(root: Path, extra_rows: str = "", header: str = "path,label,split") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i in range(8):
        (root / f"g{i}.jpg").write_bytes(_jpeg(i))
        lines.append(f"g{i}.jpg,{'ab'[i % 2]},{('train', 'train', 'val', 'test')[i % 4]}")
    path = root / "labels.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode() + extra_rows.encode("latin-1"))
    return path


def test_nul_byte_in_metadata_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Case 5: in the CSV (file and line named) and in any record (parquet, API)."""
    _no_model(monkeypatch)
    path = _good_csv(tmp_path / "d", "g0.jpg,a\x00b,train\n")
    with pytest.raises(DataError, match=r"labels\.csv, line 10: a NUL byte"):
        load_dataset(path)
    ds = load_dataset(_good_csv(tmp_path / "e"))
    ds.records[3] = Record(ds.records[3].image_id, ds.records[3].source, ds.records[3].label,
                           ds.records[3].split, meta={"age": "4\x005"})
    with pytest.raises(DataError, match="column 'age' of image 'g3' contains a NUL byte"):
        encode_dataset(ds, TINY, cache_dir=tmp_path / "c", **FAST)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


@pytest.mark.parametrize("case,rows,match", [
    ("long field", "g0.jpg," + "x" * 140_000 + ",train\n", r"line 10: malformed CSV.*field "
                                                          r"larger than field limit"),
    ("unterminated quote", 'g0.jpg,"a,train\ng1.jpg,b,train\n', r"line 10: malformed CSV.*"
                                                              r"unexpected end of data"),
    ("latin-1", "caf\xe9.jpg,a,train\n", r"not UTF-8 text \(byte 0xe9"),
])
def test_malformed_csv_is_one_line_naming_the_file(tmp_path, monkeypatch, case, rows, match):
    """Case 6: over-long field, unterminated quote, Latin-1 text: DataError naming the file."""
    _no_model(monkeypatch)
    path = _good_csv(tmp_path / "d", rows)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_fit_head_on_a_cache_without_val_or_test_says_so(tmp_path, monkeypatch):
    """Case 6: a CSV whose rows all say `train` encodes, but fit-head refuses to print an
    empty metrics table, before fitting."""
    from skincache.heads import Head
    from skincache.runs import RunError, fit_head_run

    root = tmp_path / "d"
    path = _good_csv(root)
    path.write_text(path.read_text().replace(",val\n", ",train\n").replace(",test\n",
                                                                            ",train\n"))
    res = encode_dataset(load_dataset(path), TINY, policy=ViewPolicy(k=0),
                         cache_dir=tmp_path / "c", **FAST)
    monkeypatch.setattr(Head, "fit", lambda *a, **k: pytest.fail("fit must not run"))
    with pytest.raises(RunError, match=r"no val or test split .*\['train'\]"):
        fit_head_run(res.path, "logreg", runs_dir=tmp_path / "runs")


@pytest.mark.parametrize("bad_id", ["../../outside/secret", "/etc/passwd", "sub/x", ".."])
def test_ham10000_ids_cannot_leave_the_dataset_folder(tmp_path, bad_id):
    """Case 7: ids name files below the dataset root, never paths (HAM10000 and ISIC)."""
    root = tmp_path / "ham"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(_jpeg(0))
    (root / "ISIC_1.jpg").write_bytes(_jpeg(1))
    (root / "HAM10000_metadata.csv").write_text(
        "lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n"
        f"HAM_2,{bad_id},mel\n")
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv, line 3: image_id .* is not "
                                        r"a file name"):
        load_dataset(root)
    isic = tmp_path / "isic"
    isic.mkdir()
    (isic / "gt.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
                                 f"{bad_id},1,0,0,0,0,0,0\n")
    with pytest.raises(DataError, match=r"gt\.csv, line 2: image .* is not a file name"):
        load_dataset(isic / "gt.csv")


# --------------------------------------------------------------------------- cases 8-10


def _partial(cache_dir: Path) -> Path:
    return next(cache_dir.glob("*.partial"))


def test_disk_full_while_writing_chunks_is_one_line_and_resumes(demo_dataset, tmp_path,
                                                                monkeypatch):
    """Case 8: ENOSPC on the third chunk: DiskError naming the chunk and saying how to
    resume; the two committed chunks survive and the rerun resumes to a complete cache."""
    from skincache.cache import PartialCache

    real = PartialCache.write_chunk

    def full(self, i, **arrays):
        if i == 2:
            tmp = self.chunk_path(i).with_name(self.chunk_path(i).name + ".tmp")
            tmp.write_bytes(b"half")  # what a full disk leaves; must be cleaned
            tmp.unlink()
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(self, i, **arrays)

    monkeypatch.setattr(PartialCache, "write_chunk", full)
    opts = {**FAST, "batch_size": 8}
    with pytest.raises(DiskError, match=r"disk full writing .*chunk_000002\.npz\.tmp; nothing "
                                        r"is lost \(2 finished chunk\(s\) kept .* run the same "
                                        r"command again to resume") as e:
        encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path, **opts)
    assert "\n" not in str(e.value) and e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in _partial(tmp_path).glob("chunk_*")) == [
        "chunk_000000.npz", "chunk_000001.npz"]
    monkeypatch.setattr(PartialCache, "write_chunk", real)
    res = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path, **opts)
    assert res.status == "resumed" and FeatureCache.open(res.path).splits


def test_disk_full_before_assembly_is_found_before_hdf5_starts(demo_dataset, tmp_path,
                                                               monkeypatch):
    """Case 8: too little free space for the .h5: refused before h5py writes a byte, no
    .h5.tmp left, every chunk kept; the rerun resumes."""
    import skincache.encode as enc

    usage = shutil.disk_usage
    monkeypatch.setattr(enc.shutil, "disk_usage",
                        lambda p: usage(p)._replace(free=1000))
    monkeypatch.setattr(enc, "write_cache", lambda *a: pytest.fail("must not start writing"))
    with pytest.raises(DiskError, match=r"disk full: assembling .*\.h5 needs about .* MB, "
                                        r"0\.0 MB are free; nothing is lost"):
        encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path, **FAST)
    assert not list(tmp_path.glob("*.h5*"))
    assert list(_partial(tmp_path).glob("chunk_*"))


def test_a_failing_cache_write_removes_its_tmp_file_and_says_disk_full(tmp_path, monkeypatch):
    """Case 8: ENOSPC while the .h5 bytes go to disk: a DiskError naming the file, the
    half-written .h5.tmp removed, nothing under the final name."""
    from skincache.cache import CacheHeader
    from skincache.cache import writer as writer_mod

    def full(fh, view, block=1 << 24):
        fh.write(view[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "_write_view", full)
    header = CacheHeader(key="k", model="m", weights_sha256="w", embed_dim=2, logit_scale=1.0,
                         precision="fp32", preprocess={}, views={}, dataset="d",
                         dataset_kind="csv", dataset_root="r", dataset_fingerprint="f",
                         classes=["a", "b"], class_names=["a", "b"], versions={})
    with pytest.raises(DiskError, match=r"disk full writing .*x\.h5\.tmp"):
        writer_mod.write_cache(tmp_path / "x.h5", header, {}, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_reported_inside_h5py_messages_are_recognised():
    """h5py puts the errno only in its message text: still a one-line DiskError."""
    from skincache.cache import disk_error

    e = OSError("Can't write data (file write failed: time = x, filename = 'y', errno = 28, "
                "error message = 'No space left on device')")
    assert str(disk_error(e, "y.h5", "writing")) == "disk full writing y.h5"
    assert disk_error(OSError(errno.ENOENT, "gone"), "y", "writing") is None


def _limit_file_size(limit: int):
    def pre():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit get EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root with mount rights only; else skip)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a small tmpfs")
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path, mount_tmpfs):
    """A folder nobody can write: a read-only tmpfs as root, chmod 555 otherwise."""
    if os.geteuid() == 0:
        return mount_tmpfs("ro,size=64k")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.slow
def test_real_disk_full_on_a_small_tmpfs_is_one_line_and_resumes(demo_root, mount_tmpfs):
    """Case 8 with a real file system: a 320 KB tmpfs holds the chunks (~90 KB) but not the
    cache. One line naming the file and saying how to resume, no traceback, no segfault, no
    .h5.tmp; once the disk has room (the tmpfs grown in place) the same command resumes."""
    small = mount_tmpfs("size=320k")
    args = [*SKINCACHE, "encode", "--data", str(demo_root), "--model", "skincache-tiny",
            "--pretrained", "", "--device", "cpu", "--views", "4", "--workers", "0",
            "--batch-size", "8", "--quiet", "--cache-dir", str(small)]
    env = {**os.environ, "COLUMNS": "5000"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "Traceback" not in out and "HDF5" not in out
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full"), out
    assert "run the same command again to resume" in lines[0]
    assert not list(small.glob("*.h5*")) and list(small.glob("*.partial/chunk_*"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    assert FeatureCache.open(next(small.glob("*.h5"))).splits


def test_read_only_cache_dir_and_runs_dir_are_one_line_before_any_work(
        demo_dataset, demo_cache, readonly_dir, monkeypatch, tmp_path):
    """Case 9: checked before the model loads (encode) and before the fit (fit-head)."""
    from skincache.heads import Head
    from skincache.runs import fit_head_run

    monkeypatch.setattr("skincache.encode.load_model",
                        lambda *a, **k: pytest.fail("model loaded for a read-only folder"))
    with pytest.raises(DiskError, match=f"{readonly_dir}.*--cache-dir must be a folder"):
        encode_dataset(demo_dataset, TINY, cache_dir=readonly_dir, **FAST)
    monkeypatch.setattr(Head, "fit", lambda *a, **k: pytest.fail("fit before the check"))
    with pytest.raises(DiskError, match=f"{readonly_dir}.*--runs-dir must be a folder"):
        fit_head_run(demo_cache, "logreg", runs_dir=readonly_dir / "runs")


_KILL_IN_CLEANUP = textwrap.dedent("""
    import os, signal, sys
    from skincache.cache import PartialCache
    from skincache.data import load_dataset
    from skincache.encode import encode_dataset
    from skincache.models import ModelSpec
    from skincache.views import ViewPolicy

    PartialCache.remove = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    encode_dataset(load_dataset(sys.argv[1]), ModelSpec("skincache-tiny"),
                   policy=ViewPolicy(k=1), cache_dir=sys.argv[2], device="cpu",
                   batch_size=16, num_workers=0, progress=False)
""")


@pytest.mark.slow
def test_a_kill_during_cleanup_leaves_litter_the_next_run_sweeps(demo_root, demo_dataset,
                                                                 tmp_path):
    """Case 10: SIGKILL after the final rename, before `.partial/` and `.lock` are removed:
    the next run finds the cache up to date *and* removes the litter."""
    r = subprocess.run([sys.executable, "-c", _KILL_IN_CLEANUP, str(demo_root),
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert list(tmp_path.glob("*.h5")) and list(tmp_path.glob("*.partial"))
    assert list(tmp_path.glob("*.lock"))
    res = encode_dataset(demo_dataset, TINY, policy=ViewPolicy(k=1), cache_dir=tmp_path,
                         **{**FAST, "batch_size": 16})
    assert res.status == "exists"
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".h5"]


_HOLD_LOCK_AND_FORK = textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from pathlib import Path
    from skincache.cache import CacheLock

    lock = CacheLock(Path(sys.argv[1]))
    lock.acquire()
    child = mp.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
    child.start()  # what a DataLoader decode worker is
    print(child.pid, flush=True)
    time.sleep(60)
""")


@pytest.mark.slow
def test_forked_workers_do_not_hold_the_lock_of_a_killed_run(tmp_path):
    """Case 10: the lock's holder is SIGKILLed while its forked child lives on; the lock is
    free at once (the child closed its copy of the fd right after the fork)."""
    path = tmp_path / "x.lock"
    p = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK_AND_FORK, str(path)],
                         stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        assert not CacheLock(path).try_acquire()  # held while the run lives
        p.kill()
        p.wait(timeout=30)
        lock = CacheLock(path)
        # the child drops its copy in its after-fork hook, which runs once the child is first
        # scheduled: under load that can be after the parent's death, so allow a moment;
        # 10 s is far below the child's 60 s life, which a leaked copy would hold it for
        deadline = time.monotonic() + 10
        while not lock.try_acquire():
            assert time.monotonic() < deadline, "a forked child still holds the dead run's lock"
            time.sleep(0.05)
        lock.release()
    finally:
        p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_a_lock_whose_recorded_holder_is_dead_says_so(tmp_path):
    """Case 10: the message names the dead pid and says what to do."""
    import fcntl

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = tmp_path / "x.lock"
    path.write_text(dead.stdout.strip())
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by "a process it started"
    try:
        with pytest.raises(CacheBusyError, match=f"pid {dead.stdout.strip()}\\) has exited.*"
                                                 "run again in a few seconds"):
            CacheLock(path).acquire()
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- case 11


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _bad_weight_files(folder: Path) -> dict[str, Path]:
    _Evil.marker = folder / "PWNED"
    files = {"empty": folder / "empty.pt", "pickle": folder / "pickle.pt",
             "random": folder / "random.pt", "safetensors": folder / "random.safetensors",
             "torch pickle": folder / "evil.pt"}
    files["empty"].write_bytes(b"")
    files["pickle"].write_bytes(pickle.dumps({"state_dict": _Evil()}))
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["safetensors"].write_bytes(np.random.default_rng(1).bytes(4096))
    torch.save({"format": "skincache.finetune", "state_dict": _Evil()}, files["torch pickle"])
    return files


def test_bad_checkpoints_are_one_line_and_never_unpickled(tmp_path):
    """Case 11: `encode --checkpoint` and fine-tuning's `last.pt`/`best.pt`: empty, pickle,
    random bytes, random .safetensors, a torch file holding an object: one InputFileError
    line naming the file, and the pickle payload never runs."""
    from skincache.finetune import load_checkpoint
    from skincache.models import load_model

    reasons = {"empty": "empty file", "pickle": "raw Python pickle", "random": "not a torch "
               "checkpoint", "safetensors": "not a valid safetensors", "torch pickle":
               "weights-only"}
    for kind, path in _bad_weight_files(tmp_path).items():
        with pytest.raises(InputFileError, match=reasons[kind]) as e:
            load_model(ModelSpec(TINY_MODEL, checkpoint=str(path)))
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), kind
        if path.suffix == ".pt":
            with pytest.raises(InputFileError, match=reasons[kind]) as e:
                load_checkpoint(path)
            assert str(e.value).startswith(str(path)) and "\n" not in str(e.value), kind
    assert not _Evil.marker.exists()


def _saved_head(tmp_path: Path, name: str = "mlp") -> Path:
    from skincache.heads import create_head

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 3
    return create_head(name).fit(X, y).save(tmp_path / name)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(n_classes=1e11), r"n_classes must be an integer in \[2, 100000\]"),
    (lambda c: c.update(n_classes=10**11), r"n_classes must be an integer"),
    (lambda c: c.update(n_features_in=-3), r"n_features_in must be an integer"),
    (lambda c: c.update(evil=1), r"unknown keys \['evil'\]"),
    (lambda c: c["params"].update(hiden=3), r"params: unknown keys \['hiden'\]"),
    (lambda c: c["params"].update(hidden=10**12), r"params.hidden = .* is out of range"),
    (lambda c: c["params"].update(hidden={"a": 1}), r"params.hidden: dict is not"),
    (lambda c: c["fitted"].update(__class__=1), r"fitted: unknown keys"),
    (lambda c: c.update(name="nope"), r"unknown head 'nope'"),
    (lambda c: c.update(n_features_in=9), r"n_features_in = 9 matches no saved array"),
    (lambda c: c["params"].update(hidden=64), r"saved arrays do not fit"),
])
def test_evil_head_json_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, edit,
                                                                match):
    """Case 11: head.json is validated against its schema; one line naming the file."""
    from skincache.heads import load_head

    d = _saved_head(tmp_path)
    cfg = json.loads((d / "head.json").read_text())
    edit(cfg)
    (d / "head.json").write_text(json.dumps(cfg))
    with pytest.raises(InputFileError, match=match) as e:
        load_head(d)
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_bad_head_files_are_one_line(tmp_path):
    """Case 11: non-JSON config, random or pickled bytes as head.safetensors."""
    from skincache.heads import load_head

    d = _saved_head(tmp_path, "logreg")
    good = (d / "head.json").read_text()
    (d / "head.json").write_text("{not json")
    with pytest.raises(InputFileError, match=r"head\.json:? (is )?not valid JSON"):
        load_head(d)
    (d / "head.json").write_text(good)
    _Evil.marker = tmp_path / "PWNED"
    for payload in (np.random.default_rng(0).bytes(3000), pickle.dumps(_Evil()), b""):
        (d / "head.safetensors").write_bytes(payload)
        with pytest.raises(InputFileError, match=r"head\.safetensors: not a valid safetensors"):
            load_head(d)
    assert not _Evil.marker.exists()


# --------------------------------------------------------------------------- case 12


@pytest.fixture
def cache_copy(demo_cache, tmp_path) -> Path:
    dst = tmp_path / demo_cache.name
    shutil.copy(demo_cache, dst)
    return dst


def _file_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_offset()


@pytest.mark.parametrize("dataset,damage", [
    ("splits/train/features", "bit"),
    ("splits/train/features", "zero2k"),
    ("splits/val/views", "bit"),
    ("splits/train/labels", "bit"),
])
def test_a_flipped_bit_or_zeroed_block_is_refused_naming_the_dataset(cache_copy, dataset,
                                                                     damage):
    """Case 12: bytes changed on disk under a dataset (what a disk fault does)."""
    FeatureCache.open(cache_copy)  # sound before
    off = _file_offset(cache_copy, dataset)
    with open(cache_copy, "r+b") as f:
        if damage == "bit":
            f.seek(off + 3)
            b = f.read(1)
            f.seek(off + 3)
            f.write(bytes([b[0] ^ 0x10]))
        else:
            f.seek(off)
            f.write(b"\0" * 2048)
    with pytest.raises(CacheError, match=f"dataset {dataset} does not match its checksum"):
        FeatureCache.open(cache_copy).load()


def test_labels_overwritten_through_hdf5_are_refused(cache_copy):
    """Case 12: 50 labels rewritten with h5py (a valid HDF5 file, different contents)."""
    with h5py.File(cache_copy, "r+") as f:
        labels = f["splits/train/labels"]
        labels[:20] = (labels[:20] + 1) % 7
    with pytest.raises(CacheError, match="splits/train/labels does not match its checksum"):
        FeatureCache.open(cache_copy).load()


def _edit_attrs(path: Path, fix_checksum: bool, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        if fix_checksum:  # an editor who also recomputes the header checksum
            f.attrs["header_sha256"] = _header_digest(dict(f.attrs))


@pytest.mark.parametrize("attrs,match", [
    (dict(classes='["mel", "nv"]'), "'class_names' does not list one name per class"),
    (dict(classes='["nv", "mel"'), "'classes' is not valid JSON"),
    (dict(split_order='["train", "val", "holdout"]'), "names split 'holdout'"),
    (dict(logit_scale=1e9), r"logit_scale = 1000000000\.0 is outside"),
    (dict(embed_dim=10**9), "embed_dim"),
])
@pytest.mark.parametrize("fix_checksum", [False, True])
def test_hand_edited_attributes_are_refused(cache_copy, attrs, match, fix_checksum):
    """Case 12: edited attrs fail the header checksum; with the checksum recomputed they
    still fail the sanity checks (truncated classes, missing split, non-JSON, absurd scale)."""
    _edit_attrs(cache_copy, fix_checksum, **attrs)
    with pytest.raises(CacheError) as e:
        FeatureCache.open(cache_copy).load()
    msg = str(e.value)
    assert "\n" not in msg and str(cache_copy) in msg
    if fix_checksum:
        assert re.search(match, msg), msg
    else:
        assert "do not match their checksum" in msg


def test_swapped_classes_are_caught_by_the_header_checksum(cache_copy):
    """Case 12: swapping two class names is a well-formed edit only the checksum can see."""
    fc = FeatureCache.open(cache_copy)
    swapped = list(fc.classes)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    _edit_attrs(cache_copy, False, classes=json.dumps(swapped))
    with pytest.raises(CacheError, match="do not match their checksum"):
        FeatureCache.open(cache_copy).load()


def test_a_schema_1_cache_is_still_read_with_a_warning(cache_copy):
    """Old caches (no checksums) stay readable and say that they cannot be verified."""
    with h5py.File(cache_copy, "r+") as f:
        f.attrs["schema_version"] = 1
        del f.attrs["checksums"], f.attrs["header_sha256"]
    with pytest.warns(CacheWarning, match="without checksums.*re-encode"):
        fc = FeatureCache.open(cache_copy)
    assert fc.splits["train"].features.shape[1] == 64
    from typer.testing import CliRunner

    from skincache.cli import app

    r = CliRunner().invoke(app, ["info", str(cache_copy)])  # one yellow line, then the summary
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "warning: " in text and "without checksums" in text
    assert "Traceback" not in r.output and "CacheWarning" not in r.output


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: int = 240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "5000", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*SKINCACHE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


@pytest.mark.slow
def test_cli_prints_no_traceback_for_any_hostile_case(tmp_path, demo_root, demo_cache):
    """Every case above through the real `skincache` command: no Python traceback, no hang
    (each call has a timeout), no crash (exit status 0 or 1, never a signal), and every
    failure is exactly one `error:` line."""
    enc = ["--model", "skincache-tiny", "--pretrained", "", "--device", "cpu", "--quiet",
           "--views", "1", "--batch-size", "8"]
    cases: dict[str, tuple[list[str], dict]] = {}

    # 1-4: hostile files, through real DataLoader workers, then predict
    hostile = make_hostile_csv(tmp_path / "hostile")
    cases["hostile files encode"] = (["encode", "--data", str(hostile), *enc, "--workers", "1",
                                      "--cache-dir", str(tmp_path / "c1")], {"rc": 0})
    # 5-7: bad metadata
    cases["NUL byte"] = (["encode", "--data", str(_good_csv(tmp_path / "nul",
                                                             "g0.jpg,a\x00,train\n")), *enc,
                          "--cache-dir", str(tmp_path / "c2")], {"rc": 1, "says": "NUL"})
    cases["long field"] = (["encode", "--data", str(_good_csv(tmp_path / "long", "g0.jpg,"
                                                               + "x" * 140_000 + ",train\n")),
                            *enc, "--cache-dir", str(tmp_path / "c2")],
                           {"rc": 1, "says": "malformed CSV"})
    cases["unterminated quote"] = (["encode", "--data", str(_good_csv(tmp_path / "q",
                                                                       'g0.jpg,"a,train\n')),
                                    *enc, "--cache-dir", str(tmp_path / "c2")],
                                   {"rc": 1, "says": "malformed CSV"})
    cases["latin-1"] = (["encode", "--data", str(_good_csv(tmp_path / "l1",
                                                            "caf\xe9.jpg,a,train\n")), *enc,
                         "--cache-dir", str(tmp_path / "c2")], {"rc": 1, "says": "not UTF-8"})
    ham = tmp_path / "ham"
    ham.mkdir()
    (ham / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,../../x,nv\n")
    cases["traversal id"] = (["encode", "--data", str(ham), *enc, "--cache-dir",
                              str(tmp_path / "c2")], {"rc": 1, "says": "is not a file name"})
    alltrain = _good_csv(tmp_path / "alltrain")
    alltrain.write_text(alltrain.read_text().replace(",val\n", ",train\n")
                        .replace(",test\n", ",train\n"))
    # 11: bad checkpoints and head files
    bad = _bad_weight_files(tmp_path)
    for kind in ("empty", "pickle", "random", "safetensors"):
        cases[f"checkpoint {kind}"] = (["encode", "--data", str(demo_root), *enc,
                                        "--checkpoint", str(bad[kind]), "--cache-dir",
                                        str(tmp_path / "c3")], {"rc": 1, "says": str(bad[kind])})
    from skincache.finetune import FinetuneConfig

    run = tmp_path / "runs" / "ft"
    run.mkdir(parents=True)
    cfg = FinetuneConfig.from_setup("base", data=str(demo_root), model="skincache-tiny",
                                    pretrained=None, epochs=1, device="cpu",
                                    runs_dir=str(tmp_path / "runs"), name="ft")
    (run / "run.json").write_text(json.dumps({
        "kind": "finetune", "status": "running", "config": cfg.to_dict(),
        "dataset": {"fingerprint": load_dataset(demo_root).fingerprint()}}))
    (run / "last.pt").write_bytes(b"")
    cases["empty last.pt"] = (["finetune", "--resume", str(run), "--device", "cpu",
                               "--quiet"], {"rc": 1, "says": "last.pt: cannot read this "
                                                            "checkpoint: empty file"})
    # 12 and read-only / runs: on a damaged copy of the demo cache
    flipped = tmp_path / "flipped.h5"
    shutil.copy(demo_cache, flipped)
    off = _file_offset(flipped, "splits/train/features")
    with open(flipped, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    cases["flipped bit info"] = (["info", str(flipped)], {"rc": 1, "says": "checksum"})
    cases["flipped bit fit-head"] = (["fit-head", "--cache", str(flipped), "--head", "knn",
                                      "--runs-dir", str(tmp_path / "r1")],
                                     {"rc": 1, "says": "checksum"})
    relabeled = tmp_path / "relabeled.h5"
    shutil.copy(demo_cache, relabeled)
    with h5py.File(relabeled, "r+") as f:
        f["splits/train/labels"][:5] = 0
        f.attrs["logit_scale"] = 1e9
    cases["edited labels and attrs"] = (["info", str(relabeled)], {"rc": 1, "says": "checksum"})

    results = {}
    for name, (args, want) in cases.items():
        with deadline(300):
            results[name] = (_cli(*args), want)

    # built on the first results: fit a head, then break its files; all-train cache
    good = _cli("fit-head", "--cache", str(demo_cache), "--head", "logreg", "--runs-dir",
                str(tmp_path / "runs"), "--name", "lr", "--bootstrap", "10", "--no-plots")
    assert good.returncode == 0, good.stderr
    head_dir = tmp_path / "runs" / "lr" / "head"
    cfg = json.loads((head_dir / "head.json").read_text())
    cfg["n_classes"] = 10**11
    (head_dir / "head.json").write_text(json.dumps(cfg))
    results["evil head.json evaluate"] = (_cli("evaluate", str(tmp_path / "runs" / "lr"),
                                               "--split", "val"), {"rc": 1, "says": "n_classes"})
    results["evil head.json predict"] = (_cli("predict", str(tmp_path / "runs" / "lr"),
                                              str(hostile.parent / "good0.jpg"), "--device",
                                              "cpu"), {"rc": 1, "says": "n_classes"})
    cfg["n_classes"] = 7
    (head_dir / "head.json").write_text(json.dumps(cfg))
    (head_dir / "head.safetensors").write_bytes(pickle.dumps(_Evil()))
    results["pickled head arrays"] = (_cli("evaluate", str(tmp_path / "runs" / "lr"),
                                           "--split", "val"), {"rc": 1, "says": "safetensors"})
    enc_all = _cli("encode", "--data", str(alltrain), *enc, "--cache-dir", str(tmp_path / "c4"))
    assert enc_all.returncode == 0, enc_all.stderr
    results["all-train fit-head"] = (_cli("fit-head", "--cache",
                                          str(next((tmp_path / "c4").glob("*.h5"))),
                                          "--runs-dir", str(tmp_path / "r2")),
                                     {"rc": 1, "says": "no val or test split"})
    # predict over the hostile files (the FIFO must not hang it)
    results["predict hostile files"] = (_cli("predict", str(tmp_path / "runs" / "lr"),
                                             *[str(hostile.parent / n) for n in
                                               ("fifo.jpg", "zero.jpg", "strip.png")],
                                             "--device", "cpu"), {"rc": 1})
    # 8: a real write failure inside h5py and inside the chunk writer (RLIMIT_FSIZE: EFBIG)
    # sizes here: text.npz 28 KB, chunk 0 53 KB, chunk 1 7 KB, the .h5 129 KB
    for name, limit in (("file size limit in chunks", 40_000), ("file size limit in .h5",
                                                                 60_000)):
        # --workers 0: the limit would also hit the workers' shared-memory files
        results[name] = (_cli("encode", "--data", str(demo_root), *enc, "--views", "4",
                              "--workers", "0", "--cache-dir", str(tmp_path / "c5"),
                              preexec_fn=_limit_file_size(limit)),
                         {"rc": 1, "says": "run the same command again to resume"})
    resumed = _cli("encode", "--data", str(demo_root), *enc, "--views", "4", "--workers", "0",
                   "--cache-dir", str(tmp_path / "c5"))
    results["resume after disk full"] = (resumed, {"rc": 0, "says": "resumed"})

    problems = []
    for name, (r, want) in results.items():
        out = r.stdout + r.stderr
        if "Traceback (most recent call last)" in out:
            problems.append(f"{name}: traceback\n{out[-3000:]}")
        elif r.returncode != want["rc"]:
            problems.append(f"{name}: exit status {r.returncode}, wanted {want['rc']}\n"
                            f"{out[-2000:]}")
        elif want.get("says") and want["says"] not in " ".join(out.split()):
            problems.append(f"{name}: output does not say {want['says']!r}\n{out[-2000:]}")
        elif r.returncode == 1 and name not in ("predict hostile files",):
            errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
            rest = [x for x in r.stderr.splitlines() if x.strip() and not
                    x.startswith(("error:", "warning:"))]
            if len(errors) != 1 or rest:
                problems.append(f"{name}: not one error line\n{r.stderr[-2000:]}")
    assert not problems, "\n\n".join(problems)
    assert len(results) == 22  # 24 invocations with the two that set the cases up
    assert not _Evil.marker.exists()


def test_debug_option_shows_the_traceback_that_errors_hide(tmp_path):
    """`skincache --debug COMMAND` re-raises what is otherwise one `error:` line."""
    from typer.testing import CliRunner

    from skincache.cli import app

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    plain = CliRunner().invoke(app, ["info", str(bad)])
    assert plain.exit_code == 1 and "not a readable HDF5 file" in " ".join(plain.output.split())
    assert plain.exception is None or isinstance(plain.exception, SystemExit)
    debug = CliRunner().invoke(app, ["--debug", "info", str(bad)])
    assert isinstance(debug.exception, CacheError)
    again = CliRunner().invoke(app, ["info", str(bad)])  # --debug does not stick
    assert again.exit_code == 1 and not isinstance(again.exception, CacheError)

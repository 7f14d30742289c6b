"""Sharded encode under torchrun (2 gloo processes on the CPU): the same cache as one process,
and a run with a killed rank resumes to it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARGS = ["encode", "--model", "skincache-tiny", "--device", "cpu", "--views", "1",
        "--batch-size", "2", "--workers", "0", "--quiet"]  # chunks of 16 images: 5 chunks


def _env(extra_path: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return env


def _torchrun(data: Path, cache_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "skincache.cli", *ARGS, "--data", str(data), "--cache-dir", str(cache_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
        f.visititems(visit)
        out["attrs.key"] = f.attrs["key"]
    return out


def _same_cache(a: Path, b: Path) -> None:
    assert a.name == b.name  # same key
    x, y = _arrays(a), _arrays(b)
    assert sorted(x) == sorted(y)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def one_process(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    r = subprocess.run([sys.executable, "-m", "skincache.cli", *ARGS, "--data", str(demo_root),
                        "--cache-dir", str(out)], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return next(out.glob("*.h5"))


def test_two_ranks_write_the_same_cache_as_one_process(demo_root, one_process, tmp_path):
    r = _torchrun(demo_root, tmp_path, _env())
    assert r.returncode == 0, r.stdout + r.stderr
    [cache] = list(tmp_path.glob("*.h5"))
    _same_cache(cache, one_process)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.lock"))


def test_a_killed_rank_is_resumed_by_the_next_run(demo_root, one_process, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    # rank 1 dies (SIGKILL) right after committing its first chunk; torchrun then stops rank 0
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, signal
        if os.environ.get("RANK") == "1" and os.environ.get("SKC_KILL_RANK1"):
            import skincache.encode as e
            _orig = e._commit
            def _commit(*a, **k):
                _orig(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
            e._commit = _commit
    """))
    out = tmp_path / "cache"
    r = _torchrun(demo_root, out, _env(hook, SKC_KILL_RANK1="1"))
    assert r.returncode != 0
    [partial] = list(out.glob("*.partial"))
    chunks = sorted(p.name for p in partial.glob("chunk_*.npz"))
    assert "chunk_000001.npz" in chunks, chunks  # rank 1's first chunk, committed before it died
    assert len(chunks) < 5
    assert not list(out.glob("*.h5"))
    r = _torchrun(demo_root, out, _env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed" in r.stdout
    _same_cache(next(out.glob("*.h5")), one_process)

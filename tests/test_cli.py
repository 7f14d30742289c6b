"""The CLI end to end on the tiny model: demo, encode, info, audit, fetch-data."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from huggingface_hub import constants
from typer.testing import CliRunner

from skincache.cli import app

runner = CliRunner()


def _ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_help_lists_only_built_commands():
    import typer

    commands = typer.main.get_command(app).commands
    assert set(commands) == {"encode", "demo", "info", "audit", "fetch-data", "fit-head",
                             "evaluate", "predict", "bench-heads", "finetune", "heads", "models",
                             "score", "compare"}
    out = subprocess.run([sys.executable, "-m", "skincache.cli", "--help"], capture_output=True,
                         text=True, check=True, env={"COLUMNS": "120", "PATH": ""}).stdout
    for name, cmd in commands.items():
        assert name in out and cmd.get_short_help_str(80)[:20] in out


def test_demo_then_info_then_noop(tmp_path):
    r = _ok(["demo", "--cache-dir", str(tmp_path), "--n-images", "60", "--quiet"])
    assert "wrote" in r.output and "images per split and class" in r.output
    cache = next(tmp_path.glob("demo-s0__*.h5"))
    again = _ok(["demo", "--cache-dir", str(tmp_path), "--n-images", "60", "--quiet"])
    assert "up to date" in again.output
    info = _ok(["info", str(cache), "--json"])
    summary = json.loads(info.output)
    assert summary["model"] == "skincache-tiny" and summary["views"]["k"] == 2
    assert sum(summary["splits"].values()) == 60


def test_encode_cli_writes_then_is_a_no_op(demo_root, tmp_path):
    args = ["encode", "--data", str(demo_root), "--model", "skincache-tiny", "--pretrained", "",
            "--device", "cpu", "--views", "1", "--workers", "0", "--quiet",
            "--cache-dir", str(tmp_path)]
    first = _ok(args)
    assert "wrote" in first.output
    assert "up to date" in _ok(args).output
    cache = next(tmp_path.glob("*.h5"))
    shown = _ok(["info", str(cache)])
    assert "skincache-tiny" in shown.output and "K=1" in shown.output


def test_bad_inputs_give_one_clear_line_and_exit_1(tmp_path):
    r = runner.invoke(app, ["encode", "--data", str(tmp_path / "nowhere"), "--quiet"])
    assert r.exit_code == 1 and "error:" in r.output and "nowhere" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "missing.h5")])
    assert r.exit_code == 1 and "no such cache" in r.output
    r = runner.invoke(app, ["encode", "--data", str(tmp_path), "--split-ratios", "a,b"])
    assert r.exit_code != 0 and "comma-separated" in r.output


def test_audit_cli_reports_a_clean_lesion_split(demo_root, tmp_path):
    out = tmp_path / "audit.json"
    r = _ok(["audit", "--data", str(demo_root), "--quiet", "--json", str(out)])
    assert "0 lesion(s) appear in more than one split" in r.output
    assert json.loads(out.read_text())["cross_split_groups"] == []


def test_fetch_data_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    r = runner.invoke(app, ["fetch-data", "ham10000", "--to", str(tmp_path / "d")])
    assert r.exit_code == 1 and "No network" in r.output
    assert time.monotonic() - t0 < 10


def test_heads_cli_fit_evaluate_predict_bench_audit(demo_cache, tmp_path):
    runs = tmp_path / "runs"
    r = _ok(["fit-head", "--cache", str(demo_cache), "--head", "knn", "-p", "k=3",
             "--runs-dir", str(runs), "--name", "k3", "--bootstrap", "20", "--no-plots"])
    assert "bal. acc" in r.output and "per class" in r.output
    assert json.loads((runs / "k3" / "run.json").read_text())["params"]["k"] == 3
    r = _ok(["evaluate", str(runs / "k3"), "--split", "val", "--bootstrap", "20"])
    assert "val" in r.output and (runs / "k3" / "metrics" / "val.json").is_file()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    r = runner.invoke(app, ["predict", str(runs / "k3"), str(bad), "--device", "cpu"])
    assert r.exit_code == 1 and "empty file" in " ".join(r.output.split())
    r = _ok(["bench-heads", "--cache", str(demo_cache), "--seeds", "2", "--variants",
             "knn-k1,linear", "--out-dir", str(tmp_path / "bench"), "--quiet"])
    assert "knn-k1" in r.output and (tmp_path / "bench" / "results.md").is_file()
    r = _ok(["audit", "--cache", str(demo_cache), "--threshold", "1.0"])
    assert "cross-split pair(s)" in r.output
    r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "nope",
                            "--runs-dir", str(runs)])
    assert r.exit_code == 1 and "nope" in r.output
    for bad in ("hiden=256", "hidden=abc"):
        r = runner.invoke(app, ["fit-head", "--cache", str(demo_cache), "--head", "mlp", "-p",
                                bad, "--runs-dir", str(runs), "--no-plots"])
        assert r.exit_code == 1 and "skincache heads mlp" in " ".join(r.output.split()), r.output
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 1 and "a folder, not a cache file" in " ".join(r.output.split())


def test_finetune_then_reencode_with_its_checkpoint_then_fit_head(demo_root, tmp_path):
    runs, caches = tmp_path / "runs", tmp_path / "cache"
    r = _ok(["finetune", "--data", str(demo_root), "--model", "skincache-tiny", "--pretrained",
             "", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--runs-dir",
             str(runs), "--name", "ft", "--bootstrap", "0", "--no-plots", "--quiet"])
    assert "finetune base" in " ".join(r.output.split())
    assert (runs / "ft" / "best.pt").is_file() and (runs / "ft" / "history.json").is_file()
    r = runner.invoke(app, ["finetune", "--model", "skincache-tiny"])
    assert r.exit_code == 1 and "--data" in r.output
    _ok(["encode", "--data", str(demo_root), "--model", "skincache-tiny", "--checkpoint",
         str(runs / "ft" / "best.pt"), "--device", "cpu", "--views", "0", "--workers", "0",
         "--quiet", "--cache-dir", str(caches)])
    cache = next(caches.glob("*.h5"))
    assert "best" in cache.name and "openai" not in cache.name
    info = json.loads(_ok(["info", str(cache), "--json"]).output)
    assert len(info["checkpoint_sha256"]) == 64
    _ok(["fit-head", "--cache", str(cache), "--head", "zeroshot", "--runs-dir", str(runs),
         "--bootstrap", "0", "--no-plots"])


def test_only_skincache_errors_become_one_line(tmp_path, monkeypatch):
    """A library error that is the user's (`SkincacheError`) is one `error:` line; anything
    else, a torch shape bug or CUDA running out of memory, keeps its traceback."""
    from skincache.cache import FeatureCache
    from skincache.errors import UsageError

    cache = tmp_path / "x.h5"
    cache.write_bytes(b"")

    def refuse(path):
        raise UsageError("a message for the user")

    monkeypatch.setattr(FeatureCache, "open", classmethod(lambda cls, p: refuse(p)))
    r = runner.invoke(app, ["info", str(cache)])
    assert r.exit_code == 1 and "error: a message for the user" in r.output

    def crash(path):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FeatureCache, "open", classmethod(lambda cls, p: crash(p)))
    r = runner.invoke(app, ["info", str(cache)])
    assert isinstance(r.exception, RuntimeError) and "error:" not in r.output
    monkeypatch.setattr(FeatureCache, "open", classmethod(lambda cls, p: (_ for _ in ()).throw(
        ValueError("shapes (3,4) and (5,6) not aligned"))))
    r = runner.invoke(app, ["info", str(cache)])
    assert isinstance(r.exception, ValueError) and "error:" not in r.output

"""The CLI end to end on the tiny model: demo, encode, info, audit, fetch-data."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

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
    assert set(commands) == {"encode", "demo", "info", "concepts", "audit", "fetch-data",
                             "fit-head", "evaluate", "predict", "bench-heads", "bench-encoders",
                             "finetune", "heads", "models", "score", "compare", "report"}
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


# ------------------------------------------------- each command calls one library function

CLI_DIR = Path(__file__).resolve().parents[1] / "skincache" / "cli"

#: What a command may call besides its one library function: option checks, rendering and
#: the warnings it prints. Any other skincache callable it calls is library work.
HELPER_MODULES = {
    "skincache.render", "skincache.render_study",  # rendering
    "skincache._options", "skincache._head_params",  # option checks before torch loads
    "skincache._sanity",  # the warnings printed beside a result
    "skincache.cli._common",  # the CLI's own option types, checks and warning lines
    "skincache.errors", "skincache.defaults",
}


def _is_helper_call(name: str) -> bool:
    """`check_*` refuses an option value; `write_*` writes the output file an option names
    (rendering to a file); a CamelCase call builds the typed value of parsed options."""
    return name.startswith(("check_", "write_")) or name[:1].isupper()


def _library_calls(func: ast.FunctionDef, imported: dict[str, str]) -> set[str]:
    """The skincache library callables `func`'s body calls (`module.name`), helpers aside."""
    names = dict(imported)
    for node in ast.walk(func):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skincache"):
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = set()
    for stmt in func.body:
        for node in ast.walk(stmt):
            if not isinstance(node, ast.Call):
                continue
            root = node.func
            while isinstance(root, ast.Attribute):
                root = root.value
            if not isinstance(root, ast.Name) or root.id not in names:
                continue
            target = names[root.id]
            if target.rsplit(".", 1)[0] in HELPER_MODULES or target in HELPER_MODULES:
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else root.id
            if isinstance(node.func, ast.Name) and _is_helper_call(called):
                continue
            found.add(ast.unparse(node.func) + f" ({target})")
    return found


def _commands(source: str) -> dict[str, set[str]]:
    """Each public function of a CLI module -> the library callables it calls."""
    tree = ast.parse(source)
    imported = {a.asname or a.name: f"{n.module}.{a.name}" for n in tree.body
                if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("skincache")
                for a in n.names}
    return {f.name: _library_calls(f, imported) for f in tree.body
            if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}


def test_each_command_calls_at_most_one_library_function():
    """README: each command parses its options, calls one library function and renders."""
    from skincache.cli import COMMANDS

    seen = {}
    for path in sorted(CLI_DIR.glob("*.py")):
        if path.stem not in ("__init__", "__main__", "_common"):
            seen.update(_commands(path.read_text()))
    assert {f.__name__ for _, f in COMMANDS} <= set(seen)
    heavy = {name: calls for name, calls in seen.items() if len(calls) > 1}
    assert not heavy, f"commands doing library work: {heavy}"
    assert seen["audit"] == {"run_audit (skincache.near_duplicates.audit)"}


def test_the_one_call_check_catches_a_command_doing_library_work():
    """The check fed a command that does the library's work itself (and a thin one)."""
    bad = '''
from skincache.render import metrics_table
from skincache._options import check_file

def fit(cache):
    check_file("--cache", cache)
    from skincache.cache import FeatureCache
    from skincache.runs import chosen_by_val, fit_heads
    fc = FeatureCache.open(cache)
    results = fit_heads(fc)
    metrics_table(results[chosen_by_val(results)].metrics, "t")
'''
    assert len(_commands(bad)["fit"]) == 3
    thin = bad.replace("    fc = FeatureCache.open(cache)\n", "").replace(
        "results[chosen_by_val(results)]", "results[0]").replace("fit_heads(fc)",
                                                                 "fit_heads(cache)")
    assert _commands(thin)["fit"] == {"fit_heads (skincache.runs.fit_heads)"}


def test_only_the_cli_handler_prints_error_lines():
    """The library raises; the one handler in skincache/cli prints `error:` (grep for it)."""
    pkg = CLI_DIR.parent
    printers = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                if "error:[/]" in p.read_text() or "\"error:" in p.read_text()]
    assert printers == ["cli/__init__.py"], printers


def test_the_cli_and_the_library_take_their_defaults_from_defaults_py():
    """No module but defaults.py spells the shared constants; the CLI shows the same values."""
    import inspect

    import typer

    from skincache import defaults
    from skincache.cli import data, heads

    repeated = [str(p.relative_to(CLI_DIR.parent)) for p in CLI_DIR.parent.rglob("*.py")
                if p.name != "defaults.py" and any(
                    s in p.read_text() for s in ("0.72", 'Path("runs")', 'Path("cache")',
                                                 '= "runs"', '"regularization", "augmented"'))]
    assert repeated == [], repeated
    encode = typer.main.get_command(app).commands["encode"]
    shown = {p.name: p.default for p in encode.params}
    assert shown["split_ratios"] == defaults.SPLIT_RATIOS_TEXT
    assert str(shown["cache_dir"]) == defaults.CACHE_DIR
    assert str(inspect.signature(heads.fit_head).parameters["runs_dir"].default) == \
        defaults.RUNS_DIR
    assert str(inspect.signature(data.demo).parameters["cache_dir"].default) == \
        defaults.CACHE_DIR

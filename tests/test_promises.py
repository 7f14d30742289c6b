"""The README's promises (issue 15): bench-heads resumes into its --out-dir and writes its tables
as one unit, each command's Ctrl-C hint is true, value typos are refused before torch loads,
progress lines reach a pipe while the work runs, --tta on a cache without views says so, and
the CI over seeds uses Student's t."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_in_fresh_process
from typer.testing import CliRunner

from skincache import bench, metrics
from skincache.cli import app
from skincache.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["zeroshot", "knn-k1"]
FIT_AND_SCORE = bench._fit_and_score


@pytest.fixture(scope="module")
def flat_cache(demo_dataset, tmp_path_factory) -> Path:
    """The demo dataset encoded with K=0: a cache without augmented views."""
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    return encode_dataset(demo_dataset, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=0),
                          cache_dir=tmp_path_factory.mktemp("flat"), device="cpu",
                          num_workers=0, progress=False).path


# ------------------------------------------------------------ 1. bench-heads resumes


def _count_fits(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Record each fit bench-heads makes; with `fail_at`, Ctrl-C at that fit (0-based)."""
    fits: list[str] = []
    real = FIT_AND_SCORE

    def counted(fc, evald, val, full, key, names, tta):
        if fail_at is not None and len(fits) == fail_at:
            raise KeyboardInterrupt
        fits.append(key["variant"])
        return real(fc, evald, val, full, key, names, tta)

    monkeypatch.setattr(bench, "_fit_and_score", counted)
    return fits


def test_bench_rerun_into_its_out_dir_refits_only_what_is_missing(demo_cache, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "b"
    first = bench.bench_heads(demo_cache, seeds=2, variants=FAST, out_dir=out)
    (out / "runs" / "knn-k1_s0.json").unlink()
    fits = _count_fits(monkeypatch)
    again = bench.bench_heads(demo_cache, seeds=2, variants=FAST, out_dir=out)
    assert fits == ["knn-k1"] and again.reused == 1
    def scores(rows):  # the refit's own fit time differs, nothing else
        return [{k: v for k, v in r.items() if not k.startswith("fit_seconds")} for r in rows]

    assert scores(again.rows) == scores(first.rows)  # deterministic heads: the same table
    results = json.loads((out / "results.json").read_text())
    assert f"run id `{results['run_id']}`" in (out / "results.md").read_text()
    assert {line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]
            } == {results["run_id"]}


def test_a_killed_bench_leaves_no_results_json_and_the_rerun_completes(demo_cache, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "b"
    bench.bench_heads(demo_cache, seeds=1, variants=FAST, out_dir=out)
    old_md = (out / "results.md").read_text()
    _count_fits(monkeypatch, fail_at=0)
    with pytest.raises(KeyboardInterrupt):  # another bench (TTA rows) into the same folder
        bench.bench_heads(demo_cache, seeds=1, variants=FAST, out_dir=out, tta=True)
    assert not (out / "results.json").exists()  # no results.json beside another run's .md
    assert (out / "results.md").read_text() == old_md
    fits = _count_fits(monkeypatch)
    res = bench.bench_heads(demo_cache, seeds=1, variants=FAST, out_dir=out, tta=True)
    assert fits == FAST and {r["variant"] for r in res.rows} == {*FAST, "zeroshot+tta",
                                                                "knn-k1+tta"}


def test_bench_refuses_an_out_dir_holding_another_benchs_runs(demo_cache, tmp_path):
    out = tmp_path / "b"
    bench.bench_heads(demo_cache, seeds=1, variants=["knn-k1"], out_dir=out)
    path = out / "runs" / "knn-k1_s0.json"
    run = json.loads(path.read_text())
    path.write_text(json.dumps({**run, "cache_key": "another-cache"}))
    with pytest.raises(UsageError, match="a run of another bench \\(cache_key differ"):
        bench.bench_heads(demo_cache, seeds=1, variants=["knn-k1"], out_dir=out)
    assert json.loads(path.read_text())["cache_key"] == "another-cache"  # not overwritten
    (out / "runs" / "zz").write_text("{")  # an unrelated file is ignored; a damaged run redone
    path.write_text("{not json")
    assert bench.bench_heads(demo_cache, seeds=1, variants=["knn-k1"], out_dir=out).reused == 0


def test_bench_out_dir_naming_a_file_is_one_line(demo_cache, tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    r = runner.invoke(app, ["bench-heads", "--cache", str(demo_cache), "--out-dir", str(f)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "--out-dir" in r.output and "not a folder" in r.output


# ------------------------------------------------------------ 2. Ctrl-C hints are true


def _interrupt(monkeypatch, capsys, target: str, argv: list[str]) -> str:
    from skincache import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    monkeypatch.setattr(sys, "argv", ["skincache", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    return capsys.readouterr().err


def test_bench_ctrl_c_names_the_command_that_resumes(demo_cache, tmp_path, monkeypatch,
                                                     capsys):
    err = _interrupt(monkeypatch, capsys, "skincache.bench.bench_heads",
                     ["bench-heads", "--cache", str(demo_cache), "--seeds", "2", "--variants",
                      "knn-k1", "--quiet"])
    line = " ".join(err.split())
    assert "run the same command again to resume" not in line
    out_dir = line.split("--out-dir ")[1].split()[0]
    assert Path(out_dir).parent == Path("runs") and Path(out_dir).name.startswith("bench-")
    assert (f"resume with: skincache bench-heads --cache {demo_cache} --seeds 2 --variants "
            f"knn-k1 --out-dir {out_dir} --quiet") in line


def test_fit_head_ctrl_c_does_not_promise_a_resume(demo_cache, tmp_path, monkeypatch, capsys):
    err = _interrupt(monkeypatch, capsys, "skincache.runs.fit_head_run",
                     ["fit-head", "--cache", str(demo_cache), "--head", "knn", "--runs-dir",
                      str(tmp_path), "--quiet"])
    assert "nothing resumes" in err and "to resume" not in err


# ------------------------------------------------------------ 3. typos before torch loads


def test_head_params_read_from_source_equal_the_imported_signatures():
    from skincache._head_params import annotation, head_params
    from skincache.heads import HEADS

    schema = head_params()
    assert set(schema) == set(HEADS)
    for name, cls in HEADS.items():
        hints = typing.get_type_hints(cls.__init__)
        real = [p for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self"]
        assert [(p.name, p.default) for p in schema[name]] == [(p.name, p.default)
                                                               for p in real], name
        assert [annotation(p.type) for p in schema[name]] == [hints[p.name] for p in real]


TYPOS = [
    (["fit-head", "--cache", "{cache}", "--head", "mpl"], "unknown head 'mpl'"),
    (["fit-head", "--cache", "{cache}", "--head", "knn", "-p", "nprob=8"], "no parameter"),
    (["fit-head", "--cache", "{cache}", "--head", "mlp", "-p", "hidden=big"], "not of type"),
    (["fit-head", "--cache", "{cache}", "--shots", "0"], "--shots 0"),
    (["fit-head", "--cache", "{cache}", "--templates", "derm"], "--templates 'derm'"),
    (["bench-heads", "--cache", "{cache}", "--templates", "derm"], "--templates 'derm'"),
    (["bench-heads", "--cache", "{cache}", "--variants", "mpl"], "unknown variants mpl"),
    (["bench-heads", "--cache", "{cache}", "--shots", "0"], "--shots must be positive"),
    (["fit-head", "--cache", "{cache}", "--cv", "1"], "--cv 1: must be >= 2"),
    (["fit-head", "--cache", "{cache}", "--cv", "3", "--tta"], "does not combine"),
    (["bench-heads", "--cache", "{cache}", "--cv", "3", "--shots", "2"], "does not combine"),
]


def test_value_typos_are_refused_before_torch_or_open_clip_load(tmp_path):
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"not read: the typo is found first")
    args = [[a.replace("{cache}", str(cache)) for a in t] for t, _ in TYPOS]
    for (code, output, heavy), (_, expected) in zip(cli_in_fresh_process(args), TYPOS,
                                                    strict=True):
        assert code == 1 and expected in output and output.count("\n") == 1, output
        assert heavy == [], (expected, heavy)


# ------------------------------------------------------------ 4. progress when piped


def test_plain_progress_prints_a_line_every_interval_with_rate_and_eta():
    from skincache._progress import PlainProgress

    now = [0.0]
    lines: list[str] = []
    p = PlainProgress(20, "encode x", "img", every=5, clock=lambda: now[0], emit=lines.append)
    for _ in range(20):
        now[0] += 1.0
        p.advance()
    p.show()  # the end: nothing new since the last line, so nothing printed again
    assert lines[0] == "encode x: 5/20 img, 1.0 img/s, eta 15s"
    assert len(lines) == 4 and lines[-1] == "encode x: 20/20 img, 1.0 img/s, done in 20s"


def test_piped_bench_heads_prints_progress_lines_before_it_ends(demo_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SKINCACHE_PROGRESS_INTERVAL": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", "from skincache.cli import main; main()", "bench-heads",
         "--cache", str(demo_cache), "--seeds", "1", "--variants", "zeroshot,knn-k1,knn-k5",
         "--out-dir", str(tmp_path / "b")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    progress = [i for i, line in enumerate(lines) if line.startswith("bench heads: ")]
    assert [lines[i].split(",")[0] for i in progress] == [f"bench heads: {n}/3 fit"
                                                          for n in (1, 2, 3)]
    first_result = next(i for i, line in enumerate(lines) if "heads on" in line)
    assert progress[0] < progress[1] < first_result  # while it runs, not at the end


# ------------------------------------------------------------ 5. --tta without views


def test_tta_on_a_cache_without_views_warns_and_titles_say_tta(flat_cache, demo_cache,
                                                               tmp_path):
    args = ["fit-head", "--head", "knn", "--tta", "--no-plots", "--bootstrap", "0", "--quiet"]
    flat = runner.invoke(app, [*args, "--cache", str(flat_cache), "--runs-dir",
                               str(tmp_path / "a")])
    assert flat.exit_code == 0, flat.output
    text = " ".join(flat.output.split())
    assert "warning: --tta: this cache has no augmented views" in text and "(TTA)" not in text
    views = runner.invoke(app, [*args, "--cache", str(demo_cache), "--runs-dir",
                                str(tmp_path / "b")])
    assert views.exit_code == 0 and "knn (TTA)" in views.output
    assert "no augmented views" not in views.output
    run = next((tmp_path / "a").iterdir())
    ev = runner.invoke(app, ["evaluate", str(run), "--split", "val", "--bootstrap", "0"])
    assert ev.exit_code == 0 and "no augmented views" in " ".join(ev.output.split())
    b = runner.invoke(app, ["bench-heads", "--cache", str(flat_cache), "--variants", "knn-k1",
                            "--tta", "--out-dir", str(tmp_path / "c"), "--quiet"])
    assert b.exit_code == 0 and "no augmented views" in " ".join(b.output.split())


# ------------------------------------------------------------ 6. CI over seeds


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ci_over_seeds_is_students_t(n):
    from scipy import stats

    x = np.random.default_rng(n).normal(0.6, 0.05, n)
    lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert metrics.ci95_half_width(x.std(), n) == pytest.approx((hi - lo) / 2)
    assert metrics.ci95_half_width(x.std(), n) > 1.96 * x.std(ddof=1) / np.sqrt(n)
    assert metrics.ci95_half_width(0.1, 1) == 0


def test_ctrl_c_of_a_command_that_keeps_nothing_does_not_promise_a_resume(
        demo_cache, monkeypatch, capsys):
    err = _interrupt(monkeypatch, capsys, "skincache.cache.FeatureCache.open",
                     ["info", str(demo_cache)])
    assert "to resume" not in err and "run the same command again" in err


def test_bench_variants_name_registered_heads_and_their_parameters():
    from skincache._head_params import head_params

    for variant, head, params in bench.VARIANTS:
        assert set(params) <= {p.name for p in head_params()[head]}, variant


def test_a_piped_usage_error_is_one_error_line(tmp_path):
    """README: output sent to a file or a pipe is not wrapped, and a mistake is one `error:`
    line: click's usage errors too (typer draws a multi-line panel for them otherwise)."""
    import subprocess
    import sys

    for args, needle in ((["fit-head", "--hed", "x"], "No such option: --hed"),
                         (["fit-head", "--tta", "true", "--cache", "x"], "unexpected extra"),
                         (["fit-head"], "Missing option '--cache'")):
        p = subprocess.run([sys.executable, "-m", "skincache.cli", *args], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2, (args, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert "fit-head --help" in lines[0]

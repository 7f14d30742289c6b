"""Run folders under attack (issue 15): edited or damaged run.json, metrics and head files,
hostile --name values, two writers of one run, a killed evaluate, full disks, predict's exit
status. Each is refused in one line (or completed by the rerun), never a traceback or a hang."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from skincache.errors import DiskError, InputFileError, NotFoundError, UsageError
from skincache.run_record import RUN_FORMAT_VERSION, check_run_name, read_run, write_run

SKINCACHE = [sys.executable, "-m", "skincache.cli"]

HEAD_RUN = {"kind": "head", "head": "logreg", "params": {}, "cache": "/c.h5", "cache_key": "k",
            "encoding_key": "e", "model": "ViT-B-32", "pretrained": "openai",
            "classes": ["a", "b"], "template_set": "all", "seed": 0, "tta": False,
            "shots": None, "evaluations": [], "created": "2026-01-01T00:00:00+00:00",
            "fit_seconds": 0.5}
FINETUNE_RUN = {"kind": "finetune", "format_version": 1, "status": "complete",
                "config": {"setup": "base"}, "model": {"name": "ViT-B-32",
                                                       "pretrained": "openai",
                                                       "checkpoint": None, "embed_dim": 512},
                "dataset": {"fingerprint": "f"}, "classes": ["a", "b"]}


def _write(tmp_path: Path, content: bytes | str) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else content.encode()
    (run / "run.json").write_bytes(data)
    return run


def _edited(**changes) -> str:
    d = {**HEAD_RUN, **changes}
    return json.dumps({k: v for k, v in d.items() if v != "DROP"})


# --------------------------------------------------------------------------- run.json


@pytest.mark.parametrize("content,field", [
    ("{not json", "not valid JSON"),
    ("[]", "not a JSON object"),
    (b"\xff\xfe{}", "not UTF-8"),
    (_edited(cache="DROP"), "'cache' is missing"),
    (_edited(encoding_key="DROP"), "'encoding_key' is missing"),
    (_edited(cache=None), "'cache' must be a string"),
    (_edited(seed="abc"), "'seed' must be an integer"),
    (_edited(seed=True), "'seed' must be an integer"),
    (_edited(tta="no"), "'tta' must be true or false"),
    (_edited(tta=1), "'tta' must be true or false"),
    (_edited(classes=[1, 2]), "'classes' must be a list of class names"),
    (_edited(model=None), "'model' must be an object"),
    (_edited(kind="other"), "'kind' must be one of"),
    (_edited(format_version=99), "newer than this skincache reads"),
    (json.dumps({**FINETUNE_RUN, "status": None}), "'status' must be a string"),
])
def test_an_edited_run_json_is_one_line_naming_the_file_and_field(tmp_path, content, field):
    run = _write(tmp_path, content)
    with pytest.raises(InputFileError, match=field) as e:
        read_run(run)
    assert str(run / "run.json") in str(e.value) and "\n" not in str(e.value)


def test_a_fifo_or_missing_run_json_is_refused_without_waiting(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(NotFoundError):
        read_run(run)
    os.mkfifo(run / "run.json")
    with pytest.raises(InputFileError, match="not a regular file"):
        read_run(run)


def test_old_run_folders_of_both_shapes_still_read_and_round_trip(tmp_path):
    head = read_run(_write(tmp_path / "h", json.dumps(HEAD_RUN)))
    assert (head.model.name, head.model.pretrained, head.format_version) == (
        "ViT-B-32", "openai", 1)
    assert head.extra["fit_seconds"] == 0.5 and head.tta is False and head.shots is None
    ft = read_run(_write(tmp_path / "f", json.dumps(FINETUNE_RUN)))
    assert ft.model.name == "ViT-B-32" and ft.model.details["embed_dim"] == 512
    assert ft.status == "complete" and ft.extra["config"] == {"setup": "base"}
    for rec, where in ((head, tmp_path / "h2"), (ft, tmp_path / "f2")):
        where.mkdir()
        write_run(where, rec)
        again = read_run(where)
        assert again.format_version == RUN_FORMAT_VERSION and again.to_dict() == rec.to_dict()
        assert isinstance(json.loads((where / "run.json").read_text())["model"], dict)


@pytest.mark.parametrize("name", ["../../x", "/abs", ".", "..", "", "a/b", ".hidden",
                                  "x" * 101, "x" * 300, "tab\there", "nul\x00"])
def test_unsafe_run_names_are_refused(name):
    with pytest.raises(UsageError, match="a run name is"):
        check_run_name(name)


def test_safe_run_names_pass():
    for name in ("lr", "mlp-20260101-120000", "a.b_c-1", "x" * 100):
        assert check_run_name(name) == name


# --------------------------------------------------------------------------- head runs


@pytest.fixture
def knn_run(demo_cache, tmp_path) -> Path:
    from skincache.runs import fit_head_run

    fit_head_run(demo_cache, "knn", runs_dir=tmp_path / "runs", name="knn", n_bootstrap=0,
                 plots=False)
    return tmp_path / "runs" / "knn"


def test_fit_head_refuses_an_unsafe_name_before_writing_anything(demo_cache, tmp_path):
    from skincache.runs import fit_head_run

    for name in ("../../escaped", "/tmp/abs", ".", "y" * 300):
        with pytest.raises(UsageError, match="a run name is"):
            fit_head_run(demo_cache, "knn", runs_dir=tmp_path / "runs", name=name)
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()


def test_a_run_folder_being_written_is_refused_naming_the_holder(demo_cache, knn_run):
    from skincache.runs import RunError, evaluate, fit_head_run, run_lock

    with run_lock(knn_run):  # another process's fit or evaluate, as flock sees it
        with pytest.raises(RunError, match=rf"pid {os.getpid()}\) is writing this run"):
            fit_head_run(demo_cache, "knn", runs_dir=knn_run.parent, name="knn")
        with pytest.raises(RunError, match="is writing this run"):
            evaluate(knn_run, "val", n_bootstrap=0, plots=False)
    assert evaluate(knn_run, "val", n_bootstrap=0, plots=False).status == "unchanged"


@pytest.mark.parametrize("damage", ["invalid", "folder", "dev-zero", "fifo"])
def test_a_damaged_metrics_file_is_one_line(knn_run, damage):
    from skincache.runs import evaluate

    m = knn_run / "metrics" / "val.json"
    m.unlink()
    if damage == "invalid":
        m.write_text("{not json")
    elif damage == "folder":
        m.mkdir()
    elif damage == "dev-zero":
        m.symlink_to("/dev/zero")
    else:
        os.mkfifo(m)
    with pytest.raises(InputFileError, match="metrics file") as e:
        evaluate(knn_run, "val", n_bootstrap=0, plots=False)
    assert str(m) in str(e.value)


def test_a_killed_evaluate_is_completed_by_the_rerun(knn_run, monkeypatch):
    import skincache.runs as runs

    def killed(*a, **k):
        raise KeyboardInterrupt  # the kill, after the predictions, before the plots

    monkeypatch.setattr(runs, "write_report_plots", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.evaluate(knn_run, "train", n_bootstrap=0, plots=True)
    assert (knn_run / "predictions" / "train.csv").is_file()
    assert not (knn_run / "metrics" / "train.json").exists()  # so the split is not done
    monkeypatch.undo()
    ev = runs.evaluate(knn_run, "train", n_bootstrap=0, plots=True)
    assert ev.status == "written" and len(list((knn_run / "plots").glob("train_*.png"))) >= 3
    # a folder an older version left incomplete: metrics there, predictions and a plot not
    (knn_run / "predictions" / "train.csv").unlink()
    next((knn_run / "plots").glob("train_*.png")).unlink()
    ev = runs.evaluate(knn_run, "train", n_bootstrap=0, plots=True)
    assert ev.status == "completed" and (knn_run / "predictions" / "train.csv").is_file()
    assert len(list((knn_run / "plots").glob("train_*.png"))) >= 3
    assert runs.evaluate(knn_run, "train", n_bootstrap=0, plots=True).status == "unchanged"
    statuses = [e["status"] for e in read_run(knn_run).evaluations if e["split"] == "train"]
    assert statuses == ["written", "completed", "unchanged"]


def test_disk_full_while_saving_the_head_is_one_disk_error(demo_cache, tmp_path, monkeypatch):
    import skincache.heads.base as base
    from skincache.runs import fit_head_run

    def full(path, write, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(base, "atomic_write", full)
    with pytest.raises(DiskError, match="disk full writing the head to") as e:
        fit_head_run(demo_cache, "knn", runs_dir=tmp_path, name="full", n_bootstrap=0)
    assert "\n" not in str(e.value) and not (tmp_path / "full" / "run.json").exists()


# --------------------------------------------------------------------------- head files


def _logreg(tmp_path: Path, name: str = "lr", seed: int = 0) -> Path:
    from skincache.heads import create_head

    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 3
    return create_head("logreg").fit(X, y).save(tmp_path / name)


def _edit_arrays(d: Path, edit, *, declare: bool = True, drop_sha: bool = True) -> None:
    arrays = load_file(str(d / "head.safetensors"))
    edit(arrays)
    save_file(arrays, str(d / "head.safetensors"))
    cfg = json.loads((d / "head.json").read_text())
    if declare:
        cfg["arrays"] = sorted(arrays)
    if drop_sha:
        cfg.pop("arrays_sha256")
    (d / "head.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,declare,match", [
    (lambda a: a.update(predict_proba=np.zeros(3, np.float32)), True, r"\['predict_proba'\]"),
    (lambda a: a.update(temperature_=np.zeros(1, np.float32)), True, r"\['temperature_'\]"),
    (lambda a: a.update(extra_=np.zeros(1, np.float32)), False, "head.json declares"),
    (lambda a: a["coef_"].__setitem__((0, 0), np.nan), True, "NaN, inf"),
    (lambda a: a["coef_"].__setitem__((0, 0), np.inf), True, "NaN, inf"),
    (lambda a: a.update(coef_=a["coef_"].astype(np.float64) * 1e300), True, "NaN, inf"),
    (lambda a: a.update(coef_=a["coef_"].astype(np.int8)), True, "is int8"),
])
def test_tampered_head_arrays_are_refused(tmp_path, edit, declare, match):
    from skincache.heads import load_head

    d = _logreg(tmp_path)
    _edit_arrays(d, edit, declare=declare)
    with pytest.raises(InputFileError, match=match) as e:
        load_head(d)
    assert "head.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_another_runs_same_shape_arrays_fail_the_recorded_sha256(tmp_path):
    from skincache.heads import load_head

    a, b = _logreg(tmp_path, "a", seed=0), _logreg(tmp_path, "b", seed=1)
    (a / "head.safetensors").write_bytes((b / "head.safetensors").read_bytes())
    with pytest.raises(InputFileError, match="does not match the sha256"):
        load_head(a)
    cfg = json.loads((a / "head.json").read_text())
    del cfg["arrays_sha256"]  # a head saved before the checksum: loaded without the check
    (a / "head.json").write_text(json.dumps(cfg))
    assert load_head(a).n_classes_ == 3


def test_absurd_posthoc_values_and_deep_head_json_are_one_line(tmp_path):
    from skincache.heads import load_head

    d = _logreg(tmp_path)
    good = json.loads((d / "head.json").read_text())
    for post in ({"logit_adjust_": 1e308}, {"temperature_": 1e-9}):
        (d / "head.json").write_text(json.dumps({**good, "posthoc": post}))
        with pytest.raises(InputFileError, match="posthoc out of range"):
            load_head(d)
    (d / "head.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputFileError, match="nested too deep|not a JSON object"):
        load_head(d)


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "5000", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*SKINCACHE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_sweep_over_run_folder_edits_and_path_options(demo_cache, demo_root, tmp_path):
    """Each edit or option through the real command: no traceback, no hang (a timeout per
    call), exit status 1 and exactly one `error:` line."""
    runs = tmp_path / "runs"
    good = _cli("fit-head", "--cache", str(demo_cache), "--head", "knn", "--runs-dir",
                str(runs), "--name", "k", "--bootstrap", "0", "--no-plots")
    assert good.returncode == 0, good.stderr
    run = runs / "k"
    image = str(next(p for p in demo_root.rglob("*") if p.suffix.lower() in (".jpg", ".png")))
    (tmp_path / "empty").mkdir()
    cases: dict[str, tuple[list[str], str, object]] = {}
    for label, name in (("dotdot", "../../x"), ("abs", "/abs"), ("dot", "."),
                        ("long", "n" * 300)):
        cases[f"--name {label}"] = (["fit-head", "--cache", str(demo_cache), "--head", "knn",
                                     "--runs-dir", str(runs), "--name", name], "a run name is",
                                    None)
    cases["predict --out folder"] = (["predict", str(run), image, "--device", "cpu", "--out",
                                      str(tmp_path / "empty.csv")], "is a folder", "outdir")
    cases["audit --json folder"] = (["audit", "--cache", str(demo_cache), "--json",
                                     str(tmp_path / "empty")], "is a folder", None)
    cases["predict empty folder"] = (["predict", str(run), str(tmp_path / "empty"), "--device",
                                      "cpu"], "no images in", None)
    record = json.loads((run / "run.json").read_text())
    for label, change in (("seed abc", {"seed": "abc"}), ("tta no", {"tta": "no"}),
                          ("cache null", {"cache": None})):
        cases[f"run.json {label}"] = (["evaluate", str(run), "--split", "val"],
                                      label.split()[0], {**record, **change})
    cases["run.json []"] = (["evaluate", str(run), "--split", "val"], "not a JSON object", [])
    cases["metrics FIFO"] = (["evaluate", str(run), "--split", "val"], "not a regular file",
                             "fifo")

    problems = []
    for label, (args, says, setup) in cases.items():
        if setup == "outdir":
            (tmp_path / "empty.csv").mkdir(exist_ok=True)
        elif setup == "fifo":
            (run / "metrics" / "val.json").unlink()
            os.mkfifo(run / "metrics" / "val.json")
        elif setup is not None:
            (run / "run.json").write_text(json.dumps(setup))
        r = _cli(*args)
        if setup is not None and setup not in ("outdir", "fifo"):
            (run / "run.json").write_text(json.dumps(record))
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        if "Traceback" in r.stdout + r.stderr or r.returncode != 1 or len(errors) != 1 \
                or says not in " ".join(r.stderr.split()):
            problems.append(f"{label}: rc {r.returncode}\n{(r.stdout + r.stderr)[-1500:]}")
    assert not problems, "\n\n".join(problems)
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()


@pytest.mark.parametrize("code,says", [(errno.ENOSPC, "disk full writing"),
                                       (errno.EROFS, "read-only file system writing")])
def test_predict_out_and_audit_json_on_a_full_or_read_only_disk(knn_run, demo_cache,
                                                               demo_root, tmp_path,
                                                               monkeypatch, code, says):
    """The results are printed first; the failed write is one DiskError line, status 1."""
    from typer.testing import CliRunner

    import skincache._io as io_mod
    from skincache.cli import app

    def refused(path, write, **kw):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(io_mod, "atomic_write", refused)
    image = next(p for p in demo_root.rglob("*.jpg"))
    runner = CliRunner()
    for args, out in ((["predict", str(knn_run), str(image), "--device", "cpu", "--out"],
                       tmp_path / "p.csv"),
                      (["audit", "--cache", str(demo_cache), "--json"], tmp_path / "a.json")):
        r = runner.invoke(app, [*args, str(out)])
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert r.exit_code == 1 and len(errors) == 1, r.output
        assert says in errors[0] and str(out) in " ".join(r.output.split())
        assert r.exception is None or isinstance(r.exception, SystemExit)


def test_predict_reports_each_failed_image_and_exits_1(knn_run, demo_root, tmp_path):
    from typer.testing import CliRunner

    from skincache.cli import app

    image = str(next(p for p in demo_root.rglob("*.jpg")))
    too_long = str(tmp_path / ("x" * 5000 + ".jpg"))  # the OS refuses to even stat it
    r = CliRunner().invoke(app, ["predict", str(knn_run), image, too_long, "/no/such.jpg",
                                 "--device", "cpu"])
    assert r.exit_code == 1 and "3 images: 1 predicted, 2 failed" in r.output, r.output
    assert "/no/such.jpg: missing" in r.output and image in r.output
    r = CliRunner().invoke(app, ["predict", str(knn_run), image, "--device", "cpu"])
    assert r.exit_code == 0, r.output

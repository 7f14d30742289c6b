"""What a new user trips on (issue 9): the tiny model as named, evaluate keeping every result,
piped output, errors before torch, Ctrl-C, predict's lines, plots, --limit, the README's
first screen, and warnings where the numbers mean nothing. CLI tests run through CliRunner
(not a terminal) or a subprocess with a pipe."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skincache.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _ok(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def _fails(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output + repr(r.exception)
    return r


def _cli(args: list[str], cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """The real entry point in a subprocess, stdout and stderr piped (not a terminal)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "50"}
    return subprocess.run([sys.executable, "-c", "from skincache.cli import main; main()",
                           *args], capture_output=True, text=True, cwd=cwd, env=env, **kw)


# ---------------------------------------------------------------- 1. the tiny model as named


def test_pretrained_default_follows_the_model_and_unknown_tags_list_the_known_ones():
    from skincache.errors import UsageError
    from skincache.models import resolve_pretrained

    assert resolve_pretrained("skincache-tiny", None) is None  # no tags: random init
    assert resolve_pretrained("ViT-B-32", None) == "openai"
    assert resolve_pretrained("ViT-B-32", "") is None
    assert resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k") == "laion2b_s34b_b79k"
    assert resolve_pretrained("ViT-B-32", "nope", "w.pt") is None  # a checkpoint wins
    with pytest.raises(UsageError, match="--pretrained ''"):
        resolve_pretrained("skincache-tiny", "openai")
    with pytest.raises(UsageError, match="its tags: openai, .*laion2b_s34b_b79k"):
        resolve_pretrained("ViT-B-32", "nope")
    with pytest.raises(UsageError, match="no 'openai' weights; choose --pretrained from: "):
        resolve_pretrained("ViT-bigG-14", None)


def test_encode_tiny_without_pretrained_runs_and_a_bad_tag_leaves_no_lock(demo_root, tmp_path):
    common = ["--data", str(demo_root), "--device", "cpu", "--views", "0", "--workers", "0",
              "--quiet", "--cache-dir", str(tmp_path)]
    r = _ok(["encode", "--model", "skincache-tiny", *common])
    assert "wrote" in r.output and "seed0" in next(tmp_path.glob("*.h5")).name
    r = _fails(["encode", "--model", "skincache-tiny", "--pretrained", "openai", *common])
    assert "--pretrained ''" in r.output and r.output.count("\n") == 1
    r = _fails(["encode", "--model", "ViT-B-32", "--pretrained", "nope", *common])
    assert "laion2b_s34b_b79k" in r.output and "skincache models ViT-B-32" in r.output
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.partial"))


def test_models_lists_architectures_with_tags_and_filters():
    r = _ok(["models"])
    lines = r.output.splitlines()
    assert any(line.startswith("skincache-tiny ") and "no tags" in line for line in lines)
    vit = next(line for line in lines if line.startswith("ViT-B-32 "))
    assert "openai (default)" in vit and "laion2b_s34b_b79k" in vit
    r = _ok(["models", "TINY"])
    names = [line.split()[0] for line in r.output.splitlines()[:-1]]
    assert "skincache-tiny" in names and "ViT-B-32" not in names
    r = _fails(["models", "no-such-model-xyz"])
    assert "skincache models" in r.output


# ------------------------------------------------------- 2. evaluate never replaces results


def test_evaluate_on_another_cache_keeps_the_runs_results(demo_cache, tmp_path):
    from skincache.data import load_dataset, make_demo_dataset
    from skincache.encode import encode_dataset
    from skincache.models import TINY_MODEL, ModelSpec
    from skincache.views import ViewPolicy

    runs = tmp_path / "runs"
    _ok(["fit-head", "--cache", str(demo_cache), "--head", "knn", "--runs-dir", str(runs),
         "--name", "k", "--bootstrap", "0", "--no-plots"])
    run = runs / "k"
    own = (run / "metrics" / "test.json").read_bytes()
    own_csv = (run / "predictions" / "test.csv").read_bytes()
    other_root = make_demo_dataset(tmp_path / "other", n_images=40, seed=7)
    ds = load_dataset(other_root)
    other = encode_dataset(ds, ModelSpec(TINY_MODEL), policy=ViewPolicy(k=0),
                           cache_dir=tmp_path / "c", device="cpu", num_workers=0,
                           progress=False).path
    r = _ok(["evaluate", str(run), "--split", "test", "--cache", str(other), "--bootstrap",
             "0"])
    name = f"{ds.name}__test"
    assert f"metrics/{name}.json" in r.output
    ext = json.loads((run / "metrics" / f"{name}.json").read_text())
    assert ext["n_samples"] == len(ds.split_records("test"))
    assert (run / "metrics" / "test.json").read_bytes() == own  # untouched
    assert (run / "predictions" / "test.csv").read_bytes() == own_csv
    assert (run / "plots" / f"{name}_confusion_matrix_counts.png").is_file()
    # the same evaluation on the run's own cache: same numbers, nothing rewritten
    r = _ok(["evaluate", str(run), "--split", "test", "--bootstrap", "0"])
    assert "nothing rewritten" in r.output
    assert (run / "metrics" / "test.json").read_bytes() == own
    assert (run / "plots" / "test_classwise.png").is_file()  # fit with --no-plots: added
    # other numbers under a taken name (bootstrap CIs now): a new name, the old file stays
    _ok(["evaluate", str(run), "--split", "test", "--bootstrap", "20"])
    assert (run / "metrics" / "test.json").read_bytes() == own
    assert "ci" in json.loads((run / "metrics" / "test-2.json").read_text())
    evals = json.loads((run / "run.json").read_text())["evaluations"]
    assert [(e["name"], e["by"], e["status"]) for e in evals] == [
        ("val", "fit-head", "written"), ("test", "fit-head", "written"),
        (name, "evaluate", "written"), ("test", "evaluate", "completed"),  # plots added
        ("test-2", "evaluate", "written")]
    assert evals[2]["cache_key"] != evals[1]["cache_key"]
    assert evals[2]["dataset"] == ds.name and evals[2]["cache"] == str(other.resolve())


def test_plot_subtitles_name_run_model_dataset_and_split(demo_cache):
    from skincache.cache import FeatureCache
    from skincache.runs import model_label, plot_label

    fc = FeatureCache.open(demo_cache)
    label = plot_label(Path("runs/mlp-1"), fc, "test", 30)
    assert label == f"mlp-1 · skincache-tiny (random init) · {fc.attrs['dataset']} test " \
                    "split (n=30)"
    assert model_label({"model": "ViT-B-32", "pretrained": "openai"}) == "ViT-B-32 (openai)"
    assert model_label({"model": "ViT-B-32", "checkpoint": "runs/x/best.pt"}) == \
        "ViT-B-32 (best.pt)"


# ------------------------------------------------------------ 3. piped output, not wrapped


def test_piped_output_keeps_each_line_whole(tmp_path):
    cache_dir = tmp_path / "a-rather-long-folder-name-for-the-caches-of-this-test"
    r = _cli(["demo", "--n-images", "40", "--quiet", "--cache-dir", str(cache_dir)],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = next(cache_dir.glob("*.h5"))
    nxt = [line for line in r.stdout.splitlines() if line.startswith("next:")]
    assert len(nxt) == 1 and f"--cache {path} --head mlp" in nxt[0]  # COLUMNS=50, one line
    assert any(line.startswith("wrote ") and str(path) in line for line in r.stdout.splitlines())
    assert f"cache {path}" in r.stdout.splitlines()  # table title on its own, whole line
    r = runner.invoke(app, ["info", str(path)])  # CliRunner is not a terminal either
    assert f"cache {path}" in r.output.splitlines()


# ------------------------------------------------- 5. errors: ours, one line, before torch


def test_option_errors_are_one_line_of_ours_before_torch_loads(tmp_path):
    probe = ("import sys\nfrom skincache.cli import main\nsys.argv = ['skincache'] + "
             "sys.argv[1:]\ntry:\n    main()\nexcept SystemExit as e:\n    "
             "print('torch' in sys.modules, 'open_clip' in sys.modules, e.code)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cases = [
        (["encode", "--data", str(tmp_path), "--device", "gpu"], "--device 'gpu': use cpu"),
        (["encode", "--data", str(tmp_path), "--model", "ViT-B-23"], "did you mean ViT-B-32"),
        (["encode", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "w.pt")],
         "no such file"),
        (["finetune", "--data", str(tmp_path), "--device", "gpu"], "--device 'gpu'"),
        (["finetune", "--data", str(tmp_path), "--setup", "fancy"], "--setup 'fancy'"),
        (["predict", str(tmp_path / "no-run"), "x.jpg"], "not a run folder"),
        (["evaluate", str(tmp_path)], "not a run folder"),
        (["fit-head", "--cache", str(tmp_path / "none.h5")], "--cache"),
        (["bench-heads", "--cache", str(tmp_path / "none.h5")], "no such file"),
        (["audit", "--cache", str(tmp_path / "none.h5")], "no such file"),
    ]
    for args, expected in cases:
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                           text=True, env=env)
        assert r.stdout.split() == ["False", "False", "1"], (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert expected in r.stderr, r.stderr


def test_bench_unknown_variant_errors_before_any_progress_bar(demo_cache, tmp_path):
    r = _fails(["bench-heads", "--cache", str(demo_cache), "--variants", "logreg,foo",
                "--out-dir", str(tmp_path / "b")])
    assert r.output.startswith("error: --variants: unknown variants foo; known: zeroshot")
    assert r.output.count("\n") == 1 and not (tmp_path / "b").exists()


def test_open_clip_log_lines_are_held_back_when_loading_fails(monkeypatch, capfd):
    import logging

    from skincache.models import ModelSpec, load_model

    def failing(*a, **k):
        logging.error("Failed to download weights for tag 'openai'")  # what open_clip does
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr("open_clip.create_model", failing)
    root_handlers = logging.getLogger().handlers[:]
    with pytest.raises(RuntimeError, match="could not load model 'ViT-B-32'"):
        load_model(ModelSpec("ViT-B-32", "openai"))
    assert "ERROR:root" not in capfd.readouterr().err
    assert logging.getLogger().handlers == root_handlers  # no basicConfig left behind


# ------------------------------------------------------ 6. Ctrl-C and leftover partials


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path):
    from skincache import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("skincache.data.load_dataset", interrupted)
    monkeypatch.setattr(sys, "argv", ["skincache", "encode", "--data", str(tmp_path),
                                      "--model", "skincache-tiny"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err


def test_noop_encode_reports_a_stale_partial_and_force_resumes_it(demo_root, tmp_path):
    args = ["encode", "--data", str(demo_root), "--model", "skincache-tiny", "--device", "cpu",
            "--views", "0", "--workers", "0", "--quiet", "--cache-dir", str(tmp_path)]
    _ok(args)
    cache = next(tmp_path.glob("*.h5"))
    partial = cache.with_suffix(".partial")
    partial.mkdir()  # what an interrupted --force rebuild leaves beside the cache
    r = _ok(args)
    assert "up to date" in r.output and f"removed {partial}, left by an interrupted" \
        in " ".join(r.output.split())
    assert not partial.exists()
    partial.mkdir()
    r = _ok([*args, "--force"])
    assert "wrote" in r.output and not partial.exists()


# ------------------------------------------------------- 7. predict: one line per image


def test_predict_a_folder_gives_one_line_per_image(demo_cache, demo_root, tmp_path):
    from skincache.render import distinct_digits

    runs = tmp_path / "runs"
    _ok(["fit-head", "--cache", str(demo_cache), "--head", "knn", "--runs-dir", str(runs),
         "--name", "k", "--bootstrap", "0", "--no-plots"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted(demo_root.rglob("*.jpg"))[:4]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    r = runner.invoke(app, ["predict", str(runs / "k"), str(folder), "--device", "cpu"])
    assert r.exit_code == 1, r.output  # one image failed: the others are printed, status 1
    lines = r.output.splitlines()
    preds = [line for line in lines if line.startswith(str(folder)) and ": " not in line]
    assert len(preds) == 4 and all(re.search(r"  \w+ [01]\.\d{3}$", p) for p in preds)
    assert any("broken.jpg: " in line for line in lines)
    assert "5 images: 4 predicted, 1 failed" in r.output
    assert "similar:" not in r.output and "┃" not in r.output  # no tables by default
    (folder / "broken.jpg").unlink()
    r = _ok(["predict", str(runs / "k"), str(folder), "--device", "cpu", "--top-k", "3"])
    top3 = [line for line in r.output.splitlines() if line.startswith(str(folder))
            and ": " not in line]
    assert all(len(re.findall(r"\w+ [01]\.\d{3}", p)) == 3 for p in top3)
    r = _ok(["predict", str(runs / "k"), str(folder), "--device", "cpu", "--verbose"])
    assert r.output.count("similar:") == 4 * 5
    assert distinct_digits([0.9991, 0.9994, 0.9996]) == 4
    assert distinct_digits([0.5, 0.25]) == 3
    assert distinct_digits([1.0, 1.0, 0.999999]) == 6


# ----------------------------------------------------------------------------- 8. plots


def _report() -> dict:
    from skincache.metrics import classification_report

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(7), 10)
    proba = rng.dirichlet(np.ones(7), size=len(y))
    return classification_report(y, proba, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                                 n_bootstrap=0)


def test_plots_carry_the_full_class_names():
    from skincache.plots import classwise_figure, confusion_figure

    rep = _report()
    for normalize in (False, True):
        fig = confusion_figure(rep["confusion_matrix"], rep["classes"], normalize=normalize)
        ylabels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert ylabels[0].startswith("akiec") and "actinic keratoses and" in ylabels[0]
        assert "intraepithelial carcinoma" in ylabels[0] and "melanoma" in ylabels[4]
    fig = classwise_figure(rep["confusion_matrix"], rep["classes"])
    xlabels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert xlabels[5] == "nv\nmelanocytic\nnevi" and "intraepithelia\n" not in xlabels[0]
    fig = confusion_figure(np.eye(2, dtype=int), ["benign", "malignant"], normalize=False)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["benign", "malignant"]


def test_curves_start_at_epoch_0_with_readable_labels_off_the_data(tmp_path):
    from skincache.finetune.report import curve_series
    from skincache.plots import curves_figure

    history = [{"train_loss": 1.2, "val_loss": 1.1, "train_accuracy": 0.5, "val_accuracy": 0.6,
                "val_balanced_accuracy": 0.3},
               {"train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.6, "val_accuracy": 0.7,
                "val_balanced_accuracy": 0.4}]
    series = curve_series(history, {"balanced_accuracy": 0.14, "accuracy": 0.1, "loss": 1.9})
    assert series["val_balanced_accuracy"] == [0.14, 0.3, 0.4]
    assert series["train_loss"] == [None, 1.2, 1.0]
    fig = curves_figure(series, title="Fine-tuning (base)", subtitle="ft · tiny · ham10000",
                        first_epoch=0)
    loss_ax, score_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["Training loss", "Validation loss"]
    assert "Validation balanced accuracy" in [line.get_label() for line in score_ax.lines]
    val = score_ax.lines[-1]
    assert val.get_xdata().tolist() == [0, 1, 2] and val.get_ydata()[0] == 0.14
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0, 1, 2]  # integer epochs, epoch 0 included
        legend = ax.get_legend().get_window_extent()
        assert legend.y1 < ax.get_window_extent().y0  # below the panel, off the data
    assert "ft · tiny · ham10000" in fig.get_suptitle()


def test_wise_curve_has_the_run_subtitle(tmp_path):
    from PIL import Image

    from skincache.finetune.report import plot_wise_curve

    curve = [{"alpha": a / 10, "balanced_accuracy": 0.2 + a / 50, "accuracy": 0.5}
             for a in range(11)]
    with_sub = plot_wise_curve(curve, tmp_path / "a.png", 0.5, subtitle="ft · tiny · ham")
    without = plot_wise_curve(curve, tmp_path / "b.png", 0.5)
    assert Image.open(with_sub).height > Image.open(without).height  # a line more on top


# ------------------------------------------------------------------------ 9. --limit


def _records(n_lesions: int = 400, seed: int = 0):
    from skincache.data import Record, assign_splits

    rng = np.random.default_rng(seed)
    labels = rng.choice(["nv", "mel", "bkl", "df"], size=n_lesions, p=[0.7, 0.15, 0.12, 0.03])
    recs = [Record(image_id=f"i{i}_{j}", source=f"/x/i{i}_{j}.jpg", label=str(lab),
                   group=f"L{i}") for i, lab in enumerate(labels)
            for j in range(1 + int(rng.integers(0, 3)))]
    return assign_splits(recs, (0.7, 0.2, 0.1), seed=0)


def test_limit_is_seeded_stratified_and_lesion_grouped():
    from skincache.data.splits import limit_records

    recs = _records()
    sub = limit_records(recs, 200, seed=0)
    assert abs(len(sub) - 200) <= 12
    assert sub == limit_records(recs, 200, seed=0)  # seeded
    assert sub != limit_records(recs, 200, seed=1)
    ids = {r.image_id for r in sub}
    assert [r for r in recs if r.image_id in ids] == sub  # source order, splits unchanged
    full_groups = Counter(r.group for r in recs)
    assert all(Counter(r.group for r in sub)[g] == full_groups[g] for g in {r.group for r in sub})
    for split in ("train", "val", "test"):
        everything = Counter(r.label for r in recs if r.split == split)
        part = Counter(r.label for r in sub if r.split == split)
        assert set(part) == set(everything)  # every class stays in every split
        for label, n in everything.items():
            share = n / len(recs) * 200
            assert abs(part[label] - share) <= max(3, 0.25 * share), (split, label)
    assert limit_records(recs, 10**6) == recs


def test_limit_on_encode_and_finetune(demo_root, tmp_path):
    r = _ok(["encode", "--data", str(demo_root), "--model", "skincache-tiny", "--device", "cpu",
             "--views", "0", "--workers", "0", "--quiet", "--cache-dir", str(tmp_path / "c"),
             "--limit", "40"])
    cache = next((tmp_path / "c").glob("*.h5"))
    assert "-limit40__" in cache.name
    n = int(re.search(r": (\d+) images", r.output).group(1))
    assert 30 <= n <= 50
    _ok(["finetune", "--data", str(demo_root), "--model", "skincache-tiny", "--device", "cpu",
         "--epochs", "1", "--batch-size", "8", "--limit", "40", "--runs-dir",
         str(tmp_path / "runs"), "--name", "ft", "--bootstrap", "0", "--no-plots", "--quiet"])
    meta = json.loads((tmp_path / "runs" / "ft" / "run.json").read_text())
    assert meta["config"]["limit"] == 40 and meta["config"]["pretrained"] is None
    assert 30 <= sum(meta["dataset"]["split_sizes"].values()) <= 50


# ------------------------------------------------------------- 10. the README's first screen


def test_readme_first_screen_installs_cpu_torch_first_and_uses_one_venv_style():
    text = (REPO / "README.md").read_text()
    first = text[:text.index("## Commands")]
    block = first[first.index("```bash"):first.index("```", first.index("```bash") + 3)]
    cpu = block.index("--index-url https://download.pytorch.org/whl/cpu")
    assert block.index("source .venv/bin/activate") < cpu < block.index("pip install -e")
    assert "2 GB" in first and "6 GB" in first
    assert ".venv/bin/" not in text.replace("source .venv/bin/activate", "")


def test_readme_tiny_model_lines_run_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    first = text[:text.index("## Commands")]
    lines = [line.strip() for line in first.splitlines()
             if line.strip().startswith(("skincache encode", "skincache finetune"))]
    assert [line.split()[1] for line in lines] == ["encode", "finetune"]
    monkeypatch.chdir(tmp_path)
    _ok(["demo", "--quiet"])  # the README runs the demo first: it makes cache/demo-data
    for line in lines:
        args = shlex.split(line)[1:]
        assert "skincache-tiny" in args and "--pretrained" not in args
        _ok(args + ["--quiet"])


# -------------------------------------------------- 11. warnings for meaningless numbers


def test_one_class_and_random_init_warnings():
    from skincache._sanity import is_random_init, one_class_warning, random_init_warning

    rep = {"classes": ["mel", "nv"], "confusion_matrix": [[1, 9], [0, 90]]}
    fine = {"classes": ["mel", "nv"], "confusion_matrix": [[10, 0], [6, 84]]}  # nv 84%: fine
    w = one_class_warning({"val": fine, "test": rep}, "mlp")
    assert w.startswith("mlp predicts 'nv' for 99% of test (99 of 100): ") and "val" not in w
    w = one_class_warning({"val": rep, "test": rep}, "mlp")
    assert "'nv' for 99% of val (99 of 100) and 'nv' for 99% of test" in w
    assert one_class_warning({"val": fine, "test": fine}) is None
    assert is_random_init({"model": "skincache-tiny", "pretrained": ""})
    assert "random weights" in random_init_warning({"model": "ViT-B-32", "pretrained": ""})
    for attrs in ({"model": "ViT-B-32", "pretrained": "openai"},
                  {"model": "ViT-B-32", "pretrained": "", "checkpoint_sha256": "ab"},
                  {"model": "hf-hub:org/repo", "pretrained": ""}):
        assert random_init_warning(attrs) is None


def test_fit_head_and_audit_on_a_random_init_cache_say_so(demo_cache, tmp_path):
    r = _ok(["fit-head", "--cache", str(demo_cache), "--head", "zeroshot", "--runs-dir",
             str(tmp_path), "--bootstrap", "0", "--no-plots"])
    assert r.output.count("warning: skincache-tiny has random weights") == 1
    out = tmp_path / "audit.json"
    r = _ok(["audit", "--cache", str(demo_cache), "--threshold", "0.99", "--json", str(out)])
    assert "near-duplicate pairs, check the pipeline only" in r.output
    assert json.loads(out.read_text())["near_duplicates"]["random_init_model"] is True


def test_sigint_during_encode_then_the_same_command_resumes(tmp_path):
    import signal
    import time

    from skincache.data import make_demo_dataset

    root = make_demo_dataset(tmp_path / "data", n_images=400, seed=3)
    args = ["encode", "--data", str(root), "--model", "skincache-tiny", "--device", "cpu",
            "--views", "2", "--workers", "0", "--batch-size", "4", "--quiet", "--cache-dir",
            str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "from skincache.cli import main; main()",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "c").glob("*.partial/chunk_000000.npz")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the encode finished before the interrupt arrived (machine too fast)")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in err
    r = _cli(args)
    assert r.returncode == 0 and "resumed and finished" in r.stdout, r.stdout + r.stderr


def test_fit_head_warns_once_per_head_that_answers_one_class(demo_cache, tmp_path,
                                                              monkeypatch):
    import skincache.runs as runs

    real = runs.evaluate_head

    class AlwaysNv:
        def predict_proba(self, X):
            p = np.full((len(X), 7), 0.01)
            p[:, 5] = 0.94
            return p

        def predict_proba_pair(self, X, views=None):
            return self.predict_proba(X), self.predict_proba(X)

    monkeypatch.setattr(runs, "evaluate_head",
                        lambda head, cache, split, **kw: real(AlwaysNv(), cache, split, **kw))
    r = _ok(["fit-head", "--cache", str(demo_cache), "--head", "knn", "--runs-dir",
             str(tmp_path), "--bootstrap", "0", "--no-plots"])
    lines = [line for line in r.output.splitlines() if "predicts 'nv'" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: knn predicts 'nv' for 100% of val")
    assert "100% of test" in lines[0]

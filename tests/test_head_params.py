"""Head parameter values: the `param_constraints` each head declares are read from its source
(skincache/_head_params.py), refused by `-p` before torch loads, enforced again by `Head.fit`
for Python users, and a failed fit leaves no run folder behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli_in_fresh_process, synthetic_cache

from skincache._head_params import (
    SHARED_CONSTRAINTS,
    head_constraints,
    head_params,
    param_violation,
    parse_params,
)
from skincache.errors import UsageError

# (fit-head arguments after --cache, what the one error line says)
REFUSED = [
    (["--head", "logreg", "-p", "C=-1"], "-p C=-1: C must be > 0 (skincache heads logreg"),
    (["--head", "logreg", "-p", "C=0"], "C must be > 0"),
    (["--head", "logreg", "-p", "C=nan"], "C must be > 0"),
    (["--head", "mlp", "-p", "dropout=2"], "dropout must be in [0, 1)"),
    (["--head", "mlp", "-p", "lr=-1"], "lr must be > 0"),
    (["--head", "mlp", "-p", "hidden=0"], "hidden must be >= 1"),
    (["--head", "mlp", "-p", "epochs=0"], "epochs must be >= 1"),
    (["--head", "knn", "-p", "k=0"], "k must be >= 1"),
    (["--head", "logreg", "-p", "c_range=0,10"], "c_range must be > 0"),
    (["--head", "mlp", "-p", "logit_adjust=nope"], "logit_adjust must be 'auto' or >= 0"),
    (["--head", "mlp", "-p", "logit_adjust=-1"], "logit_adjust must be 'auto' or >= 0"),
    (["--head", "mlp", "--name", "../x"], "--name '../x'"),
]


def test_bad_values_are_one_error_line_before_torch_loads(tmp_path):
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"not read: the value is refused first")
    args = [["fit-head", "--cache", str(cache), "--runs-dir", str(tmp_path / "runs"), *a]
            for a, _ in REFUSED]
    for (code, output, heavy), (_, expected) in zip(cli_in_fresh_process(args), REFUSED,
                                                    strict=True):
        assert code == 1 and output.startswith("error: ") and output.count("\n") == 1, output
        assert expected in output and "Traceback" not in output, output
        assert "torch" not in heavy, expected
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_good_values_still_parse():
    assert parse_params("logreg", {"C": "0.5", "c_range": "1e-2,10"}) == {
        "C": 0.5, "c_range": (0.01, 10.0)}
    assert parse_params("mlp", {"dropout": "0", "logit_adjust": "auto", "patience": "none"}) == {
        "dropout": 0.0, "logit_adjust": "auto", "patience": None}
    assert parse_params("knn", {"logit_adjust": "1.5"}) == {"logit_adjust": 1.5}


def test_constraints_read_from_source_equal_the_imported_classes():
    from skincache.heads import HEADS

    declared = 0
    for name, cls in HEADS.items():
        params = {p.name: p.default for p in head_params()[name]}
        shared = {k: v for k, v in SHARED_CONSTRAINTS.items() if k in params}
        assert head_constraints(name) == {**shared, **cls.param_constraints}, name
        for key, rule in head_constraints(name).items():
            assert key in params, (name, key)  # a rule for a parameter the head has
            assert param_violation(key, params[key], rule) is None, (name, key)  # default ok
        declared += bool(cls.param_constraints)
    assert declared >= len(HEADS) - 1  # zeroshot has nothing numeric but logit_adjust


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="not a parameter constraint"):
        param_violation("x", 1.0, "> zero")


def test_python_users_get_the_same_check_in_fit():
    from skincache.heads import get_head_class

    X = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    y = np.arange(20) % 2
    with pytest.raises(UsageError, match=r"MLPHead\(dropout=2\): dropout must be in \[0, 1\)"):
        get_head_class("mlp")(dropout=2).fit(X, y)
    with pytest.raises(UsageError, match="C must be > 0"):
        get_head_class("logreg")(C=0.0).fit(X, y)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_cache(tmp_path_factory.mktemp("params") / "synthetic.h5", n=90, d=8)


def test_a_failed_fit_leaves_no_run_folder(synth, tmp_path, monkeypatch):
    import skincache.runs as runs

    runs_dir = tmp_path / "runs"
    with pytest.raises(UsageError, match="epochs must be >= 1"):
        runs.fit_head_run(synth, "mlp", {"epochs": 0}, runs_dir=runs_dir, n_bootstrap=0)
    assert list(runs_dir.iterdir()) == []

    def broken(*a, **kw):  # fails after the head was saved
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(runs, "evaluate_head", broken)
    with pytest.raises(RuntimeError, match="scoring failed"):
        runs.fit_head_run(synth, "knn", runs_dir=runs_dir, name="half", n_bootstrap=0)
    assert list(runs_dir.iterdir()) == []


def test_a_finished_run_folder_is_never_removed(synth, tmp_path):
    from skincache.runs import RunError, fit_head_run, remove_unfinished_run

    done = tmp_path / "runs" / "done"
    done.mkdir(parents=True)
    (done / "run.json").write_text("{}")
    with pytest.raises(RunError, match="a run with this name exists"):
        fit_head_run(synth, "knn", runs_dir=tmp_path / "runs", name="done", n_bootstrap=0)
    remove_unfinished_run(done)
    assert (done / "run.json").read_text() == "{}"

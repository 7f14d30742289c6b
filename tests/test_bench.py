"""bench-heads: one JSON per (variant, seed), then the aggregate tables."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from skincache.bench import aggregate, bench_heads


def test_bench_heads_one_json_per_run_then_aggregate(demo_cache, tmp_path):
    res = bench_heads(demo_cache, seeds=2, variants=["zeroshot", "knn-k1", "linear"],
                      out_dir=tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "b" / "runs").glob("*.json"))
    assert files == ["knn-k1_s0.json", "linear_s0.json", "linear_s1.json", "zeroshot_s0.json"]
    runs = [json.loads((tmp_path / "b" / "runs" / f).read_text()) for f in files]
    lin = [r["balanced_accuracy"] for r in runs if r["variant"] == "linear"]
    row = next(r for r in res.rows if r["variant"] == "linear")
    assert row["n_seeds"] == 2 and row["balanced_accuracy_mean"] == pytest.approx(np.mean(lin))
    assert row["balanced_accuracy_std"] == pytest.approx(np.std(lin))
    assert [r["seed"] for r in runs if r["variant"] == "linear"] == [0, 1]
    assert aggregate(runs)[0]["variant"] == "knn-k1"
    md = (tmp_path / "b" / "results.md").read_text()
    assert re.search(r"\| linear( \(val's pick\))? \| all \| 2 \|", md)
    assert "1 (deterministic)" in md
    assert (tmp_path / "b" / "results.csv").is_file()
    with pytest.raises(ValueError, match="unknown variants"):
        bench_heads(demo_cache, variants=["nope"], out_dir=tmp_path / "c")

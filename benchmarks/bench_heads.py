"""`bench-heads` wall time on a HAM10000-sized cache (D=512, K=4): every variant x 5 seeds.

The cache is written through skincache's own writer from the synthetic problem
`skincache.data.synthetic_features` (as in `benchmarks/heads_fit.py`: 10,015 train images with
HAM10000's class counts, val/test with the same proportions, 7 x 8 prompt embeddings), then
`bench_heads` runs on it exactly as the CLI does. Target on a 2-core CPU: under 3 minutes.
Prints a table and writes JSON.

    python benchmarks/bench_heads.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from skincache.bench import bench_heads, n_fits
from skincache.cache import CacheHeader, SplitArrays, write_cache
from skincache.data import HAM10000_CLASSES, synthetic_features
from skincache.render import bench_table


def synthetic_cache(path: Path, seed: int = 0) -> Path:
    p = synthetic_features(seed=seed)
    k, d = p["views"].shape[1], p["X"].shape[1]

    def split(X, y, views, name):
        n = len(y)
        return SplitArrays(features=X, views=views, labels=y,
                           image_id=[f"{name}{i}" for i in range(n)],
                           group_id=[f"L{name}{i}" for i in range(n)], sha1=[""] * n, meta={})
    splits = {
        "train": split(p["X"], p["y"], p["views"], "tr"),
        "val": split(p["X_val"], p["y_val"], np.repeat(p["X_val"][:, None], k, 1), "va"),
        "test": split(p["X_test"], p["y_test"], np.repeat(p["X_test"][:, None], k, 1), "te"),
    }
    header = CacheHeader(
        key=f"synthetic-{seed}", model="synthetic-D512", logit_scale=100.0, weights_sha256="",
        embed_dim=d, precision="fp32", classes=list(HAM10000_CLASSES),
        class_names=list(HAM10000_CLASSES), preprocess={}, views={"k": k},
        dataset="synthetic", dataset_kind="synthetic", dataset_root="",
        dataset_fingerprint="", versions={})
    write_cache(path, header, splits, {"synthetic": p["text"]}, {})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" /
                    "bench_heads.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = synthetic_cache(Path(tmp) / "synthetic.h5")
        t0 = time.perf_counter()
        res = bench_heads(cache, seeds=args.seeds, out_dir=Path(tmp) / "bench")
        wall = time.perf_counter() - t0
    bench_table(res.rows, f"bench-heads on a synthetic HAM10000-sized cache (D=512, K=4), "
                          f"{args.seeds} seeds")
    Console().print(f"{n_fits(args.seeds)} fits in {wall:.1f} s (target < 180 s on 2 cores); "
                    f"load average {os.getloadavg()[0]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "bench-heads", "seeds": args.seeds,
                                    "n_fits": n_fits(args.seeds), "wall_s": wall,
                                    "cpu_count": os.cpu_count(), "rows": res.rows}, indent=2))


if __name__ == "__main__":
    main()

"""Time `skincache fit-head --head logreg --cv 5` on REAL frozen features of HAM10000.

The features are `../shared/data/features/ham10000-effnetlite0.npz` (10,015 real HAM10000
images through an ImageNet EfficientNet-Lite0; not CLIP features), written as a skincache cache
by `real_heads.build_cache` (skincache's lesion-grouped split, 60/20/20, seed 0). Then the CLI
runs as a user would run it, in a child process (`--threads` caps torch's and BLAS's threads
there), and what it wrote (the run folder's cv.json) is read back:

1. the normal fit-head run (fit on train, selection on val, scored on val and test);
2. 5 lesion-grouped stratified folds over train+val (8,009 images), the head's selection (C,
   tau, temperature) redone inside each fold on its inner val;
3. the refit: selection on an inner val carved from train+val, one score on test.

    python benchmarks/cv.py [--npz PATH] [--threads 2] [--k 5]
                            [--out benchmarks/results/cv.json]

Printed: mean ± 95% Student t interval over folds per metric (the metric registry), the refit's
test score, the wall time of the whole command and its CPU time, beside the load average before
and after (this machine is shared: CPU seconds say what the work costs, wall seconds what it
cost today).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_heads import DEFAULT_NPZ, build_cache  # noqa: E402

from skincache.metrics import get_metric, table_metrics  # noqa: E402


def _cell(name: str, mean: float | None, half: float | None = None) -> str:
    if mean is None:
        return "n/a"
    scale, digits = (100, 1) if get_metric(name).fmt == "percent" else (1, 3)
    return f"{scale * mean:.{digits}f}" + ("" if half is None else f" ± {scale * half:.{digits}f}")


def run_cli(cache: Path, runs: Path, k: int, threads: int | None) -> tuple[float, float]:
    """fit-head --head logreg --cv K in a child process: (wall s, CPU s of the child)."""
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                              "OPENBLAS_NUM_THREADS")})
    cli = Path(sys.executable).with_name("skincache")
    cmd = [str(cli), "fit-head", "--cache", str(cache), "--head", "logreg", "--cv", str(k),
           "--runs-dir", str(runs), "--name", "logreg-cv", "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def table(cv: dict, wall: float, cpu: float, load: list) -> Table:
    t = Table(title=f"logreg, {cv['k']}-fold lesion-grouped CV over train+val "
                    f"({cv['n_pool']:,} images) + refit on test "
                    f"({cv['refit']['n_samples']:,} images); whole command {wall:.1f} s wall, "
                    f"{cpu:.1f} s CPU, load {load[0][0]:.2f} → {load[1][0]:.2f}",
              title_justify="left")
    for col in ("metric", "CV mean ± 95% CI", "refit → test"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for m in table_metrics():
        t.add_row(m.heading, _cell(m.name, cv["mean"][m.name], cv["ci95"][m.name]),
                  _cell(m.name, cv["refit"][m.name]))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    ap.add_argument("--threads", type=int, default=None, help="threads of the child process")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cv.json"))
    args = ap.parse_args()
    if not args.npz.is_file():
        sys.exit(f"error: {args.npz}: no such file (the real features live in ../shared/data)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(args.npz, Path(tmp) / "real.h5")
        load_before = os.getloadavg()
        wall, cpu = run_cli(cache, Path(tmp) / "runs", args.k, args.threads)
        load_after = os.getloadavg()
        cv = json.loads((Path(tmp) / "runs" / "logreg-cv" / "cv.json").read_text())
    load = [list(load_before), list(load_after)]
    Console(width=140).print(table(cv, wall, cpu, load))
    print(f"folds: {[round(100 * f['metrics']['balanced_accuracy'], 1) for f in cv['folds']]} "
          f"bal. acc %; chosen C per fold: {[f['selection'].get('C_') for f in cv['folds']]}; "
          f"CV part {cv['seconds']:.1f} s (of {wall:.1f} s)")
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"skincache fit-head --head logreg --cv {args.k}", "npz": str(args.npz),
        "wall_seconds": wall, "cpu_seconds": cpu, "cv_seconds": cv["seconds"],
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_average": load,
        "python": platform.python_version(), "cv": cv}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

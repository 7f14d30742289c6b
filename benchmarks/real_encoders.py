"""bench-encoders on REAL frozen features: two encoders of the same 10,015 HAM10000 images.

The encoders are the two real-feature files of `../shared/data/features/`: EfficientNet-Lite0
(`ham10000-effnetlite0.npz`) and the HAM10000 rows of EfficientNet-Lite1
(`effnetlite1-ham10000-isic2018.npz`, its ISIC 2018 rows left out), both ImageNet CNNs, 1280-d,
clean view + 2 augmented views, no text tower (so no zeroshot column). They are not
dermatology encoders and not CLIP: the point is the command on real, long-tailed features,
not which derm model wins (no derm weights were loaded here).

What runs:
1. The Lite1 rows are matched to Lite0's by image_id (the same images, in Lite0's order), and
   both are written as skincache caches with ONE split: benchmarks/real_heads.py's
   lesion-grouped, class-stratified 60/20/20 (seed 0), computed once on Lite0's rows.
2. `skincache.study.encoders.bench_encoders` on the two caches (checked aligned first):
   each head fit on train, selection on val, scored once on test with 1,000-resample
   percentile-bootstrap 95% CIs; `--cv K` for the lesion-grouped K-fold CV instead.
3. The table is printed and results.json / results.md / encoders.png are written under
   `benchmarks/results/real_encoders/` (the load average beside the timings: the machine is
   shared).

    python benchmarks/real_encoders.py [--heads logreg,dermfm-lp] [--cv 5] [--threads 2]
                                       [--out-dir benchmarks/results/real_encoders]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_heads import DEFAULT_NPZ, EXTERNAL_NPZ, split_rows, write_arrays_cache  # noqa: E402

from skincache.study.encoders import bench_encoders  # noqa: E402


def matched_rows(lite0, lite1) -> dict[str, np.ndarray]:
    """Lite1's HAM10000 rows in Lite0's image order (every Lite0 image must be there)."""
    ham = np.flatnonzero(lite1["split"] == "ham10000")
    where = {str(i): r for i, r in zip(lite1["image_id"][ham], ham, strict=True)}
    missing = [i for i in lite0["image_id"] if str(i) not in where]
    if missing:
        sys.exit(f"{len(missing)} Lite0 images are not among Lite1's HAM10000 rows "
                 f"(e.g. {missing[0]}): the two files are not of the same images")
    order = np.array([where[str(i)] for i in lite0["image_id"]])
    return {k: lite1[k][order] for k in lite1.files if k != "split"}


def build_caches(folder: Path) -> list[Path]:
    """The two encoders' caches, one split."""
    lite0, lite1 = np.load(DEFAULT_NPZ), np.load(EXTERNAL_NPZ)
    d1 = matched_rows(lite0, lite1)
    assert (d1["dx"] == lite0["dx"]).all() and (d1["lesion_id"] == lite0["lesion_id"]).all()
    split = split_rows(lite0, external=False)
    return [write_arrays_cache(lite0, split, folder / "ham10000-effnetlite0.h5",
                               key=DEFAULT_NPZ.stem, root=str(DEFAULT_NPZ),
                               model="efficientnet-lite0"),
            write_arrays_cache(d1, split, folder / "ham10000-effnetlite1.h5",
                               key=EXTERNAL_NPZ.stem + "-ham10000", root=str(EXTERNAL_NPZ),
                               model="efficientnet-lite1")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="logreg,dermfm-lp", help="comma-separated variants")
    ap.add_argument("--cv", type=int, default=None, help="K-fold lesion-grouped CV instead")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out-dir", type=Path,
                    default=Path(__file__).parent / "results" / "real_encoders")
    args = ap.parse_args()
    for npz in (DEFAULT_NPZ, EXTERNAL_NPZ):
        if not npz.is_file():
            sys.exit(f"{npz}: the real-feature file is not here; set SKINCACHE_SHARED_DATA "
                     "to the shared data folder")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        caches = build_caches(Path(tmp))
        res = bench_encoders(caches, heads=args.heads.split(","), cv=args.cv,
                             n_bootstrap=args.bootstrap, out_dir=args.out_dir, progress=True)
    seconds = time.perf_counter() - t0
    load_after = os.getloadavg()
    from skincache.render_study import encoders_table

    encoders_table(res)
    for r in res.runs:
        print(f"  {r['encoder']:<28} {r['variant']:<12} fit {r['fit_seconds']:7.1f} s")
    print(f"total {seconds:.0f} s; load average before {load_before[0]:.2f}, "
          f"after {load_after[0]:.2f} (1 min)")
    summary = {"seconds": seconds, "load_average_before": load_before,
               "load_average_after": load_after, "cpu_count": os.cpu_count(),
               "results": str(res.out_dir / "results.json")}
    (res.out_dir / "timing.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written: {res.out_dir}/results.json, results.md, encoders.png, timing.json")


if __name__ == "__main__":
    main()

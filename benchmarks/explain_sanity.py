"""The model-randomisation sanity check (Adebayo et al., 2018) of `predict --explain` on a run
and images of your choice: the image tower re-initialised cascading from the top, and per
stage the mean rank correlation of each image's Grad-CAM map with the original one. Maps that
explain the model fall towards 0; maps that survive re-drawn weights (rho near 1) show the
image, not the model. Prints a table (load average beside it) and writes JSON.

    python benchmarks/explain_sanity.py runs/<run> lesion1.jpg [more.jpg | a folder] [--device cuda]

On the shipped random skincache-tiny this checks the mechanism only; run it on a run fit on
real weights (README "Saliency maps").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from skincache.explain import randomisation_check_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/explain_sanity.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = randomisation_check_run(args.run, args.images, device=args.device, seed=args.seed)
    seconds = time.perf_counter() - t0
    load = os.getloadavg()
    t = Table(title=f"model randomisation, cascading from the top: {args.run}, "
                    f"{len(rows[0]['rho'])} images, {seconds:.1f} s (load average "
                    f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    t.add_column("re-drawn so far, down to")
    t.add_column("mean rank correlation with the original map", justify="right")
    for r in rows:
        t.add_row(r["stage"], f"{r['mean_rho']:.3f}")
    Console().print(t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "rows": rows, "seconds": seconds,
                               "loadavg": load}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

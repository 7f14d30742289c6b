"""What `predict --explain` costs per image: one Grad-CAM (forward + backward through the image
tower to the last block's input tokens, through a linear head) and one overlay PNG, per model.

Random-initialised towers (no download: the cost does not depend on the weights); a 7-class
linear head with random unit rows stands in for the run's head. Prints a table (with the load
average beside it) and writes JSON.

    python benchmarks/explain_speed.py [--models skincache-tiny,ViT-B-32,ViT-B-16] [--n 3]
        [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from skincache.device import resolve_device
from skincache.explain import gradcam, vit_parts, write_overlay
from skincache.models import ModelSpec, load_model
from skincache.views import Normalizer


def measure(name: str, n: int, device: torch.device) -> dict:
    loaded = load_model(ModelSpec(name, None), device)
    visual = loaded.model.visual
    _, _, grid = vit_parts(visual)
    h, w = loaded.preprocess.size
    g = torch.Generator().manual_seed(0)
    W = F.normalize(torch.randn(7, loaded.embed_dim, generator=g), dim=-1).to(device)

    def scorer(f: torch.Tensor) -> torch.Tensor:
        return 100.0 * F.normalize(f, dim=-1) @ W.T

    norm = Normalizer(loaded.preprocess, device)
    pixels = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    x = norm(pixels[None].to(device))
    gradcam(visual, scorer, x)  # warm-up
    cam_s, png_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            t0 = time.perf_counter()
            sal = gradcam(visual, scorer, x, i % 7)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            write_overlay(pixels.numpy().transpose(1, 2, 0), sal.map, f"{name} class {i % 7}",
                          Path(tmp) / f"{i}.png")
            cam_s.append(t1 - t0)
            png_s.append(time.perf_counter() - t1)
    return {"model": name, "input": f"{h}x{w}", "grid": f"{grid[0]}x{grid[1]}",
            "gradcam_s": float(np.median(cam_s)), "overlay_s": float(np.median(png_s)),
            "n": n, "device": device.type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="skincache-tiny,ViT-B-32,ViT-B-16")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    ap.add_argument("--out", default="benchmarks/results/explain_speed.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(m, args.n, device) for m in args.models.split(",")]
    load = os.getloadavg()
    t = Table(title=f"predict --explain per image ({device.type}, {torch.get_num_threads()} "
                    f"threads; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    for col in ("model", "input", "grid", "Grad-CAM s", "overlay PNG s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        t.add_row(r["model"], r["input"], r["grid"], f"{r['gradcam_s']:.3f}",
                  f"{r['overlay_s']:.3f}")
    Console().print(t)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "loadavg": load,
                               "threads": torch.get_num_threads()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

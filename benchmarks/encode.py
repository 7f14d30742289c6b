"""Encode throughput: skincache's one-pass encode vs the loop a user would write.

On the same synthetic 600x450 JPEGs, for each K in --views:
  (a) skincache: `encode_dataset` end to end (decode, views, model, cache write), forced rebuild;
  (b) baseline: open_clip's `preprocess` (plus, for K > 0, torchvision's RandomResizedCrop-free
      reference augmentation Resize 256 / RandomCrop 224 / HorizontalFlip applied K more times to
      the same decoded PIL image) in a torch DataLoader with one worker per core, the model under
      autocast on CUDA.
Prints source images/s for both and the ratio, and writes JSON.

    python benchmarks/encode.py                                  # CPU, tiny model
    python benchmarks/encode.py --device cuda --model ViT-B-32 --n-images 20000 --batch-size 256

Weights do not change the speed, so `--pretrained ''` (random init) is the default: it runs
without a network. Pass `--pretrained openai` to use real weights where they can be downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torchvision import transforms as T

from skincache.data import load_dataset, make_demo_dataset
from skincache.device import autocast_dtype, resolve_device, resolve_precision
from skincache.encode import encode_dataset
from skincache.models import ModelSpec, load_model
from skincache.views import ViewPolicy


class _BaselineDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], preprocess, aug, k: int):
        self.paths, self.preprocess, self.aug, self.k = paths, preprocess, aug, k

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i])
        views = [self.preprocess(img)] + [self.aug(img) for _ in range(self.k)]
        return torch.stack(views)


def baseline(paths: list[str], loaded, k: int, device: torch.device, precision: str,
             batch_size: int, workers: int) -> float:
    """Seconds for the user-written loop over all images."""
    pp = loaded.preprocess
    preprocess = pp.open_clip_transform()
    resize = round(256 * min(pp.size) / 224)
    aug = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomCrop(pp.size), T.RandomHorizontalFlip(), T.ToTensor(),
                     T.Normalize(pp.mean, pp.std)])
    loader = torch.utils.data.DataLoader(
        _BaselineDataset(paths, preprocess, aug, k), batch_size=batch_size,
        num_workers=workers, pin_memory=device.type == "cuda")
    dtype = autocast_dtype(precision)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in loader:
            x = x.flatten(0, 1).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                f = loaded.model.encode_image(x)
            f.float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=400)
    ap.add_argument("--model", default="skincache-tiny")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--views", default="0,4", help="comma-separated K values")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="keep the synthetic JPEGs here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/encode.json"))
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    spec = ModelSpec(args.model, args.pretrained or None)
    tmp = Path(tempfile.mkdtemp(prefix="skincache-bench-"))
    data_dir = args.data_dir or tmp / "data"
    console = Console()
    console.print(f"generating {args.n_images} synthetic 600x450 JPEGs in {data_dir} ...")
    make_demo_dataset(data_dir, n_images=args.n_images, seed=0)
    ds = load_dataset(data_dir)
    paths = [r.source for r in ds.records]
    t0 = time.perf_counter()
    loaded = load_model(spec, device)
    load_s = time.perf_counter() - t0

    # warm-up: first CUDA kernels, page cache, worker start
    baseline(paths[: args.batch_size], loaded, 0, device, precision, args.batch_size,
             args.workers)
    rows = []
    for k in [int(x) for x in args.views.split(",")]:
        base_s = baseline(paths, loaded, k, device, precision, args.batch_size, args.workers)
        t0 = time.perf_counter()
        res = encode_dataset(ds, spec, policy=ViewPolicy(k=k), cache_dir=tmp / "cache",
                             device=str(device), batch_size=args.batch_size,
                             num_workers=args.workers, force=True, progress=False)
        ours_s = time.perf_counter() - t0
        n = len(paths)
        rows.append({
            "k": k, "n_images": n, "skincache_s": ours_s, "baseline_s": base_s,
            "skincache_img_per_s": n / ours_s, "baseline_img_per_s": n / base_s,
            "skincache_img_per_s_excl_model_load": n / max(ours_s - load_s, 1e-9),
            "ratio": base_s / ours_s, "failed": res.n_failed,
        })
    shutil.rmtree(tmp, ignore_errors=True)

    table = Table(title=f"encode throughput: {args.model} on {device.type} ({precision}), "
                        f"{len(paths)} images 600x450, batch {args.batch_size}, "
                        f"{args.workers} workers")
    for col in ("K", "skincache img/s", "baseline img/s", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["k"]), f"{r['skincache_img_per_s']:,.0f}",
                      f"{r['baseline_img_per_s']:,.0f}", f"{r['ratio']:.2f}x")
    console.print(table)
    console.print(f"model load {load_s:.1f} s (included in skincache's end-to-end time)")
    result = {
        "benchmark": "encode", "model": args.model, "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "precision": precision, "batch_size": args.batch_size,
        "workers": args.workers, "model_load_s": load_s, "rows": rows,
        "python": sys.version.split()[0], "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

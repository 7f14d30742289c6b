"""`skincache report` on REAL data: the README's report screenshot, and its size and time.

The HAM10000 EfficientNet-Lite0 features (`../shared/data/features/ham10000-effnetlite0.npz`,
no text tower, so no text heads) are written as a cache with skincache's lesion-grouped
60/20/20 split (`real_heads.build_cache`), its dataset root the real HAM10000 folder (so the
gallery shows the real images); `fit-head` runs four heads, `bench-heads` one seed of three
variants, `audit` the split; then `skincache report` writes one page of it all, headless
Chromium screenshots it (when installed), and the table says how big and how slow that was.

    python benchmarks/report_real.py [--out-dir benchmarks/results/report_real]
                                     [--screenshot docs/report-real.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_heads import DEFAULT_NPZ, FEATURES, build_cache  # noqa: E402

HAM = FEATURES.parent / "ham10000"
HEADS = ("logreg", "mlp", "knn", "linear")


def sh(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "skincache.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2000) -> bool:
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(b)), None)
    if browser is None:
        print("no chromium: no screenshot")
        return False
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}",
                    page.resolve().as_uri()],
                   check=True, capture_output=True)
    with Image.open(png) as im:  # small for the repository: half size, 64 colours
        im.convert("RGB").resize((width // 2, height // 2), Image.LANCZOS).quantize(64).save(
            png, optimize=True)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/report_real"))
    ap.add_argument("--screenshot", type=Path, default=Path("docs/report-real.png"))
    args = ap.parse_args()
    if not DEFAULT_NPZ.is_file():
        sys.exit(f"real features not available: {DEFAULT_NPZ}")
    out = args.out_dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    cache = build_cache(DEFAULT_NPZ, out / "ham10000-lite0.h5", dataset_root=str(HAM))
    times = {}
    for head in HEADS:
        times[f"fit-head {head}"] = sh("fit-head", "--cache", str(cache), "--head", head,
                                       "--runs-dir", str(out / "runs"), "--name", head, "-q")
    times["bench-heads"] = sh("bench-heads", "--cache", str(cache), "--seeds", "1",
                              "--variants", "logreg,mlp,knn-k20", "--out-dir",
                              str(out / "bench"), "--quiet")
    times["audit"] = sh("audit", "--data", str(HAM), "--no-hash", "--split-ratios",
                        "0.6,0.2,0.2", "--json", str(out / "audit.json"))  # the cache's split
    times["report"] = sh("report", str(out / "runs"), str(out / "bench"),
                         str(out / "audit.json"), "--out", str(out / "report.html"), "-q")
    size = (out / "report.html").stat().st_size
    shot = screenshot(out / "report.html", args.screenshot)
    result = {"load_average_1min_before": load, "seconds": times, "report_bytes": size,
              "screenshot": str(args.screenshot) if shot else None}
    (out / "report_real.json").write_text(json.dumps(result, indent=2))
    print(f"load average before: {load:.2f}")
    for k, v in times.items():
        print(f"{k:24s} {v:7.1f} s")
    print(f"report.html {size / 1e6:.2f} MB; screenshot: {result['screenshot']}")


if __name__ == "__main__":
    main()

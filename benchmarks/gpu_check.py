"""The GPU claims, checked in one prepared script: encode, nvjpeg, bf16, fine-tune, heads.

Six steps, each in its own try/except (a failed step records its error and the others still
run), under one time budget (a step that would start too late is skipped with a note). Prints
one table and writes one JSON (after every step, so a run killed at its time limit keeps what
it measured):

  1. encode end to end (decode, views, model, cache write; model load included) on synthetic
     600x450 JPEGs, K=0 and K=4: skincache vs the naive baseline (open_clip's `preprocess` in a
     DataLoader with one worker per core, autocast on CUDA) in the same run: images/s, ratio;
  2. the CUDA route (nvjpeg + views on the GPU, bf16) vs the CPU route (Pillow workers, fp32)
     on the same real images: min cosine of the clean view (>= 0.99) and of the views;
  3. a bad-input set through both routes: the same `failed` table (ids and reasons), and the
     images both keep decoded alike (pixels and features): nothing decoded silently wrong;
  4. precision: the image tower with bf16 weights and under bf16 autocast vs fp32, on the same
     real images: min cosine, and the tower's images/s in each;
  5. fine-tuning: a bare training step's images/s at batch 16 and a larger batch, two short
     epochs of `run_finetune` (base setup, decode-once image store) at each, and the projected
     time of the 20-epoch base setup on 9,577 training images;
  6. heads: logreg's C sweep (torch L-BFGS) and linear/mlp fit times on the device,
     on a synthetic HAM10000-sized problem (10,015 x 512, K=4).

Targets (one H200, ViT-B-32, 20,000 images): >= 8,000 source images/s at K=0, >= 5,000 at K=4,
>= 3x the baseline, the projected base fine-tune < 8 min; cosines >= 0.99 everywhere. The table
says met or MISSED; nothing here is tuned to pass. Speed targets are judged only on CUDA with
ViT-B-32 at full size ("n/a" otherwise); the correctness checks are judged everywhere.

    python benchmarks/gpu_check.py                              # on the GPU machine (README)
    python benchmarks/gpu_check.py --device cpu --quick         # the same steps, CI-sized

Weights are random-initialised (nothing can be downloaded there): speed does not depend on them;
cosines between routes and precisions are measured on a random-init network, which is noted.
Exit status: 0 when every step ran (targets met or not), 1 when a step raised.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# fine-tuning runs deterministic by default; cuBLAS needs this before its first use (as in
# benchmarks/finetune.py, so the fine-tune step measures what a user's run does)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from skincache import (  # noqa: E402
    FeatureCache,
    FinetuneConfig,
    ModelSpec,
    ViewPolicy,
    create_head,
    encode_dataset,
    load_dataset,
    load_model,
    make_demo_dataset,
    run_finetune,
)
from skincache.data import HAM10000_CLASSES, synthetic_features  # noqa: E402
from skincache.device import autocast_dtype, resolve_device, resolve_precision  # noqa: E402
from skincache.loaders import cpu_batches, tensor_batches  # noqa: E402
from skincache.models import TINY_MODEL, PreprocessSpec  # noqa: E402
from skincache.views import Normalizer, ViewMaker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"k0_img_s": 8000.0, "k4_img_s": 5000.0, "ratio": 3.0, "finetune_min": 8.0,
           "cosine": 0.99, "pixel_mad": 8.0}
#: what the README asks of the heads on a 2-core CPU (benchmarks/heads_fit.py)
HEAD_TARGETS_S = {"logreg": 10.0, "linear": 2.0, "mlp": 2.0}

#: sizes: the GPU run and the CI-sized CPU run (--quick)
FULL = {"n_images": 20000, "shards": 16, "batch": 256, "real_n": 0, "views_real": 1,
        "tower_batch": 256, "tower_iters": 100, "ft_batches": (16, 128), "ft_epochs": 2,
        "bare_steps": 30, "heads_scale": 1.0, "budget_s": 300.0}
QUICK = {"n_images": 64, "shards": 1, "batch": 32, "real_n": 40, "views_real": 1,
         "tower_batch": 32, "tower_iters": 4, "ft_batches": (16, 32), "ft_epochs": 2,
         "bare_steps": 4, "heads_scale": 0.03, "budget_s": 600.0}
#: seconds a step needs at full size, roughly: skipped when less is left of the budget
STEP_NEEDS_S = {1: 60, 2: 20, 3: 10, 4: 15, 5: 45, 6: 20}


class OutOfTime(Exception):
    """The global budget ran out inside a step: it stops there, keeping its rows."""


# --------------------------------------------------------------------------- the record


class Check:
    """The rows of the one table, the per-step results, the JSON, the budget."""

    def __init__(self, args: argparse.Namespace, sizes: dict, device: torch.device,
                 t0: float):
        self.args, self.sizes, self.device = args, sizes, device
        self.t0 = t0  # the budget counts from the start, data generation included
        self.budget_s = args.budget_s if args.budget_s is not None else sizes["budget_s"]
        self.rows: list[dict] = []
        self.steps: dict[str, dict] = {}
        self.speed_targets_apply = (device.type == "cuda" and args.model == "ViT-B-32"
                                    and not args.quick)
        self.console = Console(width=132)

    # budget
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def need(self, seconds: float, what: str) -> None:
        """Stop the current step when fewer than `seconds` of the budget are left."""
        if self.left() < seconds:
            raise OutOfTime(f"{what} skipped: {self.left():.0f} s of the {self.budget_s:.0f} s "
                            f"budget left, needs about {seconds:.0f} s")

    # rows
    def row(self, step: int, measure: str, value: str, target: str = "", verdict: str = "",
            **data) -> None:
        self.rows.append({"step": step, "measure": measure, "value": value, "target": target,
                          "verdict": verdict, **data})

    def judge(self, value: float | None, target: float, *, higher: bool = True,
              speed: bool = False) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "—"
        if speed and not self.speed_targets_apply:
            return "n/a"
        ok = value >= target if higher else value <= target
        return "met" if ok else "MISSED"

    # steps
    def run_step(self, n: int, title: str, fn: Callable[[Check, dict], None],
                 state: dict) -> None:
        rec = {"title": title, "status": "ok", "started_s": round(self.elapsed(), 1)}
        self.steps[str(n)] = rec
        t0 = time.perf_counter()
        scale = 1.0 if not self.args.quick else 0.0
        try:
            self.need(STEP_NEEDS_S[n] * scale, f"step {n}")
            fn(self, state)
        except OutOfTime as e:
            rec["status"] = "skipped"
            rec["note"] = str(e)
            self.row(n, f"{title}: stopped", str(e), verdict="skipped")
        except Exception as e:  # one failed step must not lose the others
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=8)
            self.row(n, f"{title}: error", f"{type(e).__name__}: {str(e)[:160]}",
                     verdict="error")
        finally:
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):  # a broken context is the step's error
                    torch.cuda.empty_cache()
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] step {n} ({title}): {rec['status']} in {rec['seconds']} s "
              f"(elapsed {self.elapsed():.0f} s)", flush=True)
        self.save()

    def result(self) -> dict:
        return {
            "benchmark": "gpu_check",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": self.args.quick, "model": self.args.model, "device": self.device.type,
            "device_name": device_name(self.device), "cpu_count": os.cpu_count(),
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in self.sizes.items()},
            "budget_s": self.budget_s, "elapsed_s": round(self.elapsed(), 1),
            "speed_targets_apply": self.speed_targets_apply, "targets": TARGETS,
            "env": environment(), "steps": self.steps, "rows": self.rows,
            "table_markdown": self.markdown(),
        }

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result(), indent=2, default=str) + "\n")
        tmp.replace(out)

    def title(self) -> str:
        return (f"gpu_check {'--quick ' if self.args.quick else ''}— {self.args.model} "
                f"(random init) on {device_name(self.device)}, {os.cpu_count()} CPU cores, "
                f"{datetime.now(timezone.utc):%Y-%m-%d}, {self.elapsed():.0f} s")

    def markdown(self) -> str:
        lines = [f"**{self.title()}**", "", "| step | measure | value | target | verdict |",
                 "|---|---|---:|---:|---|"]
        def cell(text: object) -> str:
            return str(text).replace("|", "\\|").replace("\n", " ")

        for r in self.rows:
            lines.append("| " + " | ".join(cell(r[c]) for c in ("step", "measure", "value",
                                                                "target", "verdict")) + " |")
        return "\n".join(lines)

    def print_table(self) -> None:
        table = Table(title=self.title(), show_lines=False)
        for col, justify in (("step", "right"), ("measure", "left"), ("value", "right"),
                             ("target", "right"), ("verdict", "left")):
            table.add_column(col, justify=justify, overflow="fold")
        colour = {"met": "green", "MISSED": "bold red", "error": "bold red",
                  "skipped": "yellow"}
        for r in self.rows:
            v = r["verdict"]
            table.add_row(str(r["step"]), r["measure"], r["value"], r["target"],
                          f"[{colour[v]}]{v}[/]" if v in colour else v)
        self.console.print(table)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def environment() -> dict:
    import open_clip
    import PIL
    import torchvision

    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "open_clip": open_clip.__version__,
        "numpy": np.__version__, "pillow": PIL.__version__,
        "cuda": torch.version.cuda, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data


def _shard(job: tuple[str, int, int]) -> str:
    root, n, seed = job
    make_demo_dataset(Path(root), n_images=n, seed=seed)
    return root


def make_synthetic(root: Path, n: int, shards: int) -> Path:
    """n synthetic 600x450 JPEGs written by `shards` processes (one demo dataset each, seeds
    0..shards-1), listed in one `path,label,group` CSV (splits assigned by skincache)."""
    sizes = [n // shards + (i < n % shards) for i in range(shards)]
    jobs = [(str(root / f"shard{i:02d}"), s, i) for i, s in enumerate(sizes)]
    if shards > 1:
        # fork: nothing has touched CUDA yet when this runs (it is the first thing main does)
        with ProcessPoolExecutor(shards, mp_context=mp.get_context("fork")) as ex:
            list(ex.map(_shard, jobs))
    else:
        _shard(jobs[0])
    with open(root / "images.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "group"])
        for i, (shard, _, _) in enumerate(jobs):
            meta = Path(shard) / "HAM10000_metadata.csv"
            where = {p.stem: p.relative_to(root).as_posix() for p in Path(shard).rglob("*.jpg")}
            with open(meta, newline="") as m:
                for r in csv.DictReader(m):
                    w.writerow([where[r["image_id"]], r["dx"], f"s{i}-{r['lesion_id']}"])
    return root / "images.csv"


def synthetic(state: dict, key: str) -> Path:
    """The synthetic images' CSV ("synthetic_csv") or first shard ("shard0")."""
    if key not in state:
        raise RuntimeError(f"no synthetic images: {state.get('data_error', 'not generated')}")
    return state[key]


def subset(ds, n: int):
    """About n records of `ds`, every split kept, classes taken in turn within each split."""
    if not n or n >= len(ds.records):
        return ds
    keep = []
    for split in ds.splits:
        recs = ds.split_records(split)
        quota = max(1, round(n * len(recs) / len(ds.records)))
        by_class: dict[str, list] = {}
        for r in recs:
            by_class.setdefault(r.label, []).append(r)
        picked: list = []
        while len(picked) < quota and any(by_class.values()):
            for c in sorted(by_class):
                if by_class[c] and len(picked) < quota:
                    picked.append(by_class[c].pop(0))
        keep += picked
    return replace(ds, records=keep)


def real_dataset(chk: Check, state: dict):
    """The real images (.gpu-data/ham10000 by default), or, in --quick mode only, the synthetic
    images when none are there (noted in the table)."""
    if "real" in state:
        return state["real"]
    path = Path(chk.args.real_data)
    if (path / "HAM10000_metadata.csv").is_file():
        ds = subset(load_dataset(path), chk.sizes["real_n"])
        state["real"] = (ds, f"{len(ds.records)} real HAM10000 images ({path})")
    elif chk.args.quick:
        ds = load_dataset(synthetic(state, "shard0"))
        state["real"] = (ds, f"{len(ds.records)} synthetic images (no real images at {path})")
    else:
        raise FileNotFoundError(f"no real images at {path}: run `python benchmarks/gpu_data.py` "
                                "and carry .gpu-data (see the README's GPU check)")
    return state["real"]


# --------------------------------------------------------------------------- step 1: encode


def baseline_seconds(paths: list[str], loaded, k: int, device: torch.device, precision: str,
                     batch_size: int, workers: int) -> float:
    """The loop a user would write: `benchmarks/encode.py`'s baseline (open_clip's
    `preprocess` and, for K > 0, the reference augmentation K more times per decoded image),
    imported from the script beside this one so both benchmarks time the same loop."""
    from encode import baseline  # benchmarks/encode.py: this script's folder is on sys.path

    return baseline(paths, loaded, k, device, precision, batch_size, workers)


def step_encode(chk: Check, state: dict) -> None:
    dev, sz, args = chk.device, chk.sizes, chk.args
    precision = resolve_precision("auto", dev)
    workers = args.workers or os.cpu_count() or 1
    ds = load_dataset(synthetic(state, "synthetic_csv"))
    paths = [r.source for r in ds.records]
    n = len(paths)
    spec = ModelSpec(args.model, None)
    t0 = time.perf_counter()
    loaded = load_model(spec, dev)
    sync(dev)
    load_s = time.perf_counter() - t0
    chk.row(1, "model load, first in the process", f"{load_s:.1f} s", model_load_s=load_s)
    # warm-up, not in the rates below (a one-off CLI run pays it on top): CUDA context and
    # kernels, cuBLAS, nvjpeg, worker start, for both loops
    t0 = time.perf_counter()
    baseline_seconds(paths[: sz["batch"]], loaded, 0, dev, precision, sz["batch"], workers)
    warm = load_dataset(synthetic(state, "shard0"))
    encode_dataset(warm, spec, policy=ViewPolicy(k=0), cache_dir=state["tmp"] / "warm",
                   device=str(dev), batch_size=sz["batch"], num_workers=workers, force=True,
                   progress=False)
    chk.row(1, f"warm-up, not timed below (baseline 1 batch, skincache {len(warm.records)} "
               "images)", f"{time.perf_counter() - t0:.1f} s")
    # what one encode pays for its model in a warm process (the first load above also paid
    # open_clip's imports): subtracted below for the rate without the model load
    t0 = time.perf_counter()
    load_model(spec, dev)
    sync(dev)
    load_s = time.perf_counter() - t0
    chk.row(1, "model load in a warm process (create + move + checksum)", f"{load_s:.1f} s",
            model_load_warm_s=load_s)
    for k in (0, 4):
        chk.need(15 if not args.quick else 0, f"step 1, K={k}")
        base_s = baseline_seconds(paths, loaded, k, dev, precision, sz["batch"], workers)
        t0 = time.perf_counter()
        res = encode_dataset(ds, spec, policy=ViewPolicy(k=k), cache_dir=state["tmp"] / "enc",
                             device=str(dev), batch_size=sz["batch"], num_workers=workers,
                             force=True, progress=False)
        ours_s = time.perf_counter() - t0
        rate, base_rate = n / ours_s, n / base_s
        target = TARGETS["k0_img_s"] if k == 0 else TARGETS["k4_img_s"]
        chk.row(1, f"K={k}: skincache, source img/s end to end ({n:,} images, {res.n_failed} "
                   f"failed)", f"{rate:,.0f}", f">= {target:,.0f}",
                chk.judge(rate, target, speed=True), k=k, n_images=n, skincache_s=ours_s,
                img_per_s=rate, n_failed=res.n_failed)
        excl = n / (ours_s - load_s) if ours_s > load_s else None
        chk.row(1, f"K={k}: skincache, img/s without one model load (est.)",
                f"{excl:,.0f}" if excl else "—", k=k, img_per_s_excl_load=excl)
        chk.row(1, f"K={k}: naive baseline img/s ({workers} workers, "
                   f"{'autocast ' + precision if autocast_dtype(precision) else precision})",
                f"{base_rate:,.0f}", k=k, baseline_s=base_s, img_per_s=base_rate)
        ratio = base_s / ours_s
        chk.row(1, f"K={k}: skincache / baseline", f"{ratio:.2f}x",
                f">= {TARGETS['ratio']:.0f}x", chk.judge(ratio, TARGETS["ratio"], speed=True),
                k=k, ratio=ratio)
        shutil.rmtree(state["tmp"] / "enc", ignore_errors=True)
    del loaded


# --------------------------------------------------------------------------- step 2: routes


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _centred_min(a: np.ndarray, b: np.ndarray) -> float:
    """Min cosine after removing the reference's mean feature: random-init features of
    different images share a large common direction that makes the plain cosine easy."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean = b.reshape(-1, b.shape[-1]).mean(0)
    return float(_cosines(a - mean, b - mean).min())


def _by_id(cache: FeatureCache) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for s in cache.splits.values():
        for i, image_id in enumerate(s.image_id):
            out[str(image_id)] = (s.features[i], s.views[i])
    return out


def encode_routes(chk: Check, ds, tag: str, k: int, state: dict):
    """(CUDA route cache, CPU route cache): the device's tensor route at the default precision
    (nvjpeg + bf16 on CUDA; torchvision's CPU decoder + fp32 with --device cpu) and the CPU
    route (Pillow workers, fp32, on the CPU)."""
    spec = ModelSpec(chk.args.model, None)
    cpus = os.cpu_count() or 1
    a = encode_dataset(ds, spec, policy=ViewPolicy(k=k), cache_dir=state["tmp"] / f"{tag}-a",
                       device=str(chk.device), loader="tensor", batch_size=chk.sizes["batch"],
                       force=True, progress=False)
    # few decode workers: the CPU route gives the model the cores its workers leave
    b = encode_dataset(ds, spec, policy=ViewPolicy(k=k), cache_dir=state["tmp"] / f"{tag}-b",
                       device="cpu", loader="pillow", precision="fp32",
                       batch_size=chk.sizes["batch"], num_workers=max(1, min(4, cpus // 4)),
                       force=True, progress=False)
    return a, b


def route_label(chk: Check) -> str:
    if chk.device.type == "cuda":
        return "CUDA route (nvjpeg, bf16) vs CPU route (Pillow, fp32)"
    return "tensor route (torchvision CPU decoder) vs CPU route (Pillow), fp32"


def step_routes(chk: Check, state: dict) -> None:
    ds, what = real_dataset(chk, state)
    a, b = encode_routes(chk, ds, "routes", chk.sizes["views_real"], state)
    fa, fb = _by_id(FeatureCache.open(a.path)), _by_id(FeatureCache.open(b.path))
    ids = sorted(set(fa) & set(fb))
    if not ids:
        raise RuntimeError("no image was encoded by both routes")
    clean = _cosines(np.stack([fa[i][0] for i in ids]), np.stack([fb[i][0] for i in ids]))
    views = _cosines(np.stack([fa[i][1] for i in ids]), np.stack([fb[i][1] for i in ids]))
    worst = ids[int(clean.argmin())]
    chk.row(2, f"{route_label(chk)}: {what}, {len(ids)} encoded by both "
               f"({a.n_failed} / {b.n_failed} failed)", "", n_images=len(ids),
            n_failed_a=a.n_failed, n_failed_b=b.n_failed)
    chk.row(2, "clean view: min cosine", f"{clean.min():.4f}", f">= {TARGETS['cosine']}",
            chk.judge(float(clean.min()), TARGETS["cosine"]), min_cosine=float(clean.min()),
            mean_cosine=float(clean.mean()), worst_image=worst)
    chk.row(2, f"views (K={chk.sizes['views_real']}): min cosine", f"{views.min():.4f}",
            f">= {TARGETS['cosine']}", chk.judge(float(views.min()), TARGETS["cosine"]),
            min_cosine=float(views.min()))
    # how discriminating is 0.99 here? random-init features of different images can be close
    cpu = np.stack([fb[i][0] for i in ids]).astype(np.float64)
    centred = _centred_min(np.stack([fa[i][0] for i in ids]), cpu)
    unit = cpu / np.linalg.norm(cpu, axis=1, keepdims=True)
    others = (unit @ unit.T)[~np.eye(len(ids), dtype=bool)]
    chk.row(2, "clean view: min cosine after removing the mean feature (stricter)",
            f"{centred:.4f}", f">= {TARGETS['cosine']}", chk.judge(centred, TARGETS["cosine"]),
            min_centred_cosine=centred)
    chk.row(2, "context: median cosine between two different images (CPU route)",
            f"{np.median(others):.4f}" if len(others) else "—",
            median_other_cosine=float(np.median(others)) if len(others) else None)


# --------------------------------------------------------------------------- step 3: bad input


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_inputs(root: Path) -> Path:
    """A path,label,split CSV over every kind of odd and bad file the encoder must handle."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)

    def picture(seed: int, h: int = 450, w: int = 600) -> Image.Image:
        r = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], -1)
        noise = r.integers(-30, 30, (h, w, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))

    good = _jpeg(picture(1), quality=90)
    files = {
        "good1.jpg": good, "good2.jpg": _jpeg(picture(2), quality=75),
        "good3.jpg": _jpeg(picture(3, 450, 450)), "good4.jpg": _jpeg(picture(4, 300, 400)),
        "progressive.jpg": _jpeg(picture(5), progressive=True),
        "gray_jpeg.jpg": _jpeg(picture(6).convert("L")),
        "cmyk.jpg": _jpeg(picture(7).convert("CMYK")),
        "subsampling444.jpg": _jpeg(picture(8), subsampling=0),
        "gray.png": _png(picture(9, 90, 120).convert("L")),
        "rgba.png": _png(picture(10, 90, 120).convert("RGBA")),
        "palette.png": _png(picture(11, 90, 120).convert("P")),
        "deep.png": _png(Image.fromarray(rng.integers(0, 65535, (90, 120), dtype=np.uint16))),
        "png_named.jpg": _png(picture(12, 90, 120)),
        "empty.jpg": b"",
        "truncated_half.jpg": good[: len(good) // 2],
        "truncated_90pct.jpg": good[: int(len(good) * 0.9)],
        "scan_garbage.jpg": good[:700] + rng.bytes(len(good) - 702) + b"\xff\xd9",
        "header_only.jpg": b"\xff\xd8\xff" + rng.bytes(3000),
        "notes.jpg": b"this is a text file, not an image\n",
        # just over Pillow's decompression-bomb limit (89,478,485 pixels): one colour, small file
        "bomb.jpg": _jpeg(Image.new("RGB", (9500, 9500), (200, 120, 90)), quality=50),
    }
    labels = ("nv", "mel")
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label", "split"])
        for i, (name, data) in enumerate(files.items()):
            (root / name).write_bytes(data)
            w.writerow([name, labels[i % 2], ("train", "val")[(i // 2) % 2]])
        w.writerow(["gone.jpg", "nv", "train"])  # listed, never written
    return root / "labels.csv"


def _pixels(batches) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for b in batches:
        px = b.pixels.cpu().numpy() if len(b.index) else None
        for j, pos in enumerate(b.index):
            out[pos] = px[j, 0]
    return out


def step_bad_inputs(chk: Check, state: dict) -> None:
    ds = load_dataset(write_bad_inputs(state["tmp"] / "bad"))
    a, b = encode_routes(chk, ds, "bad", 1, state)
    ca, cb = FeatureCache.open(a.path), FeatureCache.open(b.path)
    fail_a = {r["image_id"]: r["reason"] for r in ca.failed}
    fail_b = {r["image_id"]: r["reason"] for r in cb.failed}
    only_a, only_b = sorted(set(fail_a) - set(fail_b)), sorted(set(fail_b) - set(fail_a))
    differ = sorted(i for i in set(fail_a) & set(fail_b) if fail_a[i] != fail_b[i])
    dev_name = "CUDA route" if chk.device.type == "cuda" else "tensor route"
    detail = "; ".join(
        [f"{i}: {dev_name} kept it, CPU route: {fail_b[i][:60]}" for i in only_b]
        + [f"{i}: CPU route kept it, {dev_name}: {fail_a[i][:60]}" for i in only_a])
    chk.row(3, f"{len(ds.records)} odd/bad files: failed ids, {dev_name} vs CPU route",
            f"{len(fail_a)} vs {len(fail_b)}" + (f" ({detail})" if detail else ""),
            "identical", "met" if not (only_a or only_b) else "MISSED",
            failed_a=fail_a, failed_b=fail_b, only_a=only_a, only_b=only_b)
    chk.row(3, "failure reasons, ids failed on both", f"{len(differ)} differ"
            + (f" ({', '.join(differ)})" if differ else ""), "identical",
            "met" if not differ else "MISSED", reasons_differ=differ)
    # nothing decoded silently wrong: what both keep looks alike, in pixels and in features
    pp = PreprocessSpec.from_json(json.dumps(ca.header.preprocess))
    maker = ViewMaker(pp, ViewPolicy(k=0))
    recs, pos = ds.records, list(range(len(ds.records)))
    pa = _pixels(tensor_batches(recs, pos, maker, 8, chk.device))
    pb = _pixels(cpu_batches(recs, pos, maker, 8, 0))
    both = sorted(set(pa) & set(pb))
    mad = {recs[p].image_id: float(np.abs(pa[p].astype(np.int16) - pb[p]).mean())
           for p in both}
    worst = max(mad, key=mad.get) if mad else None
    chk.row(3, f"kept by both ({len(both)}): max mean abs. pixel difference of the clean view "
               f"(0-255; worst {worst})", f"{mad[worst]:.2f}" if worst else "—",
            f"<= {TARGETS['pixel_mad']:.0f}",
            chk.judge(mad[worst], TARGETS["pixel_mad"], higher=False) if worst else "—",
            pixel_mad=mad)
    fa, fb = _by_id(ca), _by_id(cb)
    ids = sorted(set(fa) & set(fb))
    cos = _cosines(np.stack([fa[i][0] for i in ids]), np.stack([fb[i][0] for i in ids]))
    chk.row(3, "kept by both: min cosine of the clean view", f"{cos.min():.4f}",
            f">= {TARGETS['cosine']}", chk.judge(float(cos.min()), TARGETS["cosine"]),
            cosine={i: float(c) for i, c in zip(ids, cos, strict=True)})


# --------------------------------------------------------------------------- step 4: precision


def _features(tower: torch.nn.Module, x: torch.Tensor, bs: int, mode: str) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            if mode == "bf16-weights":
                f = tower(xb.to(torch.bfloat16))
            else:
                with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                    enabled=mode == "autocast"):
                    f = tower(xb)
            out.append(f.float())
    return torch.cat(out)


def _tower_rate(tower: torch.nn.Module, shape: tuple[int, ...], device: torch.device,
                mode: str, iters: int) -> float:
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    x = torch.randn(*shape, device=device, dtype=dtype)
    for _ in range(3):
        _features(tower, x, shape[0], mode)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        _features(tower, x, shape[0], mode)
    sync(device)
    return iters * shape[0] / (time.perf_counter() - t0)


def step_precision(chk: Check, state: dict) -> None:
    ds, what = real_dataset(chk, state)
    dev, sz = chk.device, chk.sizes
    loaded = load_model(ModelSpec(chk.args.model, None), dev)
    pp = loaded.preprocess
    maker = ViewMaker(pp, ViewPolicy(k=0))
    pos = list(range(len(ds.records)))
    batches = (tensor_batches(ds.records, pos, maker, sz["batch"], dev) if dev.type == "cuda"
               else cpu_batches(ds.records, pos, maker, sz["batch"], 0))
    px = [b.pixels[:, 0].to(dev) for b in batches if len(b.index)]
    x = Normalizer(pp, dev)(torch.cat(px))
    fp32 = loaded.model.visual.float().eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ref = _features(fp32, x, sz["batch"], "fp32").cpu().numpy()
    feats = {"autocast": _features(fp32, x, sz["batch"], "autocast").cpu().numpy(),
             "bf16-weights": _features(bf16, x, sz["batch"], "bf16-weights").cpu().numpy()}
    chk.row(4, f"image tower, {what}", "", n_images=len(x))
    for mode, f in feats.items():
        c = _cosines(f, ref)
        m, centred = float(c.min()), _centred_min(f, ref)
        chk.row(4, f"{mode}: min cosine vs fp32", f"{m:.4f}", f">= {TARGETS['cosine']}",
                chk.judge(m, TARGETS["cosine"]), mode=mode, min_cosine=m,
                mean_cosine=float(c.mean()))
        chk.row(4, f"{mode}: the same after removing the mean feature (stricter)",
                f"{centred:.4f}", f">= {TARGETS['cosine']}", chk.judge(centred, TARGETS["cosine"]),
                mode=mode, min_centred_cosine=centred)
    shape = (sz["tower_batch"], 3, *pp.size)
    need = TARGETS["k4_img_s"] * 5  # K=4: five views per source image through the tower
    rates = {}
    for mode, tower in (("fp32", fp32), ("autocast", fp32), ("bf16-weights", bf16)):
        chk.need(3 if not chk.args.quick else 0, f"step 4, {mode} speed")
        rates[mode] = _tower_rate(tower, shape, dev, mode, sz["tower_iters"])
        enough = chk.judge(rates[mode], need, speed=True)  # not a target itself: which
        enough = {"met": "enough", "MISSED": "short"}.get(enough, enough)  # modes could do
        chk.row(4, f"tower img/s, {mode} (batch {shape[0]})", f"{rates[mode]:,.0f}",
                f">= {need:,.0f} for K=4", enough, mode=mode, img_per_s=rates[mode])
    del loaded, fp32, bf16


# --------------------------------------------------------------------------- step 5: fine-tune


def step_finetune(chk: Check, state: dict) -> None:
    # benchmarks/finetune.py (this script's folder is on sys.path): the same measures
    from finetune import bare_step_rate, projected_seconds, run_rates

    sz, args, dev = chk.sizes, chk.args, chk.device
    data = str(synthetic(state, "shard0"))
    ds = load_dataset(data)
    n_val = len(ds.split_records("val"))
    n_all = len(ds.records)
    for bs in sz["ft_batches"]:
        chk.need(10 if not args.quick else 0, f"step 5, bare step at batch {bs}")
        bare = bare_step_rate(args.model, None, dev, resolve_precision("auto", dev), bs,
                              sz["bare_steps"], repeats=1, warmup=max(3, sz["bare_steps"] // 5))
        chk.row(5, f"batch {bs}: bare training step img/s (no data pipeline)", f"{bare:,.0f}",
                batch_size=bs, bare_step_img_per_s=bare)
    for bs in sz["ft_batches"]:
        chk.need(20 if not args.quick else 0, f"step 5, run_finetune at batch {bs}")
        cfg = FinetuneConfig.from_setup(
            "base", data=data, model=args.model, pretrained=None, epochs=sz["ft_epochs"],
            batch_size=bs, device=str(chk.device), runs_dir=str(state["tmp"] / "runs"),
            name=f"gpu-check-bs{bs}", image_store="memory", n_bootstrap=0, plots=False)
        t0 = time.perf_counter()
        res = run_finetune(cfg, progress=False)
        wall = time.perf_counter() - t0
        run = json.loads((res.run_dir / "run.json").read_text())
        rates = run_rates(res, n_val, n_all)
        train_rate, eval_rate = rates["train_img_per_s"], rates["eval_img_per_s"]
        save_s, decode_rate = rates["save_s_per_epoch"], rates["decode_img_per_s"]
        proj = projected_seconds(decode_rate, train_rate, eval_rate, save_s)
        epochs = ", ".join(f"{r['train_images_per_s']:,.0f}" for r in res.history)
        chk.row(5, f"batch {bs}: run_finetune base, {len(res.history)} epochs on "
                   f"{len(ds.split_records('train'))} images, store "
                   f"'{run.get('image_store', '?')}': train img/s per epoch",
                epochs, batch_size=bs, wall_s=wall, train_img_per_s=train_rate,
                history=res.history, timings=res.timings, image_store=run.get("image_store"))
        chk.row(5, f"batch {bs}: eval img/s, save s/epoch, decode img/s",
                f"{eval_rate:,.0f}, {save_s:.2f}, {decode_rate:,.0f}", batch_size=bs,
                eval_img_per_s=eval_rate, save_s_per_epoch=save_s, decode_img_per_s=decode_rate)
        is_base = bs == 16
        chk.row(5, f"batch {bs}: projected 20-epoch base run, 9,577 + 2,492 images"
                   + ("" if is_base else " (not the paper's batch)"), f"{proj / 60:.1f} min",
                f"< {TARGETS['finetune_min']:.0f} min" if is_base else "",
                chk.judge(proj / 60, TARGETS["finetune_min"], higher=False, speed=True)
                if is_base else "", batch_size=bs, projected_s=proj)


# --------------------------------------------------------------------------- step 6: heads


def heads_problem(scale: float, seed: int = 0) -> dict:
    """HAM10000-sized features (10,015 train at scale 1) shaped like CLIP's (the problem of
    benchmarks/heads_fit.py): `skincache.data.synthetic_features`."""
    return synthetic_features(seed, scale=scale)


def step_heads(chk: Check, state: dict) -> None:
    p = heads_problem(chk.sizes["heads_scale"])
    dev = str(chk.device)
    chk.row(6, f"synthetic cache: {p['X'].shape[0]:,} x {p['X'].shape[1]} train, K="
               f"{p['views'].shape[1]}, {len(HAM10000_CLASSES)} classes", "",
            shape={k: list(v.shape) for k, v in p.items()})
    # warm-up: torch._dynamo's import at the first optimizer, CUDA kernels
    create_head("mlp", epochs=1, device=dev).fit(p["X"][:512], p["y"][:512])
    for name, params, where in (("logreg", {"device": dev}, f"torch L-BFGS, {dev}"),
                                ("linear", {"device": dev}, dev),
                                ("mlp", {"device": dev}, dev)):
        chk.need(5 if not chk.args.quick else 0, f"step 6, {name}")
        head = create_head(name, **params)
        sync(chk.device)
        t0 = time.perf_counter()
        head.fit(p["X"], p["y"], views=p["views"], X_val=p["X_val"], y_val=p["y_val"],
                 text=p["text"], logit_scale=100.0)
        sync(chk.device)
        s = time.perf_counter() - t0
        target = HEAD_TARGETS_S[name]
        chk.row(6, f"{name} fit ({where}{', C sweep' if name == 'logreg' else ''})",
                f"{s:.2f} s", f"< {target:.0f} s (2-core CPU)",
                chk.judge(s, target, higher=False), head=name, fit_s=s)


# --------------------------------------------------------------------------- main


STEPS = [
    (1, "encode end to end", step_encode),
    (2, "CUDA route vs CPU route", step_routes),
    (3, "bad inputs through both routes", step_bad_inputs),
    (4, "bf16 weights / autocast vs fp32", step_precision),
    (5, "fine-tune throughput", step_finetune),
    (6, "heads on the device", step_heads),
]


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else REPO / "benchmarks" / "results" / \
        "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (its rehearsal)")
    ap.add_argument("--quick", action="store_true",
                    help="CI sizes: tiny model, 64 synthetic images, 40 real ones")
    ap.add_argument("--model", default=None, help=f"default ViT-B-32; {TINY_MODEL} with --quick")
    ap.add_argument("--n-images", type=int, default=None, help="synthetic images for step 1")
    ap.add_argument("--real-data", default=str(REPO / ".gpu-data" / "ham10000"),
                    help="a HAM10000-layout folder of real images (benchmarks/gpu_data.py)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: cores)")
    ap.add_argument("--steps", default="1,2,3,4,5,6")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting steps after this many seconds (300; 600 with --quick)")
    ap.add_argument("--out", type=Path, default=default_out(),
                    help="the JSON ($OUT/gpu_check.json when OUT is set)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    args.model = args.model or (TINY_MODEL if args.quick else "ViT-B-32")
    sizes = dict(QUICK if args.quick else FULL)
    if args.n_images:
        sizes["n_images"] = args.n_images
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="skincache-gpu-check-"))
    state: dict = {"tmp": tmp}
    try:
        # first, before anything touches CUDA: the generator forks worker processes; at least
        # 100 images a shard, so that every class reaches every split of each
        shards = max(1, min(sizes["shards"], sizes["n_images"] // 100))
        try:
            state["synthetic_csv"] = make_synthetic(tmp / "synthetic", sizes["n_images"],
                                                    shards)
            state["shard0"] = tmp / "synthetic" / "shard00"
        except Exception as e:  # the steps that need the images say so; the others run
            state["data_error"] = f"{type(e).__name__}: {e}"
            print(f"[gpu_check] synthetic data failed: {state['data_error']}", flush=True)
        device = resolve_device(args.device)
        chk = Check(args, sizes, device, t0)
        print(f"[gpu_check] {sizes['n_images']:,} synthetic 600x450 JPEGs in {shards} shard(s), "
              f"{time.perf_counter() - t0:.1f} s; budget {chk.budget_s:.0f} s", flush=True)
        wanted = {int(s) for s in args.steps.split(",") if s.strip()}
        for n, title, fn in STEPS:
            if n in wanted:
                chk.run_step(n, title, fn, state)
    finally:
        if args.keep:
            print(f"[gpu_check] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    chk.print_table()
    missed = [r for r in chk.rows if r["verdict"] == "MISSED"]
    errors = [n for n, s in chk.steps.items() if s["status"] == "error"]
    skipped = [n for n, s in chk.steps.items() if s["status"] == "skipped"]
    chk.console.print(f"{len(missed)} target(s) missed; steps with errors: "
                      f"{', '.join(errors) or 'none'}; skipped: {', '.join(skipped) or 'none'}; "
                      f"{chk.elapsed():.0f} s")
    for n in errors:
        chk.console.print(f"step {n}: {chk.steps[n]['traceback']}", markup=False,
                          highlight=False)
    chk.save()
    chk.console.print(f"wrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""The few-shot curve of issue 18 on REAL features: 1/2/4/8/16 shots x seeds, one line a head.

The papers' check (GDA, ICLR 2024; ProKeR, CVPR 2025; Tip-Adapter-F; LP++, CLAP) is the
CoOp few-shot protocol: K training images per class, hyper-parameters chosen on a few-shot
validation set (min(K, 4) per class), accuracy on the whole test set, averaged over seeds.
Here on `../shared/data/features/ham10000-effnetlite0.npz` (10,015 real HAM10000 images,
EfficientNet-Lite0, 1280-d, clean + 2 cached views), split as `real_heads.py` splits it
(lesion-grouped, class-stratified 60/20/20, seed 0; its `split_rows` is imported), the
metric is balanced accuracy (HAM10000 is two-thirds nv).

The text heads need zero-shot prototypes and these features have no text tower. The one
stand-in, printed in the table's title: a "prompt pool" of PROMPT_POOL training lesions per
class, held out of every shot draw (never val or test images), whose class means of the
normalised features are the prototypes (`text` [C, 1, D]), with logit scale 100. It is a weak,
image-based prior, not CLIP's text: the order of heads can differ from the papers' for that
reason alone.

    python benchmarks/fewshot_real.py [--seeds 3] [--shots 1 2 4 8 16] [--heads ...]
                                      [--out benchmarks/results/fewshot_real.json]

Writes the JSON and a PNG (one line per head, mean and 95% CI over seeds, Student's t) beside
it, and prints the table with the load average. Also a full-data row (all training images but
the pool, the whole val split) with fit seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from real_heads import DEFAULT_NPZ, split_rows  # noqa: E402

from skincache.data.classes import HAM10000_CLASSES  # noqa: E402
from skincache.heads import create_head, list_heads  # noqa: E402
from skincache.heads.base import balanced_accuracy  # noqa: E402
from skincache.metrics import ci95_half_width  # noqa: E402
from skincache.plots import plot_shots  # noqa: E402
from skincache.runs import few_shot_indices  # noqa: E402

#: lesions per class in the prompt pool (the zero-shot stand-in), drawn once (seed 0)
PROMPT_POOL = 8
SHOTS = (1, 2, 4, 8, 16)
#: (label, head, params), in the plot's order; heads not registered are skipped with a note
HEADS: list[tuple[str, str, dict]] = [
    ("zeroshot (pool proxy)", "zeroshot", {}),
    ("logreg", "logreg", {}),
    ("tip-adapter", "tip-adapter", {}),
    ("tip-adapter-f", "tip-adapter-f", {}),
    ("zs-linear", "zs-linear", {}),
    ("lp++", "lp++", {}),
    ("clap", "clap", {}),
    ("gda", "gda", {}),
    ("proker", "proker", {}),
]


def prompt_pool(y: np.ndarray, lesion: np.ndarray, rows: np.ndarray, per_class: int,
                seed: int = 0) -> np.ndarray:
    """Indices (into `rows`) of `per_class` whole lesions per class, seeded."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y[rows]):
        lesions = np.unique(lesion[rows][y[rows] == c])
        chosen = set(rng.permutation(lesions)[:per_class])
        picked += [i for i, r in enumerate(rows) if y[r] == c and lesion[r] in chosen]
    return np.array(sorted(picked), dtype=np.int64)


def load(npz: Path) -> dict:
    d = np.load(npz)
    split = split_rows(d, external=False)
    y = np.array([HAM10000_CLASSES.index(c) for c in d["dx"]])
    lesion = np.where(d["lesion_id"] != "", d["lesion_id"], d["image_id"])
    X = d["features"].astype(np.float32)
    V = d["views"].astype(np.float32)
    train = np.flatnonzero(split == "train")
    pool_local = prompt_pool(y, lesion, train, PROMPT_POOL)
    pool = train[pool_local]
    train = np.setdiff1d(train, pool)
    # [C, 1, D]: each class's prototype is the mean of its pool's normalised features (the
    # heads normalise it again, as `zeroshot_prototypes` does a template mean)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    text = np.stack([Xn[pool[y[pool] == c]].mean(axis=0, keepdims=True)
                     for c in range(len(HAM10000_CLASSES))])
    return {"X": X, "V": V, "y": y, "train": train, "val": np.flatnonzero(split == "val"),
            "test": np.flatnonzero(split == "test"), "text": text, "pool_images": len(pool)}


def fit_score(data: dict, head: str, params: dict, tr: np.ndarray, va: np.ndarray,
              seed: int) -> tuple[float, float]:
    """(test balanced accuracy, fit seconds) of one head fitted on rows `tr`, chosen on `va`."""
    X, V, y = data["X"], data["V"], data["y"]
    if "seed" in create_head(head).get_params():
        params = {**params, "seed": seed}
    h = create_head(head, **params)
    t0 = time.perf_counter()
    h.fit(X[tr], y[tr], views=V[tr], X_val=X[va], y_val=y[va], text=data["text"],
          logit_scale=100.0, n_classes=len(HAM10000_CLASSES))
    fit_s = time.perf_counter() - t0
    te = data["test"]
    return balanced_accuracy(y[te], h.predict(X[te])), fit_s


#: the papers' order to check (ProKeR > GDA > Tip-Adapter-F at 16 shots), as pairs
PAIRS = (("proker", "gda"), ("proker", "tip-adapter-f"), ("gda", "tip-adapter-f"))


def paired_seed_differences(runs: list[dict], shots: list[int]) -> list[dict]:
    """a - b per seed (both heads saw the same draw), mean and Student-t 95% CI over seeds."""
    out = []
    for k in shots:
        for a, b in PAIRS:
            by = {v: {r["seed"]: r["balanced_accuracy"] for r in runs
                      if r["variant"] == v and r["shots"] == k} for v in (a, b)}
            seeds = sorted(set(by[a]) & set(by[b]))
            if not seeds:
                continue
            diff = np.array([by[a][s] - by[b][s] for s in seeds])
            out.append({"shots": k, "a": a, "b": b, "mean": float(diff.mean()),
                        "ci95": float(ci95_half_width(diff.std(), len(diff)))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    ap.add_argument("--heads", nargs="+", default=None, help="labels of HEADS to run")
    ap.add_argument("--no-full", action="store_true", help="skip the full-data row")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (default 1: on a shared machine threaded "
                         "BLAS/LAPACK spin-wait; a 4-shot logreg took 101 s at load 19)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "fewshot_real.json")
    args = ap.parse_args()
    if not args.npz.is_file():
        sys.exit(f"{args.npz}: the real-feature file is not here; pass --npz or set "
                 "SKINCACHE_SHARED_DATA to the shared data folder")
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads, user_api="blas")
    known = set(list_heads())
    heads = [h for h in HEADS if args.heads is None or h[0] in args.heads]
    for label, head, _ in heads:
        if head not in known:
            print(f"note: head {head!r} is not registered in this checkout; '{label}' skipped",
                  file=sys.stderr)
    heads = [h for h in heads if h[1] in known]
    data = load(args.npz)
    y = data["y"]
    load_before = os.getloadavg()
    runs: list[dict] = []
    t_start = time.perf_counter()
    for k in args.shots:
        for seed in range(args.seeds):
            tr = data["train"][few_shot_indices(y[data["train"]], k, seed)]
            va = data["val"][few_shot_indices(y[data["val"]], min(k, 4), seed + 1000)]
            for label, head, params in heads:
                score, fit_s = fit_score(data, head, params, tr, va, seed)
                runs.append({"variant": label, "head": head, "shots": k, "seed": seed,
                             "balanced_accuracy": score, "fit_seconds": fit_s})
                print(f"[{time.perf_counter() - t_start:6.0f} s] {k:>2} shots seed {seed} "
                      f"{label:<22} bal-acc {score:.3f}  fit {fit_s:.2f} s", file=sys.stderr,
                      flush=True)
    full = []
    if not args.no_full:
        for label, head, params in heads:
            score, fit_s = fit_score(data, head, params, data["train"], data["val"], 0)
            full.append({"variant": label, "head": head, "shots": None, "seed": 0,
                         "balanced_accuracy": score, "fit_seconds": fit_s})
            print(f"full data {label:<22} bal-acc {score:.3f}  fit {fit_s:.2f} s",
                  file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    rows = []
    for label, head, _ in heads:
        for k in args.shots:
            s = np.array([r["balanced_accuracy"] for r in runs
                          if r["variant"] == label and r["shots"] == k])
            rows.append({"variant": label, "head": head, "shots": k, "n_seeds": len(s),
                         "balanced_accuracy_mean": float(s.mean()),
                         "balanced_accuracy_std": float(s.std()),
                         "ci95": float(ci95_half_width(s.std(), len(s)))})
    proxy = (f"zero-shot stand-in: class means of a prompt pool of {PROMPT_POOL} training "
             f"lesions/class ({data['pool_images']} images, held out of the shot draws)")
    title = (f"few-shot HAM10000 ({args.npz.name}), val min(K,4)/class, test "
             f"{len(data['test'])} images, {args.seeds} seeds; {proxy}; load "
             f"{load_before[0]:.1f}→{load_after[0]:.1f}")
    t = Table(title=title)
    t.add_column("head")
    for k in args.shots:
        t.add_column(f"{k} shot{'s' if k > 1 else ''}", justify="right")
    if full:
        t.add_column("all train (fit s)", justify="right")
    for label, _, _ in heads:
        cells = []
        for k in args.shots:
            r = next(r for r in rows if r["variant"] == label and r["shots"] == k)
            cells.append(f"{100 * r['balanced_accuracy_mean']:.1f} ± {100 * r['ci95']:.1f}")
        if full:
            f = next(r for r in full if r["variant"] == label)
            cells.append(f"{100 * f['balanced_accuracy']:.1f} ({f['fit_seconds']:.2f})")
        t.add_row(label, *cells)
    Console(width=160).print(t)
    order = {k: sorted(((r["balanced_accuracy_mean"], r["variant"]) for r in rows
                        if r["shots"] == k), reverse=True) for k in args.shots}
    top = max(args.shots)
    print(f"order at {top} shots: " + " > ".join(f"{v} {100 * m:.1f}" for m, v in order[top]))
    paired = paired_seed_differences(runs, args.shots)
    for p in paired:
        if p["shots"] == top:
            print(f"{top} shots, paired over the same draws: {p['a']} - {p['b']} "
                  f"{100 * p['mean']:+.1f} ± {100 * p['ci95']:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_shots(rows, args.out.with_suffix(".png"),
                     title=f"few-shot HAM10000, {args.npz.name}, {args.seeds} seeds\n{proxy}")
    args.out.write_text(json.dumps({
        "npz": str(args.npz), "protocol": "CoOp few-shot: K/class train, min(K,4)/class val",
        "zero_shot_proxy": proxy, "split_sizes": {s: int(len(data[s])) for s in
                                                  ("train", "val", "test")},
        "rows": rows, "runs": runs, "full_data": full, "paired": paired,
        "order": {str(k): v for k, v in order.items()},
        "load_average": [load_before, load_after], "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2, default=float))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()

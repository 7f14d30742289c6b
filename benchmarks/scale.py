"""How skincache's cost grows with N: synthetic caches of 10k, 100k and 1M training rows.

Each cache (D=512, K augmented views, 7 classes in HAM10000's proportions, val and test of
N/10 rows each, capped at 20,000) is written by skincache's own `write_cache`, then:

- write s: `write_cache` (hashing included); file MB;
- open s: `FeatureCache.open` (lazy: header, shapes, text; no split data) and read s: reading
  the train split's float16 features (each block checked against its sha256 as it arrives);
- per head, in a fresh subprocess (so each peak is its own): open the cache, take the fit
  inputs as `fit-head` does (`runs.fit_inputs`: float16 train features, views, val), fit,
  predict the test split. Peak RSS is the child's `VmHWM` (= `ru_maxrss`), fit s the fit alone;
- knn: query s for the test split (k=20) with the index the head chose (exact up to 200k keys,
  IVF above), and recall@20 of a forced IVF index (sqrt(N) cells, nprobe 32) against exact
  search on 1,000 test queries, at every size.

Heads: linear and mlp (defaults), logreg with C=1 fixed and at most 100 L-BFGS evaluations
(the default C sweep costs about 15 solves; its time is this times that), knn (k=20).

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--views 0,4]
                               [--heads linear,mlp,logreg,knn] [--quick]
                               [--out benchmarks/results/scale.json] [--plot PNG]

`--quick` (what the test runs): 2,000 rows, D=64, K=0 and 2, two epochs. Caches are written
to a temporary folder (`--tmp`) and deleted after each size. Results are appended to the JSON
after every head, so an interrupted run keeps what it measured.
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

import numpy as np

HEADS = ("linear", "mlp", "logreg", "knn")
HEAD_PARAMS = {"logreg": {"C": 1.0, "max_iter": 100}, "knn": {"k": 20}}
QUICK_PARAMS = {"linear": {"epochs": 2}, "mlp": {"epochs": 2},
                "logreg": {"C": 1.0, "max_iter": 20}, "knn": {"k": 20}}
PROPORTIONS = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _peak_kb() -> int:
    """The process's peak resident set (VmHWM, kB); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_split(n: int, k: int, dim: int, centres: np.ndarray, rng: np.random.Generator):
    """A split of n rows: class means plus unit noise (+ per-view noise), float16, built in
    blocks so that no float64 N x D array exists."""
    from skincache.cache import SplitArrays

    y = rng.choice(len(CLASSES), size=n, p=PROPORTIONS)
    X = np.empty((n, dim), dtype=np.float16)
    V = np.empty((n, k, dim), dtype=np.float16)
    step = 50_000
    for i in range(0, n, step):
        yb = y[i:i + step]
        xb = centres[yb] + rng.standard_normal((len(yb), dim), dtype=np.float32)
        X[i:i + step] = xb
        for j in range(k):
            V[i:i + step, j] = xb + 0.3 * rng.standard_normal((len(yb), dim), dtype=np.float32)
    ids = [f"IMG_{i:08d}" for i in range(n)]
    return SplitArrays(features=X, views=V, labels=y, image_id=ids, group_id=ids,
                       sha1=[""] * n, meta={})


def write_synthetic(path: Path, n: int, k: int, dim: int, seed: int = 0) -> dict:
    from skincache.cache import CacheHeader, write_cache

    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((len(CLASSES), dim)) * 0.35).astype(np.float32)
    m = max(200, min(n // 10, 20_000))
    splits = {"train": make_split(n, k, dim, centres, rng),
              "val": make_split(m, k, dim, centres, rng),
              "test": make_split(m, k, dim, centres, rng)}
    header = CacheHeader(
        key=f"{n:064d}"[-64:], model="synthetic", weights_sha256="1" * 64, embed_dim=dim,
        logit_scale=100.0, precision="fp32", device="cpu", preprocess={}, views={"k": k},
        dataset=f"scale-{n}", dataset_kind="synthetic", dataset_root="",
        dataset_fingerprint="2" * 64, classes=list(CLASSES), class_names=list(CLASSES),
        template_sets={"synthetic": []}, created="now", versions={})
    text = {"synthetic": centres[:, None, :].repeat(2, axis=1)}
    t0 = time.perf_counter()
    write_cache(path, header, splits, text, {})
    return {"write_s": time.perf_counter() - t0, "file_mb": path.stat().st_size / 2**20,
            "n_val": m}


def child(cache: str, head: str, params: dict) -> dict:
    """One head, in this (fresh) process: open, fit inputs, fit, predict test; peak memory."""
    from skincache.cache import FeatureCache
    from skincache.runs import fit_inputs, make_head

    out: dict = {"head": head, "params": params}
    t0 = time.perf_counter()
    fc = FeatureCache.open(cache)
    out["open_s"] = time.perf_counter() - t0
    out["rss_open_mb"] = _peak_kb() / 1024
    t0 = time.perf_counter()
    inputs = fit_inputs(fc, template_set="synthetic")
    out["read_s"] = time.perf_counter() - t0
    h = make_head(head, params, seed=0)
    t0 = time.perf_counter()
    h.fit(**inputs)
    out["fit_s"] = time.perf_counter() - t0
    out["streamed"] = bool(getattr(h, "streamed_", False))
    out["epochs_run"] = getattr(h, "epochs_run_", None)
    test = fc.split("test")
    t0 = time.perf_counter()
    pred = h.predict(test.features16)
    out["predict_s"] = time.perf_counter() - t0
    out["test_acc"] = float((pred == test.labels).mean())
    out["peak_rss_mb"] = _peak_kb() / 1024  # before the recall check below allocates more
    if head == "knn":
        from skincache.heads.knn import build_ip_index, unit_rows

        out["index"] = "ivf" if h.approximate_ else "flat"
        q = unit_rows(test.features16[:1000])
        t0 = time.perf_counter()
        h._search(test.features16, h.k)
        out["query_s"] = time.perf_counter() - t0
        exact = build_ip_index(h.keys_, "flat")
        _, truth = exact.search(q, h.k)
        t0 = time.perf_counter()
        ivf = build_ip_index(h.keys_, "ivf", nprobe=h.nprobe)
        out["ivf_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, got = ivf.search(q, h.k)
        out["ivf_query_1k_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        exact.search(q, h.k)
        out["exact_query_1k_s"] = time.perf_counter() - t0
        out["ivf_recall_at_k"] = float(np.mean(
            [len(set(truth[i]) & set(got[i])) / h.k for i in range(len(q))]))
        out["ivf_cells"] = int(ivf.nlist)
        sweep = {}
        for nprobe in (8, 32, 128):  # the recall / query-time trade of the IVF setting
            ivf.nprobe = min(nprobe, ivf.nlist)
            t0 = time.perf_counter()
            _, got = ivf.search(q, h.k)
            sweep[nprobe] = {"query_1k_s": time.perf_counter() - t0, "recall_at_k": float(
                np.mean([len(set(truth[i]) & set(got[i])) / h.k for i in range(len(q))]))}
        out["ivf_nprobe_sweep"] = sweep
    return out


def run_head(cache: Path, head: str, params: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(cache), "--head", head,
           "--params", json.dumps(params)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"head": head, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"head": head, "error": (r.stderr.strip().splitlines() or ["?"])[-1],
                "returncode": r.returncode}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def table(rows: list[dict]) -> str:
    lines = ["| N | K | file MB | write s | open s | head | fit s | peak RSS MB | streamed "
             "| query s | IVF recall@20 |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        for h in r["heads"]:
            if "error" in h:
                lines.append(f"| {r['n']:,} | {r['k']} | {r['file_mb']:.0f} | "
                             f"{r['write_s']:.1f} | {r['open_s']:.3f} | {h['head']} | "
                             f"{h['error']} | | | | |")
                continue
            q = f"{h['query_s']:.2f} ({h['index']})" if "query_s" in h else ""
            rec = f"{h['ivf_recall_at_k']:.3f}" if "ivf_recall_at_k" in h else ""
            lines.append(f"| {r['n']:,} | {r['k']} | {r['file_mb']:.0f} | {r['write_s']:.1f} | "
                         f"{r['open_s']:.3f} | {h.get('variant', h['head'])} | {h['fit_s']:.1f} | "
                         f"{h['peak_rss_mb']:.0f} | {'yes' if h['streamed'] else 'no'} | "
                         f"{q} | {rec} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    def name(h: dict) -> str:
        return h.get("variant", h["head"])

    keys = sorted({(name(h), r["k"]) for r in rows for h in r["heads"] if "error" not in h})
    colours = plt.get_cmap("tab10")
    names = sorted({head for head, _ in keys})
    for head, k in keys:
        colour = colours(names.index(head) % 10)
        pts = sorted(((r["n"], h) for r in rows if r["k"] == k for h in r["heads"]
                      if name(h) == head and "error" not in h), key=lambda p: p[0])
        if not pts:
            continue
        ns = [p[0] for p in pts]
        style = "-o" if k == 0 else "--s"
        axes[0].loglog(ns, [p[1]["fit_s"] for p in pts], style, color=colour,
                       label=f"{head} K={k}")
        axes[1].loglog(ns, [p[1]["peak_rss_mb"] for p in pts], style, color=colour,
                       label=f"{head} K={k}")
    ns = sorted({r["n"] for r in rows})
    if len(ns) > 1:  # a linear-growth guide through the first linear point
        axes[0].loglog(ns, [ns_ / ns[0] for ns_ in ns], ":", color="grey", label="slope 1")
    axes[0].set(xlabel="training rows N", ylabel="fit time (s)", title="fit time")
    axes[1].set(xlabel="training rows N", ylabel="peak RSS (MB)",
                title="peak memory of the fit process")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"skincache at scale: D=512 synthetic caches, {os.cpu_count()}-core CPU",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--views", default="0,4")
    ap.add_argument("--heads", default=",".join(HEADS),
                    help="heads; NAME:BUDGET sets max_memory (e.g. linear:1G streams)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    ap.add_argument("--plot", default="")
    ap.add_argument("--tmp", default="")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--child", default="")
    ap.add_argument("--head", default="")
    ap.add_argument("--params", default="{}")
    ap.add_argument("--merge", default="", help="JSON files of earlier runs: table + plot only")
    a = ap.parse_args(argv)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge.split(",")]
        result = {**parts[0], "rows": [r for p in parts for r in p["rows"]]}
        result["table_markdown"] = table(result["rows"])
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(result["table_markdown"])
        if a.plot:
            plot(result["rows"], Path(a.plot))
        return result
    if a.child:
        print(json.dumps(child(a.child, a.head, json.loads(a.params))), flush=True)
        return {}
    sizes = [2000] if a.quick else [int(x) for x in a.sizes.split(",")]
    ks = [0, 2] if a.quick else [int(x) for x in a.views.split(",")]
    dim = 64 if a.quick else a.dim
    params = QUICK_PARAMS if a.quick else HEAD_PARAMS
    heads = a.heads.split(",")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "dim": dim, "head_params": {h: params.get(h, {}) for h in heads}, "rows": []}
    tmp_root = Path(tempfile.mkdtemp(prefix="skincache-scale-", dir=a.tmp or None))
    try:
        for n in sizes:
            for k in ks:
                from skincache.cache import FeatureCache

                path = tmp_root / f"scale-{n}-k{k}.h5"
                row = {"n": n, "k": k, **write_synthetic(path, n, k, dim)}
                t0 = time.perf_counter()
                fc = FeatureCache.open(path)
                row["open_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                _ = fc.split("train").features16
                row["read_train_s"] = time.perf_counter() - t0
                del fc, _
                row["heads"] = []
                result["rows"].append(row)
                print(f"N={n:,} K={k}: wrote {row['file_mb']:.0f} MB in {row['write_s']:.1f} s, "
                      f"open {row['open_s']:.3f} s, read train {row['read_train_s']:.2f} s",
                      flush=True)
                for spec in heads:  # "linear:1G": linear with max_memory=1G (streamed)
                    head, _, budget = spec.partition(":")
                    hp = {**params.get(head, {}), **({"max_memory": budget} if budget else {})}
                    res = run_head(path, head, hp, a.timeout)
                    res["variant"] = spec
                    row["heads"].append(res)
                    print(f"  {head}: " + (res.get("error") or
                          f"fit {res['fit_s']:.1f} s, peak {res['peak_rss_mb']:.0f} MB, "
                          f"streamed {res['streamed']}"), flush=True)
                    out.write_text(json.dumps(result, indent=1))
                path.unlink()
    finally:
        for p in tmp_root.glob("*"):
            p.unlink()
        tmp_root.rmdir()
    result["table_markdown"] = table(result["rows"])
    out.write_text(json.dumps(result, indent=1))
    print(result["table_markdown"])
    if a.plot:
        plot(result["rows"], Path(a.plot))
    return result


if __name__ == "__main__":
    main()

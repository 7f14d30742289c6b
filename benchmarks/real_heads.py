"""Every head on REAL frozen features of HAM10000, next to two hand-written baselines.

The features are `../shared/data/features/ham10000-effnetlite0.npz` (10,015 real HAM10000
images through an ImageNet EfficientNet-Lite0, 1280-d, clean view + 2 augmented views). They
are not CLIP features and say nothing about CLIP accuracy; they are real, long-tailed and badly
conditioned, which is what the heads must be fast and good on. No text tower goes with them,
so the text heads run only on a stand-in (`text_probes_standin`: lp++, clap, zs-lp,
zs-linear with class-mean prototypes of a held-out prompt pool of training lesions).

What runs, in one process, on one split:
1. a skincache cache is written from the npz with the project's writer (`write_cache`), split
   by skincache's own lesion-grouped, class-stratified split, 60/20/20 (seed 0) so that the
   test split is ~2,000 images: with the default 9% test (906 images, ~10 of class df) a
   difference of 0.03 in balanced accuracy is inside the noise;
2. every head variant is fit from that cache on train (val chooses hyper-parameters, tau and T)
   and scored on val and test, with and without test-time augmentation (TTA: the mean over the
   clean view and the 2 cached views);
3. two baselines on the same arrays: plain scikit-learn balanced logistic regression with 11 C
   values swept on val (the 40-line script a user would write), and CLIP_benchmark's linear
   probe, the `clip-benchmark-lp` head (torch Linear, AdamW lr 0.1, batch 64, 10 epochs cosine,
   weight decay chosen on val accuracy from its 97-point log grid, refit on train+val);
4. the old solver (scikit-learn lbfgs inside the head) and the new one (torch L-BFGS) on the
   same C sweep, side by side: the speed-up ratio;
5. optionally `skincache fit-head --head all` end to end (`--cli`);
6. metadata fusion (issue 18): logreg, linear and mlp with and without
   `-p metadata=age,sex,localization` on the same split, test balanced accuracy and the paired
   bootstrap 95% CI of each difference (JSON key `metadata_fusion`; `--metadata-only` runs just
   this part). The HAM10000 test split, because the ISIC 2018 test images carry no metadata.

    python benchmarks/real_heads.py [--npz PATH] [--threads 2] [--cli]
                                    [--out benchmarks/results/real_heads.json]
    python benchmarks/real_heads.py --external    # HAM10000 -> ISIC 2018 (Lite1 features)
    python benchmarks/real_heads.py --metadata-only [--seeds 3]   # part 6 alone
    python benchmarks/real_heads.py --fusion-only # Lite0 + Lite1 caches, one head (issue 18)

The fusion section (also run, and stored under the JSON key `fusion`, by the default run):
Lite0 and the Lite1 file's HAM10000 rows (matched by image_id) as two caches of the same
images on the same lesion-grouped split; logreg and mlp on each alone, early-fused and
late-fused, each fused row against the best single-cache head chosen by val, with the paired
bootstrap CI of the difference; plot `results/fusion.png`.

`--external` (issue 18's protocol): `effnetlite1-ham10000-isic2018.npz`, HAM10000 split 6/7
train, 1/7 val by lesion, the 1,512 ISIC 2018 test images (another acquisition) as test; val
and external-test balanced accuracy per head variant (and the defaults before issue 15), val's
pick marked, the most over-predicted class (a collapsing head gives one class many times its
true share).

Timing: wall seconds of one fit each; the load average is printed with the table because this
machine is shared. Model selection is on val; test is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from skincache.cache import CacheHeader, FeatureCache, SplitArrays, write_cache
from skincache.data import Record
from skincache.data.classes import HAM10000_CLASSES
from skincache.data.splits import assign_splits
from skincache.heads import create_head
from skincache.heads.base import l2_normalize
from skincache.metrics import classification_report
from skincache.runs import SplitMeta, head_meta

#: $SKINCACHE_SHARED_DATA (as for the tests), else ../shared/data beside the repository
FEATURES = Path(os.environ.get("SKINCACHE_SHARED_DATA")
                or Path(__file__).resolve().parents[2] / "shared/data") / "features"
DEFAULT_NPZ = FEATURES / "ham10000-effnetlite0.npz"
#: the Lite1 file, the only one with the ISIC 2018 test images (`--external`)
EXTERNAL_NPZ = FEATURES / "effnetlite1-ham10000-isic2018.npz"
META = ("age", "sex", "localization", "dx_type")
RATIOS = (0.6, 0.2, 0.2)
EXTERNAL_RATIOS = (6 / 7, 1 / 7)

#: (variant, head, params). Defaults first; "-plain" is the unadjusted objective.
VARIANTS: list[tuple[str, str, dict]] = [
    ("logreg", "logreg", {}),
    ("logreg-plain", "logreg", {"logit_adjust": None}),
    ("logreg-balanced", "logreg", {"class_weight": "balanced", "logit_adjust": None}),
    ("logreg-views", "logreg", {"use_views": True}),
    ("linear", "linear", {}),
    ("linear-plain", "linear", {"logit_adjust": None, "balance": None}),
    ("mlp", "mlp", {}),
    ("mlp-plain", "mlp", {"logit_adjust": None}),
    ("mlp-h512", "mlp", {"hidden": 512, "dropout": 0.2}),
    ("knn", "knn", {}),
    ("knn-plain", "knn", {"logit_adjust": None}),
    # issue 18, training-free closed forms; no text here, so both fit their vision form
    ("gda", "gda", {}),
    ("proker", "proker", {}),
]
#: `--external` adds the defaults before issue 15, to show what the external set did to them
BEFORE_ISSUE15 = [
    ("linear (before: std_shrink=0, balance=none)", "linear", {"std_shrink": 0.0,
                                                               "balance": None}),
    ("mlp (before: std_shrink=0)", "mlp", {"std_shrink": 0.0}),
]
#: the head's previous solver (scikit-learn lbfgs) vs the new one, same sweep, same selection
SOLVER_PAIR = (("logreg-sklearn-solver", "logreg", {"solver": "sklearn", "logit_adjust": None,
                                                    "calibrate": False}),
               ("logreg-torch-solver", "logreg", {"solver": "torch", "logit_adjust": None,
                                                  "calibrate": False}))


def _lesion_split(d, ratios: tuple[float, ...], rows: np.ndarray) -> np.ndarray:
    """skincache's lesion-grouped, class-stratified split (seed 0) of the given rows."""
    records = [Record(str(i), "", str(c), None, str(les)) for i, c, les in
               zip(d["image_id"][rows], d["dx"][rows], d["lesion_id"][rows], strict=True)]
    return np.array([r.split for r in assign_splits(records, ratios, seed=0)])


def split_rows(d, external: bool) -> np.ndarray:
    """Each row's split. Internal: HAM10000 60/20/20 by lesion. External (issue 18's
    protocol): HAM10000 6/7 train, 1/7 val by lesion; the ISIC 2018 test images are test."""
    if not external:
        return _lesion_split(d, RATIOS, np.ones(len(d["dx"]), bool))
    ham = d["split"] == "ham10000"
    split = np.full(len(ham), "test", dtype=object)
    split[ham] = _lesion_split(d, EXTERNAL_RATIOS, ham)
    return split


def build_cache(npz: Path, out: Path, external: bool = False,
                dataset_root: str | None = None) -> Path:
    """Write the npz as a skincache cache, split by `split_rows`. `dataset_root`: where the
    images are (the report's thumbnails read them); default the npz itself."""
    d = np.load(npz)
    return write_arrays_cache(d, split_rows(d, external), out, key=npz.stem,
                              root=dataset_root or str(npz))


def write_arrays_cache(d, split: np.ndarray, out: Path, *, key: str, root: str,
                       model: str = "efficientnet-lite (ImageNet)") -> Path:
    """Write real-feature arrays (an npz's columns, rows in any order) as a skincache cache
    with each row's `split` (also benchmarks/real_encoders.py: two encoders, one split)."""
    labels = np.array([HAM10000_CLASSES.index(c) for c in d["dx"]])
    groups = np.where(d["lesion_id"] != "", d["lesion_id"], d["image_id"])  # ISIC: none
    splits = {}
    for name in ("train", "val", "test"):
        m = split == name
        splits[name] = SplitArrays(
            features=d["features"][m], views=d["views"][m], labels=labels[m],
            image_id=list(d["image_id"][m]), group_id=list(groups[m]),
            sha1=[""] * int(m.sum()), meta={c: list(d[c][m]) for c in META})
    header = CacheHeader(
        key=key, model=model, pretrained="imagenet",
        # the key stands in for the weights' checksum: two encoders' caches never share an
        # encoding key
        logit_scale=100.0, weights_sha256=key, embed_dim=int(d["features"].shape[1]),
        precision="fp16", classes=list(HAM10000_CLASSES), class_names=list(HAM10000_CLASSES),
        preprocess={}, views={"k": int(d["views"].shape[1])}, dataset="ham10000-real",
        dataset_kind="ham10000", dataset_root=root, dataset_fingerprint="", versions={})
    write_cache(out, header, splits, {}, {})
    return out


def _scores(y: np.ndarray, proba: np.ndarray) -> dict:
    r = classification_report(y, proba, HAM10000_CLASSES, n_bootstrap=0)
    out = {k: r[k] for k in ("balanced_accuracy", "accuracy", "macro_f1", "auroc", "ece")}
    out["pred"] = proba.argmax(axis=1).tolist()
    return out


def paired_difference(y: np.ndarray, pred_a: list, pred_b: list, n: int = 2000,
                      seed: int = 0) -> dict:
    """Balanced accuracy of a minus b on the same images, with a paired bootstrap 95% CI
    (resampling images, both predictions together): is a difference more than noise?"""
    from skincache.heads.base import balanced_accuracy

    a, b = np.asarray(pred_a), np.asarray(pred_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        diffs.append(balanced_accuracy(y[idx], a[idx]) - balanced_accuracy(y[idx], b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": balanced_accuracy(y, a) - balanced_accuracy(y, b),
            "ci95": [float(lo), float(hi)]}


def run_head(fc: FeatureCache, variant: str, head: str, params: dict) -> list[dict]:
    tr, va, te = fc.split("train"), fc.split("val"), fc.split("test")
    h = create_head(head, **params)
    t0 = time.perf_counter()
    h.fit(tr.features, tr.labels, views=tr.views, X_val=va.features, y_val=va.labels,
          n_classes=len(fc.classes), meta=SplitMeta(tr), meta_val=SplitMeta(va))
    fit_s = time.perf_counter() - t0
    rows = []
    for tta in (False, True):
        cal, unc = {}, {}
        for s, d in (("val", va), ("test", te)):
            meta = head_meta(h, d)  # a head fit with metadata predicts with it
            cal[s], unc[s] = h.predict_proba_pair(d.features, d.views if tta else None,
                                                  *(() if meta is None else (meta,)))
        rows.append({
            "variant": variant + ("+tta" if tta else ""), "head": head, "params": params,
            "fit_seconds": fit_s, "val": _scores(va.labels, cal["val"]),
            "test": _scores(te.labels, cal["test"]),
            "ece_test_uncalibrated": _scores(te.labels, unc["test"])["ece"],
            "tau": getattr(h, "logit_adjust_", None), "temperature": getattr(h, "temperature_",
                                                                              None),
            "C": getattr(h, "C_", None), "weight_decay": getattr(h, "weight_decay_", None),
        })
    return rows


def sklearn_balanced_baseline(fc: FeatureCache) -> dict:
    """What a user writes by hand: balanced logreg, 11 C values, best val balanced accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    tr, va, te = fc.split("train"), fc.split("val"), fc.split("test")
    X, Xv, Xt = (l2_normalize(s.features) for s in (tr, va, te))
    t0 = time.perf_counter()
    best = (-1.0, None)
    for C in np.logspace(-3, 3, 11):
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(X, tr.labels)
        score = balanced_accuracy_score(va.labels, clf.predict(Xv))
        if score > best[0]:
            best = (score, clf)
    fit_s = time.perf_counter() - t0
    clf = best[1]
    return {"variant": "baseline: sklearn balanced logreg (11 C)", "fit_seconds": fit_s,
            "val": _scores(va.labels, clf.predict_proba(Xv)),
            "test": _scores(te.labels, clf.predict_proba(Xt)), "C": float(clf.C)}


#: issue 18: the zero-shot-anchored probes, on a class-mean stand-in for the missing text tower
TEXT_PROBES = [("zeroshot (stand-in)", "zeroshot", {}), ("zs-linear", "zs-linear", {}),
               ("zs-lp", "clap", {"constraint": "none"}), ("clap", "clap", {}),
               ("lp++", "lp++", {})]


def text_probes_standin(fc: FeatureCache, pool_lesions: int = 20, seed: int = 0) -> list[dict]:
    """lp++ / clap / zs-lp / zs-linear at full size, with a zero-shot stand-in for the text
    these features lack: per class, the raw mean feature of a prompt pool of `pool_lesions`
    training lesions (all their images), held out of the heads' training rows; never val or
    test. The rows: val/test balanced accuracy and fit seconds (README "lp++, clap and
    zs-linear" has the few-shot curve under the same stand-in)."""
    tr, va, te = fc.split("train"), fc.split("val"), fc.split("test")
    rng = np.random.default_rng(seed)
    groups = np.asarray(tr.group_id)
    pool = np.zeros(len(tr.labels), bool)
    for c in range(len(fc.classes)):
        lesions = np.unique(groups[tr.labels == c])
        pick = rng.choice(lesions, size=min(pool_lesions, len(lesions) // 4), replace=False)
        pool |= np.isin(groups, pick) & (tr.labels == c)
    text = np.stack([tr.features[pool & (tr.labels == c)].astype(np.float32).mean(0)[None]
                     for c in range(len(fc.classes))])
    rest = ~pool
    rows = []
    for variant, head, params in TEXT_PROBES:
        h = create_head(head, **params)
        t0 = time.perf_counter()
        h.fit(tr.features[rest], tr.labels[rest], views=tr.views[rest], X_val=va.features,
              y_val=va.labels, text=text, n_classes=len(fc.classes))
        fit_s = time.perf_counter() - t0
        rows.append({"variant": variant, "head": head, "params": params, "fit_seconds": fit_s,
                     "val": _scores(va.labels, h.predict_proba(va.features)),
                     "test": _scores(te.labels, h.predict_proba(te.features)),
                     "pool_images": int(pool.sum())})
        _log(rows[-1])
    return rows


def clip_benchmark_probe(fc: FeatureCache, seed: int = 0) -> dict:
    """CLIP_benchmark's linear-probe protocol: the `clip-benchmark-lp` head (AdamW, cosine
    schedule, weight decay chosen on val accuracy, then a refit on train+val)."""
    row = run_head(fc, "baseline: CLIP_benchmark linear probe (val: fit)", "clip-benchmark-lp",
                   {"seed": seed})[0]
    return {**row, "note": "val is part of its final training set"}


#: the metadata fields of part 6 (dx_type is refused: label leakage)
META_FIELDS = "age,sex,localization"
META_HEADS = ("logreg", "linear", "mlp")


def metadata_only_baseline(fc: FeatureCache) -> dict:
    """How much the metadata alone knows: balanced logistic regression on the encoded fields,
    no image features (C swept on val)."""
    from sklearn.linear_model import LogisticRegression

    from skincache.heads.base import balanced_accuracy
    from skincache.metadata import fit_encoding

    tr, va, te = fc.split("train"), fc.split("val"), fc.split("test")
    enc = fit_encoding(META_FIELDS.split(","), tr.meta, len(tr))
    E = {s: enc.transform(d.meta, len(d)) for s, d in (("train", tr), ("val", va), ("test", te))}
    best = max((LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
                .fit(E["train"], tr.labels) for C in np.logspace(-2, 2, 5)),
               key=lambda m: balanced_accuracy(va.labels, m.predict(E["val"])))
    return {"variant": "metadata alone (balanced logreg)", "C": float(best.C),
            "val": _scores(va.labels, best.predict_proba(E["val"])),
            "test": _scores(te.labels, best.predict_proba(E["test"]))}


def metadata_fusion(fc: FeatureCache, seeds: int = 1) -> dict:
    """Part 6: each head with and without `metadata=age,sex,localization`, same split and
    seed; test balanced accuracy and the paired bootstrap CI of with - without (clean view and
    TTA). Seeded heads run `seeds` times; each seed's pair is compared on its own."""
    y_test = fc.split("test").labels
    rows, pairs = [], []
    for head in META_HEADS:
        for seed in range(seeds if head != "logreg" else 1):
            extra = {} if head == "logreg" else {"seed": seed}
            plain = run_head(fc, f"{head}", head, dict(extra))
            fused = run_head(fc, f"{head}+meta", head, {**extra, "metadata": META_FIELDS})
            for p, f in zip(plain, fused, strict=True):
                diff = paired_difference(y_test, f["test"]["pred"], p["test"]["pred"])
                pairs.append({"head": head, "seed": seed, "tta": p["variant"].endswith("+tta"),
                              "val_without": p["val"]["balanced_accuracy"],
                              "val_with": f["val"]["balanced_accuracy"],
                              "test_without": p["test"]["balanced_accuracy"],
                              "test_with": f["test"]["balanced_accuracy"],
                              "fit_seconds_without": p["fit_seconds"],
                              "fit_seconds_with": f["fit_seconds"], **diff})
            rows += plain + fused
            _log(fused[0])
    return {"fields": META_FIELDS, "rows": rows, "pairs": pairs,
            "metadata_alone": metadata_only_baseline(fc)}


def render_metadata(res: dict, title: str) -> None:
    t = Table(title=title)
    for col in ("head", "seed", "TTA", "val bal-acc (no→with)", "test bal-acc no meta",
                "with meta", "difference (paired 95% CI)", "fit s (no/with)"):
        t.add_column(col, justify="left" if col == "head" else "right")
    for p in res["pairs"]:
        t.add_row(p["head"], str(p["seed"]), "yes" if p["tta"] else "",
                  f"{_pct(p['val_without'])}→{_pct(p['val_with'])}", _pct(p["test_without"]),
                  _pct(p["test_with"]),
                  f"{100 * p['difference']:+.1f} ({100 * p['ci95'][0]:+.1f} to "
                  f"{100 * p['ci95'][1]:+.1f})",
                  f"{p['fit_seconds_without']:.1f}/{p['fit_seconds_with']:.1f}")
    alone = res["metadata_alone"]
    t.add_row(alone["variant"], "", "", _pct(alone["val"]["balanced_accuracy"]), "",
              _pct(alone["test"]["balanced_accuracy"]), "", "")
    Console(width=150).print(t)


def plot_metadata(res: dict, path: Path, title: str) -> Path:
    """The differences (with - without metadata, test balanced accuracy) with their paired
    95% CIs, one row per head, seed and TTA setting: a forest plot around 0."""
    from matplotlib.figure import Figure

    pairs = res["pairs"]
    fig = Figure(figsize=(7, 0.35 * len(pairs) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    for i, p in enumerate(pairs):
        d, (lo, hi) = 100 * p["difference"], (100 * p["ci95"][0], 100 * p["ci95"][1])
        ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="o", capsize=3,
                    color="C1" if p["tta"] else "C0")
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(pairs)), [f"{p['head']} s{p['seed']}" + (" +TTA" if p["tta"]
                                                                       else "")
                                      for p in pairs])
    ax.invert_yaxis()
    ax.set_xlabel("test balanced accuracy, with − without metadata (points, paired 95% CI)")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    return path


def metadata_only(npz: Path, out: Path, seeds: int) -> None:
    """`--metadata-only`: part 6 alone, on the default split, into its own JSON."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        fc = FeatureCache.open(build_cache(npz, Path(tmp) / "meta.h5"))
        sizes = {s: len(fc.splits[s]) for s in fc.splits}
        res = metadata_fusion(fc, seeds)
    load_after = os.getloadavg()
    render_metadata(res, f"metadata fusion on real HAM10000 features ({npz.name}), lesion-"
                         f"grouped split {sizes}; load {load_before[0]:.1f}→{load_after[0]:.1f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "npz": str(npz), "split_sizes": sizes, "metadata_fusion": res,
        "load_average": [load_before, load_after], "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2, default=float))
    png = plot_metadata(res, out.with_suffix(".png"), f"metadata fusion, {npz.name}, split "
                                                     f"{sizes}")
    print(f"wrote {out} and {png}")


def fit_head_all_cli(cache: Path, runs: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "skincache.cli", "fit-head", "--cache", str(cache),
                    "--head", "all", "--runs-dir", str(runs), "--bootstrap", "1000"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _log(r: dict) -> None:
    print(f"{r['variant']:<45} fit {r['fit_seconds']:7.2f} s  test bal-acc "
          f"{r['test']['balanced_accuracy']:.3f}", file=sys.stderr, flush=True)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def render(rows: list[dict], title: str) -> None:
    t = Table(title=title)
    for col in ("variant", "val bal-acc", "test bal-acc", "acc", "macro-F1", "AUROC",
                "ECE (raw→cal)", "fit s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        ece = _pct(r["test"]["ece"])
        if r.get("ece_test_uncalibrated") is not None:
            ece = f"{_pct(r['ece_test_uncalibrated'])}→{ece}"
        t.add_row(r["variant"], _pct(r["val"]["balanced_accuracy"]),
                  _pct(r["test"]["balanced_accuracy"]), _pct(r["test"]["accuracy"]),
                  _pct(r["test"]["macro_f1"]), _pct(r["test"]["auroc"]), ece,
                  f"{r['fit_seconds']:.2f}")
    Console(width=130).print(t)


def over_prediction(y: np.ndarray, pred: list) -> tuple[str, float]:
    """The class predicted most often relative to its true share, and that ratio: a head that
    collapses on a shifted set gives one class many times its share."""
    c = len(HAM10000_CLASSES)
    ratio = (np.bincount(pred, minlength=c) / len(pred)) / np.maximum(
        np.bincount(y, minlength=c) / len(y), 1e-12)
    j = int(np.argmax(ratio))
    return HAM10000_CLASSES[j], float(ratio[j])


def external(npz: Path, out: Path) -> None:
    """Train and choose on HAM10000, test on ISIC 2018 (another acquisition): val and
    external-test balanced accuracy per head, val's pick marked."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        fc = FeatureCache.open(build_cache(npz, Path(tmp) / "external.h5", external=True))
        sizes = {s: len(fc.splits[s]) for s in fc.splits}
        y_test = fc.split("test").labels
        rows: list[dict] = []
        for variant, head, params in VARIANTS + BEFORE_ISSUE15:
            rows += run_head(fc, variant, head, params)
            _log(rows[-2])
    load_after = os.getloadavg()
    for r in rows:
        r["over_predicted"] = over_prediction(y_test, r["test"]["pred"])
    pick = max(rows, key=lambda r: r["val"]["balanced_accuracy"])
    t = Table(title=f"train/val HAM10000 by lesion, test ISIC 2018 ({npz.name}), split "
                    f"{sizes}; load {load_before[0]:.1f}→{load_after[0]:.1f}")
    for col in ("variant", "val bal-acc", "ISIC test bal-acc", "test acc",
                "most over-predicted (x true share)", "fit s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        cls, ratio = r["over_predicted"]
        t.add_row(r["variant"] + ("  ← val's pick" if r is pick else ""),
                  _pct(r["val"]["balanced_accuracy"]), _pct(r["test"]["balanced_accuracy"]),
                  _pct(r["test"]["accuracy"]), f"{cls} {ratio:.1f}x", f"{r['fit_seconds']:.2f}")
    Console(width=140).print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "npz": str(npz), "protocol": "external", "split_sizes": sizes, "rows": rows,
        "val_pick": pick["variant"], "load_average": [load_before, load_after],
        "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2, default=float))
    print(f"wrote {out}")


def fusion_caches(lite0: Path, lite1: Path, tmp: Path) -> tuple[Path, Path]:
    """Lite0 and Lite1 caches of the same 10,015 HAM10000 images, the Lite1 rows matched to
    Lite0's by image_id (the files' row orders need not agree), on one lesion-grouped 60/20/20
    split (the main section's)."""
    a = dict(np.load(lite0))
    b_all = np.load(lite1)
    ham = b_all["split"] == "ham10000"
    b = {k: b_all[k][ham] for k in b_all.files}
    pos = {i: n for n, i in enumerate(b["image_id"])}
    missing = [i for i in a["image_id"] if i not in pos]
    if missing or len(pos) != len(a["image_id"]):
        sys.exit(f"{lite1}: its HAM10000 rows are not the images of {lite0} "
                 f"({len(missing)} of Lite0's ids missing, {len(pos)} vs {len(a['image_id'])})")
    order = np.array([pos[i] for i in a["image_id"]])
    b = {k: v[order] for k, v in b.items()}
    assert (b["dx"] == a["dx"]).all() and (b["lesion_id"] == a["lesion_id"]).all()
    split = split_rows(a, external=False)
    return (write_arrays_cache(a, split, tmp / "lite0.h5", key=lite0.stem, root=lite0.stem,
                               model="efficientnet-lite0"),
            write_arrays_cache(b, split, tmp / "lite1.h5", key=lite1.stem + "-ham",
                               root=lite1.stem + "-ham", model="efficientnet-lite1"))


#: the heads the fusion section compares: (head, params)
FUSION_HEADS = (("logreg", {}), ("mlp", {}))


def _fusion_row(fc, label: str, head: str, params: dict, fusion: str = "early") -> dict:
    from skincache.runs import fit_inputs, make_fit_head

    h = make_fit_head(head, params, 0, fc, fusion)
    inputs = fit_inputs(fc)
    t0 = time.perf_counter()
    h.fit(**inputs)
    fit_s = time.perf_counter() - t0
    va, te = fc.split("val"), fc.split("test")
    row = {"variant": label, "head": head, "fusion": fusion, "fit_seconds": fit_s,
           "val": _scores(va.labels, h.predict_proba(va.features)),
           "test": _scores(te.labels, h.predict_proba(te.features))}
    if hasattr(h, "summary"):
        row["late_fusion"] = h.summary()
    _log(row)
    return row


def fusion_section(lite0: Path, lite1: Path, plot: Path | None = None) -> dict:
    """Two encoders of the same HAM10000 images, one head: each cache alone, early fusion
    (features joined) and late fusion (a head per cache, weights on val), for logreg and mlp;
    each fused row against the best single-cache head *by val* (of the same head, and of all),
    with the paired bootstrap 95% CI of the test balanced-accuracy difference."""
    from skincache.cache.joined import join_caches

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = fusion_caches(lite0, lite1, Path(tmp))
        A, B = FeatureCache.open(pa), FeatureCache.open(pb)
        AB = join_caches([A, B])
        sizes = {s: len(A.splits[s]) for s in A.splits}
        y = A.split("test").labels
        rows = []
        for head, params in FUSION_HEADS:
            rows += [_fusion_row(A, f"{head} Lite0", head, params),
                     _fusion_row(B, f"{head} Lite1", head, params),
                     _fusion_row(AB, f"{head} Lite0+Lite1 early", head, params),
                     _fusion_row(AB, f"{head} Lite0+Lite1 late", head, params, "late")]
    load_after = os.getloadavg()
    singles = [r for r in rows if "+" not in r["variant"]]
    best_single = max(singles, key=lambda r: r["val"]["balanced_accuracy"])
    for r in rows:
        if "+" not in r["variant"]:
            continue
        same = max((s for s in singles if s["head"] == r["head"]),
                   key=lambda s: s["val"]["balanced_accuracy"])
        r["vs_best_single_same_head"] = {"single": same["variant"], **paired_difference(
            y, r["test"]["pred"], same["test"]["pred"])}
        r["vs_best_single"] = {"single": best_single["variant"], **paired_difference(
            y, r["test"]["pred"], best_single["test"]["pred"])}
    t = Table(title=f"two encoders, one head: HAM10000 {sizes} (lesion-grouped); "
                    f"load {load_before[0]:.1f}→{load_after[0]:.1f}")
    for col in ("variant", "val bal-acc", "test bal-acc", "Δ vs best single by val "
                "(same head), paired 95% CI", "weights", "fit s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        d = r.get("vs_best_single_same_head")
        delta = "" if d is None else (f"{100 * d['difference']:+.1f} "
                                      f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                                      f" vs {d['single']}")
        w = r.get("late_fusion", {}).get("weights")
        t.add_row(r["variant"], _pct(r["val"]["balanced_accuracy"]),
                  _pct(r["test"]["balanced_accuracy"]), delta,
                  "" if w is None else "/".join(f"{x:.1f}" for x in w),
                  f"{r['fit_seconds']:.2f}")
    Console(width=150).print(t)
    if plot is not None:
        _fusion_plot(rows, plot, f"Lite0 + Lite1 on HAM10000 test (n={sizes['test']})")
    return {"lite0": str(lite0), "lite1": str(lite1), "split_sizes": sizes, "rows": rows,
            "best_single_by_val": best_single["variant"],
            "load_average": [load_before, load_after], "plot": str(plot) if plot else None}


def _fusion_plot(rows: list[dict], path: Path, title: str) -> None:
    """Test balanced accuracy per row (bars), fused rows with their paired CI vs the best
    single-cache head of the same head (error bars on the difference, drawn at the bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [r["variant"] for r in rows]
    vals = [100 * r["test"]["balanced_accuracy"] for r in rows]
    colors = ["#888" if "+" not in n else "#1f77b4" for n in names]
    ax.barh(names, vals, color=colors)
    for i, r in enumerate(rows):
        d = r.get("vs_best_single_same_head")
        label = f"{vals[i]:.1f}" + ("" if d is None else
                                    f"  (Δ {100 * d['difference']:+.1f}, CI "
                                    f"{100 * d['ci95'][0]:+.1f}..{100 * d['ci95'][1]:+.1f})")
        ax.text(vals[i] + 0.3, i, label, va="center", fontsize=7)
    ax.set_xlim(0, max(vals) + 25)
    ax.invert_yaxis()
    ax.set_xlabel("test balanced accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", type=Path, default=None,
                    help=f"features (default {DEFAULT_NPZ.name}; with --external "
                         f"{EXTERNAL_NPZ.name})")
    ap.add_argument("--external", action="store_true",
                    help="train/val on HAM10000 by lesion (6/7, 1/7), test on ISIC 2018")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cli", action="store_true", help="also time `fit-head --head all`")
    ap.add_argument("--metadata-only", action="store_true",
                    help="only part 6: heads with and without age,sex,localization")
    ap.add_argument("--seeds", type=int, default=1,
                    help="seeds of linear and mlp in the metadata part (default 1)")
    ap.add_argument("--fusion-only", action="store_true",
                    help="only the two-encoder section (Lite0 + Lite1 caches of the same "
                         "HAM10000 images; default out results/real_heads_fusion.json)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results (default benchmarks/results/real_heads[_external].json)")
    args = ap.parse_args()
    args.npz = args.npz or (EXTERNAL_NPZ if args.external else DEFAULT_NPZ)
    args.out = args.out or (Path(__file__).parent / "results" / (
        "real_heads_external.json" if args.external else
        "real_heads_metadata.json" if args.metadata_only else "real_heads.json"))
    if not args.npz.is_file():
        sys.exit(f"{args.npz}: the real-feature file is not here; pass --npz or set "
                 "SKINCACHE_SHARED_DATA to the shared data folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.external:
        external(args.npz, args.out)
        return
    if args.metadata_only:
        metadata_only(args.npz, args.out, args.seeds)
        return
    results = Path(__file__).parent / "results"
    if args.fusion_only:
        out = args.out if args.out != results / "real_heads.json" else \
            results / "real_heads_fusion.json"
        section = fusion_section(DEFAULT_NPZ, EXTERNAL_NPZ, results / "fusion.png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"fusion": section, "torch_threads": torch.get_num_threads(),
                                   "machine": platform.platform(),
                                   "date": time.strftime("%Y-%m-%d %H:%M")},
                                  indent=2, default=float))
        print(f"wrote {out}")
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_cache(args.npz, Path(tmp) / "ham10000-effnetlite0.h5")
        fc = FeatureCache.open(cache)
        sizes = {s: len(fc.splits[s]) for s in fc.splits}
        fc_labels_test = fc.split("test").labels
        create_head("mlp", epochs=1).fit(fc.split("val").features[:64],
                                         fc.split("val").labels[:64])  # torch warm-up, once
        rows: list[dict] = []
        for variant, head, params in VARIANTS:
            rows += run_head(fc, variant, head, params)
            _log(rows[-2])
        solver = [run_head(fc, *v)[0] for v in SOLVER_PAIR]
        for r in solver:
            _log(r)
        baselines = [sklearn_balanced_baseline(fc), clip_benchmark_probe(fc)]
        for r in baselines:
            _log(r)
        text_probes = text_probes_standin(fc)
        meta = metadata_fusion(fc, args.seeds)
        cli_s = fit_head_all_cli(cache, Path(tmp) / "runs") if args.cli else None
    load_after = os.getloadavg()
    fusion = (fusion_section(args.npz, EXTERNAL_NPZ, results / "fusion.png")
              if EXTERNAL_NPZ.is_file() else None)

    render(rows + solver + baselines + text_probes,
           f"heads on real HAM10000 features (EfficientNet-Lite0, 1280-d), split {sizes}; "
           f"load {load_before[0]:.1f}→{load_after[0]:.1f}")
    own = [r for r in rows]
    best_val = max(own, key=lambda r: r["val"]["balanced_accuracy"])
    best_test = max(own, key=lambda r: r["test"]["balanced_accuracy"])
    sk, cb = baselines
    y_test = fc_labels_test
    diff = paired_difference(y_test, best_val["test"]["pred"], sk["test"]["pred"])
    speedup = solver[0]["fit_seconds"] / solver[1]["fit_seconds"]
    logreg_s = next(r for r in rows if r["variant"] == "logreg")["fit_seconds"]
    others_s = max(r["fit_seconds"] for r in rows if r["head"] != "logreg")
    acc_best = max(own, key=lambda r: r["test"]["accuracy"])
    checks = [
        ("logreg C sweep < 10 s", f"{logreg_s:.2f} s", logreg_s < 10),
        ("new solver >= 5x the old (same sweep)", f"{speedup:.1f}x", speedup >= 5),
        ("every other head < 10 s", f"max {others_s:.2f} s", others_s < 10),
        ("val-chosen head >= sklearn balanced + 0.03 (test bal-acc)",
         f"{best_val['variant']} {_pct(best_val['test']['balanced_accuracy'])} vs "
         f"{_pct(sk['test']['balanced_accuracy'])} (difference {100 * diff['difference']:+.1f}, "
         f"paired 95% CI {100 * diff['ci95'][0]:+.1f} to {100 * diff['ci95'][1]:+.1f})",
         best_val["test"]["balanced_accuracy"] >= sk["test"]["balanced_accuracy"] + 0.03),
        ("a head as accurate as CLIP_benchmark (test acc)",
         f"{acc_best['variant']} {_pct(acc_best['test']['accuracy'])} vs "
         f"{_pct(cb['test']['accuracy'])}",
         acc_best["test"]["accuracy"] >= cb["test"]["accuracy"]),
    ]
    if cli_s is not None:
        checks.append(("fit-head --head all < 60 s", f"{cli_s:.1f} s", cli_s < 60))
    t = Table(title="targets (issue 7)")
    for col in ("target", "measured", "met"):
        t.add_column(col)
    for name, val, ok in checks:
        t.add_row(name, val, "[green]yes[/]" if ok else "[red]NO[/]")
    Console(width=130).print(t)
    Console().print(f"best head by val: {best_val['variant']}; best on test (not used to "
                    f"choose): {best_test['variant']}")
    render_metadata(meta, "metadata fusion (same split): with - without, paired bootstrap CI")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_metadata(meta, args.out.with_name(args.out.stem + "_metadata.png"),
                  f"metadata fusion, {args.npz.name}, split {sizes}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "npz": str(args.npz), "split_sizes": sizes, "rows": rows, "solver_pair": solver,
        "baselines": baselines, "fit_head_all_cli_seconds": cli_s,
        "text_probes_standin": text_probes,
        "best_by_val_minus_sklearn_balanced": diff,
        "metadata_fusion": meta,
        "fusion": fusion,
        "checks": [{"target": n, "measured": v, "met": bool(ok)} for n, v, ok in checks],
        "load_average": [load_before, load_after], "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

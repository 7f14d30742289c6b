"""What the cache checksums cost: writing and opening a HAM10000-sized cache with and without.

A cache of HAM10000's shape (10,015 images split 7,205 / 1,904 / 906, D=512, K=4 views, three
prompt sets of 7 classes x 8 templates, image/lesion ids, sha1s and four metadata columns) is
written by skincache's own `write_cache` (schema 2: a sha256 per dataset and over the
attributes, verified as each dataset is read; timed here as `FeatureCache.open(path,
load=True)`, which reads everything). A copy stripped of its checksums and marked schema 1
is what an unverified open costs (the reader takes the old-schema path and skips the
hashing). For comparison, the two float datasets are also written with HDF5's own chunked
`fletcher32` filter and read back, against the same datasets contiguous.

    python benchmarks/cache_checksums.py [--repeats 5] [--k 4] [--dim 512]
                                         [--out benchmarks/results/cache_checksums.json]

Times are the best of `--repeats` (warm page cache: the file was just written, as after an
encode); the cost of the checksum is the difference between the verified and unverified opens.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import h5py
import numpy as np

from skincache.cache import (
    CacheHeader,
    CacheWarning,
    FeatureCache,
    SplitArrays,
    dataset_digest,
    write_cache,
)

SPLITS = {"train": 7205, "val": 1904, "test": 906}


def make_cache(k: int, dim: int, seed: int = 0) -> tuple:
    """(header, splits, text, failed) of a HAM10000-shaped cache, ready for `write_cache`."""
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in SPLITS.items():
        ids = [f"ISIC_{i:07d}" for i in rng.integers(0, 10**7, n)]
        splits[name] = SplitArrays(
            features=rng.standard_normal((n, dim)).astype(np.float32),
            views=rng.standard_normal((n, k, dim)).astype(np.float32),
            labels=rng.integers(0, 7, n), image_id=ids,
            group_id=[f"HAM_{i:07d}" for i in rng.integers(0, 10**7, n)],
            sha1=[f"{i:040x}" for i in rng.integers(0, 2**62, n)],
            meta={c: [str(v) for v in rng.integers(0, 90, n)] for c in
                  ("age", "sex", "localization", "dx_type")},
        )
    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    header = CacheHeader(
        key="0" * 64, model="ViT-B-32", pretrained="openai", weights_sha256="1" * 64,
        embed_dim=dim, logit_scale=100.0, precision="bf16", device="cuda",
        preprocess={"size": [224, 224]}, views={"k": k}, dataset="ham10000",
        dataset_kind="ham10000", dataset_root="/data", dataset_fingerprint="2" * 64,
        classes=classes, class_names=classes, created="now", versions={})
    text = {s: rng.standard_normal((7, 8, dim)).astype(np.float32)
            for s in ("clip", "dermoscopy", "context")}
    return header, splits, text, {"image_id": [], "source": [], "split": [], "reason": []}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def open_unverified(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        FeatureCache.open(path, load=True)


def fletcher_rows(folder: Path, path: Path, repeats: int) -> dict[str, float]:
    """The float datasets written contiguous vs chunked with fletcher32, and read back."""
    with h5py.File(path, "r") as f:
        arrays = {f"{s}/{d}": f[f"splits/{s}/{d}"][()] for s in SPLITS for d in
                  ("features", "views")}
    out = {}
    for label, opts in (("contiguous", {}), ("fletcher32", {"fletcher32": True,
                                                            "chunks": True})):
        p = folder / f"{label}.h5"
        with h5py.File(p, "w") as f:
            for name, a in arrays.items():
                f.create_dataset(name, data=a, **opts)

        def read(p=p):
            with h5py.File(p, "r") as f:
                for name in arrays:
                    f[name][()]
        out[label] = best(read, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cache_checksums.json"))
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="skincache-bench-"))
    try:
        checked = folder / "checked.h5"
        parts = make_cache(args.k, args.dim)
        write_s = best(lambda: write_cache(checked, *parts), args.repeats)
        plain = folder / "plain.h5"
        shutil.copy(checked, plain)
        with h5py.File(plain, "r+") as f:
            f.attrs["schema_version"] = 1
            del f.attrs["checksums"], f.attrs["header_sha256"]
        with h5py.File(checked, "r") as f:
            data = []
            f.visititems(lambda n, o: data.append(o.asstr()[()] if o.dtype.kind == "O"
                                                  else o[()]) if isinstance(o, h5py.Dataset)
                         else None)
        hash_s = best(lambda: [dataset_digest(a) for a in data], args.repeats)
        open_checked = best(lambda: FeatureCache.open(checked, load=True), args.repeats)
        open_plain = best(lambda: open_unverified(plain), args.repeats)
        fl = fletcher_rows(folder, checked, args.repeats)
        size_mb = checked.stat().st_size / 1e6
        result = {
            "cache": {"images": sum(SPLITS.values()), "dim": args.dim, "k": args.k,
                      "file_mb": round(size_mb, 1)},
            "write_with_checksums_s": round(write_s, 3),
            "hash_all_datasets_s": round(hash_s, 4),
            "open_verified_s": round(open_checked, 4),
            "open_unverified_s": round(open_plain, 4),
            "checksum_overhead_s": round(open_checked - open_plain, 4),
            "checksum_overhead_pct": round(100 * (open_checked - open_plain) / open_plain, 1),
            "float_datasets_read_contiguous_s": round(fl["contiguous"], 4),
            "float_datasets_read_fletcher32_s": round(fl["fletcher32"], 4),
            "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"HAM10000-sized cache: {result['cache']['images']:,} images, D={args.dim}, "
          f"K={args.k}, {result['cache']['file_mb']} MB (best of {args.repeats}, warm cache)")
    rows = [("write_cache (hashing included)", write_s),
            ("open, verified (sha256 per dataset + header)", open_checked),
            ("open, unverified (schema-1 path)", open_plain),
            ("  difference: the checksum cost", open_checked - open_plain),
            ("sha256 of every dataset alone", hash_s),
            ("float datasets read, contiguous", fl["contiguous"]),
            ("float datasets read, chunked + fletcher32", fl["fletcher32"])]
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  seconds")
    for label, s in rows:
        print(f"{label:{w}}  {s:7.3f}")
    print(f"checksum overhead on open: {result['checksum_overhead_pct']}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

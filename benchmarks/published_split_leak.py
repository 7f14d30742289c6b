"""How much the DermFM-Zero HAM10000 test split's lesion leak moves a linear probe's score.

Their split is image-level: 613 of its 1,503 test images have an image of the same lesion in
train/val. This fits their protocol (L-BFGS multinomial logistic regression, C = D x n_classes /
100, max_iter 1,000, train+val merged) on the shared real features
(`../shared/data/features/ham10000-effnetlite0.npz`, not CLIP) three times and scores each on the
same 1,503 test images:

- `published`: train on every image outside their test split (what their numbers rest on);
- `leak-free`: without the 778 train/val images of test lesions (`encode --drop-lesion-mates`);
- `control-<seed>`: without 778 other train/val images, drawn at random with the mates' class
  counts (seeded; `--controls` draws): the cost of fewer training images (of those classes)
  alone, so that leak-free minus control is what the leak was worth.

One change to their protocol: features are z-scored on the training rows (these EfficientNet
features are not normalised; raw, L-BFGS stops at 1,000 iterations unconverged and the scores
swing by several points between near-identical training sets).

Balanced accuracy and accuracy on all test images and on the 613 affected / 890 unaffected
ones.

    python benchmarks/published_split_leak.py [--data ../shared/data] [--seed 0] [--controls 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from skincache.data import load_dataset
from skincache.data.splits import lesion_mates_of_test


def fit_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
              groups: dict[str, np.ndarray]) -> dict[str, float]:
    n_classes = len(np.unique(y))
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6  # z-scored on the training rows
    x = (x - mean) / std
    clf = LogisticRegression(C=x.shape[1] * n_classes / 100, max_iter=1000)  # lbfgs, multinomial
    clf.fit(x[train], y[train])
    pred = clf.predict(x)
    out = {}
    for name, idx in {"all": test, **groups}.items():
        out[f"bacc {name}"] = balanced_accuracy_score(y[idx], pred[idx])
        out[f"acc {name}"] = accuracy_score(y[idx], pred[idx])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).parents[1] / ".." / "shared"
                    / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controls", type=int, default=5)
    args = ap.parse_args()
    z = np.load(args.data / "features" / "ham10000-effnetlite0.npz")
    ds = load_dataset(args.data / "ham10000",
                      split_file=args.data / "published" / "lp-HAM-MONET.csv")
    row = {str(i): k for k, i in enumerate(z["image_id"])}
    order = np.array([row[r.image_id] for r in ds.records])
    x = z["features"].astype(np.float32)[order]
    y = np.unique(z["dx"], return_inverse=True)[1][order]
    is_test = np.array([r.split == "test" for r in ds.records])
    mates = np.array(lesion_mates_of_test(ds.records))
    mate_groups = {ds.records[i].group for i in mates}
    test = np.flatnonzero(is_test)
    affected = np.array([i for i in test if ds.records[i].group in mate_groups])
    groups = {"affected": affected, "unaffected": np.setdiff1d(test, affected)}
    rest = np.flatnonzero(~is_test)
    others = np.setdiff1d(rest, mates)
    trains = {"published": rest, "leak-free": np.setdiff1d(rest, mates)}
    for k in range(args.controls):
        rng = np.random.default_rng(args.seed + k)
        control = np.concatenate([rng.choice(others[y[others] == c], (y[mates] == c).sum(),
                                             replace=False) for c in np.unique(y[mates])])
        trains[f"control-{args.seed + k}"] = np.setdiff1d(rest, control)
    print(f"test {len(test)} images ({len(affected)} with a lesion mate in train/val), "
          f"{len(mates)} mates; balanced accuracy (bacc) and accuracy (acc) on all test "
          "images, the affected ones and the others:")
    cols = [f"{m} {g}" for m in ("bacc", "acc") for g in ("all", "affected", "unaffected")]
    print(f"{'train set':<11} {'n train':>7} " + " ".join(f"{c:>14}" for c in cols)
          + f" {'fit s':>6}")
    for name, train in trains.items():
        t0 = time.perf_counter()
        s = fit_score(x, y, train, test, groups)
        print(f"{name:<11} {len(train):>7} " + " ".join(f"{s[c]:>14.4f}" for c in cols)
              + f" {time.perf_counter() - t0:>6.1f}", flush=True)


if __name__ == "__main__":
    main()

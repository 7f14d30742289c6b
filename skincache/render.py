"""Rich tables for what the CLI prints. Presentation only: numbers come from the library."""

from __future__ import annotations

import numpy as np
from rich.markup import escape
from rich.table import Table

from skincache._progress import PlainWhenPiped
from skincache.metrics import PRIMARY, Metric, get_metric, table_metrics

out = PlainWhenPiped()
err = PlainWhenPiped(stderr=True)  # errors, so `> file` keeps only results


def _show(t: Table) -> None:
    """Print a table. Piped or redirected, its title goes on a line of its own first: rich
    wraps a title to the table's width, which would split a cache path over many lines."""
    if not out.is_terminal and t.title:
        title, t.title = t.title, None
        out.print(title)
    out.print(t)


def cache_summary(s: dict) -> None:
    """`skincache info`: provenance, preprocessing, splits x classes, failures."""
    t = Table(title=f"cache {s['path']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    pp = s["preprocess"]
    v = s["views"]
    rows = [
        ("key", s["key"]),
        ("model", f"{s['model']}" + (f" / {s['pretrained']}" if s["pretrained"] else "")),
        ("checkpoint", f"{s['checkpoint']} (sha256 {s['checkpoint_sha256'][:12]}…)"
         if s.get("checkpoint") else "none"),
        ("weights sha256", s["weights_sha256"][:16] + "…"),
        ("precision", s["precision"]),
        ("embedding", f"D={s['embed_dim']}, stored {s['feature_dtype']}, not normalised"
                      + (f"; pre-projection D={s['pre_projection_dim']} (features_pre)"
                         if s.get("pre_projection_dim") else "")),
        ("preprocess", f"{pp['size'][0]}x{pp['size'][1]} {pp['interpolation']} "
                       f"{pp['resize_mode']}, mean {_fmt(pp['mean'])}, std {_fmt(pp['std'])}"
         if "size" in pp else "not recorded (a cache written from arrays, not by encode)"),
        ("views", f"K={v['k']}: resize {v.get('scaled_resize', v['resize'])}, random crop "
                  f"{v.get('scaled_crop', v['crop'])}, hflip p={v['hflip']}, seed {v['seed']}"
         if "resize" in v else f"K={v.get('k', 0)} (how they were cut is not recorded)"),
        ("dataset", f"{s['dataset']['name']} ({s['dataset']['kind']}) {s['dataset']['root']}"),
        ("text sets", ", ".join(f"{k} {tuple(x)}" for k, x in s["text_sets"].items()) or "none"),
        ("concepts", _concepts_line(s.get("concepts") or {})),
        ("failed", f"{s['failed']}" + (f" ({_reasons(s['failed_reasons'])})"
                                       if s["failed"] else "")),
        ("created", s["created"]),
    ]
    for k, val in rows:
        t.add_row(k, str(val))
    _show(t)
    class_table(s["class_counts"], s["classes"], title="images per split and class")


def _concepts_line(c: dict) -> str:
    if not c.get("stored"):
        return "none (re-encode to score concepts: `skincache concepts` needs them)"
    return f"{c.get('name', '?')}: {c['stored']} concepts (sha256 {str(c.get('sha256'))[:12]}…)"


def class_table(counts: dict[str, dict[str, int]], classes: list[str], title: str) -> None:
    t = Table(title=title, title_justify="left")
    t.add_column("split", style="bold")
    for c in classes:
        t.add_column(c, justify="right")
    t.add_column("total", justify="right", style="bold")
    for split, per in counts.items():
        t.add_row(split, *(f"{per.get(c, 0):,}" for c in classes), f"{sum(per.values()):,}")
    _show(t)


def encode_result(r) -> None:
    if r.status == "exists":
        out.print(f"[green]up to date:[/] {r.path} already holds this encoding "
                  "(same data, model, preprocessing and views); nothing to do. "
                  "Use --force to rebuild.")
        if r.stale_partial is not None:
            err.print(f"[bold yellow]note:[/] removed {r.stale_partial}, left by an interrupted "
                      "run (a --force rebuild, or a kill during cleanup); the cache itself was "
                      "already complete", highlight=False)
        return
    verb = "resumed and finished" if r.status == "resumed" else "wrote"
    out.print(f"[green]{verb}[/] {r.path}: {r.n_images:,} images "
              f"({', '.join(f'{k} {v:,}' for k, v in r.splits.items())}) in {r.seconds:.1f} s, "
              f"{r.images_per_s:,.0f} images/s")
    if r.n_failed:
        out.print(f"[yellow]{r.n_failed} image(s) failed and were skipped[/]: "
                  f"{_reasons(r.failed_reasons)}. `skincache info {r.path} --failed` lists them.")


def failed_table(rows: list[dict]) -> None:
    t = Table(title="failed images", title_justify="left")
    for col in ("image_id", "split", "reason", "source"):
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(row.get("image_id", ""), row.get("split", ""), row.get("reason", ""),
                  row.get("source", ""))
    _show(t)


def audit_report(rep: dict, classes: list[str]) -> None:
    class_table(rep["class_counts"], classes, title="images per split and class")
    lesions = rep["cross_split_groups"]
    dups = rep["cross_split_duplicates"]
    style = "red" if lesions else "green"
    out.print(f"[{style}]{len(lesions)} lesion(s) appear in more than one split[/]"
              + (" (a lesion-level leak: its images should share one split)" if lesions else ""))
    _sample(lesions, ("group", "splits", "image_ids"), "lesions in several splits")
    style = "red" if dups else "green"
    out.print(f"[{style}]{len(dups)} set(s) of byte-identical images across splits[/]")
    _sample(dups, ("sha1", "splits", "image_ids"), "byte-identical images across splits")
    for key, label in (("repeated_image_ids", "image ids listed more than once"),
                       ("unreadable", "listed but unreadable/missing")):
        items = rep.get(key) or []
        if items:
            out.print(f"[yellow]{len(items)} {label}[/]")
    leak = rep.get("test_leakage")
    if leak:
        style = "red" if leak["test_images_affected"] else "green"
        where = ", ".join(f"{s} {n:,}" for s, n in leak["mates_by_split"].items())
        out.print(f"[{style}]{leak['test_images_affected']:,} of {leak['test_images']:,} test "
                  f"images have an image of the same lesion outside test[/]"
                  + (f" ({leak['test_lesions_affected']:,} lesions; "
                     f"{leak['mates_outside_test']:,} such images: {where}; "
                     "encode --drop-lesion-mates leaves them out)"
                     if leak["test_images_affected"] else ""), highlight=False)


def split_origin(origin: dict) -> None:
    """One line on where the splits came from, when a split file or --drop-lesion-mates
    chose them (nothing otherwise)."""
    if not origin:
        return
    parts = []
    if origin.get("file"):
        listed = ", ".join(f"{s} {n:,}" for s, n in origin["listed"].items())
        parts.append(f"splits from {origin['file']} ({listed})")
        if origin["split_by_seed"]:
            parts.append(f"{origin['split_by_seed']:,} unlisted images split train/val by "
                         f"seed {origin['split_seed']}")
    if "lesion_mates_dropped" in origin:
        parts.append(f"--drop-lesion-mates left out {origin['lesion_mates_dropped']:,} "
                     f"train/val images of {origin['lesions_with_mates_dropped']:,} lesions "
                     "that have an image in test")
    out.print("; ".join(parts), highlight=False, soft_wrap=True)


def _sample(items: list[dict], cols: tuple[str, ...], title: str, limit: int = 10) -> None:
    if not items:
        return
    t = Table(title=f"{title} (first {min(limit, len(items))} of {len(items)})",
              title_justify="left")
    for c in cols:
        t.add_column(c, overflow="fold")
    for it in items[:limit]:
        t.add_row(*(", ".join(map(str, it[c])) if isinstance(it[c], list) else str(it[c])
                    for c in cols))
    _show(t)


def _fmt(xs) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in xs) + ")"


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def _cell(report: dict | None, m: Metric, with_ci: bool = True) -> str:
    """One metric of a report in its registered format, with its interval when it has one:
    `71.3 [68-74]` (percent) or `0.042 [0.031-0.055]` (fraction)."""
    v = None if report is None else report.get(m.name)
    if v is None:
        return "n/a"
    ci = (report.get("ci") or {}).get(m.name) if with_ci else None
    if m.fmt == "percent":
        return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]" if ci else "")
    return f"{v:.3f}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")


def _ci_caption(reports: list[dict]) -> str | None:
    """Says what the bracketed numbers are, at the level the reports were made with."""
    levels = {r.get("bootstrap", {}).get("level") for r in reports
              if r.get("bootstrap", {}).get("n_resamples")}
    if len(levels) != 1:
        return None
    return escape(f"[lo-hi]: {100 * levels.pop():g}% bootstrap interval")


def metrics_table(reports: dict[str, dict], title: str) -> None:
    """Headline metrics per split, one column per table metric (`table_metrics()`), balanced
    accuracy first (it leads on imbalanced data); every CI is in metrics/<split>.json."""
    shown = table_metrics()
    t = Table(title=title, title_justify="left", caption=_ci_caption(list(reports.values())),
              caption_justify="left")
    for col in ("split", "n", *(m.heading for m in shown)):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, r in reports.items():
        t.add_row(split, f"{r['n_samples']:,}", *(_cell(r, m) for m in shown))
    _show(t)


def per_class_table(report: dict, title: str) -> None:
    t = Table(title=title, title_justify="left")
    for col in ("class", "support", "precision %", "recall %", "F1 %"):
        t.add_column(col, justify="right" if col != "class" else "left")
    for c, v in report["per_class"].items():
        t.add_row(c, f"{v['support']:,}", f"{100 * v['precision']:.1f}",
                  f"{100 * v['recall']:.1f}", f"{100 * v['f1']:.1f}")
    _show(t)


def heads_table(results: list, split: str, picked: int | None = None, setting: str = ""
                ) -> None:
    """One row per head: val (where hyper-parameters and the head are chosen) beside `split`;
    `picked` (the index val chooses) is marked, so nobody picks a head by its test score."""
    t = Table(title=f"heads{setting}: chosen on val, reported on {split}", title_justify="left")
    primary, shown = get_metric(PRIMARY), table_metrics()
    for col in ("head", "fit s", f"val {primary.heading}",
                *((f"{split} " if m is primary else "") + m.heading for m in shown)):
        t.add_column(col, justify="left" if col == "head" else "right")
    for i, r in enumerate(results):
        m = r.metrics.get(split)
        if m is None:
            continue
        name = f"{r.head} *" if i == picked else r.head
        val = _cell(r.metrics.get("val"), primary, with_ci=False)
        t.add_row(name, f"{r.fit_seconds:.2f}",
                  val + (" (fit)" if getattr(r, "trains_on_val", False) else ""),
                  *(_cell(m, metric) for metric in shown))
    _show(t)
    if picked is not None:
        out.print(f"* {results[picked].head}: val's pick (best val balanced accuracy); choose "
                  "heads on val, never on test", highlight=False, soft_wrap=True)
    if any(getattr(r, "trains_on_val", False) for r in results):
        out.print("(fit): the head trained on val (a published protocol's train+val refit); "
                  "its val score is not a validation score and val never picks it",
                  highlight=False, soft_wrap=True)
    for r in results:  # full paths, for evaluate / predict
        out.print(f"{r.head}: {r.path}", highlight=False, soft_wrap=True)


def heads_list(specs: list) -> None:
    """`skincache heads`: one block per head, its parameters with type and default."""
    for h in specs:
        t = Table(title=f"[bold]{h.name}[/] — {h.summary}"
                  + ("  (needs the cache's text features)" if h.needs_text else ""),
                  title_justify="left", show_edge=False)
        t.add_column("parameter")
        t.add_column("type")
        t.add_column("default")
        for p in h.params:
            t.add_row(p.name, p.type, repr(p.default))
        out.print(t)
    out.print("set any of them with -p NAME=VALUE, e.g. `skincache fit-head --head logreg "
              "-p C=10 -p logit_adjust=none`", highlight=False, soft_wrap=True)


def bench_table(rows: list[dict], title: str) -> None:
    t = Table(title=title, title_justify="left")
    shots = any(r.get("shots") is not None for r in rows)
    shown = table_metrics()
    for col in ("variant", *(("shots",) if shots else ()), "seeds",
                f"val {get_metric(PRIMARY).heading}", *(m.heading for m in shown), "fit s"):
        t.add_column(col, justify="left" if col == "variant" else "right")

    from skincache.bench import VAL_KEY
    from skincache.bench import format_cell as f

    for r in rows:
        name = r["variant"] + (" ← val's pick" if r.get("chosen_by_val") else "")
        t.add_row(name, *((str(r["shots"]),) if shots else ()),
                  str(r["n_seeds"]) if r["n_seeds"] > 1 else "1 (det.)",
                  f(r, VAL_KEY), *(f(r, m.name) for m in shown), f(r, "fit_seconds", pct=False))
    _show(t)


def distinct_digits(values: list[float], start: int = 3, most: int = 6) -> int:
    """Decimals needed for values that differ to print differently (up to `most`): three
    neighbours at 0.9991, 0.9994 and 0.9996 all read 0.999 at three."""
    for d in range(start, most + 1):
        shown = [f"{v:.{d}f}" for v in values]
        if all(a != b for a, b, x, y in zip(shown, shown[1:], values, values[1:], strict=False)
               if x != y):
            return d
    return most


def _top(p, k: int) -> list[tuple[str, float]]:
    return sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:k]


def prediction_lines(preds: list, top: int = 1) -> None:
    """One line per image: the path, then the `top` most probable classes; errors on stderr."""
    width = max((len(p.path) for p in preds if p.ok), default=0)
    for p in preds:
        if not p.ok:
            err.print(f"[bold red]{escape(p.path)}[/]: {escape(p.error)}", highlight=False)
            continue
        classes = "  ".join(f"{c} {v:.3f}" for c, v in _top(p, top))
        why = ("  <- " + ", ".join(f"{c['concept']} {c['share']:+.2f}" for c in p.concepts)
               if getattr(p, "concepts", None) else "")
        out.print(f"{escape(p.path):<{width}}  [bold]{escape(classes)}[/]{escape(why)}",
                  highlight=False)


def predictions(preds: list, top: int = 3) -> None:
    """`predict --verbose`: a table per image, top classes then the nearest training cases."""
    for p in preds:
        if not p.ok:
            err.print(f"[bold red]{escape(p.path)}[/]: {escape(p.error)}", highlight=False)
            continue
        t = Table(title=f"{p.path} → [bold]{p.predicted}[/]", title_justify="left")
        t.add_column("class")
        t.add_column("probability / cosine", justify="right")
        for c, v in _top(p, top):
            t.add_row(c, f"{v:.3f}")
        if getattr(p, "concepts", None):
            t.add_section()
            for c in p.concepts:
                t.add_row(f"concept: {escape(c['concept'])}", f"{c['share']:+.2f} logit")
        if p.neighbors:
            t.add_section()
            d = distinct_digits([n["similarity"] for n in p.neighbors])
            for n in p.neighbors:
                t.add_row(f"similar: {n['image_id']} ({n['label']})",
                          f"cos {n['similarity']:.{d}f}")
        _show(t)


def near_duplicate_pairs(pairs: list[dict], threshold: float, limit: int = 20) -> None:
    style = "red" if pairs else "green"
    out.print(f"[{style}]{len(pairs):,} cross-split pair(s) with feature cosine >= "
              f"{threshold}[/]")
    if not pairs:
        return
    t = Table(title=f"near-duplicates across splits (first {min(limit, len(pairs))})",
              title_justify="left")
    for col in ("similarity", "split a", "image a", "split b", "image b", "same lesion"):
        t.add_column(col)
    for p in pairs[:limit]:
        t.add_row(f"{p['similarity']:.4f}", p["split_a"], p["image_a"], p["split_b"],
                  p["image_b"], "yes" if p["same_group"] else "")
    _show(t)


def finetune_result(r) -> None:
    """Per-epoch history, then the final metrics of the chosen model."""
    t = Table(title=f"finetune {r.config.setup}: {r.run_dir}", title_justify="left")
    for col in ("epoch", "train loss", "train acc %", "val bal. acc %", "val acc %", "img/s"):
        t.add_column(col, justify="right")
    for h in r.history:
        best = " *" if h["epoch"] == r.best_epoch else ""
        t.add_row(f"{h['epoch']}{best}", f"{h['train_loss']:.4f}",
                  f"{100 * h['train_accuracy']:.1f}",
                  "" if h.get("val_balanced_accuracy") is None else
                  f"{100 * h['val_balanced_accuracy']:.1f}",
                  "" if h.get("val_accuracy") is None else f"{100 * h['val_accuracy']:.1f}",
                  f"{h.get('train_images_per_s', 0):,.0f}")
    _show(t)
    if r.wise_alpha is not None:
        out.print(f"WiSE-FT alpha {r.wise_alpha:g} applied to the final model")
    if r.metrics:
        metrics_table(r.metrics, f"final model (best epoch {r.best_epoch})")
    if r.failed:
        out.print(f"[yellow]{len(r.failed)} image(s) could not be read and were skipped[/] "
                  f"(listed in {r.run_dir}/failed.json)")


def derm_models_table(rows: list[dict]) -> None:
    """`skincache models --derm`: the derm encoder registry, one row per short name."""
    t = Table(title="dermatology encoders (--model SHORT-NAME)", title_justify="left",
              caption="facts marked unverified in skincache/derm_models.json were not checked "
                      "against the model's own config; no derm weights were loaded to make this "
                      "table")
    for col in ("short name", "source", "architecture", "input", "text tower", "license",
                "loads here"):
        t.add_column(col, overflow="fold")
    for r in rows:
        loads = r["loads"]
        style = "green" if loads.startswith("yes") else "yellow"
        t.add_row(r["name"], escape(r["source"]), escape(r["architecture"]),
                  f"{r['input_size']}px", escape(r["text_tower"]), escape(r["license"]),
                  f"[{style}]{escape(loads)}[/]")
    _show(t)
    out.print(f"{len(rows)} model(s). Encode with: skincache encode --data DIR --model "
              "SHORT-NAME (e.g. --model dermlip-b16)", highlight=False)


def concept_table(report) -> None:
    """`skincache concepts`: mean z-scored concept score per class (rows: concepts); each
    concept's highest class in bold."""
    t = Table(title=f"mean concept score per class, {report.split} split of {report.cache} "
                    f"({report.model}; z-scores against the train split)",
              title_justify="left")
    t.add_column("concept", style="bold")
    for c, n in zip(report.classes, report.counts, strict=True):
        t.add_column(f"{c} (n={n})", justify="right")
    for k, name in enumerate(report.names):
        col = report.means[:, k]
        best = int(np.nanargmax(col)) if np.isfinite(col).any() else -1
        cells = ["–" if not np.isfinite(v) else
                 (f"[bold]{v:+.2f}[/]" if i == best else f"{v:+.2f}")
                 for i, v in enumerate(col)]
        t.add_row(escape(name), *cells)
    _show(t)


def image_concepts(image: dict, top: int = 10) -> None:
    """One image's concept scores, highest first."""
    t = Table(title=f"{image['id']} ({image['split']} split, label {image['label']}): "
                    f"top {top} concepts (z-scores)", title_justify="left")
    t.add_column("concept", style="bold")
    t.add_column("z", justify="right")
    for name, v in sorted(image["scores"].items(), key=lambda kv: -kv[1])[:top]:
        t.add_row(escape(name), f"{v:+.2f}")
    _show(t)


def concept_summary(report, k: int = 3) -> None:
    """The demo's short form of `skincache concepts`: per class its `k` highest concepts."""
    if report is None:
        return
    note = " random weights: they mean nothing here;" if report.random_init else ""
    out.print(f"concepts ({report.split} split, mean z-score;{note} the full table: skincache "
              f"concepts {report.cache}; plot {report.plot}):", highlight=False)
    for c, name in enumerate(report.classes):
        row = report.means[c]
        if not np.isfinite(row).any():
            continue
        best = [i for i in np.argsort(-np.nan_to_num(row, nan=-np.inf))][:k]
        out.print(f"  {name:<6} " + ", ".join(f"{report.names[i]} {row[i]:+.2f}" for i in best),
                  highlight=False)

"""Tables for `skincache score` and `skincache compare`. Presentation only: the numbers come from
`skincache.study`. Values are fractions to 4 decimals, as published tables print them, so a
row can be read against a paper's."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from skincache.render import _show, err, out

_SCORED = (("balanced_accuracy", "bal. acc"), ("accuracy", "acc"), ("macro_f1", "macro-F1"),
           ("auroc", "AUROC"))


def _value_ci(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ({ci[0]:.4f}-{ci[1]:.4f})" if ci else "")


def _notes(who: str, notes: list[str]) -> None:
    for n in notes:
        err.print(f"[bold yellow]note:[/] {escape(who)}: {escape(n)}", highlight=False)


def score_table(reports: list[dict[str, Any]]) -> None:
    """One row per file: the point estimate and its 95% bootstrap CI for each headline metric."""
    level = round(100 * reports[0]["bootstrap"]["level"]) if reports else 95
    n_boot = reports[0]["bootstrap"]["n_resamples"] if reports else 0
    t = Table(title=f"scores: value ({level}% percentile bootstrap CI, {n_boot:,} resamples, "
                    f"seed {reports[0]['bootstrap']['seed'] if reports else 0})",
              title_justify="left")
    for col in ("file", "format", "n", *(label for _, label in _SCORED), "ECE"):
        t.add_column(col, justify="left" if col in ("file", "format") else "right")
    for r in reports:
        src = r["source"]
        t.add_row(escape(src["path"].rsplit("/", 1)[-1]), src["format"], f"{r['n_samples']:,}",
                  *(_value_ci(r[m], r["ci"].get(m)) for m, _ in _SCORED),
                  "n/a" if r.get("ece") is None else f"{r['ece']:.4f}")
    _show(t)
    for r in reports:
        _notes(r["source"]["path"], list(r["source"]["notes"]) + list(r["notes"]))
        if r.get("plots"):
            out.print(f"plots: {', '.join(r['plots'])}", highlight=False, soft_wrap=True)


def compare_table(result: dict[str, Any]) -> None:
    """Per comparison: each metric for both inputs, the difference and its paired CI, then
    McNemar's test on correctness."""
    from skincache.study.compare import COMPARED

    b = result["bootstrap"]
    level = round(100 * b["level"])
    for c in result["comparisons"]:
        t = Table(title=f"{c['b']} minus {c['a']} on {c['n_shared']:,} shared images "
                        f"(paired bootstrap, {b['n_resamples']:,} resamples, seed {b['seed']})",
                  title_justify="left")
        for col in ("metric", c["a"], c["b"], "difference", f"{level}% CI"):
            t.add_column(escape(col), justify="left" if col == "metric" else "right")
        for m, label in COMPARED:
            d = c["metrics"][m]
            if d["difference"] is None:
                t.add_row(label, "n/a", "n/a", "n/a", "")
                continue
            t.add_row(label, f"{d['a']:.4f}", f"{d['b']:.4f}", f"{d['difference']:+.4f}",
                      f"{d['ci'][0]:+.4f} to {d['ci'][1]:+.4f}")
        _show(t)
        mc = c["mcnemar"]
        out.print(f"McNemar (exact): {mc['a_right_b_wrong']} images only {escape(c['a'])} gets "
                  f"right, {mc['a_wrong_b_right']} only {escape(c['b'])}; p = "
                  f"{mc['p_value']:.3g}", highlight=False, soft_wrap=True)
        _notes(f"{c['a']} vs {c['b']}", c["notes"])
    if result.get("plot"):
        out.print(f"plot: {result['plot']}", highlight=False, soft_wrap=True)


def _mean_ci(m: Any, mean: float | None, half: float | None) -> str:
    """`71.3 ± 2.1` (percent metrics) or `0.042 ± 0.010` (fractions): mean ± 95% t half-width."""
    if mean is None:
        return "n/a"
    scale, digits = (100, 1) if m.fmt == "percent" else (1, 3)
    return f"{scale * mean:.{digits}f}" + ("" if half is None else f" ± {scale * half:.{digits}f}")


def cv_table(result: Any, path: str = "") -> None:
    """fit-head --cv: one row per table metric, a column per fold, the mean ± 95% t CI over
    folds, and the refit's test score."""
    from skincache.metrics import table_metrics

    t = Table(title=f"{result.head}: {result.k}-fold lesion-grouped CV over train+val "
                    f"({result.n_pool:,} images, {result.seconds:.1f} s){path}",
              title_justify="left",
              caption="mean ± 95% Student t interval over folds; refit: selection on an inner "
                      "val of train+val, scored once on test", caption_justify="left")
    t.add_column("metric")
    for f in result.folds:
        t.add_column(f"fold {f.fold + 1}", justify="right")
    t.add_column("mean ± CI", justify="right")
    t.add_column("refit → test", justify="right")
    for m in table_metrics():
        refit = None if result.refit is None else result.refit.get(m.name)
        t.add_row(m.heading, *(_mean_ci(m, f.metrics.get(m.name), None) for f in result.folds),
                  _mean_ci(m, result.mean.get(m.name), result.ci95.get(m.name)),
                  _mean_ci(m, refit, None))
    _show(t)


def cv_bench_table(rows: list[dict[str, Any]], title: str) -> None:
    """bench-heads --cv: one row per variant, mean ± 95% t CI over folds per table metric,
    the inner-val score that picks a variant, and the refit's test score (primary metric)."""
    from skincache.bench import VAL_KEY
    from skincache.metrics import PRIMARY, get_metric, table_metrics

    primary = get_metric(PRIMARY)
    t = Table(title=title, title_justify="left",
              caption="mean ± 95% Student t interval over folds; CV's pick: the best mean "
                      "over the held-out folds (test never chooses)", caption_justify="left")
    for col in ("variant", "folds", f"inner val {primary.heading}",
                *(m.heading for m in table_metrics()), f"refit test {primary.heading}",
                "fit s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        name = r["variant"] + (" ← CV's pick" if r.get("chosen_by_val") else "")
        t.add_row(name, str(r["n_folds"]), _mean_ci(primary, r[f"{VAL_KEY}_mean"], None),
                  *(_mean_ci(m, r[f"{m.name}_mean"], r[f"{m.name}_ci95"])
                    for m in table_metrics()),
                  _mean_ci(primary, r.get(f"refit_{PRIMARY}"), None),
                  f"{r['fit_seconds_mean']:.2f}")
    _show(t)


def encoders_table(result: Any) -> None:
    """bench-encoders: rows = encoders, columns = heads, balanced accuracy (95% CI) per cell
    (the other metrics are in results.md and results.json)."""
    from skincache.study.encoders import cell, table_rows

    t = Table(title=f"balanced accuracy (95% CI) · {result.protocol}", title_justify="left")
    t.add_column("encoder")
    t.add_column("dim", justify="right")
    for h in result.heads:
        t.add_column(h, justify="right")
    for r in table_rows(result):
        t.add_row(escape(r["encoder"]), str(r["embed_dim"]),
                  *(cell(r[h], "balanced_accuracy", r["text"]) for h in result.heads))
    _show(t)

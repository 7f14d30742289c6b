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

"""The page: a `Study` and its gallery rendered with jinja2 into one self-contained HTML file.

Plots are inlined as downscaled PNG data: URIs and thumbnails as small JPEGs, so the file opens
from disk, offline, and can be mailed to a co-author. The template (`report.html.j2`, beside
this module) autoescapes everything it is given; its few lines of inline script sort the tables
and mark an image that fails to decode, and nothing is loaded from a network.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from skincache._io import __version__, now_iso
from skincache.metrics import PRIMARY, get_metric, metrics
from skincache.report._collect import RunEntry, Study
from skincache.report._gallery import Gallery

#: the `kind` of a bench-encoders results.json (`skincache.study.encoders`)
ENCODERS = "bench-encoders"
#: widest a plot is stored in the page (px): the run folders' PNGs are ~1000 px wide
PLOT_PX = 640


def png_uri(path: Path, max_px: int = PLOT_PX) -> str | None:
    """A PNG data: URI of the image at `path`, at most `max_px` wide; None if unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > max_px:
                im = im.resize((max_px, round(im.height * max_px / im.width)), Image.LANCZOS)
            buf = io.BytesIO()
            im.quantize(colors=255).save(buf, "PNG", optimize=True)
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(value: float | None, ci: tuple[float, float] | None, percent: bool) -> dict:
    """What a table cell shows and sorts by: '91.9 [81-100]' and 0.919."""
    if value is None:
        return {"text": "–", "sort": ""}
    scale = 100.0 if percent else 1.0
    text = f"{value * scale:.1f}" if percent else f"{value:.3f}"
    if ci is not None:
        text += f" [{ci[0] * scale:.0f}–{ci[1] * scale:.0f}]" if percent else \
            f" [{ci[0]:.3f}–{ci[1]:.3f}]"
    return {"text": text, "sort": f"{value:.6f}"}


def _columns() -> list[Any]:
    return [m for m in metrics() if m.in_tables]


def _run_row(r: RunEntry, split: str) -> dict[str, Any]:
    rec = r.record
    val = r.score("val")
    return {
        "name": r.name, "kind": rec.kind, "head": rec.head or "(fine-tune)",
        "model": rec.model.name if rec.model else "", "chosen": r.chosen,
        "fit_on_val": r.fit_on_val,
        "setting": ", ".join(s for s in (
            "TTA" if rec.tta else "", f"shots {rec.shots}" if rec.shots else "",
            f"{rec.fusion} fusion of {len(rec.caches)} caches" if rec.caches else "",
            "pre-projection" if rec.extra.get("features") == "pre" else "",
            f"metadata {rec.params['metadata']}" if rec.params.get("metadata") else "")
            if s),
        "val": _cell(val, None, True) | ({"text": f"{val * 100:.1f} (fit)", "sort": ""}
                                         if r.fit_on_val and val is not None else {}),
        "cells": [_cell(r.score(split, m.name), r.ci(split, m.name), m.fmt == "percent")
                  for m in _columns()],
        "n": r.metrics.get(split, {}).get("n_samples"),
    }


def _per_class(r: RunEntry, split: str) -> list[dict[str, Any]]:
    per = r.metrics.get(split, {}).get("per_class", {})
    return [{"cls": c, **{k: v.get(k) for k in ("precision", "recall", "f1", "support",
                                                 "predicted")}}
            for c, v in per.items() if isinstance(v, dict)]


def _run_detail(r: RunEntry, split: str) -> dict[str, Any]:
    cv = None
    if r.cv:
        cv = {"protocol": r.cv.get("protocol", ""), "k": r.cv.get("k"),
              "rows": [{"metric": get_metric(m).label, "mean": v, "ci": r.cv.get("ci95", {}).get(m)}
                       for m, v in (r.cv.get("mean") or {}).items()
                       if v is not None and m in {x.name for x in metrics()}],
              "plot": png_uri(r.cv_plot) if r.cv_plot else None}
    return {"name": r.name, "params": r.record.params, "cache": r.record.cache,
            "fit_seconds": r.record.extra.get("fit_seconds"),
            "plots": [(c, png_uri(p)) for c, p in r.plots],
            "per_class": _per_class(r, split), "cv": cv}


def _encoders(b) -> dict[str, Any]:
    """A `bench-encoders` folder: rows = encoders, columns = heads, each cell the primary
    metric with its CI (the published encoder table's shape)."""
    res = b.results
    heads = [h for h in res.get("heads", []) if isinstance(h, str)]
    rows = []
    for row in res.get("rows", []):
        if not isinstance(row, dict):
            continue
        cells = []
        for h in heads:
            cell = row.get(h)
            if not isinstance(cell, dict):
                cells.append({"text": "–", "sort": ""})
                continue
            ci = (cell.get("ci") or {}).get(PRIMARY)
            cells.append(_cell(cell.get(PRIMARY), tuple(ci) if isinstance(ci, list) else None,
                               True))
        rows.append({"encoder": row.get("encoder"), "dim": row.get("embed_dim"),
                     "cells": cells})
    return {"path": str(b.path), "protocol": res.get("protocol", ""), "heads": heads,
            "rows": rows, "plots": [(p.name, png_uri(p)) for p in b.plots]}


def _bench(b) -> dict[str, Any]:
    res = b.results
    rows = res.get("rows") or []
    shown = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        shown.append({
            "variant": row.get("variant"), "shots": row.get("shots"),
            "n_seeds": row.get("n_seeds"), "chosen": bool(row.get("chosen_by_val")),
            "fit_on_val": bool(row.get("trains_on_val")),
            "val": _cell(row.get(f"val_{PRIMARY}_mean"), None, True),
            "cells": [_cell(row.get(f"{m.name}_mean"), None, m.fmt == "percent")
                      for m in _columns()]})
    return {"path": str(b.path), "split": res.get("split", ""), "title": res.get("title", ""),
            "rows": shown, "plots": [(p.name, png_uri(p)) for p in b.plots]}


def _compare(c) -> dict[str, Any]:
    res = c.result
    out = []
    for comp in res.get("comparisons", []):
        for m, v in (comp.get("metrics") or {}).items():
            if not isinstance(v, dict) or v.get("difference") is None:
                continue
            ci = v.get("ci")
            out.append({"pair": f"{comp.get('b')} − {comp.get('a')}", "metric": m,
                        "diff": v["difference"], "ci": ci if isinstance(ci, list) else None,
                        "n": comp.get("n_shared"),
                        "p": (comp.get("mcnemar") or {}).get("p_value")})
    return {"path": str(c.path), "rows": out, "plot": png_uri(c.plot) if c.plot else None}


def _audit(a) -> dict[str, Any]:
    res = a.result
    return {"path": str(a.path), "name": res.get("name"), "leak_free": res.get("leak_free"),
            "n_images": res.get("n_images"), "n_groups": res.get("n_groups"),
            "cross_split_groups": len(res.get("cross_split_groups") or []),
            "cross_split_duplicates": len(res.get("cross_split_duplicates") or []),
            "hashed": res.get("hashed")}


def render_page(study: Study, gallery: Gallery | None, split: str, inputs: list[str]) -> str:
    """The HTML text of the report."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    template = env.get_template("report.html.j2")
    return template.render(
        generated=now_iso(), version=__version__, inputs=inputs, split=split,
        primary=get_metric(PRIMARY).label,
        columns=[m.short for m in _columns()],
        caches=study.caches, audits=[_audit(a) for a in study.audits],
        runs=[_run_row(r, split) for r in study.runs],
        details=[_run_detail(r, split) for r in study.runs],
        benches=[_bench(b) for b in study.benches if b.results.get("kind") != ENCODERS],
        encoders=[_encoders(b) for b in study.benches if b.results.get("kind") == ENCODERS],
        compares=[_compare(c) for c in study.compares],
        gallery=gallery, notes=study.notes,
    )

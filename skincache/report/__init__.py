"""`skincache report`: one static HTML page to read a study and send to a co-author.

Inside, bottom to top: `_collect` (run folders, bench folders, compare and audit results read
into typed entries, val's pick marked, cache headers), `_gallery` (the test images val's pick
got wrong beside their nearest training cases, as thumbnails), `_page` (jinja2 rendering of
`report.html.j2`). The page has everything inlined: it opens from disk with no server and no
network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skincache._disk import disk_error
from skincache._io import atomic_write_text
from skincache._progress import progress_bar
from skincache.errors import UsageError
from skincache.report._collect import Study, collect
from skincache.report._gallery import Gallery, build_gallery
from skincache.report._page import render_page

#: misclassified images shown by default (`--gallery N`); each brings 3 neighbour thumbnails
DEFAULT_GALLERY = 48


@dataclass
class ReportSummary:
    """What was written: the page, how many of each input it shows, the gallery's cap."""

    path: Path
    n_runs: int
    n_benches: int
    n_compares: int
    gallery_run: str | None
    gallery_shown: int
    gallery_wrong: int
    bytes: int


def _gallery_run(study: Study, split: str):
    """The run whose mistakes the gallery shows: val's pick, else the first run with
    predictions for `split` (said in the page)."""
    # the gallery needs a cache (thumbnails, neighbours): a fine-tuning run has none
    with_preds = [r for r in study.runs if (r.path / "predictions" / f"{split}.csv").is_file()
                  and r.record.cache]
    picks = [r for r in with_preds if r.chosen]
    if picks:
        return max(picks, key=lambda r: r.score("val") or 0.0)
    if with_preds:
        study.notes.append(f"no head run with a cache is val's pick: the gallery shows "
                           f"{with_preds[0].name}")
        return with_preds[0]
    return None


def build_report(inputs: list[str | Path], out: str | Path, *, gallery: int = DEFAULT_GALLERY,
                 split: str = "test", progress: bool = True) -> ReportSummary:
    """Read every input (run folders, a runs/ folder, bench folders, compare/audit JSONs),
    render the page and write it to `out` atomically."""
    if gallery < 0:
        raise UsageError(f"--gallery {gallery}: give 0 (no gallery) or more images")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name such as report.html")
    study = collect(inputs)
    run = _gallery_run(study, split) if gallery else None
    g: Gallery | None = None
    if run is not None:
        with progress_bar(gallery, "report gallery", enabled=progress) as advance:
            g = build_gallery(run, split, gallery, advance)
    html = render_page(study, g, split, [str(i) for i in inputs])
    try:
        atomic_write_text(out, html)
    except OSError as e:
        de = disk_error(e, out, "writing the report")
        if de is None:
            raise UsageError(f"--out {out}: cannot be written ({e.strerror or e})") from None
        raise de from None
    return ReportSummary(out, len(study.runs), len(study.benches), len(study.compares),
                         g.run if g else None, len(g.misses) if g else 0,
                         g.n_wrong if g else 0, len(html.encode()))


__all__ = ["DEFAULT_GALLERY", "ReportSummary", "build_report", "collect"]

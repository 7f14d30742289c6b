"""`skincache report`: one HTML page from run folders, bench folders and compare results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skincache.cli._common import Quiet


def report(
    inputs: Annotated[list[Path], typer.Argument(
        help="Run folders, a folder of runs (runs/), bench-heads folders, and compare/audit "
             "JSON files.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")
                   ] = Path("report.html"),
    gallery: Annotated[int, typer.Option(
        help="Misclassified images shown (most confident first), each beside its 3 nearest "
             "training cases; 0: no gallery.")] = 48,
    split: Annotated[str, typer.Option(help="The split the scores and the gallery are of.")
                     ] = "test",
    quiet: Quiet = False,
) -> None:
    """Write one self-contained HTML report (opens from disk, no network): data and model,
    a sortable table of runs with CIs and val's pick marked, per-class scores, confusion
    matrices, calibration, CV and bench results, paired comparisons, and the images val's
    pick got wrong beside their nearest training cases."""
    from skincache.report import build_report

    s = build_report(inputs, out, gallery=gallery, split=split, progress=not quiet)
    parts = [f"{s.n_runs} runs"] + ([f"{s.n_benches} bench folders"] if s.n_benches else []) \
        + ([f"{s.n_compares} comparisons"] if s.n_compares else [])
    typer.echo(f"report: {s.path} ({s.bytes / 1e6:.1f} MB; {', '.join(parts)})")
    if s.gallery_run:
        capped = f", the {s.gallery_shown} most confident shown (--gallery N for more)" \
            if s.gallery_shown < s.gallery_wrong else ""
        typer.echo(f"gallery: {s.gallery_wrong} misclassified {split} images of "
                   f"{s.gallery_run}{capped}")

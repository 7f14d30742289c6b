"""`skincache report`: the page holds what the run folders say (val's pick, scores, the gallery
of mistakes with neighbours), is self-contained (no network reference, every image a decodable
data: URI), refuses bad inputs in one line, and renders in a real headless Chromium without a
broken image or a script error (skipped with the reason where no Chromium is installed)."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from skincache.cli import app
from skincache.report import build_report

runner = CliRunner()
HEADS = ["logreg", "knn", "clip-benchmark-lp", "zeroshot"]


@pytest.fixture(scope="module")
def runs_dir(demo_cache, tmp_path_factory) -> Path:
    from skincache.runs import fit_heads

    runs = tmp_path_factory.mktemp("report") / "runs"
    fit_heads(demo_cache, HEADS, runs_dir=runs, n_bootstrap=50)
    return runs


@pytest.fixture(scope="module")
def page(runs_dir) -> tuple[Path, str]:
    out = runs_dir.parent / "report.html"
    build_report([runs_dir], out, progress=False)
    return out, out.read_text()


def _val_scores(runs_dir: Path) -> dict[str, float]:
    return {p.name: json.loads((p / "metrics" / "val.json").read_text())["balanced_accuracy"]
            for p in runs_dir.iterdir()}


def test_every_run_is_a_row_and_vals_pick_is_the_best_val_run_that_kept_val_out(runs_dir, page):
    _, html = page
    scores = _val_scores(runs_dir)
    for name in scores:
        assert f"<td>{name}" in html
    rows = [r.strip() for r in re.findall(r'<tr class="chosen"><td>([^<]+)', html)]
    # clip-benchmark-lp trains on val: its val score is a training score, never a pick
    eligible = {n: s for n, s in scores.items() if not n.startswith("clip-benchmark-lp")}
    assert rows == [max(eligible, key=eligible.get)]
    assert "(fit)" in html
    assert html.count("val's pick</span>") == 1


def test_test_scores_and_intervals_are_the_metrics_files(runs_dir, page):
    _, html = page
    for p in runs_dir.iterdir():
        m = json.loads((p / "metrics" / "test.json").read_text())
        lo, hi = m["ci"]["balanced_accuracy"]
        cell = f"{m['balanced_accuracy'] * 100:.1f} [{lo * 100:.0f}–{hi * 100:.0f}]"
        assert cell in html, (p.name, cell)


def test_the_gallery_shows_the_picks_mistakes_with_three_neighbours(runs_dir, page):
    _, html = page
    pick = re.findall(r'<tr class="chosen"><td>([^<]+)', html)[0].strip()
    with open(runs_dir / pick / "predictions" / "test.csv") as fh:
        rows = list(csv.DictReader(fh))
    wrong = [r for r in rows if r["true"] != r["predicted"]]
    assert f"{len(wrong)} of {len(rows)} test images" in html
    section = html.split('id="gallery"')[1] if wrong else ""
    for r in wrong:
        assert r["image_id"] in section
    assert section.count('class="miss"') == len(wrong)
    assert section.count("sim ") == 3 * len(wrong)


def test_the_gallery_is_capped_and_says_so(runs_dir, tmp_path):
    s = build_report([runs_dir / name for name in sorted(p.name for p in runs_dir.iterdir())
                      if name.startswith("zeroshot")], tmp_path / "r.html", gallery=1,
                     progress=False)
    html = (tmp_path / "r.html").read_text()
    assert s.gallery_wrong > 1 and s.gallery_shown == 1  # random zero-shot: many mistakes
    assert html.count('class="miss"') == 1 and "most confident mistakes" in html


def test_the_page_is_self_contained(page):
    _, html = page
    assert not re.search(r'(src|href)="(https?:)?//', html), "a network reference"
    uris = re.findall(r'src="data:image/(png|jpeg);base64,([^"]+)"', html)
    assert len(uris) >= 3 * len(HEADS)  # plots of every run, thumbnails
    for _, data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
            assert im.width > 8 and im.height > 8


def test_bad_inputs_are_one_line(tmp_path, runs_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "x.json").write_text('{"a": 1}')
    for args, words in (([str(tmp_path / "nope")], "no such file"),
                        ([str(empty)], "no run folders"),
                        ([str(tmp_path / "x.json")], "not a run folder"),
                        ([str(runs_dir), "--out", str(tmp_path)], "is a folder"),
                        ([str(runs_dir), "--gallery", "-1"], "--gallery -1")):
        r = runner.invoke(app, ["report", *args])
        assert r.exit_code != 0, args
        out = r.output.strip()
        assert words in out and len(out.splitlines()) == 1, (args, out)


def test_a_run_whose_cache_is_gone_still_reports_its_scores(runs_dir, tmp_path):
    """The scores live in the run folder: a moved cache is a note, not an error."""
    run = tmp_path / "moved"
    src = next(p for p in runs_dir.iterdir() if p.name.startswith("knn"))
    shutil.copytree(src, run)
    rec = json.loads((run / "run.json").read_text())
    rec["cache"] = str(tmp_path / "gone.h5")
    (run / "run.json").write_text(json.dumps(rec))
    build_report([run], tmp_path / "r.html", progress=False)
    html = (tmp_path / "r.html").read_text()
    assert "no such cache file" in html and "<td>moved" in html


# ----------------------------------------------------------------------- a real browser

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium installed (.ci/run installs Debian's `chromium`; "
                "`apt-get install chromium`)")


def _browser(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_the_page_renders_in_chromium_without_broken_images_or_errors(page, tmp_path):
    out, _ = page
    r = _browser("--virtual-time-budget=5000", "--dump-dom", out.as_uri())
    body = re.search(r"<body[^>]*>", r.stdout)
    assert body, r.stderr[-2000:]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(0)))
    assert attrs.get("broken") == "0" and attrs.get("errors") == "0", attrs
    assert int(attrs["images"]) >= 3 * len(HEADS)
    assert "Uncaught" not in r.stderr, r.stderr[-2000:]

    shot = tmp_path / "shot.png"
    _browser("--window-size=1280,1600", f"--screenshot={shot}", out.as_uri())
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=float)
    assert a.shape == (1600, 1280)
    assert a.std() > 10 and (a < 128).mean() > 0.005, "a blank screenshot"


def test_sorting_a_column_in_chromium_reorders_the_rows(page, tmp_path):
    """Click 'test bal. acc' in the page, inside a harness frame; read the order back."""
    out, _ = page
    harness = out.parent / "harness.html"
    harness.write_text(f"""<!DOCTYPE html><body><pre id="o">waiting</pre>
<iframe id="f" src="{out.name}" width="1200" height="800"></iframe><script>
document.getElementById("f").onload = function () {{
  var d = this.contentDocument, t = d.getElementById("runs-table");
  var th = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent.includes("test bal"));
  function col() {{ return Array.from(t.tBodies[0].rows).map(r => r.cells[th]
                      .getAttribute("data-sort")).join(","); }}
  t.tHead.rows[0].cells[th].click(); var up = col();
  t.tHead.rows[0].cells[th].click(); var down = col();
  document.getElementById("o").textContent = "UP=" + up + ";DOWN=" + down;
}};</script></body>""")
    r = _browser("--virtual-time-budget=5000", "--dump-dom", harness.as_uri())
    m = re.search(r"UP=([^;]*);DOWN=([^<]*)", r.stdout)
    assert m, r.stdout[-1500:]
    up = [float(v) for v in m.group(1).split(",")]
    down = [float(v) for v in m.group(2).split(",")]
    assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == len(HEADS)


def test_an_encoder_table_is_rows_of_encoders_and_columns_of_heads(tmp_path):
    """A bench-encoders folder shows in the published table's shape, its cells the results'."""
    from conftest import synthetic_cache

    from skincache.study.encoders import bench_encoders

    caches = [synthetic_cache(tmp_path / f"{n}.h5", d=d, seed=3) for n, d in (("a", 16), ("b", 8))]
    out = tmp_path / "enc"
    bench_encoders(caches, heads=["logreg"], n_bootstrap=50, out_dir=out)
    build_report([out], tmp_path / "r.html", progress=False)
    html = (tmp_path / "r.html").read_text()
    table = html.split('id="encoders-1"')[1].split("</table>")[0]
    res = json.loads((out / "results.json").read_text())
    assert [r["encoder"] for r in res["rows"]] == re.findall(r"<tr><td>([^<]+)</td>", table)
    for r in res["rows"]:
        assert f'{r["logreg"]["balanced_accuracy"] * 100:.1f} [' in table
    assert "encoders.png" in html.split('id="encoders-1"')[1]


def test_fused_runs_report_with_one_pick_per_set_of_val_images(tmp_path):
    """A late-fusion run (a head per cache, no head.json) reads; runs scored on the same val
    images, single or fused, compete for one pick; the setting column says which is fused."""
    from conftest import synthetic_cache

    from skincache.runs import fit_head_run

    a, b = (synthetic_cache(tmp_path / f"{n}.h5", d=d, seed=3) for n, d in (("a", 16), ("b", 8)))
    runs = tmp_path / "runs"
    fit_head_run(a, "logreg", runs_dir=runs, name="single", n_bootstrap=20, plots=False)
    fit_head_run([a, b], "logreg", runs_dir=runs, name="late", fusion="late", n_bootstrap=20,
                 plots=False)
    build_report([runs], tmp_path / "r.html", progress=False)
    html = (tmp_path / "r.html").read_text()
    assert html.count("val's pick</span>") == 1
    row = re.search(r"<tr[^>]*><td>late[ <].*?</tr>", html, flags=re.S).group(0)
    assert "late fusion of 2 caches" in row
    assert str(b) in html  # the fused run's second cache is in "Data and model"


def test_a_run_written_before_trains_on_val_was_recorded_reads_it_from_its_head(runs_dir,
                                                                                tmp_path):
    """Old run.json files lack `trains_on_val`: the saved head still says "(fit)"."""
    src = next(p for p in runs_dir.iterdir() if p.name.startswith("clip-benchmark-lp"))
    run = tmp_path / src.name
    shutil.copytree(src, run)
    rec = json.loads((run / "run.json").read_text())
    assert rec.pop("trains_on_val") is True  # what fit-head records now
    (run / "run.json").write_text(json.dumps(rec))
    build_report([run], tmp_path / "r.html", gallery=0, progress=False)
    html = (tmp_path / "r.html").read_text()
    assert "(fit)" in html and "val's pick</span>" not in html

"""Commands that study heads and runs: bench-heads (and --cv), bench-encoders, score, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file, set_interrupt_hint
from skincache._sanity import cache_attrs, random_init_warning
from skincache.cli._common import (
    CacheDir,
    Limit,
    Quiet,
    RunSplit,
    SplitFileOption,
    check_caches,
    check_cv,
    check_min,
    ratios,
    setting,
    warn,
    warn_no_views,
)
from skincache.defaults import CACHE_DIR, SPLIT_RATIOS_TEXT
from skincache.errors import UsageError


def bench_heads_cmd(
    cache: Annotated[list[Path], typer.Option(help="A cache file (.h5); repeat it to fuse "
                                                   "caches of the same images.")],
    seeds: Annotated[int, typer.Option(help="Seeds per seeded head (and per few-shot draw).")
                     ] = 5,
    variants: Annotated[str | None, typer.Option(help="Comma-separated subset of variants."
                                                 )] = None,
    split: Annotated[str | None, typer.Option(help="Split to score on (default: test, else "
                                                   "val).")] = None,
    templates: Annotated[str, typer.Option(help="Text template set, or 'all'.")] = "all",
    shots: Annotated[str | None, typer.Option(help="Few-shot protocol: comma-separated K "
                                                   "(images per class), e.g. 1,2,4,8,16.")
                     ] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Also score every fit with test-time "
                                                    "augmentation (rows <variant>+tta).")
                   ] = False,
    out_dir: Annotated[Path | None, typer.Option(help="Output folder (default: "
                                                      "runs/bench-<time>).")] = None,
    cv: Annotated[int | None, typer.Option("--cv", help="K-fold lesion-grouped "
                                           "cross-validation over train+val instead: every "
                                           "variant x K folds (+ a refit scored on test), "
                                           "mean ± 95% CI over folds.")] = None,
    fusion: Annotated[str | None, typer.Option(help="With several --cache: 'early' (joined "
                                               "features; default) or 'late' (a head per "
                                               "cache, weights on val).")] = None,
    quiet: Quiet = False,
) -> None:
    """Every head variant x seeds on one cache: val beside test, mean ± std, fit time.

    Rerun with the same --out-dir to resume: finished runs (runs/*.json of the same cache and
    options) are kept, the rest are fitted, and the tables are written again from all of them."""
    from skincache._options import check_templates

    chosen = variants.split(",") if variants else None
    check_caches(cache, fusion, cv)
    fused = {"fusion": fusion or "early"} if len(cache) > 1 else {}
    caches, cache = cache, cache[0]
    check_min("--seeds", seeds, 1)
    ks = [int(k) for k in shots.split(",")] if shots else None
    if ks and min(ks) < 1:
        raise UsageError(f"--shots must be positive integers, got {shots}")
    check_templates(templates)
    from skincache.bench import bench_heads, check_out_dir, check_variants

    check_variants(chosen)  # before any bar is drawn (and before torch loads)
    check_cv(cv, ks, tta)
    out_dir = check_out_dir(out_dir)
    if cv:
        return _bench_cv(cache, cv, chosen, templates, out_dir, quiet)
    set_interrupt_hint(f"the finished runs are kept in {out_dir}/runs; resume with: "
                       + _bench_command(caches, seeds, variants, split, templates, shots,
                                        tta, out_dir, quiet, fusion))
    res = bench_heads(caches if len(caches) > 1 else cache, seeds=seeds, variants=chosen,
                      eval_split=split, template_set=templates, out_dir=out_dir,
                      progress=not quiet, shots=ks, tta=tta, **fused)
    set_interrupt_hint("")
    warn_no_views(tta, res.n_views)
    names = " + ".join(c.name for c in caches)
    _render.bench_table(res.rows, f"heads on {names}: chosen on val, scored on "
                                  f"{res.runs[0]['split']}"
                                  f"{setting(tta and res.n_views > 0, ks)}")
    extra = f", few-shot plot {res.out_dir}/shots.png" if ks else ""
    kept = f" ({res.reused} fit(s) kept from the earlier run)" if res.reused else ""
    _render.out.print(f"results: {res.out_dir}/results.{{json,csv,md}}, one JSON per run in "
                      f"{res.out_dir}/runs/{extra}{kept}", highlight=False, soft_wrap=True)
    warn(random_init_warning(cache_attrs(cache)))


def _bench_cv(cache: Path, k: int, chosen: list[str] | None, templates: str, out_dir: Path,
              quiet: bool) -> None:
    """bench-heads --cv: every variant x K folds (and the refit) into out_dir, then the
    table of mean ± CI over folds. A rerun into the same --out-dir keeps the finished fits."""
    from skincache._progress import progress_bar
    from skincache.render_study import cv_bench_table
    from skincache.study.cv import bench_cv, n_cv_fits

    set_interrupt_hint(f"the finished fold runs are kept in {out_dir}/runs; rerun the same "
                       f"command with --out-dir {out_dir} to resume")
    with progress_bar(n_cv_fits(k, chosen), "cross-validate heads", unit="fit",
                      enabled=not quiet) as advance:
        res = bench_cv(cache, k=k, variants=chosen, template_set=templates, out_dir=out_dir,
                       progress=advance)
    set_interrupt_hint("")
    cv_bench_table(res.rows, f"heads on {cache.name}: {k}-fold lesion-grouped CV over "
                             "train+val (refit scored on test)")
    kept = f" ({res.reused} fit(s) kept from the earlier run)" if res.reused else ""
    _render.out.print(f"results: {res.out_dir}/cv_results.json, one JSON per fold run in "
                      f"{res.out_dir}/runs/{kept}", highlight=False, soft_wrap=True)


def _bench_command(caches: list[Path], seeds: int, variants: str | None, split: str | None,
                   templates: str, shots: str | None, tta: bool, out_dir: Path,
                   quiet: bool, fusion: str | None = None) -> str:
    """The bench-heads command line that resumes this one (its options, and --out-dir)."""
    import shlex

    args = ["skincache", "bench-heads"]
    for c in caches:
        args += ["--cache", str(c)]
    args += ["--seeds", str(seeds)]
    for option, value in (("--variants", variants), ("--split", split), ("--fusion", fusion),
                          ("--templates", templates if templates != "all" else None),
                          ("--shots", shots)):
        if value is not None:
            args += [option, value]
    args += ["--tta"] * tta + ["--out-dir", str(out_dir)] + ["--quiet"] * quiet
    return shlex.join(args)



def score(
    files: Annotated[list[Path], typer.Argument(help="Predictions CSV files (a run folder's "
                                                     "predictions/<split>.csv, DermFM-Zero's, "
                                                     "or any CSV with the column options) or "
                                                     "run folders.")],
    split: RunSplit = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the reports here.")
                        ] = None,
    plots: Annotated[Path | None, typer.Option(help="Write the run folder's plots here "
                                                    "(<file stem>_*.png).")] = None,
    true: Annotated[str | None, typer.Option("--true", help="Column of the true label.")
                    ] = None,
    pred: Annotated[str | None, typer.Option("--pred", help="Column of the predicted label.")
                    ] = None,
    proba: Annotated[str | None, typer.Option("--proba", help="Prefix of the probability "
                                                              "columns (p_ -> p_akiec, ...).")
                     ] = None,
    id_col: Annotated[str | None, typer.Option("--id", help="Column of the image id.")] = None,
    classes: Annotated[str | None, typer.Option(help="Class names in index order, for "
                                                     "integer labels: akiec,bcc,...")] = None,
    renormalize: Annotated[bool, typer.Option(help="Divide probability rows that do not sum "
                                                   "to 1 by their sum (else refused).")
                           ] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Metrics, 95% CIs and plots of any predictions file, computed as for a run folder."""
    from skincache.study import ColumnMap, score_files

    names = None if classes is None else tuple(c.strip() for c in classes.split(","))
    if names is not None and (len(names) < 2 or not all(names)):
        raise UsageError(f"--classes {classes!r}: give two or more names, comma-separated")
    reports = score_files(files, ColumnMap(id_col, true, pred, proba, names),
                          renormalize=renormalize, n_bootstrap=bootstrap, seed=seed,
                          plots_dir=plots, json_path=json_out, split=split)
    from skincache import render_study

    render_study.score_table(reports)


def compare(
    inputs: Annotated[list[Path], typer.Argument(help="Two or more run folders or predictions "
                                                      "files; each is compared to the first.")],
    split: RunSplit = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")
                        ] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the differences with their CIs here "
                                                   "(PNG).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Paired comparison on the shared images: differences with 95% CIs, McNemar's test."""
    check_min("--bootstrap", bootstrap, 1)
    from skincache.study import compare_inputs

    result = compare_inputs(inputs, split=split, n_bootstrap=bootstrap, seed=seed,
                            plot=plot, json_path=json_out)
    from skincache import render_study

    render_study.compare_table(result)




def bench_encoders_cmd(
    cache: Annotated[list[Path] | None, typer.Option(help="A cache of the dataset per encoder "
                                                          "(repeat: --cache A.h5 --cache B.h5)."
                                                     )] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated models to encode --data "
                                                    "with first (an existing cache is found, "
                                                    "not rebuilt).")] = None,
    data: Annotated[str | None, typer.Option(help="The dataset --models encodes (any source "
                                                  "`skincache encode --data` reads).")] = None,
    heads: Annotated[str | None, typer.Option(help="Comma-separated head variants (columns; "
                                                   "default: logreg,dermfm-lp,zeroshot; "
                                                   "text heads only on caches with text).")
                     ] = None,
    cv: Annotated[int | None, typer.Option("--cv", help="K-fold lesion-grouped CV over "
                                           "train+val instead of the test split (mean ± 95% t "
                                           "CI over folds).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of seeded heads and of the bootstrap.")] = 0,
    templates: Annotated[str, typer.Option(help="Text template set, or 'all'.")] = "all",
    features: Annotated[str, typer.Option(help="projected (the image towers' output) or pre "
                                               "(before the final projection: caches "
                                               "encoded with --pre-projection).")
                        ] = "projected",
    out_dir: Annotated[Path | None, typer.Option(help="Output folder (default: "
                                                      "runs/bench-<time>).")] = None,
    views: Annotated[int, typer.Option(help="--models: augmented views per image.")] = 4,
    device: Annotated[str, typer.Option(help="--models: cpu, cuda, mps or auto.")] = "auto",
    split_ratios: Annotated[str, typer.Option(help="--models: train,val[,test] shares.")
                            ] = SPLIT_RATIOS_TEXT,
    split_seed: Annotated[int, typer.Option(help="--models: seed of the lesion-grouped split.")
                          ] = 0,
    split_file: SplitFileOption = None,
    cache_dir: CacheDir = Path(CACHE_DIR),
    limit: Limit = None,
    quiet: Quiet = False,
) -> None:
    """Which encoder suits this data: the same heads on each encoder's cache, one table
    (rows = encoders, columns = heads, value (95% CI)), a plot, results.json and results.md.

    The caches must hold the same images, labels and splits (the first mismatch is refused).
    Rerun with the same --out-dir to resume: finished runs are kept."""
    from skincache._options import check_device, check_model, check_templates

    check_min("--cv", cv, 2)
    check_min("--bootstrap", bootstrap, 0)
    check_templates(templates)
    from skincache._head_params import FIT_OPTIONS
    from skincache._options import check_choice

    check_choice("--features", features, FIT_OPTIONS["features"])
    for c in cache or []:
        check_file("--cache", c)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else []
    if names:
        check_device(device)
        for m in names:  # the check `encode --model` makes, before any encode starts
            check_model(m)
    from skincache.bench import check_out_dir
    from skincache.study.encoders import bench_encoders, check_heads

    chosen = heads.split(",") if heads else None
    check_heads(chosen)
    out_dir = check_out_dir(out_dir)
    encode_options = {"views": views, "device": device, "split_ratios": ratios(split_ratios),
                      "split_seed": split_seed, "split_file": split_file,
                      "cache_dir": cache_dir, "limit": limit, "progress": not quiet,
                      "on_split": _render.split_origin, "pre_projection": features == "pre"}
    set_interrupt_hint(f"the finished runs are kept in {out_dir}/runs (and encodes resume "
                       f"from their last chunk); rerun the same command with --out-dir "
                       f"{out_dir} to resume")
    res = bench_encoders(list(cache or []), models=names, data=data,
                         encode_options=encode_options, heads=chosen, cv=cv, seed=seed,
                         n_bootstrap=bootstrap, template_set=templates, features=features,
                         out_dir=out_dir, progress=not quiet)
    set_interrupt_hint("")
    from skincache.render_study import encoders_table

    encoders_table(res)
    kept = f" ({res.reused} run(s) kept from the earlier bench)" if res.reused else ""
    _render.out.print(f"results: {res.out_dir}/results.{{json,md}}, plot {res.out_dir}/"
                      f"encoders.png, one JSON per run in {res.out_dir}/runs/{kept}",
                      highlight=False, soft_wrap=True)
    for e in res.encoders:
        warn(random_init_warning(cache_attrs(Path(e["cache"])), f"the {e['encoder']} row"))

"""Commands about heads on a cache: fit-head, heads, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file, set_interrupt_hint
from skincache._sanity import one_class_warning, random_init_warning, run_cache_attrs
from skincache.cli._common import (
    Quiet,
    RunsDir,
    check_caches,
    check_cv,
    check_min,
    check_out_file,
    check_run,
    params,
    setting,
    warn,
    warn_meaningless,
    warn_no_views,
    write_out,
)
from skincache.defaults import RUNS_DIR
from skincache.errors import UsageError


def fit_head(
    cache: Annotated[list[Path], typer.Option(help="A cache file (.h5); repeat it to fuse "
                                                   "caches of the same images (several "
                                                   "encoders).")],
    head: Annotated[str, typer.Option(help="Head name, or 'all' (`skincache heads` lists them)."
                                      )] = "mlp",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Head parameter "
                                                    "key=value (repeatable; `skincache heads "
                                                    "NAME` lists them).")] = None,
    templates: Annotated[str, typer.Option(help="Text template set for text heads, or 'all'."
                                           )] = "all",
    seed: Annotated[int, typer.Option(help="Seed for heads that take one (and --shots).")] = 0,
    shots: Annotated[int | None, typer.Option(help="Few-shot: K training images per class "
                                                   "(seeded); val stays whole.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average over the "
                                                    "clean and the cached views.")] = False,
    name: Annotated[str | None, typer.Option(help="Run name (default: head + timestamp)."
                                             )] = None,
    runs_dir: RunsDir = Path(RUNS_DIR),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    cv: Annotated[int | None, typer.Option("--cv", help="Also K-fold lesion-grouped "
                                           "cross-validation over train+val (selection redone "
                                           "in each fold; cv.json in the run folder).")] = None,
    fusion: Annotated[str | None, typer.Option(help="With several --cache: 'early' (features "
                                               "joined per image, one head; the default) or "
                                               "'late' (a head per cache, probabilities "
                                               "averaged with weights chosen on val).")
                      ] = None,
    quiet: Quiet = False,
) -> None:
    """Fit a head on the cache's train split in seconds; metrics, predictions and plots."""
    from skincache._head_params import parse_params, split_fit_options
    from skincache._options import check_templates
    from skincache.run_record import check_run_name

    fit_options, raw = split_fit_options(params(param or []))  # -p features=pre
    if name is not None:
        check_run_name(name)  # torch-free: `--name ../x` is refused in milliseconds
    check_caches(cache, fusion, cv)
    check_min("--shots", shots, 1)
    check_cv(cv, shots, tta)
    if cv and fit_options.get("features") == "pre":
        raise UsageError("--cv with -p features=pre is not built yet (the folds read the "
                         "projected features); fit without --cv, or on the projected features")
    check_templates(templates)
    if head == "all":
        if raw:
            raise UsageError("-p sets one head's parameters; give --head NAME with -p "
                             "(the fit option -p features=... goes with any head)")
        head_params = {}
    else:
        head_params = parse_params(head, raw)  # the head's name too, before torch loads
    set_interrupt_hint("nothing resumes: a run folder is finished once its run.json is "
                       "written; run the same command again to fit from the start")
    from skincache.runs import fit_from_cache

    fused = {"fusion": fusion or "early"} if len(cache) > 1 else {}
    fits = fit_from_cache(cache if len(cache) > 1 else cache[0], head, head_params, name=name,
                          progress=not quiet, runs_dir=runs_dir, template_set=templates,
                          seed=seed, n_bootstrap=bootstrap, plots=not no_plots, tta=tta,
                          shots=shots, **fit_options, **fused)
    set_interrupt_hint("")
    for note in fits.notes:
        _render.out.print(note, highlight=False)
    results, split = fits.results, fits.split
    warn_no_views(tta, fits.n_views)
    shown_setting = setting(tta and fits.n_views > 0, shots)
    if len(results) == 1:
        r = results[0]
        shown = {("val (fit)" if s == "val" and r.trains_on_val else s): m  # trained on val
                 for s, m in r.metrics.items()}
        _render.metrics_table(shown, f"{r.head}{shown_setting}: fit in {r.fit_seconds:.2f} s → "
                                     f"{r.path}")
        if split in r.metrics:
            _render.per_class_table(r.metrics[split], f"per class ({split})")
    else:
        _render.heads_table(results, split, picked=fits.picked, setting=shown_setting)
    warn(random_init_warning(fits.cache_attrs))
    for r in results:
        warn(one_class_warning(r.metrics, r.head))
    if cv:
        _fit_head_cv(cache[0], results, head_params, cv, templates, seed, bootstrap, not no_plots)


def _fit_head_cv(cache: Path, results: list, params: dict, k: int, templates: str, seed: int,
                 bootstrap: int, plots: bool) -> None:
    """fit-head --cv: cross-validate each fitted head, write cv.json into its run folder and
    print its table."""
    from skincache.render_study import cv_table
    from skincache.study.cv import CV_JSON, cross_validate_cache

    done = cross_validate_cache(cache, results, params, k=k, seed=seed, template_set=templates,
                                n_bootstrap=bootstrap, plots=plots)
    for r, res in zip(results, done, strict=True):
        cv_table(res, f" → {r.path / CV_JSON}")


def heads(
    filter: Annotated[str | None, typer.Argument(help="Only heads whose name contains this."
                                                 )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List every head with its parameters (type, default) and what it is."""
    from skincache.heads import describe_heads

    specs = describe_heads(filter)
    if as_json:
        typer.echo(json.dumps([{"name": h.name, "summary": h.summary,
                                "needs_text": h.needs_text,
                                "params": [{"name": p.name, "type": p.type,
                                            "default": p.default} for p in h.params]}
                               for h in specs], indent=2, default=str))
        return
    if not specs:
        raise UsageError(f"no head matches {filter!r}; `skincache heads` lists them all")
    _render.heads_list(specs)


def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head.")],
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    cache: Annotated[list[Path] | None, typer.Option(help="Cache to evaluate on (default: the "
                                                          "one the head was fit on; a fused "
                                                          "run: one per cache, in its order)."
                                                     )] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation "
                                             "(default: as the run was fit).")] = None,
) -> None:
    """Metrics and plots of a saved head on a split (refuses a different model's cache).

    On another cache (external validation) the results are stored as <dataset>__<split>;
    nothing the run wrote before is replaced, and run.json lists every evaluation."""
    check_run(run)
    for c in cache or []:
        check_file("--cache", c)
    from skincache.runs import evaluate

    given = None if not cache else cache[0] if len(cache) == 1 else cache
    ev = evaluate(run, split, cache=given, n_bootstrap=bootstrap, tta=tta)
    used_tta = bool(ev.report.get("posthoc", {}).get("tta"))
    if (tta if tta is not None else ev.fit_tta) and not used_tta:
        warn_no_views(True, 0)  # asked for (or fit with) TTA, scored without: no views
    _render.metrics_table({ev.name: ev.report},
                          f"{run} on {ev.name}{setting(used_tta, ev.shots)}")
    _render.per_class_table(ev.report, f"per class ({ev.name})")
    warn_meaningless(ev.cache_attrs, {ev.name: ev.report}, "the head",
                     "fit another head (skincache fit-head)")
    if ev.status in ("unchanged", "completed"):
        added = ("; the missing predictions or plots were added" if ev.status == "completed"
                 else "")
        _render.out.print(f"same numbers as the stored {run / 'metrics' / ev.name}.json; "
                          f"nothing rewritten{added} (run.json records this evaluation)")
    else:
        plots = f", plots/{ev.name}_*.png" if any(f.suffix == ".png" for f in ev.files) else ""
        _render.out.print(f"written under {run}: metrics/{ev.name}.json, "
                          f"predictions/{ev.name}.csv{plots}", highlight=False)


def predict(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head or finetune.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    neighbors: Annotated[int, typer.Option(help="Most similar training cases (shown with "
                                                "--verbose, written with --out).")] = 5,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes shown per image, most "
                                                       "probable first.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="A table per image: top "
                                          "classes and the most similar training cases.")
                       ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Also write results to .csv or .json.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Also write a saliency overlay PNG "
                                          "per image (Grad-CAM through the run's own head; "
                                          "ViT towers; head and finetune runs).")] = False,
    explain_dir: Annotated[Path | None, typer.Option(help="Folder for the --explain overlays "
                                                     "(default: <run>/explain).")] = None,
    explain_class: Annotated[str | None, typer.Option(help="Map the evidence for this class "
                                                      "(default: the predicted one).")] = None,
    metadata: Annotated[Path | None, typer.Option(help="For a run fit with -p metadata: a CSV "
                                                  "with image_id and the fields (as "
                                                  "HAM10000_metadata.csv).")] = None,
) -> None:
    """Class probabilities + the most similar training cases for new images: one line per
    image (top class and probability; --top-k for more), a table each with --verbose.
    --explain: a saliency overlay per image (the map says where the evidence lies)."""
    from skincache._options import check_device

    check_run(run)
    check_device(device)
    check_min("--top-k", top_k, 1)
    check_min("--neighbors", neighbors, 0)
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {out}: give a .csv or .json file name")
    check_out_file("--out", out)
    if explain_dir is not None and explain_dir.exists() and not explain_dir.is_dir():
        raise UsageError(f"--explain-dir {explain_dir}: is a file; give a folder")
    if not explain and (explain_dir is not None or explain_class is not None):
        raise UsageError("--explain-dir / --explain-class go with --explain")
    from skincache.explain import predict_run
    from skincache.predict import write_predictions

    if metadata is not None:
        check_file("--metadata", metadata)
    preds = predict_run(run, list(images), explain=explain, explain_dir=explain_dir,
                        target_class=explain_class, device=device, neighbors=neighbors,
                        progress=True, metadata=metadata)
    if verbose:
        _render.predictions(preds, top=max(top_k, 3))
    else:
        _render.prediction_lines(preds, top=top_k)
    for p in preds:
        if p.overlay:
            _render.out.print(f"overlay: {p.overlay}", highlight=False, markup=False)
    n_ok = sum(p.ok for p in preds)
    if len(preds) > 1:
        _render.out.print(f"{len(preds)} images: {n_ok} predicted, {len(preds) - n_ok} failed"
                          + (" (errors above)" if n_ok < len(preds) else ""))
    if n_ok:
        warn(random_init_warning(_run_attrs(run), "these predictions"))
    if out:
        write_out("--out", out, lambda p: write_predictions(preds, p))
        _render.out.print(f"written to {out}")
    if n_ok < len(preds):  # any image that failed is a failure of the call (said above)
        raise typer.Exit(1)




def _run_attrs(run: Path) -> dict:
    """What the random-weights warning reads: a head run's cache attributes, a finetune
    run's model (`predict --explain` takes both)."""
    record = json.loads((run / "run.json").read_text())
    if record.get("kind") == "finetune":
        m = record.get("model") or {}
        return {"model": m.get("name"), "pretrained": m.get("pretrained"),
                "checkpoint": m.get("checkpoint")}
    return run_cache_attrs(run)

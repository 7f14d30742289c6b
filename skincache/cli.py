"""The `skincache` command line: each command parses options, calls one library function and
renders the result. No logic lives here."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file, interrupt_hint, set_interrupt_hint
from skincache._sanity import cache_attrs, one_class_warning, random_init_warning
from skincache.data.sources import sources_help
from skincache.device import PRECISIONS
from skincache.errors import UsageError

app = typer.Typer(
    name="skincache",
    help="Skin-lesion classification with CLIP: encode once into an HDF5 feature cache, "
    "then train heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Folder for feature caches.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


_DEBUG = {"on": False}
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                errno.EPERM)


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full Python traceback of "
                                                        "an error instead of one line.")] = False,
) -> None:
    """Skin-lesion classification with CLIP: encode once into an HDF5 feature cache, then
    train heads in seconds."""
    _DEBUG["on"] = debug


@contextlib.contextmanager
def _clear_errors():
    """skincache's own errors (`SkincacheError`: a bad option, file or cache, said in one
    message) and a disk that is full, read-only or not ours become one red line and exit status
    1; anything else (a torch shape bug, CUDA out of memory) keeps its traceback, and
    `--debug` shows the traceback of ours too. Cache warnings (an old cache without
    checksums) become one yellow line each."""
    import warnings

    from skincache.cache import CacheWarning
    from skincache.errors import SkincacheError

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
            from rich.markup import escape

            _render.err.print(f"[bold yellow]warning:[/] {escape(str(message))}",
                              highlight=False)
        else:
            previous(message, category, filename, lineno, file, line)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except (SkincacheError, OSError) as e:
        if _DEBUG["on"]:
            raise
        if isinstance(e, SkincacheError):
            text = str(e)
        elif e.errno in _DISK_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            text = f"{e.strerror or e}{where}; nothing done so far is lost"
        else:
            raise
        from rich.markup import escape  # a message may hold "[...]": print it as is

        _render.err.print(f"[bold red]error:[/] {escape(text)}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


PRETRAINED_HELP = ("open_clip pretrained tag; default: openai where the model has it, none "
                   "for a model without tags such as skincache-tiny ('' = random init).")
SplitFileOption = Annotated[Path | None, typer.Option(
    "--split-file", help="A published split: a CSV with an image id and a split column, or a "
    "list of test ids (one per line, or a CSV's id/filename column); images it does not list "
    "are split train/val by --split-seed.")]
DropLesionMates = Annotated[bool, typer.Option(
    "--drop-lesion-mates", help="Leave out every train/val image of a lesion that has an image "
    "in test (a published split's leak-free version).")]
Limit = Annotated[int | None, typer.Option(help="Quick trial on about N images: a seeded, "
                                                "class-stratified, lesion-grouped subset.")]


#: The Ctrl-C hint of the commands that encode: their chunks are kept, the rerun resumes.
RESUMES = "run the same command again to resume"


def _check_min(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{option} {value}: must be >= {low}")


def _warn(message: str | None) -> None:
    """One yellow line on stderr (None: nothing to say)."""
    if message:
        _render.err.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def _warn_meaningless(attrs: dict, reports: dict[str, dict], who: str,
                      advice: str = "try another head or --param") -> None:
    """Warnings for numbers that mean nothing: random weights, one class for everything."""
    _warn(random_init_warning(attrs))
    _warn(one_class_warning(reports, who, advice))


def _check_run(run: Path) -> None:
    if not (run / "run.json").is_file():
        what = "no such folder" if not run.exists() else "no run.json there"
        raise UsageError(f"{run}: not a run folder ({what}); `skincache fit-head` writes "
                         "them under runs/")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@app.command()
def encode(
    data: Annotated[str, typer.Option(help=sources_help())],
    model: Annotated[str, typer.Option(help="open_clip architecture or hf-hub: id "
                                            "(`skincache models` lists them).")] = "ViT-B-32",
    pretrained: Annotated[str | None, typer.Option(help=PRETRAINED_HELP)] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights file (loaded with "
                                                         "weights_only=True).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on cuda, else fp32), fp32, bf16."
                                           )] = "auto",
    views: Annotated[int, typer.Option(help="Augmented views per image (K, 0 allowed).")] = 4,
    view_seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per model batch.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decode processes (CPU route); default: "
                                                     "one per core.")] = None,
    split_ratios: Annotated[str, typer.Option(help="train,val[,test] shares for sources without "
                                                   "a split (lesion-grouped).")] = "0.72,0.19,0.09",
    split_seed: Annotated[int, typer.Option(help="Seed of the lesion-grouped split.")] = 0,
    test_data: Annotated[str | None, typer.Option(help="A second source used whole as the "
                                                       "test split (e.g. the ISIC 2018 test "
                                                       "set); give two --split-ratios.")] = None,
    split_file: SplitFileOption = None,
    drop_lesion_mates: DropLesionMates = False,
    cache_dir: CacheDir = Path("cache"),
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache exists.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another run on the same cache instead of "
                                            "stopping.")] = False,
    follow_symlinks: Annotated[bool, typer.Option(
        help="Read images reached by a symlink out of the dataset folder (refused and "
             "recorded in /failed by default).")] = False,
    limit: Limit = None,
    quiet: Quiet = False,
) -> None:
    """Encode a dataset once: images + augmented views + class prompts -> cache/<name>.h5."""
    from skincache._options import check_choice, check_device, check_model
    from skincache.data import limit_dataset, load_dataset

    set_interrupt_hint(RESUMES)
    with _clear_errors():
        check_device(device)
        check_model(model)
        check_file("--checkpoint", checkpoint)
        check_choice("--precision", precision, PRECISIONS)
        _check_min("--views", views, 0)
        _check_min("--batch-size", batch_size, 1)
        ds = limit_dataset(load_dataset(data, split_ratios=_ratios(split_ratios),
                                        seed=split_seed, test=test_data, split_file=split_file,
                                        drop_lesion_mates=drop_lesion_mates), limit, split_seed)
        ds.validate()
        _render.split_origin(ds.split_origin)
        # torch and open_clip load from here on: every cheap check is done
        from skincache.encode import encode_dataset
        from skincache.models import ModelSpec, resolve_pretrained
        from skincache.views import ViewPolicy

        ckpt = str(checkpoint) if checkpoint else None
        spec = ModelSpec(model, resolve_pretrained(model, pretrained, ckpt), ckpt)
        result = encode_dataset(
            ds, spec, policy=ViewPolicy(k=views, seed=view_seed), cache_dir=cache_dir,
            device=device, precision=precision, batch_size=batch_size, num_workers=workers,
            force=force, wait=wait, progress=not quiet, follow_symlinks=follow_symlinks,
        )
    _render.encode_result(result)
    if result.status != "exists":
        _warn(random_init_warning({"model": spec.name, "pretrained": spec.pretrained,
                                   "checkpoint": spec.checkpoint}, "results from this cache"))


@app.command()
def demo(
    n_images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 280,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    views: Annotated[int, typer.Option(help="Augmented views per image.")] = 2,
    data_dir: Annotated[Path | None, typer.Option(help="Where the synthetic dataset goes "
                                                       "(default: <cache-dir>/demo-data).")] = None,
    cache_dir: CacheDir = Path("cache"),
    quiet: Quiet = False,
) -> None:
    """Offline demo: synthetic HAM10000-shaped data, encoded with the shipped tiny model."""
    from skincache.cache import FeatureCache
    from skincache.demo import run_demo

    set_interrupt_hint(RESUMES)  # the demo's encode resumes like any
    with _clear_errors():
        result = run_demo(cache_dir, n_images=n_images, seed=seed, views=views,
                          data_dir=data_dir, progress=not quiet)
        _render.encode_result(result)
        _render.cache_summary(FeatureCache.open(result.path).summary())
    _render.out.print(f"next: skincache fit-head --cache {result.path} --head mlp   "
                      f"(the synthetic images are in {result.path.parent / 'demo-data'})")


@app.command()
def models(
    filter_: Annotated[str, typer.Argument(metavar="[FILTER]", help="Keep architectures whose "
                                           "name or a tag contains this (any case).")] = "",
) -> None:
    """Model architectures open_clip can build here and their --pretrained tags."""
    from skincache.models import DEFAULT_PRETRAINED, TINY_MODEL, list_architectures

    rows = list_architectures(filter_)
    if not rows:
        _render.err.print(f"[bold red]error:[/] no architecture or tag contains {filter_!r}; "
                          "`skincache models` lists them all", highlight=False)
        raise typer.Exit(1)
    width = max(len(name) for name, _ in rows)
    for name, tags in rows:
        if name == TINY_MODEL:
            text = ("no tags: random init, shipped with skincache for the demo and quick "
                    "pipeline checks (runs offline)")
        elif not tags:
            text = "no tags: random init, or --checkpoint FILE"
        else:
            text = ", ".join(f"{t} (default)" if t == DEFAULT_PRETRAINED else t for t in tags)
        _render.out.print(f"{name:<{width}}  {text}", highlight=False)
    _render.out.print(f"{len(rows)} architecture(s). Encode with --model NAME --pretrained TAG; "
                      "hf-hub:org/repo ids (BiomedCLIP, DermLIP) bring their own weights and "
                      "are not listed.", highlight=False)


@app.command()
def info(
    cache: Annotated[Path, typer.Argument(help="A cache file (.h5).")],
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a cache: model, preprocessing, views, splits, class counts, failures."""
    from skincache.cache import FeatureCache

    with _clear_errors():
        fc = FeatureCache.open(cache)
        summary = fc.summary()  # verifies every dataset (lazy caches read on demand)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _render.cache_summary(summary)
    if failed and fc.failed:
        _render.failed_table(fc.failed)


@app.command()
def audit(
    data: Annotated[str | None, typer.Option(help="Dataset to audit (any source encode reads)."
                                             )] = None,
    cache: Annotated[Path | None, typer.Option(help="A cache: also look for near-duplicate "
                                                    "images across splits by feature.")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine similarity above which two images "
                                                  "count as near-duplicates.")] = 0.95,
    per_image: Annotated[int, typer.Option(help="Most similar images kept per image and "
                                                "split (bounds the report).")] = 5,
    split_ratios: Annotated[str, typer.Option(help="As for encode, for sources without a split."
                                              )] = "0.72,0.19,0.09",
    split_seed: Annotated[int, typer.Option(help="As for encode.")] = 0,
    test_data: Annotated[str | None, typer.Option(help="As for encode.")] = None,
    split_file: SplitFileOption = None,
    drop_lesion_mates: DropLesionMates = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the byte-identical image "
                                                            "check (reads every file).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as "
                                                                 "JSON here.")] = None,
    quiet: Quiet = False,
) -> None:
    """Split leakage report: lesions in several splits, identical and near-identical images."""
    from skincache._progress import progress_bar
    from skincache.cache import FeatureCache
    from skincache.data import audit_dataset, load_dataset

    if data is None and cache is None:
        _render.err.print("[bold red]error:[/] give --data (a dataset), --cache (a cache) or both")
        raise typer.Exit(1)
    if (split_file is not None or drop_lesion_mates) and data is None:
        flag = "--split-file" if split_file is not None else "--drop-lesion-mates"
        _render.err.print(f"[bold red]error:[/] {flag} needs --data (the dataset it splits)")
        raise typer.Exit(1)
    rep: dict = {}
    with _clear_errors():
        if cache is not None:
            check_file("--cache", cache)
        _check_out_file("--json", json_out)
        if data is not None:
            ds = load_dataset(data, split_ratios=_ratios(split_ratios), seed=split_seed,
                              test=test_data, split_file=split_file,
                              drop_lesion_mates=drop_lesion_mates)
            _render.split_origin(ds.split_origin)
            with progress_bar(len(ds), "hash images", enabled=not (quiet or no_hash)) as adv:
                rep = audit_dataset(ds, hash_images=not no_hash, progress=adv).to_dict()
            _render.audit_report(rep, ds.classes)
        if cache is not None:
            from skincache.near_duplicates import near_duplicates

            fc = FeatureCache.open(cache)
            pairs = near_duplicates(fc, threshold, per_image)
            random_note = random_init_warning(fc.attrs, "feature similarities, and so these "
                                                        "near-duplicate pairs,")
            rep["near_duplicates"] = {"threshold": threshold, "pairs": pairs,
                                      "random_init_model": bool(random_note)}
            _render.near_duplicate_pairs(pairs, threshold)
            _warn(random_note)
    if json_out:
        from skincache._io import write_json

        _write_out("--json", json_out, lambda p: write_json(p, rep))
        _render.out.print(f"report written to {json_out}")


@app.command("fetch-data")
def fetch_data(
    name: Annotated[str, typer.Argument(help="Dataset to download: ham10000.")],
    to: Annotated[Path, typer.Option(help="Destination folder.")] = Path("data/ham10000-hf"),
) -> None:
    """Download HAM10000 (Hugging Face parquet shards) for users who are online."""
    from skincache.data import fetch_ham10000

    if name.lower() != "ham10000":
        _render.err.print(f"[bold red]error:[/] unknown dataset {name!r}; known: ham10000")
        raise typer.Exit(1)
    with _clear_errors():
        path = fetch_ham10000(to)
    _render.out.print(f"[green]downloaded[/] to {path}; encode it with "
                      f"`skincache encode --data {path}` (audit it first: `skincache audit "
                      f"--data {path}`)")


def _params(items: list[str]) -> dict[str, str]:
    """`key=value` pairs as strings; each head types them (`skincache.heads.parse_params`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder for run folders.")]


@app.command("fit-head")
def fit_head(
    cache: Annotated[Path, typer.Option(help="A cache file (.h5).")],
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
    runs_dir: RunsDir = Path("runs"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    cv: Annotated[int | None, typer.Option("--cv", help="Also K-fold lesion-grouped "
                                           "cross-validation over train+val (selection redone "
                                           "in each fold; cv.json in the run folder).")] = None,
    quiet: Quiet = False,
) -> None:
    """Fit a head on the cache's train split in seconds; metrics, predictions and plots."""
    from skincache._head_params import parse_params
    from skincache._options import check_templates

    with _clear_errors():
        raw = _params(param or [])
        check_file("--cache", cache)
        _check_min("--shots", shots, 1)
        _check_cv(cv, shots, tta)
        check_templates(templates)
        if head == "all":
            if raw:
                raise UsageError("-p sets one head's parameters; give --head NAME with -p")
            params = {}
        else:
            params = parse_params(head, raw)  # the head's name too, before torch loads
        set_interrupt_hint("nothing resumes: a run folder is finished once its run.json is "
                           "written; run the same command again to fit from the start")
        from skincache._progress import head_progress
        from skincache.cache import FeatureCache
        from skincache.runs import chosen_by_val, fit_head_run, fit_heads

        fc = FeatureCache.open(cache)  # read once, shared by every head
        common = dict(runs_dir=runs_dir, template_set=templates, seed=seed,
                      n_bootstrap=bootstrap, plots=not no_plots, tta=tta, shots=shots)
        with head_progress(enabled=not quiet):
            if head == "all":
                results = fit_heads(fc, name=name, **common)
            else:
                results = [fit_head_run(fc, head, params, name=name, **common)]
    set_interrupt_hint("")
    split = "test" if "test" in results[0].metrics else "val"
    n_views = fc.split(split).n_views
    _warn_no_views(tta, n_views)
    setting = _setting(tta and n_views > 0, shots)
    if len(results) == 1:
        r = results[0]
        shown = {("val (fit)" if s == "val" and r.trains_on_val else s): m  # trained on val
                 for s, m in r.metrics.items()}
        _render.metrics_table(shown, f"{r.head}{setting}: fit in {r.fit_seconds:.2f} s → "
                                     f"{r.path}")
        if split in r.metrics:
            _render.per_class_table(r.metrics[split], f"per class ({split})")
    else:
        _render.heads_table(results, split, picked=chosen_by_val(results), setting=setting)
    _warn(random_init_warning(fc.attrs))
    for r in results:
        _warn(one_class_warning(r.metrics, r.head))
    if cv:
        _fit_head_cv(fc, results, params, cv, templates, seed, bootstrap, not no_plots)


def _check_cv(cv: int | None, shots, tta: bool) -> None:
    """--cv K: at least 2 folds, and not with --shots / --tta (folds use every image, clean
    view)."""
    _check_min("--cv", cv, 2)
    if cv and (shots or tta):
        raise UsageError("--cv does not combine with --shots or --tta: cross-validation uses "
                         "every train+val image and the clean view; drop one of them")


def _fit_head_cv(fc, results: list, params: dict, k: int, templates: str, seed: int,
                 bootstrap: int, plots: bool) -> None:
    """fit-head --cv: cross-validate each fitted head, write cv.json into its run folder and
    print its table."""
    from skincache.render_study import cv_table
    from skincache.study.cv import CV_JSON, cross_validate_runs

    with _clear_errors():
        done = cross_validate_runs(fc, results, params, k=k, seed=seed,
                                   template_set=templates, n_bootstrap=bootstrap, plots=plots)
    for r, res in zip(results, done, strict=True):
        cv_table(res, f" → {r.path / CV_JSON}")


@app.command()
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
        _render.err.print(f"[bold red]error:[/] no head matches {filter!r}; "
                          "`skincache heads` lists them all")
        raise typer.Exit(1)
    _render.heads_list(specs)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head.")],
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    cache: Annotated[Path | None, typer.Option(help="Cache to evaluate on (default: the one "
                                                    "the head was fit on).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation "
                                             "(default: as the run was fit).")] = None,
) -> None:
    """Metrics and plots of a saved head on a split (refuses a different model's cache).

    On another cache (external validation) the results are stored as <dataset>__<split>;
    nothing the run wrote before is replaced, and run.json lists every evaluation."""
    with _clear_errors():
        _check_run(run)
        if cache is not None:
            check_file("--cache", cache)
        from skincache.runs import evaluate

        ev = evaluate(run, split, cache=cache, n_bootstrap=bootstrap, tta=tta)
    config = _run_config(run)
    used_tta = bool(ev.report.get("posthoc", {}).get("tta"))
    if (tta if tta is not None else config.get("tta")) and not used_tta:
        _warn_no_views(True, 0)  # asked for (or fit with) TTA, scored without: no views
    _render.metrics_table({ev.name: ev.report},
                          f"{run} on {ev.name}{_setting(used_tta, config.get('shots'))}")
    _render.per_class_table(ev.report, f"per class ({ev.name})")
    _warn_meaningless(ev.cache_attrs, {ev.name: ev.report}, "the head",
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


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head.")],
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
) -> None:
    """Class probabilities + the most similar training cases for new images: one line per
    image (top class and probability; --top-k for more), a table each with --verbose."""
    from skincache._options import check_device

    with _clear_errors():
        _check_run(run)
        check_device(device)
        _check_min("--top-k", top_k, 1)
        _check_min("--neighbors", neighbors, 0)
        if out is not None and out.suffix.lower() not in (".csv", ".json"):
            raise UsageError(f"--out {out}: give a .csv or .json file name")
        _check_out_file("--out", out)
        from skincache.predict import predict_images, write_predictions

        preds = predict_images(run, list(images), device=device, neighbors=neighbors)
    if verbose:
        _render.predictions(preds, top=max(top_k, 3))
    else:
        _render.prediction_lines(preds, top=top_k)
    n_ok = sum(p.ok for p in preds)
    if len(preds) > 1:
        _render.out.print(f"{len(preds)} images: {n_ok} predicted, {len(preds) - n_ok} failed"
                          + (" (errors above)" if n_ok < len(preds) else ""))
    if n_ok:
        _warn(random_init_warning(cache_attrs(_run_cache(run)), "these predictions"))
    if out:
        _write_out("--out", out, lambda p: write_predictions(preds, p))
        _render.out.print(f"written to {out}")
    if n_ok < len(preds):  # any image that failed is a failure of the call (said above)
        raise typer.Exit(1)


def _run_cache(run: Path) -> Path:
    from skincache.run_record import read_run

    return Path(str(read_run(run).cache))


def _check_out_file(option: str, path: Path | None) -> None:
    """An output file option that names a folder is one line, before any work."""
    if path is not None and path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")


def _write_out(option: str, path: Path, write) -> None:
    """`write(path)` for an output file option: a full or read-only disk is one DiskError
    line naming the file (the results were printed above, so nothing is lost)."""
    from skincache.cache import disk_error

    with _clear_errors():
        try:
            write(path)
        except OSError as e:
            de = disk_error(e, path, "writing", f"{option}: the results are printed above; "
                            "free space or choose another file")
            if de is None:  # not the disk: a path the OS refuses (/proc, a name too long)
                raise UsageError(f"{option} {path}: cannot be written ({e.strerror or e}); "
                                 "the results are printed above") from None
            raise de from None


def _run_config(run: Path) -> dict:
    """run.json as a dict ({} when it is not one: evaluate has read it already)."""
    from skincache._io import read_json_file

    config = read_json_file(run / "run.json", what="run.json")
    return config if isinstance(config, dict) else {}


@app.command("bench-heads")
def bench_heads_cmd(
    cache: Annotated[Path, typer.Option(help="A cache file (.h5).")],
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
    quiet: Quiet = False,
) -> None:
    """Every head variant x seeds on one cache: val beside test, mean ± std, fit time.

    Rerun with the same --out-dir to resume: finished runs (runs/*.json of the same cache and
    options) are kept, the rest are fitted, and the tables are written again from all of them."""
    from skincache._options import check_templates
    from skincache._progress import progress_bar

    chosen = variants.split(",") if variants else None
    with _clear_errors():
        check_file("--cache", cache)
        _check_min("--seeds", seeds, 1)
        ks = [int(k) for k in shots.split(",")] if shots else None
        if ks and min(ks) < 1:
            raise UsageError(f"--shots must be positive integers, got {shots}")
        check_templates(templates)
        from skincache.bench import (
            bench_heads,
            check_out_dir,
            check_variants,
            default_out_dir,
            n_fits,
        )

        check_variants(chosen)  # before any bar is drawn (and before torch loads)
        _check_cv(cv, ks, tta)
        out_dir = check_out_dir(out_dir or default_out_dir())
        if cv:
            return _bench_cv(cache, cv, chosen, templates, out_dir, quiet)
        set_interrupt_hint(f"the finished runs are kept in {out_dir}/runs; resume with: "
                           + _bench_command(cache, seeds, variants, split, templates, shots,
                                            tta, out_dir, quiet))
    with _clear_errors(), progress_bar(n_fits(seeds, chosen, ks), "bench heads", unit="fit",
                                       enabled=not quiet) as advance:
        res = bench_heads(cache, seeds=seeds, variants=chosen, eval_split=split,
                          template_set=templates, out_dir=out_dir, progress=advance,
                          shots=ks, tta=tta)
    set_interrupt_hint("")
    _warn_no_views(tta, res.n_views)
    _render.bench_table(res.rows, f"heads on {cache.name}: chosen on val, scored on "
                                  f"{res.runs[0]['split']}"
                                  f"{_setting(tta and res.n_views > 0, ks)}")
    extra = f", few-shot plot {res.out_dir}/shots.png" if ks else ""
    kept = f" ({res.reused} fit(s) kept from the earlier run)" if res.reused else ""
    _render.out.print(f"results: {res.out_dir}/results.{{json,csv,md}}, one JSON per run in "
                      f"{res.out_dir}/runs/{extra}{kept}", highlight=False, soft_wrap=True)
    _warn(random_init_warning(cache_attrs(cache)))


def _bench_cv(cache: Path, k: int, chosen: list[str] | None, templates: str, out_dir: Path,
              quiet: bool) -> None:
    """bench-heads --cv: every variant x K folds (and the refit) into out_dir, then the
    table of mean ± CI over folds. A rerun into the same --out-dir keeps the finished fits."""
    from skincache._progress import progress_bar
    from skincache.render_study import cv_bench_table
    from skincache.study.cv import bench_cv, n_cv_fits

    set_interrupt_hint(f"the finished fold runs are kept in {out_dir}/runs; rerun the same "
                       f"command with --out-dir {out_dir} to resume")
    with _clear_errors(), progress_bar(n_cv_fits(k, chosen), "cross-validate heads",
                                       unit="fit", enabled=not quiet) as advance:
        res = bench_cv(cache, k=k, variants=chosen, template_set=templates, out_dir=out_dir,
                       progress=advance)
    set_interrupt_hint("")
    cv_bench_table(res.rows, f"heads on {cache.name}: {k}-fold lesion-grouped CV over "
                             "train+val (refit scored on test)")
    kept = f" ({res.reused} fit(s) kept from the earlier run)" if res.reused else ""
    _render.out.print(f"results: {res.out_dir}/cv_results.json, one JSON per fold run in "
                      f"{res.out_dir}/runs/{kept}", highlight=False, soft_wrap=True)


def _bench_command(cache: Path, seeds: int, variants: str | None, split: str | None,
                   templates: str, shots: str | None, tta: bool, out_dir: Path,
                   quiet: bool) -> str:
    """The bench-heads command line that resumes this one (its options, and --out-dir)."""
    import shlex

    args = ["skincache", "bench-heads", "--cache", str(cache), "--seeds", str(seeds)]
    for option, value in (("--variants", variants), ("--split", split),
                          ("--templates", templates if templates != "all" else None),
                          ("--shots", shots)):
        if value is not None:
            args += [option, value]
    args += ["--tta"] * tta + ["--out-dir", str(out_dir)] + ["--quiet"] * quiet
    return shlex.join(args)


def _setting(tta: bool, shots) -> str:
    """What a table's numbers were computed with, for its title: " (TTA, shots 16)"."""
    parts = ["TTA"] * bool(tta)
    if shots:
        parts.append(f"shots {shots if isinstance(shots, int) else ','.join(map(str, shots))}")
    return f" ({', '.join(parts)})" if parts else ""


def _warn_no_views(tta: bool | None, n_views: int) -> None:
    """`--tta` on a cache encoded with --views 0 has nothing to average: say so."""
    if tta and n_views == 0:
        _warn("--tta: this cache has no augmented views (encoded with --views 0), so the "
              "numbers are of the clean view only; encode with --views K for TTA")


@app.command()
def finetune(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Dataset (as for encode); not needed with "
                                                  "--resume.")] = None,
    setup: Annotated[str, typer.Option(help="base, regularization or augmented (the reference "
                                            "paper's Table 1).")] = "base",
    model: Annotated[str, typer.Option(help="open_clip architecture or hf-hub: id "
                                            "(`skincache models` lists them).")] = "ViT-B-32",
    pretrained: Annotated[str | None, typer.Option(help=PRETRAINED_HELP)] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local weights to start from.")] = None,
    test_data: Annotated[str | None, typer.Option(help="A second source used whole as the "
                                                       "test split.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (setup: 20).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size (setup: 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Backbone learning rate (setup: 5e-5).")] = None,
    head_lr: Annotated[float | None, typer.Option(help="Head learning rate (default: --lr)."
                                                  )] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (setup: 0, "
                                                             "regularization 0.01).")] = None,
    warmup_ratio: Annotated[float | None, typer.Option(help="Share of steps warming up.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine or constant.")] = None,
    layer_decay: Annotated[float | None, typer.Option(help="Layer-wise lr decay (1 = off)."
                                                      )] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing.")] = None,
    balance: Annotated[str | None, typer.Option(help="'loss' for class-weighted "
                                                     "cross-entropy.")] = None,
    head_init: Annotated[str | None, typer.Option(help="zeroshot, random, or a fit-head run "
                                                       "folder.")] = None,
    templates: Annotated[str | None, typer.Option(help="Prompt set of the zero-shot head, or "
                                                       "'all'.")] = None,
    wise: Annotated[float | None, typer.Option(help="WiSE-FT alpha for the final model.")] = None,
    wise_sweep: Annotated[bool, typer.Option(help="Evaluate WiSE-FT alpha 0..1 on val.")] = False,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience (epochs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, mps or auto.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on cuda), fp32, bf16.")] = None,
    split_ratios: Annotated[str | None, typer.Option(help="As for encode.")] = None,
    split_seed: Annotated[int | None, typer.Option(help="As for encode.")] = None,
    runs_dir: RunsDir = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Run name (default: finetune-<setup>-<time>)."
                                             )] = None,
    resume: Annotated[Path | None, typer.Option(help="A run folder to continue from its last "
                                                     "saved epoch.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode processes.")] = None,
    image_store: Annotated[str | None, typer.Option(help="auto, memory or stream.")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for the CIs.")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    limit: Limit = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune the image tower (backbone unfrozen); resumable, DDP under torchrun."""
    from skincache._options import check_choice, check_device, check_model

    if data is None and resume is None:
        _render.err.print("[bold red]error:[/] give --data (or --resume a run)")
        raise typer.Exit(1)
    with _clear_errors():
        check_choice("--setup", setup, ("base", "regularization", "augmented"))
        check_device(device)
        check_model(model)
        check_file("--checkpoint", checkpoint)
        check_choice("--precision", precision, PRECISIONS)
        _check_min("--limit", limit, 1)
        if resume is not None and not (resume / "run.json").is_file():
            raise UsageError(f"--resume {resume}: not a run folder (no run.json there)")
        set_interrupt_hint("nothing was saved yet: run the same command again")
        # torch and open_clip load from here on: every cheap check is done
        from skincache.finetune import run_finetune
        from skincache.finetune.config import config_from_cli
        from skincache.models import resolve_pretrained

        ckpt = str(checkpoint) if checkpoint else None
        # every other option passes through by name (checked against FinetuneConfig)
        config = config_from_cli({
            **ctx.params, "data": data or "",
            "pretrained": None if resume else resolve_pretrained(model, pretrained, ckpt),
            "split_ratios": _ratios(split_ratios) if split_ratios else None})
        result = run_finetune(config, progress=not quiet)
    if result.is_main:
        _render.finetune_result(result)
        c = result.config
        _warn_meaningless({"model": c.model, "pretrained": c.pretrained,
                           "checkpoint": c.checkpoint}, result.metrics, "the fine-tuned model",
                          "try more --epochs, another --lr or --balance loss")


@app.command()
def score(
    files: Annotated[list[Path], typer.Argument(help="Predictions CSV files: a run folder's "
                                                     "predictions/<split>.csv, DermFM-Zero's, "
                                                     "or any CSV with the column options.")],
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
    with _clear_errors():
        from skincache.study import ColumnMap, score_files

        names = None if classes is None else tuple(c.strip() for c in classes.split(","))
        if names is not None and (len(names) < 2 or not all(names)):
            raise UsageError(f"--classes {classes!r}: give two or more names, comma-separated")
        reports = score_files(files, ColumnMap(id_col, true, pred, proba, names),
                              renormalize=renormalize, n_bootstrap=bootstrap, seed=seed,
                              plots_dir=plots, json_path=json_out)
    from skincache import render_study

    render_study.score_table(reports)


@app.command()
def compare(
    inputs: Annotated[list[Path], typer.Argument(help="Two or more run folders or predictions "
                                                      "files; each is compared to the first.")],
    split: Annotated[str, typer.Option(help="Split of the run folders (predictions/<split>"
                                            ".csv).")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")
                        ] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw the differences with their CIs here "
                                                   "(PNG).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Paired comparison on the shared images: differences with 95% CIs, McNemar's test."""
    with _clear_errors():
        _check_min("--bootstrap", bootstrap, 1)
        from skincache.study import compare_inputs

        result = compare_inputs(inputs, split=split, n_bootstrap=bootstrap, seed=seed,
                                plot=plot, json_path=json_out)
    from skincache import render_study

    render_study.compare_table(result)


def main() -> None:
    """The `skincache` entry point. Ctrl-C gets one line saying how to go on, not a silent
    exit 130: encode resumes from its last committed chunk, finetune from its last epoch."""
    set_interrupt_hint("")  # a library call earlier in this process may have left one
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        if e.code == 130:
            _render.err.print(f"[bold yellow]interrupted[/]; {interrupt_hint()}",
                              highlight=False)
        raise


if __name__ == "__main__":
    main()

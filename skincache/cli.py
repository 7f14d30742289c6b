"""The `skincache` command line: each command parses options, calls one library function and
renders the result. No logic lives here."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Annotated

import typer

from skincache import _render

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
    """Known failures become one red line and exit status 1, not a traceback (`--debug`
    shows the traceback). Cache warnings (an old cache without checksums) become one yellow
    line each."""
    import warnings

    from skincache.cache import CacheError, CacheWarning
    from skincache.data import DataError, FetchError
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
    except (SkincacheError, DataError, CacheError, FetchError, FileNotFoundError,
            FileExistsError, ValueError, RuntimeError, OSError, EOFError) as e:
        if _DEBUG["on"]:
            raise
        if isinstance(e, OSError) and not isinstance(e, (SkincacheError, FileNotFoundError,
                                                         FileExistsError)):
            if e.errno not in _DISK_ERRNOS:
                raise
            where = f" ({e.filename})" if e.filename else ""
            text = f"{e.strerror or e}{where}; nothing done so far is lost"
        else:
            text = str(e)
        from rich.markup import escape  # a message may hold "[...]": print it as is

        _render.err.print(f"[bold red]error:[/] {escape(text)}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


@app.command()
def encode(
    data: Annotated[str, typer.Option(help="Dataset: a HAM10000 folder, ISIC 2018 CSV, parquet "
                                           "shards, path,label CSV or class folders (kind: "
                                           "prefix optional).")],
    model: Annotated[str, typer.Option(help="open_clip architecture or hf-hub: id.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag ('' for none).")] = (
        "openai"),
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
    cache_dir: CacheDir = Path("cache"),
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache exists.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another run on the same cache instead of "
                                            "stopping.")] = False,
    quiet: Quiet = False,
) -> None:
    """Encode a dataset once: images + augmented views + class prompts -> cache/<name>.h5."""
    from skincache.data import load_dataset
    from skincache.encode import encode_dataset
    from skincache.models import ModelSpec
    from skincache.views import ViewPolicy

    with _clear_errors():
        ds = load_dataset(data, split_ratios=_ratios(split_ratios), seed=split_seed,
                          test=test_data)
        spec = ModelSpec(model, None if checkpoint else (pretrained or None),
                         str(checkpoint) if checkpoint else None)
        result = encode_dataset(
            ds, spec, policy=ViewPolicy(k=views, seed=view_seed), cache_dir=cache_dir,
            device=device, precision=precision, batch_size=batch_size, num_workers=workers,
            force=force, wait=wait, progress=not quiet,
        )
    _render.encode_result(result)


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

    with _clear_errors():
        result = run_demo(cache_dir, n_images=n_images, seed=seed, views=views,
                          data_dir=data_dir, progress=not quiet)
        _render.encode_result(result)
        _render.cache_summary(FeatureCache.open(result.path).summary())
    _render.out.print(f"next: skincache fit-head --cache {result.path} --head mlp   "
                      f"(the synthetic images are in {result.path.parent / 'demo-data'})")


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
    summary = fc.summary()
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
    from skincache.near_duplicates import near_duplicates

    if data is None and cache is None:
        _render.err.print("[bold red]error:[/] give --data (a dataset), --cache (a cache) or both")
        raise typer.Exit(1)
    rep: dict = {}
    with _clear_errors():
        if data is not None:
            ds = load_dataset(data, split_ratios=_ratios(split_ratios), seed=split_seed,
                              test=test_data)
            with progress_bar(len(ds), "hash images", enabled=not (quiet or no_hash)) as adv:
                rep = audit_dataset(ds, hash_images=not no_hash, progress=adv).to_dict()
            _render.audit_report(rep, ds.classes)
        if cache is not None:
            pairs = near_duplicates(FeatureCache.open(cache), threshold, per_image)
            rep["near_duplicates"] = {"threshold": threshold, "pairs": pairs}
            _render.near_duplicate_pairs(pairs, threshold)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rep, indent=2))
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


def _params(items: list[str]) -> dict:
    """`key=value` pairs; values parsed as JSON where they can be (numbers, true, null)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def _with_param_errors(head: str, fn, *args, **kwargs):
    """A head parameter of the wrong name or type is a user error, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"head '{head}': bad --param ({e}); `skincache fit-head --help` and "
                         "the README list each head's parameters") from None


RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder for run folders.")]


@app.command("fit-head")
def fit_head(
    cache: Annotated[Path, typer.Option(help="A cache file (.h5).")],
    head: Annotated[str, typer.Option(help="Head name, or 'all'.")] = "mlp",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Head parameter "
                                                    "key=value (repeatable).")] = None,
    templates: Annotated[str, typer.Option(help="Text template set for text heads, or 'all'."
                                           )] = "all",
    seed: Annotated[int, typer.Option(help="Seed for heads that take one.")] = 0,
    name: Annotated[str | None, typer.Option(help="Run name (default: head + timestamp)."
                                             )] = None,
    runs_dir: RunsDir = Path("runs"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
) -> None:
    """Fit a head on the cache's train split in seconds; metrics, predictions and plots."""
    from skincache.cache import FeatureCache
    from skincache.heads import list_heads
    from skincache.runs import fit_head_run

    names = list_heads() if head == "all" else [head]
    results = []
    with _clear_errors():
        params = _params(param or [])
        fc = FeatureCache.open(cache)  # read once, shared by every head
        for h in names:
            results.append(_with_param_errors(h, fit_head_run,
                fc, h, params if head != "all" else None, runs_dir=runs_dir,
                name=(f"{name}-{h}" if name and head == "all" else name), template_set=templates,
                seed=seed, n_bootstrap=bootstrap, plots=not no_plots))
    split = "test" if "test" in results[0].metrics else "val"
    if len(results) == 1:
        r = results[0]
        _render.metrics_table(r.metrics, f"{r.head}: fit in {r.fit_seconds:.2f} s → {r.path}")
        if split in r.metrics:
            _render.per_class_table(r.metrics[split], f"per class ({split})")
    else:
        _render.heads_table(results, split)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head.")],
    split: Annotated[str, typer.Option(help="Split to evaluate on.")] = "test",
    cache: Annotated[Path | None, typer.Option(help="Cache to evaluate on (default: the one "
                                                    "the head was fit on).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Metrics and plots of a saved head on a split (refuses a different model's cache)."""
    from skincache.runs import evaluate_run

    with _clear_errors():
        report = evaluate_run(run, split, cache=cache, n_bootstrap=bootstrap)
    _render.metrics_table({split: report}, f"{run} on {split}")
    _render.per_class_table(report, f"per class ({split})")
    _render.out.print(f"metrics, predictions and plots written under {run}")


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A run folder written by fit-head.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    neighbors: Annotated[int, typer.Option(help="Most similar training cases to show.")] = 5,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Also write results to .csv or .json.")] = None,
) -> None:
    """Class probabilities + the most similar training cases for new images."""
    from skincache.predict import predict_images, write_predictions

    with _clear_errors():
        preds = predict_images(run, list(images), device=device, neighbors=neighbors)
    _render.predictions(preds)
    if out:
        write_predictions(preds, out)
        _render.out.print(f"written to {out}")
    if not any(p.ok for p in preds):
        raise typer.Exit(1)


@app.command("bench-heads")
def bench_heads_cmd(
    cache: Annotated[Path, typer.Option(help="A cache file (.h5).")],
    seeds: Annotated[int, typer.Option(help="Seeds per seeded head.")] = 5,
    variants: Annotated[str | None, typer.Option(help="Comma-separated subset of variants."
                                                 )] = None,
    split: Annotated[str | None, typer.Option(help="Split to score on (default: test, else "
                                                   "val).")] = None,
    templates: Annotated[str, typer.Option(help="Text template set, or 'all'.")] = "all",
    out_dir: Annotated[Path | None, typer.Option(help="Output folder (default: "
                                                      "runs/bench-<time>).")] = None,
    quiet: Quiet = False,
) -> None:
    """Every head variant x seeds on one cache: mean ± std, fit time; CSV, JSON, markdown."""
    from skincache._progress import progress_bar
    from skincache.bench import bench_heads, n_fits

    chosen = variants.split(",") if variants else None
    with _clear_errors(), progress_bar(n_fits(seeds, chosen), "bench heads", unit="fit",
                                       enabled=not quiet) as advance:
        res = bench_heads(cache, seeds=seeds, variants=chosen, eval_split=split,
                          template_set=templates, out_dir=out_dir, progress=advance)
    _render.bench_table(res.rows, f"heads on {cache.name}, scored on {res.runs[0]['split']}")
    _render.out.print(f"results: {res.out_dir}/results.{{json,csv,md}}, one JSON per run in "
                      f"{res.out_dir}/runs/")


@app.command()
def finetune(
    data: Annotated[str | None, typer.Option(help="Dataset (as for encode); not needed with "
                                                  "--resume.")] = None,
    setup: Annotated[str, typer.Option(help="base, regularization or augmented (the reference "
                                            "paper's Table 1).")] = "base",
    model: Annotated[str, typer.Option(help="open_clip architecture or hf-hub: id.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag ('' for none).")] = (
        "openai"),
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
    quiet: Quiet = False,
) -> None:
    """Fine-tune the image tower (backbone unfrozen); resumable, DDP under torchrun."""
    from skincache.finetune import FinetuneConfig, run_finetune

    if data is None and resume is None:
        _render.err.print("[bold red]error:[/] give --data (or --resume a run)")
        raise typer.Exit(1)
    with _clear_errors():
        config = FinetuneConfig.from_setup(
            setup, data=data or "", test_data=test_data, model=model,
            pretrained=None if (checkpoint or not pretrained) else pretrained,
            checkpoint=str(checkpoint) if checkpoint else None, epochs=epochs,
            batch_size=batch_size, lr=lr, head_lr=head_lr, weight_decay=weight_decay,
            warmup_ratio=warmup_ratio, schedule=schedule, layer_decay=layer_decay,
            grad_clip=grad_clip, label_smoothing=label_smoothing, balance=balance,
            head_init=head_init, template_set=templates, wise=wise, wise_sweep=wise_sweep,
            patience=patience, seed=seed, device=device, precision=precision,
            split_ratios=_ratios(split_ratios) if split_ratios else None, split_seed=split_seed,
            runs_dir=str(runs_dir), name=name, resume=str(resume) if resume else None,
            workers=workers, image_store=image_store, n_bootstrap=bootstrap,
            plots=not no_plots)
        result = run_finetune(config, progress=not quiet)
    if result.is_main:
        _render.finetune_result(result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

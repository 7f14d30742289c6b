"""The `skincache` command line: each command parses options, calls one library function and
renders the result. No logic lives here."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _clear_errors():
    """Known failures become one red line and exit status 1, not a traceback."""
    from skincache.cache import CacheError
    from skincache.data import DataError, FetchError

    try:
        yield
    except (DataError, CacheError, FetchError, FileNotFoundError, ValueError, RuntimeError) as e:
        _render.out.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None


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
        ds = load_dataset(data, split_ratios=_ratios(split_ratios), seed=split_seed)
        spec = ModelSpec(model, pretrained or None, str(checkpoint) if checkpoint else None)
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
    data: Annotated[str, typer.Option(help="Dataset to audit (any source encode reads).")],
    split_ratios: Annotated[str, typer.Option(help="As for encode, for sources without a split."
                                              )] = "0.72,0.19,0.09",
    split_seed: Annotated[int, typer.Option(help="As for encode.")] = 0,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the byte-identical image "
                                                            "check (reads every file).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as "
                                                                 "JSON here.")] = None,
    quiet: Quiet = False,
) -> None:
    """Split leakage report: lesions in several splits, identical images across splits."""
    from skincache._progress import progress_bar
    from skincache.data import audit_dataset, load_dataset

    with _clear_errors():
        ds = load_dataset(data, split_ratios=_ratios(split_ratios), seed=split_seed)
        with progress_bar(len(ds), "hash images", enabled=not (quiet or no_hash)) as advance:
            report = audit_dataset(ds, hash_images=not no_hash, progress=advance)
    rep = report.to_dict()
    _render.audit_report(rep, ds.classes)
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
        _render.out.print(f"[bold red]error:[/] unknown dataset {name!r}; known: ham10000")
        raise typer.Exit(1)
    with _clear_errors():
        path = fetch_ham10000(to)
    _render.out.print(f"[green]downloaded[/] to {path}; encode it with "
                      f"`skincache encode --data {path}` (audit it first: `skincache audit "
                      f"--data {path}`)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

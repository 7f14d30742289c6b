"""Commands about data and caches: encode, demo, models, info, audit, fetch-data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file, set_interrupt_hint
from skincache._sanity import random_init_warning
from skincache.cli._common import (
    PRETRAINED_HELP,
    RESUMES,
    CacheDir,
    DropLesionMates,
    Limit,
    Quiet,
    SplitFileOption,
    check_min,
    check_out_file,
    ratios,
    warn,
    write_out,
)
from skincache.data.sources import sources_help
from skincache.defaults import CACHE_DIR, SPLIT_RATIOS_TEXT, TINY_MODEL
from skincache.device import PRECISIONS
from skincache.errors import UsageError


def encode(
    data: Annotated[str, typer.Option(help=sources_help())],
    model: Annotated[str, typer.Option(help="open_clip architecture, hf-hub: id or derm short "
                                            "name (`skincache models [--derm]` lists them)."
                                       )] = "ViT-B-32",
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
                                                   "a split (lesion-grouped).")
                            ] = SPLIT_RATIOS_TEXT,
    split_seed: Annotated[int, typer.Option(help="Seed of the lesion-grouped split.")] = 0,
    test_data: Annotated[str | None, typer.Option(help="A second source used whole as the "
                                                       "test split (e.g. the ISIC 2018 test "
                                                       "set); give two --split-ratios.")] = None,
    split_file: SplitFileOption = None,
    drop_lesion_mates: DropLesionMates = False,
    cache_dir: CacheDir = Path(CACHE_DIR),
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache exists.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for another run on the same cache instead of "
                                            "stopping.")] = False,
    follow_symlinks: Annotated[bool, typer.Option(
        help="Read images reached by a symlink out of the dataset folder (refused and "
             "recorded in /failed by default).")] = False,
    concepts: Annotated[Path | None, typer.Option(
        help="A concept list (JSON) to score images against instead of the shipped "
             "dermoscopic one (README: Concepts).")] = None,
    no_concepts: Annotated[bool, typer.Option(
        "--no-concepts", help="Encode no concept prompts (the cache key then stays as "
                              "before concepts existed).")] = False,
    limit: Limit = None,
    pre_projection: Annotated[bool, typer.Option(
        "--pre-projection", help="Also store each view's pooled output before the image "
        "tower's final projection (features_pre; fit heads on it with -p features=pre).")
                              ] = False,
    quiet: Quiet = False,
) -> None:
    """Encode a dataset once: images + augmented views + class and concept prompts ->
    cache/<name>.h5."""
    from skincache._options import check_choice, check_device, check_model

    set_interrupt_hint(RESUMES)
    check_device(device)
    check_model(model)
    check_file("--checkpoint", checkpoint)
    check_choice("--precision", precision, PRECISIONS)
    check_min("--views", views, 0)
    check_min("--batch-size", batch_size, 1)
    if concepts is not None and no_concepts:
        raise UsageError("give --concepts FILE or --no-concepts, not both")
    check_file("--concepts", concepts)
    from skincache.pipeline import encode_source

    result = encode_source(
        data, model=model, pretrained=pretrained, checkpoint=checkpoint,
        split_ratios=ratios(split_ratios), split_seed=split_seed, test=test_data,
        split_file=split_file, drop_lesion_mates=drop_lesion_mates, limit=limit, views=views,
        view_seed=view_seed, cache_dir=cache_dir, on_split=_render.split_origin,
        device=device, precision=precision, batch_size=batch_size, num_workers=workers,
        force=force, wait=wait, progress=not quiet, follow_symlinks=follow_symlinks,
        pre_projection=pre_projection,
        concepts=False if no_concepts else (concepts or True),
    )
    _render.encode_result(result)
    if result.status != "exists" and result.spec is not None:
        spec = result.spec
        warn(random_init_warning({"model": spec.name, "pretrained": spec.pretrained,
                                  "checkpoint": spec.checkpoint}, "results from this cache"))


def demo(
    n_images: Annotated[int, typer.Option(help="Synthetic images to generate.")] = 280,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data.")] = 0,
    views: Annotated[int, typer.Option(help="Augmented views per image.")] = 2,
    data_dir: Annotated[Path | None, typer.Option(help="Where the synthetic dataset goes "
                                                       "(default: <cache-dir>/demo-data).")] = None,
    cache_dir: CacheDir = Path(CACHE_DIR),
    quiet: Quiet = False,
) -> None:
    """Offline demo: synthetic HAM10000-shaped data, encoded with the shipped tiny model."""
    from skincache.demo import run_demo

    set_interrupt_hint(RESUMES)  # the demo's encode resumes like any
    result = run_demo(cache_dir, n_images=n_images, seed=seed, views=views,
                      data_dir=data_dir, progress=not quiet)
    _render.encode_result(result)
    _render.cache_summary(result.cache_summary())
    _render.concept_summary(result.concept_report())
    _render.out.print(f"next: skincache fit-head --cache {result.path} --head mlp   "
                      f"(the synthetic images are in {result.path.parent / 'demo-data'})")


def models(
    filter_: Annotated[str, typer.Argument(metavar="[FILTER]", help="Keep architectures whose "
                                           "name or a tag contains this (any case).")] = "",
    derm: Annotated[bool, typer.Option("--derm", help="The published dermatology encoders: "
                                       "short names for --model, source, architecture, "
                                       "license, whether each loads here.")] = False,
) -> None:
    """Model architectures open_clip can build here and their --pretrained tags."""
    if derm:
        _models_derm(filter_)
        return
    from skincache.models import DEFAULT_PRETRAINED, list_architectures

    rows = list_architectures(filter_)
    if not rows:
        raise UsageError(f"no architecture or tag contains {filter_!r}; "
                         "`skincache models` lists them all")
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
                      "are not listed (`skincache models --derm`: the dermatology ones).",
                      highlight=False)


def _models_derm(filter_: str) -> None:
    """models --derm: the derm encoder registry and whether each entry loads here."""
    if filter_:
        raise UsageError("--derm lists every derm model; give no FILTER with it")
    from skincache.models import derm_table

    _render.derm_models_table(derm_table())


def info(
    cache: Annotated[Path, typer.Argument(help="A cache file (.h5).")],
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a cache: model, preprocessing, views, splits, class counts, failures."""
    from skincache.cache import FeatureCache

    fc = FeatureCache.open(cache)
    summary = fc.summary()  # verifies every dataset (lazy caches read on demand)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _render.cache_summary(summary)
    if failed and fc.failed:
        _render.failed_table(fc.failed)


def concepts(
    cache: Annotated[Path, typer.Argument(help="A cache file (.h5) encoded with concepts.")],
    split: Annotated[str, typer.Option(help="Split whose images the per-class means are "
                                            "over (scores are z-scored against train).")
                     ] = "train",
    image: Annotated[str | None, typer.Option(help="Also list this image's concept scores "
                                                   "(an image id of the cache).")] = None,
    plot: Annotated[Path | None, typer.Option(help="Where the per-class heatmap PNG goes "
                                                   "(default: beside the cache).")] = None,
    top: Annotated[int, typer.Option(help="Concepts listed for --image.")] = 10,
) -> None:
    """Mean concept score per class (MONET-style, z-scored), a heatmap PNG, --image ID."""
    check_file("cache", cache)
    check_min("--top", top, 1)
    check_out_file("--plot", plot)
    from skincache.concept_report import concept_report

    report = concept_report(cache, split=split, image=image, plot=plot)
    _render.concept_table(report)
    if report.image:
        _render.image_concepts(report.image, top)
    _render.out.print(f"plot written to {report.plot}", highlight=False)
    warn(random_init_warning(report.cache_attrs, "these concept scores"))


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
                                              )] = SPLIT_RATIOS_TEXT,
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
    if data is None and cache is None:
        raise UsageError("give --data (a dataset), --cache (a cache) or both")
    if (split_file is not None or drop_lesion_mates) and data is None:
        flag = "--split-file" if split_file is not None else "--drop-lesion-mates"
        raise UsageError(f"{flag} needs --data (the dataset it splits)")
    if cache is not None:
        check_file("--cache", cache)
    check_out_file("--json", json_out)
    from skincache.near_duplicates import audit as run_audit

    found = run_audit(data, cache, threshold=threshold, per_image=per_image,
                      split_ratios=ratios(split_ratios), split_seed=split_seed, test=test_data,
                      split_file=split_file, drop_lesion_mates=drop_lesion_mates,
                      hash_images=not no_hash, progress=not quiet)
    if data is not None:
        _render.split_origin(found.split_origin)
        _render.audit_report(found.report, found.classes)
    if found.pairs is not None:
        _render.near_duplicate_pairs(found.pairs, threshold)
        warn(found.random_note)
    if json_out:
        from skincache._io import write_json

        write_out("--json", json_out, lambda p: write_json(p, found.report))
        _render.out.print(f"report written to {json_out}")


def fetch_data(
    name: Annotated[str, typer.Argument(help="Dataset to download: ham10000.")],
    to: Annotated[Path, typer.Option(help="Destination folder.")] = Path("data/ham10000-hf"),
) -> None:
    """Download HAM10000 (Hugging Face parquet shards) for users who are online."""
    from skincache.data import fetch_ham10000

    if name.lower() != "ham10000":
        raise UsageError(f"unknown dataset {name!r}; known: ham10000")
    path = fetch_ham10000(to)
    _render.out.print(f"[green]downloaded[/] to {path}; encode it with "
                      f"`skincache encode --data {path}` (audit it first: `skincache audit "
                      f"--data {path}`)")


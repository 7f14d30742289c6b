"""What several command groups share: option types, the cheap option checks that run before
torch loads, and the warning lines. No library work here: a check refuses a value, a warning
renders one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import check_file
from skincache._sanity import one_class_warning, random_init_warning
from skincache.errors import UsageError
from skincache.run_record import FUSIONS

CacheDir = Annotated[Path, typer.Option("--cache-dir", help="Folder for feature caches.")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Folder for run folders.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
#: `--split` of score and compare: which predictions/<split>.csv of a run folder to read
RunSplit = Annotated[str, typer.Option(help="Split of the run folders (predictions/<split>"
                                            ".csv).")]

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


def check_min(option: str, value: int | None, low: int) -> None:
    """An integer option below its lowest meaningful value is one line, before any work."""
    if value is not None and value < low:
        raise UsageError(f"{option} {value}: must be >= {low}")



def check_caches(caches: list[Path], fusion: str | None, cv: int | None = None) -> None:
    """--cache (repeatable) and --fusion, before torch loads: every cache a readable file,
    --fusion one of `run_record.FUSIONS` and only with two or more caches, and no --cv with
    several (not built yet). fit-head and bench-heads share it."""
    for c in caches:
        check_file("--cache", c)
    if fusion is not None:
        if fusion not in FUSIONS:
            raise UsageError(f"--fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
        if len(caches) < 2:
            raise UsageError(f"--fusion {fusion} needs two or more --cache (caches of the "
                             "same images by different encoders)")
    if cv and len(caches) > 1:
        raise UsageError("--cv with several --cache is not built yet; cross-validate one "
                         "cache, or drop --cv")


def check_cv(cv: int | None, shots: object, tta: bool) -> None:
    """--cv K: at least 2 folds, and not with --shots / --tta (folds use every image, clean
    view)."""
    check_min("--cv", cv, 2)
    if cv and (shots or tta):
        raise UsageError("--cv does not combine with --shots or --tta: cross-validation uses "
                         "every train+val image and the clean view; drop one of them")

def warn(message: str | None) -> None:
    """One yellow line on stderr (None: nothing to say)."""
    if message:
        _render.err.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def warn_meaningless(attrs: dict, reports: dict[str, dict], who: str,
                     advice: str = "try another head or --param") -> None:
    """Warnings for numbers that mean nothing: random weights, one class for everything."""
    warn(random_init_warning(attrs))
    warn(one_class_warning(reports, who, advice))


def check_run(run: Path) -> None:
    """A path that is not a run folder is refused before torch loads."""
    if not (run / "run.json").is_file():
        what = "no such folder" if not run.exists() else "no run.json there"
        raise UsageError(f"{run}: not a run folder ({what}); `skincache fit-head` writes "
                         "them under runs/")


def ratios(text: str) -> tuple[float, ...]:
    """`--split-ratios 0.7,0.2,0.1` as floats (a typo is click's usage error)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def params(items: list[str]) -> dict[str, str]:
    """`key=value` pairs as strings; each head types them (`skincache.heads.parse_params`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def check_out_file(option: str, path: Path | None) -> None:
    """An output file option that names a folder is one line, before any work."""
    if path is not None and path.is_dir():
        raise UsageError(f"{option} {path}: is a folder; give a file name")


def write_out(option: str, path: Path, write: Callable[[Path], object]) -> None:
    """`write(path)` for an output file option: a full or read-only disk is one DiskError
    line naming the file (the results were printed above, so nothing is lost)."""
    from skincache.cache import disk_error

    try:
        write(path)
    except OSError as e:
        de = disk_error(e, path, "writing", f"{option}: the results are printed above; "
                        "free space or choose another file")
        if de is None:  # not the disk: a path the OS refuses (/proc, a name too long)
            raise UsageError(f"{option} {path}: cannot be written ({e.strerror or e}); "
                             "the results are printed above") from None
        raise de from None


def setting(tta: bool, shots) -> str:
    """What a table's numbers were computed with, for its title: " (TTA, shots 16)"."""
    parts = ["TTA"] * bool(tta)
    if shots:
        parts.append(f"shots {shots if isinstance(shots, int) else ','.join(map(str, shots))}")
    return f" ({', '.join(parts)})" if parts else ""


def warn_no_views(tta: bool | None, n_views: int) -> None:
    """`--tta` on a cache encoded with --views 0 has nothing to average: say so."""
    if tta and n_views == 0:
        warn("--tta: this cache has no augmented views (encoded with --views 0), so the "
             "numbers are of the clean view only; encode with --views K for TTA")



"""The `skincache` command line, one module per command group (`data`, `heads`, `study`,
`finetune`): each command checks its options (`_common`), calls one library function and
renders the result through `skincache.render`. The library raises skincache's own errors; the
one handler here turns them into one `error:` line (`--debug`: the traceback)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from skincache import render as _render
from skincache._options import interrupt_hint, set_interrupt_hint
from skincache.cli import data, finetune, heads, report, study
from skincache.defaults import DISK_ERRNOS

app = typer.Typer(
    name="skincache",
    help="Skin-lesion classification with CLIP: encode once into an HDF5 feature cache, "
    "then train heads in seconds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full Python traceback of "
                                                        "an error instead of one line.")] = False,
) -> None:
    """Skin-lesion classification with CLIP: encode once into an HDF5 feature cache, then
    train heads in seconds."""
    _DEBUG["on"] = debug


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """skincache's own errors (`SkincacheError`: a bad option, file or cache, said in one
    message) and a disk that is full, read-only or not ours become one red line and exit status
    1; anything else (a torch shape bug, CUDA out of memory) keeps its traceback, and
    `--debug` shows the traceback of ours too. Cache warnings (an old cache without
    checksums) become one yellow line each. The only place the CLI prints `error:`."""
    import warnings

    from rich.markup import escape  # a message may hold "[...]": print it as is

    from skincache.cache import CacheWarning
    from skincache.errors import SkincacheError

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
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
        elif e.errno in DISK_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            text = f"{e.strerror or e}{where}; nothing done so far is lost"
        else:
            raise
        _render.err.print(f"[bold red]error:[/] {escape(text)}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = previous


def _handled(command: Callable) -> Callable:
    """`command` run inside `one_line_errors` (typer reads the signature through `wraps`)."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with one_line_errors():
            return command(*args, **kwargs)
    return run


#: every command, in the order `skincache --help` lists them
COMMANDS: list[tuple[str, Callable]] = [
    ("encode", data.encode), ("demo", data.demo), ("models", data.models),
    ("info", data.info), ("concepts", data.concepts), ("audit", data.audit),
    ("fetch-data", data.fetch_data),
    ("fit-head", heads.fit_head), ("heads", heads.heads), ("evaluate", heads.evaluate),
    ("predict", heads.predict), ("bench-heads", study.bench_heads_cmd),
    ("bench-encoders", study.bench_encoders_cmd),
    ("finetune", finetune.finetune), ("score", study.score), ("compare", study.compare),
    ("report", report.report),
]
for _name, _command in COMMANDS:
    app.command(_name)(_handled(_command))


def _one_line_usage_error(e) -> None:
    """A click usage error (an unknown option, a missing value) as one `error:` line, for
    output that goes to a file or a pipe: typer's boxed panel is several lines there."""
    import sys

    if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed already (as typer does)
        return
    ctx = getattr(e, "ctx", None)
    where = f"; `{ctx.command_path} --help` lists the options" if ctx is not None else ""
    print(f"error: {' '.join(e.format_message().split()).rstrip('.')}{where}", file=sys.stderr)


def main() -> None:
    """The `skincache` entry point. Ctrl-C gets one line saying how to go on, not a silent
    exit 130: encode resumes from its last committed chunk, finetune from its last epoch.
    Piped or redirected, a usage error is one line (`_one_line_usage_error`)."""
    import sys

    set_interrupt_hint("")  # a library call earlier in this process may have left one
    if not sys.stderr.isatty():
        from typer import rich_utils

        rich_utils.rich_format_error = _one_line_usage_error
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        if e.code == 130:
            _render.err.print(f"[bold yellow]interrupted[/]; {interrupt_hint()}",
                              highlight=False)
        raise

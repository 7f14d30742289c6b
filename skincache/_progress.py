"""Rich progress bars with a rate, shared by every long-running step."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from rich.console import Console, ConsoleDimensions
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class PlainWhenPiped(Console):
    """A Console that never hard-wraps output going to a file, a pipe or a CI log.

    Rich sizes a non-terminal console to 80 columns (or to the terminal on stdin/stderr),
    which splits paths and the suggested next command mid-word in `skincache demo | tee log`.
    When this console's own stream is not a terminal it is as wide as any line, and plain text
    is printed soft-wrapped: one logical line stays one line, for the reader's terminal or
    editor to wrap. In a terminal nothing changes."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal:
            return size
        return ConsoleDimensions(100_000, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 - rich's name
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)


console = PlainWhenPiped(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, with the unit the bar counts."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s",
                    style="progress.data.speed")


#: Seconds between progress lines when the output is not a terminal (a log, `tee`, CI).
INTERVAL_ENV = "SKINCACHE_PROGRESS_INTERVAL"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "5")))
    except ValueError:
        return 5.0


def _plain() -> bool:
    """Plain lines rather than a live bar: output to a file, a pipe or a CI log (a notebook
    keeps rich's live display)."""
    return not (console.is_terminal or console.is_jupyter)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


class PlainProgress:
    """Progress as plain lines, at most one per `every` seconds (and one at the end), for
    output that is not a terminal: rich draws nothing there until the step ends, so a log
    followed with `tail -f` stayed empty for the whole of a long encode. A line reads
    `encode: 1,234/10,015 img, 45 img/s, eta 3m12s`."""

    def __init__(self, total: int | None, description: str, unit: str, *,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.total, self.description, self.unit = total, description, unit
        self.every = _interval() if every is None else every
        self.clock = clock
        self.emit = emit or (lambda line: console.print(line, markup=False, highlight=False))
        self.start = self.last = clock()
        self.done, self.shown, self.note = 0, -1, ""

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        self.done, self.note = done, note
        self.total = self.total if total is None else total
        now = self.clock()
        if now - self.last >= self.every or (self.total and done >= self.total):
            self.show(now)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def show(self, now: float | None = None) -> None:
        if self.done == self.shown:
            return
        now = self.clock() if now is None else now
        self.last, self.shown = now, self.done
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total:,}" if self.total else ""
        line = f"{self.description}: {self.done:,}{of} {self.unit}, {rate:,.1f} {self.unit}/s"
        if self.total and 0 < self.done < self.total and rate > 0:
            line += f", eta {_duration((self.total - self.done) / rate)}"
        elif self.total and self.done >= self.total:
            line += f", done in {_duration(elapsed)}"
        self.emit(line + (f", {self.note}" if self.note else ""))


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, unit: str = "img",
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; draws nothing when disabled (`--quiet`). In a terminal a rich bar;
    elsewhere (a file, a pipe) a `PlainProgress` line every few seconds."""
    if not enabled:
        yield lambda n=1: None
        return
    if _plain():
        plain = PlainProgress(total, description, unit)
        yield plain.advance
        plain.show()
        return
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), RateColumn(unit), TextColumn("eta"), TimeRemainingColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


@contextlib.contextmanager
def head_progress(enabled: bool = True) -> Iterator[None]:
    """Show the steps heads report (the logreg C sweep with the best val score so far, training
    epochs) as rich progress lines, one per task, with a rate. Heads report through
    `skincache.heads.progress_hook`, so the library stays silent when this is not installed."""
    from skincache.heads import progress_hook

    if not enabled:
        yield
        return
    if _plain():
        plains: dict[str, PlainProgress] = {}

        def plain_hook(task: str, done: int, total: int, note: str) -> None:
            plains.setdefault(task, PlainProgress(total, task, "step")).update(done, total, note)

        with progress_hook(plain_hook):
            yield
        return
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), RateColumn("step"), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"), console=console, transient=True,
    ) as p:
        tasks: dict[str, int] = {}

        def hook(task: str, done: int, total: int, note: str) -> None:
            if task not in tasks:
                tasks[task] = p.add_task(task, total=total, note="")
            p.update(tasks[task], completed=done, total=total, note=note)

        with progress_hook(hook):
            yield

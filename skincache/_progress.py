"""Rich progress bars with a rate, shared by every long-running step."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, unit: str = "img",
                 enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; draws nothing when disabled (`--quiet`, or not a terminal is fine)."""
    if not enabled:
        yield lambda n=1: None
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

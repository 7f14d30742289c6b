"""A progress hook for fits that can take more than a couple of seconds (the C sweep, epochs).

Heads are estimators with a fixed `fit` signature, so progress is not a fit argument: a caller
(the CLI, a benchmark) installs a callback for the duration of a block, and heads report steps
to whatever is installed. Nothing installed: reporting is a no-op, so library users and tests
see no output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

#: callback(task, done, total, note)
ProgressFn = Callable[[str, int, int, str], None]

_hook: ContextVar[ProgressFn | None] = ContextVar("skincache_head_progress", default=None)


def report(task: str, done: int, total: int, note: str = "") -> None:
    """Tell the installed callback (if any) that `done` of `total` steps of `task` are done."""
    fn = _hook.get()
    if fn is not None:
        fn(task, done, total, note)


@contextlib.contextmanager
def progress_hook(fn: ProgressFn | None) -> Iterator[None]:
    """Install `fn` as the head progress callback inside the block."""
    token = _hook.set(fn)
    try:
        yield
    finally:
        _hook.reset(token)

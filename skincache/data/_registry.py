"""Name -> data source, filled by a decorator on each source's loader, so that detection, the
`kind:` prefixes, the "expected one of" error text and the CLI help are all read from one
place: adding a source is one module with `@register_source`, not five lists kept in step.

The registry knows no source module (each imports it, as heads/ does with its registry), so
nothing here forms an import cycle; `sources.py` imports the built-in sources to fill it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from ._files import read_csv_header
from ._record import DataError, Dataset


class Confidence(enum.IntEnum):
    """How surely a detector recognises a path. The highest wins; a tie goes to the source
    declared first (lower `priority`). CERTAIN (the path names the format: its file name,
    suffix or exact header) ends the search; LIKELY (columns or a folder shape that another
    format may share) lets a later source claim the path with CERTAIN."""

    NO = 0
    LIKELY = 1
    CERTAIN = 2


class Probe:
    """The path being detected, with what several detectors ask for read once (the CSV header
    is read at most once, however many sources look at it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @cached_property
    def is_file(self) -> bool:
        return self.path.is_file()

    @cached_property
    def is_dir(self) -> bool:
        return self.path.is_dir()

    @cached_property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    @cached_property
    def csv_header(self) -> list[str]:
        """The header of a `.csv` file; [] for anything else (a folder, another suffix)."""
        return read_csv_header(self.path) if self.is_file and self.suffix == ".csv" else []


Detector = Callable[[Probe], Confidence]
Loader = Callable[[Path], Dataset]
L = TypeVar("L", bound=Callable[..., Dataset])


@dataclass(frozen=True)
class Source:
    """One kind of data source.

    name: the kind (`Dataset.kind`) and its prefix (`name:`). layout: one line saying what
    the path looks like, read by the CLI help and the "expected one of" errors. split and
    group: where the records' split and group come from, as README's Data sources table says
    it (a test checks that the table and the registry agree). priority:
    detection order (lower first), which breaks ties between equally confident detectors.
    """

    name: str
    layout: str
    detect: Detector
    load: Loader
    priority: int
    split: str
    group: str

    @property
    def prefix(self) -> str:
        return f"{self.name}:"


#: name -> Source, in registration order; `list_sources` gives detection order.
SOURCES: dict[str, Source] = {}


def register_source(
    name: str, *, layout: str, detect: Detector, priority: int, split: str, group: str
) -> Callable[[L], L]:
    """Loader decorator: make `name:` a prefix, `detect` part of `detect_source` and `layout`
    part of the help and error text. The loader is returned unchanged.

    `detect(probe)` answers a `Confidence` (a bool reads as LIKELY / NO) and must not raise on
    a path it does not know: every detector may see every path. It must not open anything but
    a regular file (`probe.is_file`): a FIFO named `x.csv` would block the read."""

    def decorate(load: L) -> L:
        if name in SOURCES and SOURCES[name].load is not load:
            raise ValueError(f"data source {name!r} is already registered to "
                             f"{SOURCES[name].load!r}")
        if ":" in name or name != name.lower():
            raise ValueError(f"data source name {name!r}: lower case, no ':' (it is a prefix)")
        SOURCES[name] = Source(name=name, layout=layout, detect=detect, load=load,
                               priority=priority, split=split, group=group)
        return load

    return decorate


def unregister_source(name: str) -> None:
    """Remove a source (a test's throwaway source); unknown names are ignored."""
    SOURCES.pop(name, None)


def list_sources() -> list[Source]:
    """Registered sources in detection order (priority, then registration order)."""
    return sorted(SOURCES.values(), key=lambda s: s.priority)


def source_names() -> list[str]:
    return [s.name for s in list_sources()]


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"unknown dataset kind {name!r}; known kinds: "
                        f"{', '.join(source_names())}") from None


def expected_text() -> str:
    """What the error of an unrecognised path says it wanted: every source's layout and prefix."""
    return "expected one of: " + "; ".join(f"{s.layout} ({s.prefix})" for s in list_sources())


def help_text() -> str:
    """The CLI help of a dataset option: every source, its prefix and its layout."""
    kinds = "; ".join(f"{s.prefix} {s.layout}" for s in list_sources())
    return f"Dataset path; its kind is detected, or named by a prefix: {kinds}."


def detect_source(path: Path) -> Source | None:
    """The most confident source for `path` (ties: the first in detection order), or None."""
    probe = Probe(path)
    best, best_conf = None, Confidence.NO
    for source in list_sources():
        conf = Confidence(source.detect(probe))
        if conf > best_conf:
            best, best_conf = source, conf
            if conf is Confidence.CERTAIN:
                break
    return best

"""What a user needs to choose and configure a head: `describe_heads()` lists every registered
head with its parameters (type, default) and one line of doc, the way `open_clip.
list_pretrained()` / `timm.list_models()` serve theirs; `parse_params` turns `-p key=value`
strings into typed values, with one-line errors that name the valid choices. Both read the
parameters from `skincache._head_params` (the `__init__` signatures as source text), which the
CLI checks before torch loads."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from skincache._head_params import ParamSpec, check_head, parse_params

from ._registry import HEADS, get_head_class

__all__ = ["HeadSpec", "ParamSpec", "describe_head", "describe_heads", "parse_params"]


@dataclass(frozen=True)
class HeadSpec:
    name: str
    summary: str  # first sentence of the class docstring
    needs_text: bool
    params: tuple[ParamSpec, ...]


def describe_head(name: str) -> HeadSpec:
    cls = get_head_class(name)
    doc = inspect.getdoc(cls) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    summary = first.split(". ")[0].rstrip(".") + "." if first else ""
    return HeadSpec(name, summary, cls.needs_text, check_head(name))


def describe_heads(filter: str | None = None) -> list[HeadSpec]:
    """Every registered head (registration order), optionally those whose name contains
    `filter`."""
    return [describe_head(n) for n in HEADS if not filter or filter in n]

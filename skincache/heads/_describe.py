"""What a user needs to choose and configure a head: `describe_heads()` lists every registered
head with its parameters (type, default) and one line of doc, the way `open_clip.
list_pretrained()` / `timm.list_models()` serve theirs; `parse_params` turns `-p key=value`
strings into typed values, with one-line errors that name the valid choices."""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from skincache.errors import UsageError

from ._registry import HEADS, get_head_class


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # as written in the signature, e.g. "float | None"
    default: Any


@dataclass(frozen=True)
class HeadSpec:
    name: str
    summary: str  # first sentence of the class docstring
    needs_text: bool
    params: tuple[ParamSpec, ...]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls.__init__)


def _type_name(t: Any) -> str:
    if t is type(None):
        return "None"
    if isinstance(t, type) and typing.get_origin(t) is None:
        return t.__name__
    return str(t).replace("typing.", "")


def describe_head(name: str) -> HeadSpec:
    cls = get_head_class(name)
    hints = _hints(cls)
    sig = inspect.signature(cls.__init__)
    params = tuple(
        ParamSpec(p.name, _type_name(hints.get(p.name, Any)), p.default)
        for p in sig.parameters.values() if p.name != "self")
    doc = inspect.getdoc(cls) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    summary = first.split(". ")[0].rstrip(".") + "." if first else ""
    return HeadSpec(name, summary, cls.needs_text, params)


def describe_heads(filter: str | None = None) -> list[HeadSpec]:
    """Every registered head (registration order), optionally those whose name contains
    `filter`."""
    return [describe_head(n) for n in HEADS if not filter or filter in n]


_RANK = {type(None): 0, bool: 1, int: 2, float: 3, tuple: 4}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(raw: str, t: Any) -> Any:
    """`raw` as type `t`; ValueError when it is not one."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        # None first, then the strictest types, so "auto" stays a string and "1" an int
        order = sorted(typing.get_args(t), key=lambda m: _RANK.get(typing.get_origin(m) or m, 9))
        for m in order:
            try:
                return _convert(raw, m)
            except ValueError:
                continue
        raise ValueError(raw)
    if t is type(None):
        if raw.lower() in ("none", "null", ""):
            return None
        raise ValueError(raw)
    if t is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(raw)
    if t is int:
        return int(raw)
    if t is float:
        return float(raw)
    if origin is tuple:
        parts = json.loads(raw) if raw.strip().startswith("[") else raw.split(",")
        args = typing.get_args(t)
        if len(parts) != len(args):
            raise ValueError(raw)
        return tuple(_convert(str(p), a) for p, a in zip(parts, args, strict=True))
    if t is str:
        return raw
    if t is Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    raise ValueError(raw)


def parse_params(name: str, items: dict[str, str]) -> dict[str, Any]:
    """`{"hidden": "256"}` -> `{"hidden": 256}` for head `name`, typed by its signature.
    A wrong name or a value of the wrong type is a `UsageError` naming the valid choices."""
    spec = describe_head(name)
    by_name = {p.name: p for p in spec.params}
    hints = _hints(get_head_class(name))
    out: dict[str, Any] = {}
    for key, raw in items.items():
        key = key.strip().replace("-", "_")
        if key not in by_name:
            raise UsageError(f"head '{name}' has no parameter '{key}'; its parameters: "
                             f"{', '.join(by_name)} (`skincache heads {name}` shows types and "
                             "defaults)")
        try:
            out[key] = _convert(str(raw), hints.get(key, Any))
        except (ValueError, TypeError):
            spec_ = by_name[key]
            raise UsageError(f"head '{name}': -p {key}={raw} is not of type {spec_.type} "
                             f"(default: {spec_.default!r}; `skincache heads {name}` lists "
                             "its parameters)") from None
    return out

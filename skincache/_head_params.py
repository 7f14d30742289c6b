"""Every head's name and parameters (name, type, default), read from the `__init__` signatures
in skincache/heads/*.py as source text, so `--head mpl` or `-p nprob=8` is refused before torch
loads (importing any head pulls in torch: 3-9 s for a typo).

The signatures stay the one source of truth: this module parses them (`ast`), it keeps no list
of its own, and `tests/test_promises.py` checks that what it reads equals what `inspect` sees on
the imported classes. `skincache.heads.parse_params` is this module's `parse_params`.
"""

from __future__ import annotations

import ast
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skincache.errors import UsageError

HEADS_DIR = Path(__file__).parent / "heads"
_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": None, "tuple": tuple,
          "Any": Any}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str  # as written in the signature, e.g. "float | None"
    default: Any


def _register_name(cls: ast.ClassDef) -> str | None:
    """"knn" for a class decorated `@register_head("knn")`, else None."""
    for d in cls.decorator_list:
        if (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register_head"
                and d.args and isinstance(d.args[0], ast.Constant)):
            return d.args[0].value
    return None


def _default(node: ast.expr | None, constants: dict[str, Any]) -> Any:
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return ast.literal_eval(node)


def _module_constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level `NAME = literal` assignments (a default such as `IVF_THRESHOLD`)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def _init_params(cls: ast.ClassDef, constants: dict[str, Any]) -> tuple[ParamSpec, ...]:
    init = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    a = init.args
    pos = a.args[1:]  # without self
    defaults = [None] * (len(pos) - len(a.defaults)) + list(a.defaults)
    pairs = [*zip(pos, defaults, strict=True), *zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    return tuple(ParamSpec(arg.arg, ast.unparse(arg.annotation) if arg.annotation else "Any",
                           _default(d, constants)) for arg, d in pairs)


@functools.cache
def head_params() -> dict[str, tuple[ParamSpec, ...]]:
    """{head name: its parameters}, in the order `skincache.heads` registers them (its
    modules, alphabetically)."""
    out: dict[str, tuple[ParamSpec, ...]] = {}
    for path in sorted(HEADS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _module_constants(tree)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and (name := _register_name(node)):
                out[name] = _init_params(node, constants)
    return out


def check_head(name: str) -> tuple[ParamSpec, ...]:
    """The parameters of head `name`; UsageError naming the known heads otherwise."""
    heads = head_params()
    if name not in heads:
        raise UsageError(f"unknown head {name!r}; known heads: {', '.join(heads)}")
    return heads[name]


def is_seeded(name: str) -> bool:
    """Whether head `name` takes a seed (the others are deterministic: one fit is enough)."""
    return any(p.name == "seed" for p in check_head(name))


def annotation(type_text: str) -> Any:
    """"float | None" -> the type it names (the builtins and `tuple[...]` heads use)."""
    return eval(type_text, {"__builtins__": {}}, _NAMES)  # noqa: S307 - our own source text


_RANK = {type(None): 0, bool: 1, int: 2, float: 3, tuple: 4}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def convert(raw: str, t: Any) -> Any:
    """`raw` as type `t`; ValueError when it is not one."""
    origin = typing.get_origin(t)
    if t is None:
        t = type(None)
    if origin in (typing.Union, types.UnionType):
        # None first, then the strictest types, so "auto" stays a string and "1" an int
        order = sorted(typing.get_args(t), key=lambda m: _RANK.get(typing.get_origin(m) or m, 9))
        for m in order:
            try:
                return convert(raw, m)
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
        return tuple(convert(str(p), a) for p, a in zip(parts, args, strict=True))
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
    by_name = {p.name: p for p in check_head(name)}
    out: dict[str, Any] = {}
    for key, raw in items.items():
        key = key.strip().replace("-", "_")
        if key not in by_name:
            raise UsageError(f"head '{name}' has no parameter '{key}'; its parameters: "
                             f"{', '.join(by_name)} (`skincache heads {name}` shows types and "
                             "defaults)")
        spec = by_name[key]
        try:
            out[key] = convert(str(raw), annotation(spec.type))
        except (ValueError, TypeError):
            raise UsageError(f"head '{name}': -p {key}={raw} is not of type {spec.type} "
                             f"(default: {spec.default!r}; `skincache heads {name}` lists "
                             "its parameters)") from None
    return out

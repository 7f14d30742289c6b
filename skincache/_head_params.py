"""Every head's name and parameters (name, type, default), read from the `__init__` signatures
in skincache/heads/*.py as source text, so `--head mpl` or `-p nprob=8` is refused before torch
loads (importing any head pulls in torch: 3-9 s for a typo).

The signatures stay the one source of truth: this module parses them (`ast`), it keeps no list
of its own, and `tests/test_promises.py` checks that what it reads equals what `inspect` sees on
the imported classes. `skincache.heads.parse_params` is this module's `parse_params`.

The values a parameter accepts are declared next to it, as each head class's
`param_constraints` literal (`{"C": ">0", "dropout": "[0,1)"}`), read here the same way, so
`-p C=-1` is one error line before torch loads instead of NaN probabilities after the fit.
The grammar: alternatives separated by "|", each a comparison (`>0`, `>=1`, `<=10`), an
interval (`[0,1)`, `(0,1]`) or a bare word the value may equal (`auto`); None always passes
(an optional parameter's "not set"), numbers must be finite, a tuple is checked element-wise.
The rule `METADATA_RULE` (a head's `metadata` parameter) is a list of metadata field names,
checked by `skincache.metadata` (`dx_type` refused, unknown names listed).
`Head.fit` checks the same rules through `param_violation` for Python users.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skincache.errors import UsageError
from skincache.metadata import FIELDS, field_violation

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


def _class_constraints(cls: ast.ClassDef) -> dict[str, str]:
    """The class body's `param_constraints = {...}` literal ({} without one)."""
    for node in cls.body:
        target = (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1
                  else node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and target.id == "param_constraints" and node.value:
            return ast.literal_eval(node.value)
    return {}


@functools.cache
def _read_heads() -> dict[str, tuple[tuple[ParamSpec, ...], dict[str, str]]]:
    out = {}
    for path in sorted(HEADS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _module_constants(tree)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and (name := _register_name(node)):
                out[name] = (_init_params(node, constants), _class_constraints(node))
    return out


def head_params() -> dict[str, tuple[ParamSpec, ...]]:
    """{head name: its parameters}, in the order `skincache.heads` registers them (its
    modules, alphabetically)."""
    return {name: specs for name, (specs, _) in _read_heads().items()}


#: every head's `logit_adjust` (`heads._posthoc.check_logit_adjust` says the same at fit time)
SHARED_CONSTRAINTS = {"logit_adjust": "auto|>=0"}


def head_constraints(name: str) -> dict[str, str]:
    """{parameter: rule} for head `name`: its class's `param_constraints` as written in its
    source, plus `SHARED_CONSTRAINTS` for the parameters it has."""
    check_head(name)
    specs, own = _read_heads()[name]
    shared = {k: v for k, v in SHARED_CONSTRAINTS.items() if any(p.name == k for p in specs)}
    return {**shared, **own}


_COMPARE = re.compile(r"(>=|<=|>|<)\s*([-+0-9.eE]+|inf)")
_INTERVAL = re.compile(r"([\[(])\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+|inf)\s*([\])])")


def _alternative_ok(value: Any, alt: str) -> bool:
    """Whether `value` satisfies one alternative of a rule (ValueError: not the grammar)."""
    alt = alt.strip()
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if m := _COMPARE.fullmatch(alt):
        op, bound = m.group(1), float(m.group(2))
        return number and math.isfinite(value) and {
            ">": value > bound, ">=": value >= bound, "<": value < bound,
            "<=": value <= bound}[op]
    if m := _INTERVAL.fullmatch(alt):
        lo, hi = float(m.group(2)), float(m.group(3))
        return (number and math.isfinite(value)
                and (value >= lo if m.group(1) == "[" else value > lo)
                and (value <= hi if m.group(4) == "]" else value < hi))
    if re.fullmatch(r"[A-Za-z_][\w-]*", alt):
        return value == alt
    raise ValueError(f"not a parameter constraint: {alt!r}")


def describe_rule(rule: str) -> str:
    """">0" -> "> 0", "[0,1)" -> "in [0, 1)", "auto|>=0" -> "'auto' or >= 0"."""
    if rule == METADATA_RULE:
        return f"metadata fields from {', '.join(FIELDS)} (comma-separated)"
    parts = []
    for alt in (a.strip() for a in rule.split("|")):
        if m := _COMPARE.fullmatch(alt):
            parts.append(f"{m.group(1)} {m.group(2)}")
        elif m := _INTERVAL.fullmatch(alt):
            parts.append(f"in {m.group(1)}{m.group(2)}, {m.group(3)}{m.group(4)}")
        else:
            parts.append(repr(alt))
    return " or ".join(parts)


#: the rule of a `metadata` parameter: metadata field names (`skincache.metadata.FIELDS`)
METADATA_RULE = "metadata-fields"


def param_violation(key: str, value: Any, rule: str | None) -> str | None:
    """"C must be > 0" when `value` breaks `rule`, else None: the one check behind both
    `parse_params` (the CLI, before torch) and `Head.fit` (Python users)."""
    if rule is None or value is None:
        return None
    if rule == METADATA_RULE:
        return field_violation(value)
    values = value if isinstance(value, tuple | list) else (value,)
    alts = rule.split("|")
    if all(any(_alternative_ok(v, a) for a in alts) for v in values):
        return None
    return f"{key} must be {describe_rule(rule)}"


def check_constraints(name: str, params: Mapping[str, Any], constraints: Mapping[str, str],
                      shown: Mapping[str, str] | None = None, where: str = "-p ") -> None:
    """UsageError for the first of `params` that breaks its rule in `constraints`, naming the
    value (`shown[key]`, as typed, else its repr), what it must be, and `where` it was given
    ("-p " on the command line, "MLPHead(" from Python)."""
    for key, value in params.items():
        if why := param_violation(key, value, constraints.get(key)):
            raw = shown[key] if shown and key in shown else repr(value)
            close = ")" if where.endswith("(") else ""
            raise UsageError(f"{where}{key}={raw}{close}: {why} (skincache heads {name} lists "
                             "the parameters)")


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
    A wrong name, a value of the wrong type or one its `param_constraints` refuse is a
    `UsageError` naming the valid choices."""
    by_name = {p.name: p for p in check_head(name)}
    out: dict[str, Any] = {}
    shown: dict[str, str] = {}
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
        shown[key] = str(raw)
    check_constraints(name, out, head_constraints(name), shown)
    return out


#: Fit options every head takes through `-p` beside its own parameters: they choose the fit's
#: inputs (`runs.fit_inputs`), not the head. `features`: the cached features the head is fit
#: on, and then evaluated and predicted with: `projected` (the image tower's output, in the
#: text tower's space) or `pre` (the pooled output before the final projection, stored by
#: `encode --pre-projection`).
FIT_OPTIONS: dict[str, tuple[str, ...]] = {"features": ("projected", "pre")}


def split_fit_options(items: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(fit options, head parameters) of `-p key=value` items; a fit option's value outside
    its choices is a UsageError naming them."""
    fit, rest = {}, {}
    for key, raw in items.items():
        k = key.strip().replace("-", "_")
        if k in FIT_OPTIONS:
            if raw not in FIT_OPTIONS[k]:
                raise UsageError(f"-p {k}={raw}: expected one of {', '.join(FIT_OPTIONS[k])}")
            fit[k] = raw
        else:
            rest[key] = raw
    return fit, rest

"""Name -> head class, filled by a decorator, so a CLI flag or a benchmark loop picks a head by
name without an if-chain and a saved head's JSON can say which class rebuilds it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from skincache.errors import UsageError

#: name -> head class (a `heads.base.Head` subclass). The registry knows no head module, not
#: even `base` (which imports it to rebuild saved heads): heads/ has no import cycle.
HEADS: dict[str, type] = {}

H = TypeVar("H", bound=type)


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: make the head constructible as `create_head(name)` and record the name on
    the class (`cls.name`), which is what `save` writes and `load_head` reads back."""

    def decorate(cls: H) -> H:
        if name in HEADS and HEADS[name] is not cls:
            raise ValueError(f"head name {name!r} is already registered to {HEADS[name]!r}")
        cls.name = name
        HEADS[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    """Registered head names in registration order (the order of `skincache.heads`' imports)."""
    return list(HEADS)


def get_head_class(name: str) -> type:
    try:
        return HEADS[name]
    except KeyError:
        raise UsageError(f"unknown head {name!r}; known heads: {', '.join(HEADS)}") from None


def create_head(name: str, **params: Any) -> Any:
    """A new, unfitted head. Unknown parameter names raise TypeError naming the head."""
    cls = get_head_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise TypeError(f"head {name!r}: {exc}") from None

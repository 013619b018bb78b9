"""``typing.NamedTuple``'s class syntax, without importing typing at run time.

typing costs every ``corral run`` about 2.5 ms to import, and the runtime
needs nothing of it but the class syntax of its named tuples (issue 19: no
typing on a CLI verb's path). Modules write::

    TYPE_CHECKING = False  # typing's, without importing typing: see ._tuples
    if TYPE_CHECKING:
        from typing import NamedTuple
    else:
        from ._tuples import NamedTuple

so that type checkers see typing's, and the interpreter this one. It does
what typing's does (3.11): the annotated names are the fields, in order,
those with a value their defaults; what else the class body holds (methods,
properties, class methods, the docstring) is set on the
``collections.namedtuple`` made from them.
"""

from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False  # typing's, without importing it (the point of this module)
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["NamedTuple"]

_OWN = frozenset(("__module__", "__qualname__", "__annotations__", "__orig_bases__", "__doc__"))


class _Maker(type):
    """Makes the named tuple a class statement deriving from NamedTuple names."""

    def __new__(cls, typename: str, bases: tuple[type, ...], ns: dict[str, object]) -> type:
        # Returns the tuple class, not an instance of ours: Python then
        # leaves it as it is (no __init__), as typing's does.
        annotations: dict[str, object] = dict(ns.get("__annotations__", {}))  # type: ignore[call-overload]
        defaults = []
        for field in annotations:
            if field in ns:
                defaults.append(ns[field])
            elif defaults:
                raise TypeError(
                    f"{typename}: non-default field {field!r} cannot follow default fields"
                )
        make: Callable[..., type] = namedtuple  # its fields known only here
        made = make(typename, list(annotations), defaults=defaults, module=ns["__module__"])
        made.__annotations__ = annotations
        made.__qualname__ = str(ns.get("__qualname__", typename))
        if ns.get("__doc__") is not None:
            made.__doc__ = ns["__doc__"]  # type: ignore[assignment]
        for key, value in ns.items():
            if key not in _OWN and key not in annotations:
                setattr(made, key, value)
        return made


NamedTuple = type.__new__(_Maker, "NamedTuple", (), {})
"""Derive from this as from ``typing.NamedTuple``."""

"""The runtime's named tuples, made without typing (supervisor/_runtime/_tuples.py)."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

TYPE_CHECKING = False  # mypy sees typing's, as in the runtime's modules
if TYPE_CHECKING:
    from typing import NamedTuple
else:
    from supervisor._runtime._tuples import NamedTuple


class _Point(NamedTuple):
    """A point."""

    x: int
    y: int = 2

    @property
    def total(self) -> int:
        return self.x + self.y

    @classmethod
    def of(cls, data: dict[str, int]) -> _Point:
        return cls(**data)


class _TypingPoint(typing.NamedTuple):
    """A point."""

    x: int
    y: int = 2


def test_it_makes_what_typing_makes() -> None:
    """Fields, defaults, docstring, methods and the tuple's own API, as typing's class gives them."""
    p = _Point(1)
    assert (p, p.total, _Point.of({"x": 3, "y": 4})) == ((1, 2), 3, (3, 4))
    assert p._replace(y=5) == _Point(1, 5) and p._asdict() == {"x": 1, "y": 2}
    for attr in ("_fields", "_field_defaults", "__doc__", "__module__"):
        assert getattr(_Point, attr) == getattr(_TypingPoint, attr), attr
    assert _Point.__qualname__ == "_Point" and repr(p) == "_Point(x=1, y=2)"
    assert isinstance(p, tuple) and typing.get_type_hints(_Point) == {"x": int, "y": int}


def test_a_field_without_a_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="non-default field 'b' cannot follow default fields"):

        class _Bad(NamedTuple):
            a: int = 1
            b: int  # type: ignore[misc]  # the mistake under test


def test_the_runtime_s_tuples_import_no_typing() -> None:
    """The modules a start imports define their named tuples without typing."""
    code = "import sys; import supervisor._runtime._sandbox; print('typing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr

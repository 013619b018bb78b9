"""argparse for ``corral``: the parser class every verb's sub-parser is.

Only a verb's slow path imports this (argparse, gettext and re: ~5 ms):
``--version`` and the common command lines of the control verbs are read
without it (see :mod:`._main`).
"""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT_CORRAL, terminal_columns

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, NoReturn, TypeAlias

__all__ = ["Parser", "Subparsers"]


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, its width found without importing shutil.

    argparse makes a formatter for every argument it adds (to check its
    metavar), and the default one imports shutil (with bz2, lzma and
    fnmatch: ~2 ms) to learn the terminal's width, which only help needs.
    The width is the same: ``shutil.get_terminal_size().columns - 2``.
    """

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with corral's status."""

    after_dashes: str | None = None
    """If set, the words after the first ``--`` are not parsed but kept, as
    a list, in the namespace attribute of this name (``[]`` without a
    ``--``). argparse alone cannot take ``VERB RECIPE --opt X -- WORDS``: it
    gives a trailing positional its (empty) share at the first positional,
    and the words after ``--`` are then unrecognized."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        """argparse's, with :attr:`after_dashes` applied."""
        if self.after_dashes is None or args is None:
            return super().parse_known_args(args, namespace)
        words = list(args)
        tail: list[str] = []
        if "--" in words:
            cut = words.index("--")
            words, tail = words[:cut], words[cut + 1 :]
        parsed, extras = super().parse_known_args(words, namespace)
        setattr(parsed, self.after_dashes, tail)
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"corral: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_CORRAL)


if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[Parser]
    """What ``add_subparsers`` returns; each group's ``add_parsers`` takes it."""

"""What the groups of verbs share: exit statuses, usage errors, directories.

Every group module imports this one while the parser is built, so it
imports nothing but the standard library's cheapest modules and the
exception tree; what a helper needs beyond that it imports when called.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar, overload

from .._errors import CorralError

__all__ = [
    "EXIT_CORRAL",
    "EXIT_NOEXEC",
    "EXIT_NOTFOUND",
    "Parser",
    "UsageError",
    "add_socket_option",
    "command_after_dashes",
    "control_path",
    "human_size",
    "no_verb",
    "run_dir",
    "state_dir",
    "tree_size",
    "warn_privileged",
]

_N = TypeVar("_N")

EXIT_CORRAL = 125
"""corral itself failed, or the input was bad."""
EXIT_NOEXEC = 126
"""The command cannot be executed."""
EXIT_NOTFOUND = 127
"""The command does not exist in the sandbox."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with corral's status."""

    after_dashes: str | None = None
    """If set, the words after the first ``--`` are not parsed but kept, as
    a list, in the namespace attribute of this name (``[]`` without a
    ``--``). argparse alone cannot take ``VERB RECIPE --opt X -- WORDS``: it
    gives a trailing positional its (empty) share at the first positional,
    and the words after ``--`` are then unrecognized."""

    @overload
    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: None = None
    ) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(
        self, args: Iterable[str] | None, namespace: _N
    ) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...
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


class UsageError(CorralError):
    """Bad command-line usage (reported like every error: one line, status 125)."""


def command_after_dashes(words: Sequence[str], missing: str) -> list[str]:
    """The command of ``VERB ... -- COMMAND [ARGS...]``; UsageError *missing* if there is none."""
    command = list(words)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError(missing)
    return command


def state_dir() -> str:
    """Where sandboxes' logs and checkpoints are kept (``CORRAL_STATE_DIR``)."""
    from .._runtime._dirs import DEFAULT_STATE_DIR

    return os.environ.get("CORRAL_STATE_DIR") or DEFAULT_STATE_DIR


def run_dir() -> str:
    """Where a running supervisor's sockets are (``CORRAL_RUN_DIR``)."""
    from .._runtime._dirs import DEFAULT_RUN_DIR

    return os.environ.get("CORRAL_RUN_DIR") or DEFAULT_RUN_DIR


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    """``--socket``, for a verb that talks to the supervisor's control socket."""
    parser.add_argument("--socket", help="control socket (default: RUN_DIR/control.sock)")


def control_path(args: argparse.Namespace) -> str:
    """The control socket: ``--socket``, else the one in the run directory."""
    from .._control._client import CONTROL_SOCKET

    return args.socket or os.path.join(run_dir(), CONTROL_SOCKET)


def no_verb(parser: argparse.ArgumentParser) -> int:
    """A verb group given no verb (``corral image``): its help, status 2."""
    parser.print_help()
    return 2


def tree_size(path: str) -> int:
    """Bytes the files below *path* take on disk (``du``), unreadable ones left out."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def human_size(n: int) -> str:
    """Bytes for a person: ``512 B``, ``1.5 KiB``, ``64.0 MiB``, up to GiB."""
    from .._runtime._units import human_size as rounded  # not at the top: see above

    return rounded(n)


def warn_privileged(name: str) -> None:
    """Say on stderr that sandbox *name* runs without its protections."""
    sys.stderr.write(
        f"corral: WARNING: sandbox {name!r} is privileged: it keeps every capability and"
        " no_new_privs is off; its root is the host's root\n"
    )

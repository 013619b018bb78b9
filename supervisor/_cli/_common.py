"""What the groups of verbs share: exit statuses, usage errors, directories.

Every verb's path imports this one, the control verbs' without argparse,
so it imports nothing but ``os``, ``sys`` and the exception tree (not
typing, not argparse: annotations only); what a helper needs beyond that
it imports when called. argparse's side is :mod:`._parser`.
"""

from __future__ import annotations

import os
import sys

from .._errors import CorralError

# typing.TYPE_CHECKING without importing typing (~4 ms with re, which it
# imports); type checkers treat any TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

__all__ = [
    "EXIT_CORRAL",
    "EXIT_NOEXEC",
    "EXIT_NOTFOUND",
    "SOCKET_HELP",
    "UsageError",
    "add_socket_option",
    "command_after_dashes",
    "control_path",
    "human_size",
    "no_verb",
    "run_dir",
    "state_dir",
    "terminal_columns",
    "tree_size",
    "warn_privileged",
]

EXIT_CORRAL = 125
"""corral itself failed, or the input was bad."""
EXIT_NOEXEC = 126
"""The command cannot be executed."""
EXIT_NOTFOUND = 127
"""The command does not exist in the sandbox."""


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


SOCKET_HELP = "control socket (default: RUN_DIR/control.sock)"
"""The help of ``--socket``, the option of every verb that talks to the control socket."""


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    """``--socket``, for a verb that talks to the supervisor's control socket."""
    parser.add_argument("--socket", help=SOCKET_HELP)


def control_path(args: argparse.Namespace) -> str:
    """The control socket: ``--socket``, else the one in the run directory."""
    from .._control._client import CONTROL_SOCKET

    return args.socket or os.path.join(run_dir(), CONTROL_SOCKET)


def no_verb(parser: argparse.ArgumentParser) -> int:
    """A verb group given no verb (``corral image``): its help, status 2."""
    parser.print_help()
    return 2


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil.

    ``COLUMNS`` if it is a positive number, else the width of the terminal
    on ``sys.__stdout__``, else 80: shutil's rules (it also reads
    ``LINES``, which only the height needs).
    """
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    if stdout is None:
        return 80
    try:
        return os.get_terminal_size(stdout.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


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

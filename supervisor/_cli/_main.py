"""The ``corral`` command line: read the verb, run it, map errors to statuses.

Each group of verbs is a module with an ``add_parsers(subparsers)`` that
registers its sub-parsers and sets, with ``set_defaults(func=...)``, the
function that runs each verb; :func:`main` parses and calls ``args.func``.
The groups: :mod:`._run` (``run``), :mod:`._fleet` (``up``, ``events``,
``logs``), :mod:`._checkpoints` (``checkpoint``, ``restore``,
``checkpoints``), :mod:`._control_verbs` (``ps`` ... ``update``, through
the control socket), :mod:`._commit` (``commit``), :mod:`._images`
(``image``) and :mod:`._volumes` (``volume``).

Exit statuses follow ``docker run``: the sandbox's own status when it ran
(128+N after signal N, 137 after an OOM kill); 125 when corral itself
failed or the input was bad; 126 when the command cannot be executed; 127
when it does not exist in the sandbox. Every error is one line on stderr.

Start-up is most of what a one-shot verb costs (``corral pause`` is a
millisecond's work for the supervisor), so every verb imports only what its
own path needs. This module imports nothing at its top but ``os``, ``sys``
and the exception tree, and reads the command line in up to three steps:

1. ``corral --version`` alone is answered here.
2. A plain command line of a control verb (``corral pause web``), of
   ``events`` or of ``logs`` is read without argparse, from the same
   declarations argparse is given (:mod:`._arguments`).
3. Else argparse, with only the sub-parsers of the group that the first
   word names (a sub-parser's help and errors do not depend on the
   others), or all of them (``corral --help``, an unknown verb).

Verbs that need no event loop must not import trio (it costs ~180 ms): the
group modules import at their top only what building the parser needs, and
each verb imports what it uses when it runs. tests/test_cli_imports.py
holds each path to what it imports.
"""

from __future__ import annotations

import os
import sys

from .._errors import CommandNotExecutableError, CommandNotFoundError, CorralError
from ._common import EXIT_CORRAL, EXIT_NOEXEC, EXIT_NOTFOUND, terminal_columns

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import NoReturn

__all__ = ["VERBS", "build_parser", "entry", "main", "parse_args"]

# (group module, its function that registers sub-parsers), in the order
# `corral --help` lists the verbs; `checkpoints` has always come last.
_REGISTRARS = (
    ("_run", "add_parsers"),
    ("_fleet", "add_parsers"),
    ("_checkpoints", "add_parsers"),
    ("_control_verbs", "add_parsers"),
    ("_commit", "add_parsers"),
    ("_images", "add_parsers"),
    ("_volumes", "add_parsers"),
    ("_checkpoints", "add_listing_parser"),
)


VERBS: dict[str, str] = {
    "run": "_run",
    **dict.fromkeys(("up", "events", "logs"), "_fleet"),
    **dict.fromkeys(("checkpoint", "restore", "checkpoints"), "_checkpoints"),
    **dict.fromkeys(
        (
            "ps",
            "inspect",
            "stop",
            "start",
            "restart",
            "kill",
            "pause",
            "resume",
            "exec",
            "stats",
            "add",
            "rm",
            "update",
        ),
        "_control_verbs",
    ),
    "commit": "_commit",
    "image": "_images",
    "volume": "_volumes",
}
"""Every verb, and the group module that registers (and runs) it."""


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The ``corral`` parser; every verb's namespace has ``func``, the verb to run.

    With *verb* (a key of :data:`VERBS`) only the sub-parsers of its group
    are built: enough to parse any command line that starts with it.
    """
    import importlib

    from .._version import __version__
    from ._parser import Parser

    parser = Parser(prog="corral", description="Run and supervise Linux sandboxes.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    group = None if verb is None else VERBS[verb]
    for module, register in _REGISTRARS:
        if group is None or module == group:
            getattr(importlib.import_module(f"{__package__}.{module}"), register)(sub)
    return parser


def parse_args(words: Sequence[str]) -> argparse.Namespace:
    """The command line (without the program's name), as the verbs take it.

    Exits with status 125 and one line on stderr if it is wrong, and with
    0 after printing help.
    """
    verb = words[0] if words and words[0] in VERBS else None
    if verb is not None and (args := _parse_plain(verb, words[1:])) is not None:
        return args
    return build_parser(verb).parse_args(words)


def _parse_plain(verb: str, words: Sequence[str]) -> argparse.Namespace | None:
    """*verb*'s command line read without argparse, if its group can and it
    is plain (:mod:`._arguments`); else ``None``."""
    if VERBS[verb] == "_control_verbs":
        from . import _control_verbs

        return _control_verbs.parse_verb(verb, words)
    if VERBS[verb] == "_fleet":
        from . import _fleet

        return _fleet.parse_verb(verb, words)
    if VERBS[verb] == "_run":
        from . import _run

        return _run.parse_verb(verb, words)
    return None


def _version_line() -> str | None:
    """What ``corral --version`` prints, if it can be printed without argparse.

    argparse fills the line to the terminal's width less 2 (at least 11
    columns): on a narrower terminal it would break it, so it is argparse's.
    """
    from .._version import __version__

    line = f"corral {__version__}"
    return line if len(line) <= max(terminal_columns() - 2, 11) else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` console script."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words == ["--version"] and (line := _version_line()) is not None:
        sys.stdout.write(line + "\n")
        return 0
    args = parse_args(words)
    run_verb: Callable[[argparse.Namespace], int] = args.func
    try:
        return run_verb(args)
    except CommandNotFoundError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOTFOUND
    except CommandNotExecutableError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOEXEC
    except (CorralError, _rootfs_error()) as exc:
        for line in str(exc).splitlines():
            sys.stderr.write(f"corral: {line}\n")
        return EXIT_CORRAL
    except KeyboardInterrupt as exc:
        import signal  # here: its enums cost ~0.4 ms that most verbs do not need

        # A build that SIGTERM or SIGHUP interrupted (rootfs.reverting) says which.
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except BrokenPipeError:
        # Our stderr went away; nothing useful left to say.
        os._exit(EXIT_CORRAL)


def _rootfs_error() -> type[Exception]:
    """rootfs's exception base class, reported like corral's own.

    Called only once an exception reaches that clause. Only rootfs raises
    its errors, so if nothing imported it there is none to catch, and an
    error of a verb that never touched it does not import it either.
    """
    if "rootfs" not in sys.modules:
        return CorralError
    from rootfs import RootfsError

    return RootfsError


def entry() -> NoReturn:
    """The console script: run :func:`main`, then exit without teardown.

    Interpreter teardown (freeing every module) costs several ms that a
    one-shot command does not need to pay; nothing is left to clean up by
    the time :func:`main` returns, so flush and leave.
    """
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(status)

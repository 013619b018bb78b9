"""The ``corral`` command line: build the parser, run the verb, map errors to statuses.

Each group of verbs is a module with an ``add_parsers(subparsers)`` that
registers its sub-parsers and sets, with ``set_defaults(func=...)``, the
function that runs each verb; :func:`main` parses and calls ``args.func``.
The groups: :mod:`._run` (``run``), :mod:`._fleet` (``up``, ``events``,
``logs``), :mod:`._checkpoints` (``checkpoint``, ``restore``,
``checkpoints``), :mod:`._control_verbs` (``ps`` ... ``rm``, through the
control socket), :mod:`._commit` (``commit``) and :mod:`._images`
(``image``).

Exit statuses follow ``docker run``: the sandbox's own status when it ran
(128+N after signal N, 137 after an OOM kill); 125 when corral itself
failed or the input was bad; 126 when the command cannot be executed; 127
when it does not exist in the sandbox. Every error is one line on stderr.

Verbs that need no event loop must not import trio (it costs ~180 ms): the
group modules import at their top only what building the parser needs, and
each verb imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rootfs import RootfsError

from .._errors import CommandNotExecutableError, CommandNotFoundError, CorralError
from . import _checkpoints, _commit, _control_verbs, _fleet, _images, _run, _volumes
from ._common import EXIT_CORRAL, EXIT_NOEXEC, EXIT_NOTFOUND, Parser

__all__ = ["build_parser", "entry", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``corral`` parser; every verb's namespace has ``func``, the verb to run."""
    from .._version import __version__

    parser = Parser(prog="corral", description="Run and supervise Linux sandboxes.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    sub.required = True
    # The order `corral --help` lists the verbs in; `checkpoints` has always come last.
    _run.add_parsers(sub)
    _fleet.add_parsers(sub)
    _checkpoints.add_parsers(sub)
    _control_verbs.add_parsers(sub)
    _commit.add_parsers(sub)
    _images.add_parsers(sub)
    _volumes.add_parsers(sub)
    _checkpoints.add_listing_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` console script."""
    args = build_parser().parse_args(argv)
    run_verb: Callable[[argparse.Namespace], int] = args.func
    try:
        return run_verb(args)
    except CommandNotFoundError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOTFOUND
    except CommandNotExecutableError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOEXEC
    except (CorralError, RootfsError) as exc:
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

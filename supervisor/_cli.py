"""The ``corral`` command line: parse, build a spec, call the library.

Exit statuses follow ``docker run``: the sandbox's own status when it ran
(128+N after signal N, 137 after an OOM kill); 125 when corral itself
failed or the input was bad; 126 when the command cannot be executed; 127
when it does not exist in the sandbox. Every error is one line on stderr.

Verbs that need no event loop must not import trio (it costs ~180 ms).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

from ._errors import (
    CommandNotExecutableError,
    CommandNotFoundError,
    CorralError,
)

__all__ = ["entry", "main"]

EXIT_CORRAL = 125
EXIT_NOEXEC = 126
EXIT_NOTFOUND = 127

_FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with corral's status."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"corral: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_CORRAL)


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="corral", description="Run and supervise Linux sandboxes.")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser(
        "run",
        help="run one sandbox in the foreground, then remove it",
        description="Run COMMAND in a new sandbox in the foreground and remove the sandbox"
        " when it ends (like 'docker run --rm'). The exit status is the command's.",
    )
    run.add_argument("--name", help="sandbox name (default: run-<random>)")
    run.add_argument("--rootfs", default="busybox", help="'busybox' (built in) or a directory")
    run.add_argument("--memory", help="memory limit, swap included, e.g. 64M or 1G")
    run.add_argument("--cpus", help="CPU quota in CPUs, e.g. 0.5")
    run.add_argument("--pids", help="maximum number of tasks, e.g. 64")
    run.add_argument("--hostname", help="host name inside (default: the name)")
    run.add_argument(
        "--env", "-e", action="append", default=[], metavar="K=V", help="set a variable"
    )
    run.add_argument("--workdir", "-w", default="/", help="working directory inside")
    run.add_argument("--cgroup-parent", help="cgroup to create the sandbox's cgroup in")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `corral --help` stays instant.
    from ._runtime import Runtime, Sandbox
    from ._spec import (
        Limits,
        SandboxSpec,
        parse_cpus,
        parse_env,
        parse_pids,
        parse_size,
        validate_name,
    )

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _Usage("run: expected a command after '--', e.g. corral run -- sh -c 'echo hi'")
    name = validate_name(args.name, "--name") if args.name else f"run-{os.urandom(4).hex()}"
    limits = Limits(
        memory=parse_size(args.memory, "--memory") if args.memory is not None else None,
        cpus=parse_cpus(args.cpus, "--cpus") if args.cpus is not None else None,
        pids=parse_pids(args.pids, "--pids") if args.pids is not None else None,
    )
    spec = SandboxSpec(
        name=name,
        argv=tuple(command),
        rootfs=args.rootfs,
        hostname=args.hostname,
        env=parse_env(args.env, "--env"),
        workdir=args.workdir,
        limits=limits,
    )

    # Signals that arrive before the sandbox exists are kept and delivered
    # once it does; after that each one is forwarded to its init.
    sandbox: Sandbox | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if sandbox is None:
            pending.append(signum)
        else:
            sandbox.send_signal(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    runtime = Runtime(cgroup_parent=args.cgroup_parent)
    sandbox = runtime.create(spec)
    try:
        for signum in pending:
            sandbox.send_signal(signum)
        result = sandbox.wait()
    finally:
        sandbox.destroy()
    if result.oom_killed:
        limit = f" (memory limit {args.memory})" if args.memory else ""
        sys.stderr.write(
            f"corral: sandbox {name!r} was OOM-killed{limit}: its memory use reached the limit\n"
        )
    return result.status


class _Usage(CorralError):
    """Bad command-line usage."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "run":
            return _run(args)
        parser.error(f"unknown verb {args.verb!r}")
    except CommandNotFoundError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOTFOUND
    except CommandNotExecutableError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOEXEC
    except CorralError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_CORRAL
    except KeyboardInterrupt:
        return 128 + int(signal.SIGINT)
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

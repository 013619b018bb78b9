"""``corral up``, ``corral events`` and ``corral logs``: a fleet and what it says.

``up`` runs a fleet under the supervisor in the foreground (the one verb
that imports trio); ``events`` streams a running supervisor's events from
its event socket; ``logs`` reads a sandbox's captured output from its files,
while the fleet runs or after it stopped. ``events`` and ``logs`` are
declared (:data:`VERBS`) for argparse and for the plain reader of
:mod:`._arguments`, so that their plain command lines skip argparse.
"""

from __future__ import annotations

import os
import sys

from .._errors import CorralError
from ._arguments import Arg, Verb, add_verb, parse_plain
from ._common import UsageError, run_dir, state_dir, warn_privileged

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from ._parser import Subparsers

__all__ = ["VERBS", "add_parsers", "parse_verb"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``up``, ``events`` and ``logs``."""
    up = sub.add_parser(
        "up",
        help="run a fleet under the supervisor, in the foreground",
        description="Start every sandbox of FLEET (a TOML file, see docs/fleet.md) and"
        " supervise them; print events as they happen (human lines on a terminal, JSON"
        " lines otherwise). SIGINT, SIGTERM or SIGHUP stop the fleet gracefully; a second"
        " one kills what is left. Sandboxes a supervisor before this one left running (it"
        " was killed or crashed) are taken back: see docs/fleet.md.",
    )
    up.add_argument("fleet", metavar="FLEET", help="fleet file (TOML)")
    up.add_argument("--json", action="store_true", default=None, help="JSON lines even on a TTY")
    up.add_argument(
        "--ignore-sighup",
        action="store_true",
        help="run on when the terminal goes away (SIGHUP) instead of stopping the fleet",
    )
    up.add_argument(
        "--recreate-changed",
        action="store_true",
        help="restart a sandbox taken back from a previous supervisor if the fleet file now"
        " describes it otherwise (default: it runs on as it is, reported as changed)",
    )
    up.add_argument(
        "--takeover",
        action="store_true",
        help="if a supervisor already runs these sandboxes, replace it without stopping any"
        " (a live upgrade): it hands them over and ends, and this one takes them back",
    )

    up.set_defaults(func=_up)
    for name, verb in VERBS.items():
        add_verb(sub, name, verb)


def parse_verb(name: str, words: Sequence[str]) -> argparse.Namespace | None:
    """``corral events|logs WORDS...`` read without argparse, if it is plain
    (see :func:`._arguments.parse_plain`); else ``None`` (and for ``up``,
    which pays for trio anyway)."""
    verb = VERBS.get(name)
    return None if verb is None else parse_plain(name, verb, words)


FDS_PER_SANDBOX = 7
"""Descriptors a supervisor holds per sandbox, with room: 5 measured on
cgroup v1 (its pidfd, its output pipes' read ends, its OOM watch, its
sysinfo listener's copy), 6 on v2 (an OOM watch is two there), once its
log file has let go (past the 256 most recently written) and its
namespaces are not held (past a sixteenth of the limit). The keeper,
which inherits the limit, holds three."""


def raise_open_files_limit(instances: int = 0) -> None:
    """Raise this process's limit of open files for a fleet of *instances*.

    The soft limit goes to the hard one (the usual soft limit of 1024 would
    stop a fleet near 120 sandboxes). The hard limit is whoever started us
    setting a ceiling (``ulimit -Hn``, a service's ``LimitNOFILE=``), not
    corral's to lift: if it is short of what *instances* need, one line
    says so, and the sandboxes past it fail to start, one line each. The
    sandboxes do not inherit it: theirs is set for them (1024 unless the
    fleet says otherwise).
    """
    import resource

    need = 1024 + FDS_PER_SANDBOX * instances
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        print(
            f"corral: warning: {instances} sandboxes need about {need} open files;"
            f" the hard limit is {hard} (raise it: ulimit -Hn, LimitNOFILE= of a service)",
            file=sys.stderr,
        )
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _proc_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_kernel_limits(instances: int) -> list[str]:
    """One line for each host limit a fleet of *instances* would run into:
    kernel settings, not corral's to change (they are the host's)."""
    if instances <= 0:
        return []
    problems = []
    pid_max = _proc_int("/proc/sys/kernel/pid_max")
    if pid_max is not None and pid_max < 2 * instances + 1024:
        problems.append(
            f"kernel.pid_max is {pid_max}: {instances} sandboxes need at least"
            f" {2 * instances} process IDs (an init and its command each);"
            f" raise it (sysctl kernel.pid_max={max(4 * instances, 65536)})"
        )
    for kind in ("user", "mnt", "net", "pid", "ipc", "uts", "cgroup"):
        limit = _proc_int(f"/proc/sys/user/max_{kind}_namespaces")
        if limit is not None and limit < instances:
            problems.append(
                f"user.max_{kind}_namespaces is {limit}: {instances} sandboxes need"
                f" {instances}; raise it (sysctl user.max_{kind}_namespaces={2 * instances})"
            )
    return problems


def _up(args: argparse.Namespace) -> int:
    import trio

    from .._control._service import Supervisor
    from .._core._fleet import load_fleet
    from .._core._supervisor_log import configure_logging

    fleet = load_fleet(args.fleet)
    for cfg in fleet.sandboxes:
        if cfg.security.privileged:
            warn_privileged(cfg.name)
    instances = sum(cfg.replicas for cfg in fleet.sandboxes)
    raise_open_files_limit(instances)
    for line in check_kernel_limits(instances):
        print(f"corral: warning: {line}", file=sys.stderr)
    configure_logging(json=args.json)
    supervisor = Supervisor(
        fleet,
        handle_signals=True,
        ignore_hup=args.ignore_sighup,
        log=True,
        recreate_changed=args.recreate_changed,
        takeover=args.takeover,
    )
    trio.run(supervisor.run)
    return 0


def _events(args: argparse.Namespace) -> int:
    import events
    from events import iter_events

    path = args.socket or os.path.join(run_dir(), "events.sock")
    human = not args.json
    if not human:
        import json  # here: human lines need no json (nor the re it imports)
    try:
        for event in iter_events(path, kinds=args.kind, sandboxes=args.sandbox, since=args.since):
            if human:
                who = f" {event.sandbox}#{event.generation}" if event.sandbox else ""
                data = " ".join(f"{k}={v}" for k, v in event.data().items())
                line = f"{event.seq:>8} {_clock(event.wall)} {event.kind:<18}{who} {data}"
            else:
                line = json.dumps(
                    {
                        "seq": event.seq,
                        "kind": event.kind,
                        "sandbox": event.sandbox,
                        "instance": event.instance,
                        "generation": event.generation,
                        "wall": event.wall,
                        "mono": event.mono,
                        "data": event.data(),
                    },
                    default=repr,  # plugin payloads may hold bytes
                )
            sys.stdout.write(line.rstrip() + "\n")
            sys.stdout.flush()
    except events.SocketError as exc:
        cause = exc.__cause__
        if isinstance(cause, PermissionError):
            raise CorralError(f"not allowed to connect to {path}") from None
        if isinstance(cause, ConnectionRefusedError | FileNotFoundError):
            raise CorralError(
                f"no supervisor is listening on {path} (is `corral up` running?)"
            ) from None
        raise CorralError(f"event socket {path}: {exc}") from None
    return 0


def _clock(wall: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def _logs(args: argparse.Namespace) -> int:
    import time

    from ._output_reader import follow, format_record, parse_since, read_records

    logdir = os.path.join(state_dir(), "logs")
    path = os.path.join(logdir, f"{args.name}.log")
    if not os.path.exists(path) and os.path.exists(os.path.join(logdir, f"{args.name}-0.log")):
        path = os.path.join(logdir, f"{args.name}-0.log")
    if not os.path.exists(path):
        raise CorralError(f"no output logged for {args.name!r} (looked in {logdir})")
    if args.tail is not None and args.tail < 0:
        raise UsageError(f"--tail: expected a number of lines >= 0, got {args.tail}")
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from None
    out = sys.stdout.buffer
    if args.follow:
        for record in follow(path, since=since, tail=args.tail):
            out.write(format_record(record, timestamps=args.timestamps))
            out.flush()
        return 0
    for record in read_records(path, since=since, tail=args.tail):
        out.write(format_record(record, timestamps=args.timestamps))
    out.flush()
    return 0


VERBS: dict[str, Verb] = {
    "events": Verb(
        _events,
        "stream events from a running supervisor",
        "Connect to a running `corral up` and print its events: first those"
        " since --since (from the journal), then live ones.",
        Arg("--since", type=int, help="start at this sequence number (replay)"),
        Arg("--kind", kind="append", help="only events of this kind (repeatable)"),
        Arg("--sandbox", kind="append", metavar="PATTERN", help="only sandboxes matching (glob)"),
        Arg("--json", kind="flag", help="JSON lines instead of human lines"),
        Arg("--socket", help="event socket (default: RUN_DIR/events.sock)"),
    ),
    "logs": Verb(
        _logs,
        "print a sandbox's output (stdout and stderr)",
        "Print what a sandbox instance wrote, from its rotated log files;"
        " works while the fleet runs and after it stopped.",
        Arg("name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"),
        Arg("-f", "--follow", kind="flag", help="keep printing new output"),
        Arg("--since", help="only output since a time: 10s, 5m, 2h or RFC 3339"),
        Arg("--tail", type=int, metavar="N", help="only the last N lines"),
        Arg("-t", "--timestamps", kind="flag", help="prefix each line with its time"),
    ),
}
"""The verbs after ``up``, which is built by hand (its ``--json`` defaults
to None, not False: on a terminal or not), in the order ``corral --help``
lists them."""

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
from typing import Any, NoReturn

from .._errors import (
    CommandNotExecutableError,
    CommandNotFoundError,
    CorralError,
    SpecError,
)

__all__ = ["entry", "main"]

EXIT_CORRAL = 125
EXIT_NOEXEC = 126
EXIT_NOTFOUND = 127


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit with corral's status."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"corral: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_CORRAL)


def _build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    run.add_argument(
        "--cap-add", action="append", default=[], metavar="CAP", help="keep a capability too"
    )
    run.add_argument(
        "--cap-drop", action="append", default=[], metavar="CAP", help="drop a default one"
    )
    run.add_argument(
        "--allow-new-privs", action="store_true", help="do not set no_new_privs (setuid works)"
    )
    run.add_argument(
        "--seccomp",
        default="default",
        metavar="PROFILE",
        help="'default', 'unconfined' or a Docker seccomp profile (JSON file)",
    )
    run.add_argument(
        "--ulimit",
        action="append",
        default=[],
        metavar="NAME=SOFT[:HARD]",
        help="set an rlimit, e.g. nofile=4096 or core=0:unlimited",
    )
    run.add_argument(
        "--userns",
        action="store_true",
        help="run in a user namespace: the sandbox's root is an unprivileged host user",
    )
    run.add_argument(
        "--userns-base",
        type=int,
        metavar="UID",
        help="with --userns: the host uid/gid of the sandbox's root (default: a free range)",
    )
    run.add_argument(
        "--privileged",
        action="store_true",
        help="every capability, no no_new_privs: the sandbox's protections are OFF",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    up = sub.add_parser(
        "up",
        help="run a fleet under the supervisor, in the foreground",
        description="Start every sandbox of FLEET (a TOML file, see docs/fleet.md) and"
        " supervise them; print events as they happen (human lines on a terminal, JSON"
        " lines otherwise). SIGINT/SIGTERM stop the fleet gracefully; a second one"
        " kills what is left.",
    )
    up.add_argument("fleet", metavar="FLEET", help="fleet file (TOML)")
    up.add_argument("--json", action="store_true", default=None, help="JSON lines even on a TTY")

    ev = sub.add_parser(
        "events",
        help="stream events from a running supervisor",
        description="Connect to a running `corral up` and print its events: first those"
        " since --since (from the journal), then live ones.",
    )
    ev.add_argument("--since", type=int, help="start at this sequence number (replay)")
    ev.add_argument("--kind", action="append", help="only events of this kind (repeatable)")
    ev.add_argument(
        "--sandbox", action="append", metavar="PATTERN", help="only sandboxes matching (glob)"
    )
    ev.add_argument("--json", action="store_true", help="JSON lines instead of human lines")
    ev.add_argument("--socket", help="event socket (default: RUN_DIR/events.sock)")

    lg = sub.add_parser(
        "logs",
        help="print a sandbox's output (stdout and stderr)",
        description="Print what a sandbox instance wrote, from its rotated log files;"
        " works while the fleet runs and after it stopped.",
    )
    lg.add_argument(
        "name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"
    )
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    lg.add_argument("--since", help="only output since a time: 10s, 5m, 2h or RFC 3339")
    lg.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    lg.add_argument(
        "-t", "--timestamps", action="store_true", help="prefix each line with its time"
    )

    cp = sub.add_parser(
        "checkpoint",
        help="checkpoint a running sandbox with CRIU",
        description="Dump a running sandbox instance of a running `corral up` with CRIU,"
        " together with its writable layer and spec (docs/checkpoint.md). Without"
        " --leave-running the instance is stopped once the checkpoint is complete.",
    )
    cp.add_argument(
        "name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"
    )
    cp.add_argument("--tag", help="name the checkpoint (default: the time, 20261129T101500.123456)")
    cp.add_argument(
        "--leave-running", action="store_true", help="keep the sandbox running afterwards"
    )
    cp.add_argument("--socket", help="control socket (default: RUN_DIR/control.sock)")

    rs = sub.add_parser(
        "restore",
        help="restore a sandbox from a checkpoint",
        description="Bring a checkpointed instance back under the running `corral up`, in"
        " new namespaces and a new cgroup with its limits, on its checkpointed files.",
    )
    rs.add_argument(
        "name", metavar="NAME", help="an instance (web-0), or a sandbox (web: its first)"
    )
    rs.add_argument("--from", dest="tag", metavar="TAG", help="which checkpoint (default: latest)")
    rs.add_argument(
        "--as",
        dest="as_name",
        metavar="NEW",
        help="restore into a new instance NEW (the original may keep running)",
    )
    rs.add_argument("--socket", help="control socket (default: RUN_DIR/control.sock)")

    _control_verbs(sub)

    ls = sub.add_parser(
        "checkpoints",
        help="list checkpoints",
        description="List the checkpoints kept on disk (of one instance, or of all).",
    )
    ls.add_argument("name", metavar="NAME", nargs="?", help="an instance (web-0)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return parser


_NAME_HELP = "an instance (web-0), or a sandbox (web: every instance of it)"


def _control_verbs(sub: Any) -> None:
    """The verbs that act on a running fleet through its control socket."""

    def verb(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
        p.add_argument("--socket", help="control socket (default: RUN_DIR/control.sock)")
        return p

    p = verb(
        "ps",
        "list the sandboxes of a running fleet",
        "One line per sandbox instance"
        " of the running `corral up`: state, PID, uptime, restarts, memory, last exit.",
    )
    p.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    p = verb(
        "inspect",
        "show everything about one sandbox, as JSON",
        "Spec, limits, cgroup,"
        " PIDs, namespaces, counters and last events of one instance, as JSON.",
    )
    p.add_argument("name", metavar="NAME", help="an instance (web-0), or a sandbox (its first)")

    p = verb(
        "stop",
        "stop sandboxes (they stay stopped)",
        "SIGTERM, then SIGKILL after the"
        " grace period; returns once stopped. Restart policies leave them alone.",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p.add_argument("-t", "--time", type=float, metavar="SECONDS", help="grace period")

    p = verb(
        "start",
        "start stopped sandboxes",
        "Start the next generation of stopped"
        " (or exited, failed) instances; returns once they run.",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)

    p = verb(
        "restart",
        "restart sandboxes",
        "Stop running instances gracefully and start their next generation; returns once they run.",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p.add_argument("-t", "--time", type=float, metavar="SECONDS", help="grace period")

    p = verb(
        "kill",
        "send a signal to sandboxes",
        "Send a signal to the main process of each"
        " instance, through its init (by pidfd: never a recycled PID).",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p.add_argument("-s", "--signal", default="KILL", help="name or number (default KILL)")

    p = verb(
        "pause",
        "freeze sandboxes",
        "Freeze every process of the instances with the"
        " cgroup freezer; returns once the kernel reports them frozen.",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p = verb("resume", "thaw paused sandboxes", "Thaw paused instances.")
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)

    p = verb(
        "exec",
        "run a command in a running sandbox",
        "Run COMMAND in a running"
        " sandbox: its namespaces, cgroup, root and restrictions. The exit status is"
        " the command's (125: corral failed; 126, 127: cannot run it).",
    )
    p.add_argument("name", metavar="NAME", help="an instance (web-0), or a sandbox (its first)")
    p.add_argument("-i", "--interactive", action="store_true", help="pass stdin on")
    p.add_argument("-t", "--tty", action="store_true", help="give it a pseudo-terminal")
    p.add_argument("--env", "-e", action="append", default=[], metavar="K=V", help="set a variable")
    p.add_argument("--workdir", "-w", help="working directory inside (default: the sandbox's)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    p = verb(
        "stats",
        "resource use of sandboxes",
        "Memory (current, peak), CPU, tasks and"
        " OOM counters of running instances, from their cgroups.",
    )
    p.add_argument("names", metavar="NAME", nargs="*", help=_NAME_HELP + " (default: all)")
    p.add_argument("--watch", action="store_true", help="refresh every second")
    p.add_argument("--json", action="store_true", help="a JSON array instead of a table")

    p = verb(
        "add",
        "add sandboxes to a running fleet",
        "Start the sandboxes of FLEET (a"
        " fleet file with [[sandbox]] entries only) under the running supervisor.",
    )
    p.add_argument("fleet", metavar="FLEET", help="fleet file (TOML)")

    p = verb(
        "rm",
        "remove sandboxes from a running fleet",
        "Stop the instances and take"
        " them out of the running fleet (their logs and checkpoints stay).",
    )
    p.add_argument("name", metavar="NAME", help=_NAME_HELP)
    p.add_argument("-t", "--time", type=float, metavar="SECONDS", help="grace period")


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _last_exit(last: dict[str, Any] | None) -> str:
    if not last:
        return "-"
    if last.get("oom_killed"):
        return f"{last['status']} (oom)"
    if last.get("signal"):
        import signal as sigmod

        try:
            return f"{last['status']} ({sigmod.Signals(last['signal']).name})"
        except ValueError:
            pass
    return str(last["status"])


def _memory(use: int | None, limit: int | None) -> str:
    return f"{_size(use) if use is not None else '-'} / {_size(limit) if limit else '-'}"


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'NAME':<20} {'STATE':<9} {'PID':>8} {'UPTIME':>8} {'RESTARTS':>8}"
        f"  {'MEMORY':<22} LAST EXIT"
    )
    for r in rows:
        state = r["state"] + ("*" if r.get("busy") else "")
        pid = str(r["pid"]) if r["pid"] is not None else "-"
        print(
            f"{r['name']:<20} {state:<9} {pid:>8} {_uptime(r['uptime']):>8}"
            f" {r['restarts']:>8}  {_memory(r['memory'], r['memory_limit']):<22}"
            f" {_last_exit(r['last_exit'])}"
        )


def _control(args: argparse.Namespace) -> int:
    import json

    from .._control._client import call

    path = _control_path(args)
    verb = args.verb
    if verb == "ps":
        rows = call(path, "ps")
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            _print_rows(rows)
        return 0
    if verb == "inspect":
        print(json.dumps(call(path, "inspect", {"name": args.name}), indent=2))
        return 0
    if verb == "stats":
        return _stats(path, args)
    if verb == "exec":
        return _exec(path, args)
    if verb == "add":
        rows = call(path, "add", {"path": os.path.abspath(args.fleet)})
        _print_rows(rows)
        return 0 if all(r["state"] == "running" for r in rows) else EXIT_CORRAL
    params: dict[str, Any] = {"name": args.name}
    if verb in ("stop", "restart", "rm") and args.time is not None:
        if args.time < 0:
            raise _Usage(f"-t: expected seconds >= 0, got {args.time}")
        params["timeout"] = args.time
    if verb == "kill":
        params["signal"] = args.signal
    result = call(path, verb, params)
    if verb == "rm":
        print("removed " + ", ".join(result))
        return 0
    _print_rows(result)
    if verb in ("start", "restart") and not all(r["state"] == "running" for r in result):
        return EXIT_CORRAL
    return 0


def _exec(path: str, args: argparse.Namespace) -> int:
    from .._control._exec_client import run_exec
    from .._runtime._spec import parse_env

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _Usage("exec: expected a command after '--', e.g. corral exec web -- sh")
    return run_exec(
        path,
        args.name,
        command,
        env=dict(parse_env(args.env, "--env")),
        workdir=args.workdir,
        interactive=args.interactive,
        tty=args.tty,
    )


def _stats(path: str, args: argparse.Namespace) -> int:
    import json
    import time

    from .._control._client import call

    def sample() -> tuple[float, list[dict[str, Any]]]:
        return time.monotonic(), call(path, "stats", {"names": args.names})

    if args.json and not args.watch:
        print(json.dumps(sample()[1], indent=2))
        return 0
    before = sample()
    while True:
        # CPU use is a rate: two samples a moment apart.
        time.sleep(0.5 if not args.watch else 1.0)
        now = sample()
        if args.json:
            print(json.dumps(now[1]))
        else:
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            _print_stats(before, now)
        sys.stdout.flush()
        if not args.watch:
            return 0
        before = now


def _print_stats(
    before: tuple[float, list[dict[str, Any]]], now: tuple[float, list[dict[str, Any]]]
) -> None:
    prev = {r["name"]: r for r in before[1]}
    elapsed = max(now[0] - before[0], 1e-6)
    print(
        f"{'NAME':<20} {'STATE':<9} {'CPU %':>7}  {'MEM USAGE / LIMIT':<22} {'PEAK':>10}"
        f" {'PIDS':>5} {'OOM KILLS':>9}"
    )
    for r in now[1]:
        if "cpu_usage_ns" not in r:
            print(
                f"{r['name']:<20} {r['state']:<9} {'-':>7}  {'-':<22} {'-':>10} {'-':>5} {'-':>9}"
            )
            continue
        p = prev.get(r["name"])
        cpu = "-"
        if p is not None and "cpu_usage_ns" in p:
            cpu = f"{(r['cpu_usage_ns'] - p['cpu_usage_ns']) / 1e9 / elapsed * 100:.1f}"
        peak = _size(r["memory_peak"]) if r.get("memory_peak") is not None else "-"
        print(
            f"{r['name']:<20} {r['state']:<9} {cpu:>7}  "
            f"{_memory(r['memory_current'], r['memory_limit']):<22} {peak:>10}"
            f" {r['pids_current']:>5} {r['oom_kill']:>9}"
        )


def _control_path(args: argparse.Namespace) -> str:
    from .._control._client import CONTROL_SOCKET

    return args.socket or os.path.join(_run_dir(), CONTROL_SOCKET)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _checkpoint(args: argparse.Namespace) -> int:
    from .._control._client import call

    path = _control_path(args)
    params = {"name": args.name, "tag": args.tag, "leave_running": args.leave_running}
    sys.stderr.write(f"corral: checkpointing {args.name} ...\n")
    r = call(path, "checkpoint", params)
    print(
        f"checkpointed {r['name']} as {r['tag']}: {_size(r['size'])},"
        f" {r['duration_ms']:.0f} ms, frozen {r['frozen_ms']:.0f} ms"
        + ("" if r["leave_running"] else " (stopped)")
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from .._control._client import call

    path = _control_path(args)
    params = {"name": args.name, "tag": args.tag, "as": args.as_name}
    sys.stderr.write(f"corral: restoring {args.as_name or args.name} ...\n")
    r = call(path, "restore", params)
    print(f"restored {r['name']} from {r['source']}/{r['tag']}: pid {r['pid']}")
    if r.get("weakened"):
        sys.stderr.write(f"corral: warning: {r['name']} was restored without {r['weakened']}\n")
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    import json
    import time

    from .._runtime._checkpoint import CheckpointStore

    store = CheckpointStore(os.path.join(_state_dir(), "checkpoints"))
    names = [args.name] if args.name else list(store.names())
    found = [i for n in names for i in store.list(n)]
    if args.json:
        for i in found:
            print(json.dumps(i.to_json() | {"path": i.path}))
        return 0
    if not found:
        print("no checkpoints" + (f" of {args.name}" if args.name else ""))
        return 0
    print(f"{'NAME':<20} {'TAG':<28} {'CREATED':<20} {'SIZE':>10} {'FROZEN':>9}  MODE")
    for i in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created))
        mode = "leave-running" if i.leave_running else "stopped"
        print(
            f"{i.name:<20} {i.tag:<28} {created:<20} {_size(i.size):>10}"
            f" {i.frozen * 1000:>6.0f} ms  {mode}"
        )
    return 0


def _state_dir() -> str:
    from .._runtime._sandbox import DEFAULT_STATE_DIR

    return os.environ.get("CORRAL_STATE_DIR") or DEFAULT_STATE_DIR


def _logs(args: argparse.Namespace) -> int:
    import time

    from ._output_reader import follow, format_record, parse_since, read_records

    logdir = os.path.join(_state_dir(), "logs")
    path = os.path.join(logdir, f"{args.name}.log")
    if not os.path.exists(path) and os.path.exists(os.path.join(logdir, f"{args.name}-0.log")):
        path = os.path.join(logdir, f"{args.name}-0.log")
    if not os.path.exists(path):
        raise CorralError(f"no output logged for {args.name!r} (looked in {logdir})")
    if args.tail is not None and args.tail < 0:
        raise _Usage(f"--tail: expected a number of lines >= 0, got {args.tail}")
    since = None
    if args.since is not None:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            raise _Usage(f"--since: {exc}") from None
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


def _run_dir() -> str:
    from .._runtime._sandbox import DEFAULT_RUN_DIR

    return os.environ.get("CORRAL_RUN_DIR") or DEFAULT_RUN_DIR


def _up(args: argparse.Namespace) -> int:
    import trio

    from .._core._fleet import load_fleet
    from .._core._supervisor import Supervisor
    from .._core._supervisor_log import configure_logging

    fleet = load_fleet(args.fleet)
    for cfg in fleet.sandboxes:
        if cfg.security.privileged:
            _warn_privileged(cfg.name)
    configure_logging(json=args.json)
    supervisor = Supervisor(fleet, handle_signals=True, log=True)
    trio.run(supervisor.run)
    return 0


def _events(args: argparse.Namespace) -> int:
    import json

    import events
    from events import iter_events

    path = args.socket or os.path.join(_run_dir(), "events.sock")
    human = not args.json
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


def _run(args: argparse.Namespace) -> int:
    # Imported here so that `corral --help` stays instant.
    from .._runtime._sandbox import Runtime, Sandbox
    from .._runtime._signals import FORWARDED_SIGNALS
    from .._runtime._spec import (
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
    from .._runtime._security import make_security

    try:
        rlimits: dict[str, str] = {}
        for item in args.ulimit:
            name, eq, value = item.partition("=")
            if not eq or not name:
                raise SpecError("ulimit", f"expected NAME=SOFT[:HARD], got {item!r}")
            rlimits[name] = value
        security = make_security(
            args.cap_add,
            args.cap_drop,
            not args.allow_new_privs,
            args.privileged,
            args.seccomp,
            rlimits,
            args.userns,
            args.userns_base,
        )
    except SpecError as exc:
        option = "--" + exc.field.split(".")[0].replace("_", "-").replace("rlimits", "ulimit")
        raise SpecError(option, str(exc).split(": ", 1)[1]) from None
    spec = SandboxSpec(
        name=name,
        argv=tuple(command),
        rootfs=args.rootfs,
        hostname=args.hostname,
        env=parse_env(args.env, "--env"),
        workdir=args.workdir,
        limits=limits,
        security=security,
    )
    if security.privileged:
        _warn_privileged(name)

    # Signals that arrive before the sandbox exists are kept and delivered
    # once it does; after that each one is forwarded to its init.
    sandbox: Sandbox | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if sandbox is None:
            pending.append(signum)
        else:
            sandbox.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
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


_CONTROL_VERBS = frozenset(
    {
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
    }
)


def _warn_privileged(name: str) -> None:
    sys.stderr.write(
        f"corral: WARNING: sandbox {name!r} is privileged: it keeps every capability and"
        " no_new_privs is off; its root is the host's root\n"
    )


class _Usage(CorralError):
    """Bad command-line usage."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``corral`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verb == "run":
            return _run(args)
        if args.verb == "up":
            return _up(args)
        if args.verb == "events":
            return _events(args)
        if args.verb == "logs":
            return _logs(args)
        if args.verb == "checkpoint":
            return _checkpoint(args)
        if args.verb == "restore":
            return _restore(args)
        if args.verb == "checkpoints":
            return _checkpoints(args)
        if args.verb in _CONTROL_VERBS:
            return _control(args)
        parser.error(f"unknown verb {args.verb!r}")
    except CommandNotFoundError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOTFOUND
    except CommandNotExecutableError as exc:
        sys.stderr.write(f"corral: {exc}\n")
        return EXIT_NOEXEC
    except CorralError as exc:
        for line in str(exc).splitlines():
            sys.stderr.write(f"corral: {line}\n")
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

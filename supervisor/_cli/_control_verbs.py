"""The verbs that act on a running fleet through its control socket.

``ps``, ``inspect``, ``stats``; ``stop``, ``start``, ``restart``, ``kill``,
``pause``, ``resume``; ``exec``; ``add`` and ``rm``; ``update`` (docs/control.md). Each
is one request to the supervisor (``exec`` then relays the process's stdio
and signals) and a table or JSON printed from its answer. No trio: the
client is a blocking socket. No argparse either for a plain command line
(``corral pause web``): each verb's arguments are declared once
(:data:`VERBS`), for argparse and for the plain reader of
:mod:`._arguments`, and this module imports at its top only what both
need.
"""

from __future__ import annotations

import os
import sys

from ._arguments import Arg, Verb, add_verb, parse_plain
from ._common import (
    EXIT_CORRAL,
    SOCKET_HELP,
    UsageError,
    command_after_dashes,
    control_path,
    human_size,
)

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from ._parser import Subparsers

__all__ = ["VERBS", "add_parsers", "parse_verb"]

_NAME_HELP = "an instance (web-0), or a sandbox (web: every instance of it)"


def add_parsers(sub: Subparsers) -> None:
    """Register the verbs that act on a running fleet through its control socket."""
    for name, verb in VERBS.items():
        add_verb(sub, name, verb)


def parse_verb(name: str, words: Sequence[str]) -> argparse.Namespace | None:
    """``corral NAME WORDS...`` read without argparse, if it is plain (see
    :func:`._arguments.parse_plain`); else ``None``."""
    return parse_plain(name, VERBS[name], words)


def _ps(args: argparse.Namespace) -> int:
    from .._control._client import call

    rows = call(control_path(args), "ps")
    if args.json:
        import json  # here: it imports re, which the table does not need

        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from .._control._client import call

    print(json.dumps(call(control_path(args), "inspect", {"name": args.name}), indent=2))
    return 0


def _request(args: argparse.Namespace, method: str, **params: Any) -> Any:
    """Send request *method* for the instances ``NAME`` names; its result."""
    from .._control._client import call

    return call(control_path(args), method, {"name": args.name, **params})


def _grace(args: argparse.Namespace) -> dict[str, float]:
    """``-t SECONDS`` as request parameters (none without it)."""
    if args.time is None:
        return {}
    if args.time < 0:
        raise UsageError(f"-t: expected seconds >= 0, got {args.time}")
    return {"timeout": args.time}


def _all_running(rows: list[dict[str, Any]]) -> int:
    """The exit status of a verb that should leave *rows* running."""
    return 0 if all(r["state"] == "running" for r in rows) else EXIT_CORRAL


def _stop(args: argparse.Namespace) -> int:
    _print_rows(_request(args, "stop", **_grace(args)))
    return 0


def _start(args: argparse.Namespace) -> int:
    rows = _request(args, "start")
    _print_rows(rows)
    return _all_running(rows)


def _restart(args: argparse.Namespace) -> int:
    rows = _request(args, "restart", **_grace(args))
    _print_rows(rows)
    return _all_running(rows)


def _kill(args: argparse.Namespace) -> int:
    _print_rows(_request(args, "kill", signal=args.signal))
    return 0


def _pause(args: argparse.Namespace) -> int:
    _print_rows(_request(args, "pause"))
    return 0


def _resume(args: argparse.Namespace) -> int:
    _print_rows(_request(args, "resume"))
    return 0


def _rm(args: argparse.Namespace) -> int:
    print("removed " + ", ".join(_request(args, "rm", **_grace(args))))
    return 0


def _update(args: argparse.Namespace) -> int:
    import json

    from .._runtime._limits import LIVE_KEYS
    from ._limit_options import limit_values

    # Checked here first: a bad value is one line naming its option.
    if not limit_values(args, live=True):
        raise UsageError("update: expected a limit to change, e.g. corral update web --memory 1G")
    limits = {k: getattr(args, k) for k in LIVE_KEYS if getattr(args, k, None) is not None}
    rows = _request(args, "update", limits=limits, force=args.force)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if not row["changed"]:
            print(f"{row['name']}: no change")
        for c in row["changed"]:
            what = f"{c['limit']} {c['device']}" if c["device"] else c["limit"]
            old, new = _limit_text(c["limit"], c["old"]), _limit_text(c["limit"], c["new"])
            print(f"{row['name']}: {what} {old} -> {new}")
    return 0


def _limit_text(key: str, value: int | None) -> str:
    """A limit_changed value for a person."""
    if key == "memory_stall":
        return "off" if value is None else f"{value / 1000:g}ms per second"
    if value is None:
        return "unlimited"
    if key == "cpus":
        return f"{value / 1000:g} CPU" + ("" if value == 1000 else "s")
    if key in ("memory", "memory_high", "memory_swap"):
        return human_size(value)
    if key.endswith("_bps"):
        return human_size(value) + "/s"
    if key.endswith("_iops"):
        return f"{value}/s"
    return str(value)


def _add(args: argparse.Namespace) -> int:
    from .._control._client import Client
    from .._errors import SpecError

    path = os.path.abspath(args.fleet)
    try:
        # Passed open: a supervisor running as root reads, for a member of
        # socket_group, only what that member could open itself.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(args.fleet, f"cannot read: {exc.strerror}") from None
    try:
        with Client(control_path(args)) as client:
            rows = client.answer(client.request("add", {"path": path}, fds=[fd]))
    finally:
        os.close(fd)
    _print_rows(rows)
    return _all_running(rows)


def _exec(args: argparse.Namespace) -> int:
    from .._control._exec_client import run_exec

    path = control_path(args)
    command = command_after_dashes(
        args.command, "exec: expected a command after '--', e.g. corral exec web -- sh"
    )
    # The parsers of -e and -u live with the runtime's spec (its grammar,
    # imported with re and more): loaded only when one is given.
    env: dict[str, str] = {}
    if args.env:
        from .._runtime._spec import parse_env

        env = dict(parse_env(args.env, "--env"))
    user = None
    if args.user is not None:
        from .._runtime._mounts import parse_user

        user = parse_user(args.user, "--user")
    return run_exec(
        path,
        args.name,
        command,
        env=env,
        workdir=args.workdir,
        interactive=args.interactive,
        tty=args.tty,
        user=user,
    )


def _stats(args: argparse.Namespace) -> int:
    import time

    from .._control._client import call

    if args.json:
        import json  # here: it imports re, which the table does not need

    path = control_path(args)

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
        peak = human_size(r["memory_peak"]) if r.get("memory_peak") is not None else "-"
        print(
            f"{r['name']:<20} {r['state']:<9} {cpu:>7}  "
            f"{_memory(r['memory_current'], r['memory_limit']):<22} {peak:>10}"
            f" {r['pids_current']:>5} {r['oom_kill']:>9}"
        )


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
    return f"{human_size(use) if use is not None else '-'} / {human_size(limit) if limit else '-'}"


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


def _update_arguments(p: argparse.ArgumentParser) -> None:
    """``update``'s options past NAME: the live limits, ``--force``, ``--json``."""
    from ._limit_options import add_limit_options

    add_limit_options(p, live=True)
    p.add_argument(
        "--force",
        action="store_true",
        help="set a memory limit below what it uses now (the kernel reclaims, or OOM-kills)",
    )
    p.add_argument("--json", action="store_true", help="the changes as JSON")


_SOCKET = Arg("--socket", help=SOCKET_HELP)
_NAME = Arg("name", metavar="NAME", help=_NAME_HELP)
_FIRST = Arg("name", metavar="NAME", help="an instance (web-0), or a sandbox (its first)")
_GRACE = Arg("-t", "--time", type=float, metavar="SECONDS", help="grace period")
_JSON_ARRAY = Arg("--json", kind="flag", help="a JSON array instead of a table")

VERBS: dict[str, Verb] = {
    "ps": Verb(
        _ps,
        "list the sandboxes of a running fleet",
        "One line per sandbox instance"
        " of the running `corral up`: state, PID, uptime, restarts, memory, last exit.",
        _SOCKET,
        _JSON_ARRAY,
    ),
    "inspect": Verb(
        _inspect,
        "show everything about one sandbox, as JSON",
        "Spec, limits, cgroup,"
        " PIDs, namespaces, counters and last events of one instance, as JSON.",
        _SOCKET,
        _FIRST,
    ),
    "stop": Verb(
        _stop,
        "stop sandboxes (they stay stopped)",
        "SIGTERM, then SIGKILL after the"
        " grace period; returns once stopped. Restart policies leave them alone.",
        _SOCKET,
        _NAME,
        _GRACE,
    ),
    "start": Verb(
        _start,
        "start stopped sandboxes",
        "Start the next generation of stopped"
        " (or exited, failed) instances; returns once they run.",
        _SOCKET,
        _NAME,
    ),
    "restart": Verb(
        _restart,
        "restart sandboxes",
        "Stop running instances gracefully and start their next generation; returns once they run.",
        _SOCKET,
        _NAME,
        _GRACE,
    ),
    "kill": Verb(
        _kill,
        "send a signal to sandboxes",
        "Send a signal to the main process of each"
        " instance, through its init (by pidfd: never a recycled PID).",
        _SOCKET,
        _NAME,
        Arg("-s", "--signal", default="KILL", help="name or number (default KILL)"),
    ),
    "pause": Verb(
        _pause,
        "freeze sandboxes",
        "Freeze every process of the instances with the"
        " cgroup freezer; returns once the kernel reports them frozen.",
        _SOCKET,
        _NAME,
    ),
    "resume": Verb(_resume, "thaw paused sandboxes", "Thaw paused instances.", _SOCKET, _NAME),
    "exec": Verb(
        _exec,
        "run a command in a running sandbox",
        "Run COMMAND in a running"
        " sandbox: its namespaces, cgroup, root and restrictions. The exit status is"
        " the command's (125: corral failed; 126, 127: cannot run it).",
        _SOCKET,
        _FIRST,
        Arg("-i", "--interactive", kind="flag", help="pass stdin on"),
        Arg("-t", "--tty", kind="flag", help="give it a pseudo-terminal"),
        Arg("--env", "-e", kind="append", default=[], metavar="K=V", help="set a variable"),
        Arg("--workdir", "-w", help="working directory inside (default: the sandbox's)"),
        Arg("--user", "-u", help="UID[:GID] or NAME[:GROUP] (default: the sandbox's)"),
        Arg("command", kind="rest", help="-- COMMAND [ARGS...]"),
    ),
    "stats": Verb(
        _stats,
        "resource use of sandboxes",
        "Memory (current, peak), CPU, tasks and"
        " OOM counters of running instances, from their cgroups.",
        _SOCKET,
        Arg("names", kind="many", metavar="NAME", help=_NAME_HELP + " (default: all)"),
        Arg("--watch", kind="flag", help="refresh every second"),
        _JSON_ARRAY,
    ),
    "add": Verb(
        _add,
        "add sandboxes to a running fleet",
        "Start the sandboxes of FLEET (a"
        " fleet file with [[sandbox]] entries only) under the running supervisor.",
        _SOCKET,
        Arg("fleet", metavar="FLEET", help="fleet file (TOML)"),
    ),
    "rm": Verb(
        _rm,
        "remove sandboxes from a running fleet",
        "Stop the instances and take"
        " them out of the running fleet (their logs and checkpoints stay).",
        _SOCKET,
        _NAME,
        _GRACE,
    ),
    "update": Verb(
        _update,
        "change the limits of sandboxes",
        "Change limits of the instances: at once where they run (a limit_changed"
        " event each), and for their later generations; the next supervisor keeps"
        " them. A memory limit below what an instance uses now is refused unless --force.",
        _SOCKET,
        _NAME,
        more=_update_arguments,
    ),
}
"""The verbs, in the order ``corral --help`` lists them."""

"""``corral run``: one sandbox in the foreground, removed when it ends.

The library path without the supervisor: build a :class:`SandboxSpec` from
the options, create the sandbox with a :class:`Runtime`, forward signals to
it, wait, destroy it, and exit with the command's status. Nothing on this
path imports trio: its start-up is part of every sandbox's cost.
"""

from __future__ import annotations

import os
import sys

from .._errors import SpecError
from ._arguments import Arg, Verb, add_verb, parse_plain
from ._common import UsageError, command_after_dashes, warn_privileged
from ._limit_options import limit_args, limit_values, option_error

TYPE_CHECKING = False  # typing's, without importing typing: see _common
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from types import FrameType

    from ._parser import Subparsers

__all__ = ["VERBS", "add_parsers", "parse_verb"]


def add_parsers(sub: Subparsers) -> None:
    """Register ``run``."""
    add_verb(sub, "run", VERBS["run"])


def parse_verb(name: str, words: Sequence[str]) -> argparse.Namespace | None:
    """``corral run WORDS...`` read without argparse, if it is plain (see
    :func:`._arguments.parse_plain`); else ``None``."""
    return parse_plain(name, VERBS[name], words)


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: every other verb imports this module too.
    import signal

    from .._runtime._limits import limits_from
    from .._runtime._sandbox import Runtime, Sandbox
    from .._runtime._signals import FORWARDED_SIGNALS
    from .._runtime._spec import SandboxSpec, parse_env, validate_name

    rootfs = _prepared(args.rootfs)
    try:
        command = command_after_dashes(
            args.command, "run: expected a command after '--', e.g. corral run -- sh -c 'echo hi'"
        )
    except UsageError:
        # An image may say what it runs (an OCI image's Entrypoint and Cmd).
        command = _image_command(rootfs)
        if not command:
            raise
    name = validate_name(args.name, "--name") if args.name else f"run-{os.urandom(4).hex()}"
    try:
        limits = limits_from(limit_values(args))
    except SpecError as exc:
        raise option_error(exc) from None
    from .._runtime._security import make_security

    try:
        rlimits: dict[str, str] = {}
        for item in args.ulimit:
            limit, eq, value = item.partition("=")
            if not eq or not limit:
                raise SpecError("ulimit", f"expected NAME=SOFT[:HARD], got {item!r}")
            rlimits[limit] = value
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
    from .._runtime._mounts import parse_tmpfs, parse_user, parse_volume
    from .._runtime._net import parse_port

    spec = SandboxSpec(
        name=name,
        argv=tuple(command),
        rootfs=rootfs,
        hostname=args.hostname,
        env=parse_env(args.env, "--env"),
        workdir=args.workdir,
        limits=limits,
        security=security,
        mounts=[parse_volume(_absolute_source(v), "--volume") for v in args.volume]
        + [parse_tmpfs(t, "--tmpfs") for t in args.tmpfs],
        user=parse_user(args.user, "--user") if args.user is not None else None,
        read_only=args.read_only,
        network=_network_option(args.network),
        ports=[parse_port(p, "--publish") for p in args.publish],
        egress=_egress_option(args.egress),
        lxcfs=args.lxcfs,
    )
    if security.privileged:
        warn_privileged(name)

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
    # The sandbox dies with this process, however it ends (a SIGKILL too);
    # what a killed `corral run` left is swept by the next one (or `up`).
    runtime = Runtime(cgroup_parent=args.cgroup_parent, die_with_caller=True)
    runtime.sweep_claims()
    try:
        sandbox = runtime.create(spec)
    except SpecError as exc:
        raise option_error(exc) from None
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


def _network_option(value: str) -> str:
    """``--network``: a mode, or a network known here (one a fleet declared)."""
    from .._runtime._net import network_name, parse_network
    from .._runtime._net._ipam import known_networks
    from .._runtime._net._model import DEFAULT_NETWORK
    from ._common import state_dir

    network = parse_network(value, "--network")
    name = network_name(network)
    if name is not None and network != "bridge":
        known = [n for n in known_networks(state_dir()) if n != DEFAULT_NETWORK]
        if name not in known:
            raise SpecError(
                "--network",
                f"no network {name!r} here: expected none, bridge, host, sandbox:NAME or a"
                f" network a fleet declared ({', '.join(known) or 'none is known'})",
            )
    return network


def _egress_option(value: str | None) -> tuple[str, ...] | str | None:
    """``--egress``: all, none, or a comma-separated allow-list."""
    from .._runtime._net import parse_egress

    if value is None:
        return None
    if value in ("all", "none"):
        return parse_egress(value, "--egress")
    return parse_egress([v for v in value.split(",") if v], "--egress")


def _prepared(rootfs: str) -> str:
    """*rootfs*, its image imported or built now if it is made on first
    use (``oci:/PATH[:REF]``, a missing ``debian:SUITE``), with progress on
    stderr; an interrupt reverts the build."""
    from rootfs import ImageStore, RootfsError, is_prepared_ref, prepare_image, reverting

    from ._common import state_dir

    if not is_prepared_ref(rootfs):
        return rootfs

    def output(line: str) -> None:
        sys.stderr.write(f"corral: {line}\n")
        sys.stderr.flush()

    try:
        with reverting():
            return prepare_image(ImageStore(os.path.join(state_dir(), "images")), rootfs, output)
    except RootfsError as exc:
        raise SpecError("--image", str(exc).removeprefix("rootfs: ")) from None


def _absolute_source(volume: str) -> str:
    """``./dir:/data`` means the directory here (a name alone is a named
    volume): the spec takes absolute host paths only."""
    source, sep, rest = volume.partition(":")
    if sep and source.startswith("."):
        return f"{os.path.abspath(source)}:{rest}"
    return volume


def _image_command(rootfs: str) -> list[str]:
    """The command image *rootfs* runs by default (Entrypoint + Cmd), if
    it is an image of the store that has one."""
    from rootfs import BUILTIN_BASES, ImageStore, StoreError

    from ._common import state_dir

    if rootfs in BUILTIN_BASES or rootfs.startswith(("/", ".")) or os.path.isdir(rootfs):
        return []
    try:
        config = ImageStore(os.path.join(state_dir(), "images")).find(rootfs).config
    except StoreError:
        return []
    return [*(config.get("entrypoint") or []), *(config.get("cmd") or [])]


VERBS = {
    "run": Verb(
        _run,
        "run one sandbox in the foreground, then remove it",
        "Run COMMAND in a new sandbox in the foreground and remove the sandbox"
        " when it ends (like 'docker run --rm'). The exit status is the command's.",
        Arg("--name", help="sandbox name (default: run-<random>)"),
        Arg(
            "--rootfs",
            "--image",
            default="busybox",
            help="'busybox' (built in), an image of the store (corral image ls) or a directory",
        ),
        *limit_args(),
        Arg("--hostname", help="host name inside (default: the name)"),
        Arg("--env", "-e", kind="append", default=[], metavar="K=V", help="set a variable"),
        Arg("--workdir", "-w", default="/", help="working directory inside"),
        Arg("--cgroup-parent", help="cgroup to create the sandbox's cgroup in"),
        Arg("--cap-add", kind="append", default=[], metavar="CAP", help="keep a capability too"),
        Arg("--cap-drop", kind="append", default=[], metavar="CAP", help="drop a default one"),
        Arg("--allow-new-privs", kind="flag", help="do not set no_new_privs (setuid works)"),
        Arg(
            "--seccomp",
            default="default",
            metavar="PROFILE",
            help="'default', 'unconfined' or a Docker seccomp profile (JSON file)",
        ),
        Arg(
            "--ulimit",
            kind="append",
            default=[],
            metavar="NAME=SOFT[:HARD]",
            help="set an rlimit, e.g. nofile=4096 or core=0:unlimited",
        ),
        Arg(
            "--userns",
            kind="bool",
            help="run in a user namespace, where the sandbox's root is an unprivileged host"
            " user (the default, but with --privileged); --no-userns: its root is the host's"
            " root, confined",
        ),
        Arg(
            "--userns-base",
            type=int,
            metavar="UID",
            help="with --userns: the host uid/gid of the sandbox's root (default: a free range)",
        ),
        Arg(
            "--privileged",
            kind="flag",
            help="every capability, no no_new_privs: the sandbox's protections are OFF",
        ),
        Arg(
            "--volume",
            "-v",
            kind="append",
            default=[],
            metavar="SRC:TARGET[:ro]",
            help="mount a host path (SRC starts with / or .) or a named volume (SRC is a name)",
        ),
        Arg(
            "--tmpfs",
            kind="append",
            default=[],
            metavar="TARGET[:OPTS]",
            help="mount a tmpfs, e.g. /tmp or /run:size=16M,mode=755",
        ),
        Arg("--user", "-u", help="UID[:GID] or NAME[:GROUP] to run the command as"),
        Arg(
            "--network",
            default="none",
            metavar="MODE",
            help="none (lo only, the default), bridge (corral's bridge, NAT out), the name of a"
            " network a fleet declared, host, or sandbox:NAME",
        ),
        Arg(
            "--publish",
            "-p",
            kind="append",
            default=[],
            metavar="[IP:]HOST_PORT:PORT[/PROTO]",
            help="publish a port of a bridged sandbox on the host's, e.g. 8080:80",
        ),
        Arg(
            "--egress",
            metavar="all|none|HOST[:PORT[/PROTO]],...",
            help="where a bridged sandbox may connect to (default: all); HOST is an address,"
            " a CIDR or a host name (resolved when the sandbox starts)",
        ),
        Arg("--read-only", kind="flag", help="make the root file system read-only"),
        Arg(
            "--no-lxcfs",
            kind="false",
            dest="lxcfs",
            help="show the host's /proc/meminfo, cpuinfo, uptime... (no lxcfs view: docs/view.md)",
        ),
        Arg("command", kind="rest", help="-- COMMAND [ARGS...]"),
    )
}
"""``run``, declared once: argparse's sub-parser and the plain reader's."""

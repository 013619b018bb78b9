"""The control protocol's methods: what each verb does with its parameters.

Each method is ``async (supervisor, params, context) -> result``; it checks
its parameters (errors name the key), calls the supervisor's verb and turns
what comes back into plain msgpack-able data. :data:`METHODS` maps the
wire names to them. The connections, framing, bounds and error codes are
:mod:`._server`'s.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .._errors import CorralError, SpecError
from .._runtime._checkpoint import check_criu, restore_weakens
from .._runtime._linux._cgroups import Cgroup, CgroupStats
from ._client import ControlError

if TYPE_CHECKING:
    from .._core._instance import Instance
    from .._core._supervisor import Supervisor
    from .._runtime._sandbox import ExecProcess

__all__ = ["METHODS", "Context", "Method", "parse_signal"]


# -- parameters -----------------------------------------------------------------


def _str(params: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None:
        if required:
            raise SpecError(key, "expected a string, got nothing")
        return None
    if not isinstance(value, str):
        raise SpecError(key, f"expected a string, got {type(value).__name__}")
    return value


def _name(params: dict[str, Any]) -> str:
    name = _str(params, "name", required=True)
    assert name is not None
    return name


def _bool(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise SpecError(key, f"expected true or false, got {value!r:.40}")
    return value


def _seconds(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 86400:
        raise SpecError(key, f"expected seconds between 0 and 86400, got {value!r:.40}")
    return float(value)


def parse_signal(value: object, key: str = "signal") -> int:
    """A signal from its number or name (``9``, ``KILL``, ``SIGKILL``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
    elif isinstance(value, str):
        text = value.upper()
        if text.isdigit():
            return parse_signal(int(text), key)
        try:
            return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
        except KeyError:
            pass
    raise SpecError(key, f"expected a signal name or number (TERM, 15), got {value!r:.40}")


def _strings(params: dict[str, Any], key: str) -> list[str]:
    value = params.get(key)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v and "\0" not in v for v in value)
    ):
        raise SpecError(key, "expected a non-empty list of non-empty strings")
    return value


def _env(params: dict[str, Any]) -> dict[str, str]:
    value = params.get("env") or {}
    if not isinstance(value, dict):
        raise SpecError("env", "expected a map of names to values")
    for k, v in value.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise SpecError("env", f"expected variable names without '=', got {k!r:.40}")
        if not isinstance(v, str) or "\0" in v:
            raise SpecError("env", f"{k}: expected a string value")
    return value


# -- what the verbs answer ---------------------------------------------------------


def _stats_dict(stats: CgroupStats | None, memory_limit: int | None) -> dict[str, Any] | None:
    if stats is None:
        return None
    return stats._asdict() | {"memory_limit": memory_limit}


T = TypeVar("T")


def _from_cgroup(inst: Instance, read: Callable[[Cgroup], T]) -> T | None:
    """*read* of the instance's cgroup; None if it has none (or it is
    going away right now)."""
    sb = inst.sandbox
    if sb is None:
        return None
    try:
        return read(sb.cgroup)
    except (CorralError, OSError):
        return None


def _read_stats(inst: Instance) -> CgroupStats | None:
    return _from_cgroup(inst, lambda cg: cg.stats())


def _read_memory(inst: Instance) -> int | None:
    return _from_cgroup(inst, lambda cg: cg.memory_current())


def summary(inst: Instance, stats: CgroupStats | int | None) -> dict[str, Any]:
    """One row of ``ps`` (and what the verbs answer for each instance);
    *stats*: its counters, or just its memory in use."""
    if isinstance(stats, CgroupStats):
        stats = stats.memory_current
    sb = inst.sandbox
    now = time.time()
    return {
        "name": inst.name,
        "sandbox": inst.sandbox_name,
        "instance": inst.index,
        "generation": inst.generation,
        "state": inst.state,
        "busy": inst.busy,
        "pid": sb.pid if sb is not None else None,
        "started_at": inst.started_at,
        "uptime": round(now - inst.started_at, 3) if inst.started_at else None,
        "restarts": inst.generation,
        "memory": stats,
        "memory_limit": inst.memory_limit,
        "last_exit": inst.last_exit,
    }


async def _all_stats(sup: Supervisor, instances: Sequence[Instance]) -> list[CgroupStats | None]:
    # A few small files per sandbox: one worker thread for the lot.
    return await trio.to_thread.run_sync(
        lambda: [_read_stats(i) for i in instances], limiter=sup.limiters.disk
    )


async def _rows(sup: Supervisor, instances: Sequence[Instance]) -> list[dict[str, Any]]:
    # A row shows the memory in use only: one file per sandbox, not seven.
    memory = await trio.to_thread.run_sync(
        lambda: [_read_memory(i) for i in instances], limiter=sup.limiters.disk
    )
    return [summary(i, m) for i, m in zip(instances, memory, strict=True)]


def _namespaces(pid: int) -> dict[str, str]:
    out = {}
    for ns in ("mnt", "uts", "ipc", "net", "pid", "cgroup", "user"):
        try:
            out[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            pass
    return out


def inspect(
    inst: Instance, stats: CgroupStats | None, counters: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Everything known about one instance (``corral inspect``); *counters*
    are its network's (see ``Runtime.network_stats``), if it is bridged."""
    cfg = inst.config
    sb = inst.sandbox
    spec = inst.spec()
    out = summary(inst, stats)
    out.update(
        spec={
            "command": list(cfg.command),
            "rootfs": cfg.rootfs,
            "hostname": spec.effective_hostname,
            "env": dict(cfg.env),
            "workdir": cfg.workdir,
            "replicas": cfg.replicas,
            "plugins": {k: dict(v) for k, v in cfg.plugins.items()},
        },
        limits=_limits(inst),
        limits_changed=sorted(inst.overrides),
        runtime_name=spec.name,
        cgroup=list(sb.cgroup.paths) if sb else None,
        # The init is our child and not reaped while it is tracked, so its
        # PID cannot have been reused: /proc/PID is that process.
        pids=_safe(lambda: sb.cgroup.pids()) if sb else [],
        namespaces=_namespaces(sb.pid) if sb else {},
        stats=_stats_dict(stats, inst.memory_limit),
        oom={"events": inst.oom_events_seen, "kills": inst.oom_kills_reported},
        network=_network(inst, counters),
        checkpoint_stopped=inst.checkpoint_stopped,
        restored_from=(
            f"{sb.restored_from.name}/{sb.restored_from.tag}"
            if sb is not None and sb.restored_from is not None
            else None
        ),
        execs=[{"exec_id": k, "pid": p.pid} for k, p in inst.execs.items()],
        events=[
            {
                "seq": e.seq,
                "kind": e.kind,
                "generation": e.generation,
                "wall": e.wall,
                "data": e.data(),
            }
            for e in inst.recent
        ],
    )
    return out


def _limits(inst: Instance) -> dict[str, Any]:
    """An instance's limits as ``inspect`` shows them: every key (the
    fleet file's names) as enforced, the changes made at run time in."""
    from .._runtime._limits import key_data

    limits = inst.limits.effective()
    return {key: key_data(key, getattr(limits, key)) for key in limits._fields}


def _safe(fn: Callable[[], list[int]]) -> list[int]:
    try:
        return fn()
    except (CorralError, OSError):
        return []


# -- methods ----------------------------------------------------------------------


Send = Callable[[dict[str, Any], Sequence[int]], Awaitable[None]]
"""Sends one message, with descriptors, on the request's connection."""


class Context:
    """What a method gets besides its parameters: the descriptors sent with
    the request, and a way to send ``progress`` before the answer."""

    def __init__(self, send: Send, rid: int, fds: list[int], *, privileged: bool = False) -> None:
        self._send = send
        self._rid = rid
        self.fds = fds
        self.privileged = privileged
        """The client is root or the supervisor's own user."""

    async def progress(self, data: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``{"id": ..., "progress": data}``, with *fds* attached."""
        await self._send({"id": self._rid, "progress": data}, fds)

    def close_fds(self) -> None:
        """Close the request's descriptors (done for every request at its end)."""
        while self.fds:
            os.close(self.fds.pop())


Method = Callable[["Supervisor", dict[str, Any], Context], Awaitable[Any]]
"""A control method: ``(supervisor, params, context) -> result``."""


def _checkpoint_result(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "tag": info.tag,
        "path": info.path,
        "created": info.created,
        "size": info.size,
        "duration_ms": round(info.duration * 1000, 3),
        "frozen_ms": round(info.frozen * 1000, 3),
        "criu_ms": round(info.criu_seconds * 1000, 3),
        "leave_running": info.leave_running,
    }


async def _ping(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return {"pid": os.getpid()}


async def _checkpoint(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    info = await sup.checkpoint(
        _name(params), tag=_str(params, "tag"), leave_running=_bool(params, "leave_running")
    )
    return _checkpoint_result(info)


async def _restore(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    name = _name(params)
    sb = await sup.restore(name, tag=_str(params, "tag"), as_name=_str(params, "as"))
    info = sb.restored_from
    return {
        "name": _str(params, "as") or sup.resolve(name).name,
        "pid": sb.pid,
        "tag": info.tag if info else None,
        "source": info.name if info else name,
        "weakened": restore_weakens(check_criu(), sb.spec.security),
    }


async def _checkpoints(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    found = await sup.list_checkpoints(_str(params, "name") or None)
    return [_checkpoint_result(i) for i in found]


async def _ps(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, list(sup.instances))


async def _inspect(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    inst = sup.resolve(_name(params))
    (stats,) = await _all_stats(sup, [inst])
    net = await _network_stats(sup, [inst])
    return inspect(inst, stats, net.get(inst.sandbox.name) if inst.sandbox else None)


def _network(inst: Instance, counters: Mapping[str, int] | None) -> dict[str, Any]:
    """An instance's network: its mode, ports and egress (as written) and,
    bridged and running, its lease (with the egress addresses its names
    resolved to), its veth and its counters."""
    cfg = inst.config
    out: dict[str, Any] = {
        "mode": cfg.network,
        "ports": [p.describe() for p in cfg.ports],
        "egress": list(cfg.egress) if cfg.egress is not None else "all",
    }
    sb = inst.sandbox
    lease = sb.network.get("lease") if sb is not None and sb.network else None
    if sb is not None and sb.network and isinstance(lease, dict):
        allowed = lease.get("egress")
        out.update(
            address=lease.get("address"),
            # The allow-list's names as they resolved when it started.
            egress_addresses=list(allowed) if allowed is not None else "all",
            prefix=lease.get("prefix"),
            gateway=lease.get("gateway"),
            mac=lease.get("mac"),
            address6=lease.get("address6"),
            prefix6=lease.get("prefix6") or None,
            gateway6=lease.get("gateway6"),
            veth=sb.network.get("veth"),
            counters=dict(counters) if counters is not None else None,
        )
    return out


async def _stats(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    names = params.get("names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SpecError("names", "expected a list of sandbox or instance names")
    found = [i for n in names for i in sup.targets(n)] if names else list(sup.instances)
    stats = await _all_stats(sup, found)
    net = await _network_stats(sup, found)
    return [
        {"name": i.name, "state": i.state}
        | (_stats_dict(s, i.memory_limit) or {})
        | ({"network": net[i.sandbox.name]} if i.sandbox and i.sandbox.name in net else {})
        for i, s in zip(found, stats, strict=True)
    ]


async def _network_stats(
    sup: Supervisor, instances: Sequence[Instance]
) -> dict[str, dict[str, int]]:
    """The bridged instances' network counters (see Runtime.network_stats)."""
    sandboxes = [i.sandbox for i in instances if i.sandbox is not None and i.sandbox.network]
    if not sandboxes or sup.runtime is None:
        return {}
    runtime = sup.runtime
    return await trio.to_thread.run_sync(
        lambda: runtime.network_stats(sandboxes), limiter=sup.limiters.disk
    )


async def _stop(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, await sup.stop_sandbox(_name(params), _seconds(params, "timeout")))


async def _start(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, await sup.start_sandbox(_name(params)))


async def _restart(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, await sup.restart_sandbox(_name(params), _seconds(params, "timeout")))


async def _kill(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    sig = parse_signal(params.get("signal", "KILL"))
    return await _rows(sup, await sup.kill_sandbox(_name(params), sig))


async def _pause(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, await sup.pause_sandbox(_name(params)))


async def _resume(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    return await _rows(sup, await sup.resume_sandbox(_name(params)))


async def _add(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    path = _str(params, "path", required=True)
    assert path is not None
    if not os.path.isabs(path):
        raise SpecError("path", f"expected an absolute path to a fleet file, got {path!r}")
    fd = ctx.fds[0] if len(ctx.fds) == 1 else None
    if ctx.fds and fd is None:
        raise SpecError("fds", f"expected the fleet file's descriptor, got {len(ctx.fds)}")
    if ctx.privileged:
        return await _rows(sup, await sup.add_fleet(path, fd=fd))
    # A member of socket_group: the supervisor must not read, as root, a
    # file the member could not (the client passes it open: the kernel
    # checked its rights), nor add what the fleet's policy refuses.
    if fd is None:
        raise ControlError(
            "forbidden",
            "add: a member of socket_group passes the fleet file open, as a descriptor"
            " (corral add does)",
        )
    policy = sup.fleet.supervisor.socket_policy
    return await _rows(sup, await sup.add_fleet(path, fd=fd, policy=policy))


async def _rm(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    found = await sup.remove_sandbox(_name(params), _seconds(params, "timeout"))
    return [i.name for i in found]


async def _exec(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    name = _name(params)
    argv = _strings(params, "argv")
    env = _env(params)
    workdir = _str(params, "workdir")
    user = _str(params, "user")
    tty = _bool(params, "tty")
    winsize = params.get("winsize")
    if winsize is not None and (
        not isinstance(winsize, list)
        or len(winsize) != 2
        or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 65536 for n in winsize
        )
    ):
        raise SpecError("winsize", f"expected [rows, columns], got {winsize!r:.40}")
    if tty:
        stdio = None
    elif len(ctx.fds) == 3:
        stdio = (ctx.fds[0], ctx.fds[1], ctx.fds[2])
    else:
        raise SpecError(
            "fds", f"expected 3 descriptors (stdin, stdout, stderr), got {len(ctx.fds)}"
        )

    async def started(exec_id: int, proc: ExecProcess) -> None:
        # Our copies go at once: the client's pipes must see end of file
        # when the process (and whatever it started) is done with them.
        ctx.close_fds()
        master = proc.pty_master
        proc.pty_master = None
        try:
            await ctx.progress(
                {"exec_id": exec_id, "pid": proc.pid}, [master] if master is not None else ()
            )
        finally:
            if master is not None:
                os.close(master)

    if stdio is None:
        with open("/dev/null", "rb") as null:
            n = null.fileno()
            status = await sup.exec_in(
                name,
                argv,
                env=env,
                workdir=workdir,
                tty=True,
                winsize=(winsize[0], winsize[1]) if winsize else None,
                stdio=(n, n, n),
                user=user,
                started=started,
            )
    else:
        status = await sup.exec_in(
            name, argv, env=env, workdir=workdir, stdio=stdio, user=user, started=started
        )
    return {"status": status}


async def _update(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    from .._runtime._limits import parse_limit

    limits = params.get("limits")
    if not isinstance(limits, dict) or not limits or not all(isinstance(k, str) for k in limits):
        raise SpecError("limits", "expected a map of limit keys to values, e.g. {memory: '1G'}")
    changes = {key: parse_limit(key, value, live=True) for key, value in limits.items()}
    done = await sup.update_limits(_name(params), changes, force=_bool(params, "force"))
    return [
        {
            "name": inst.name,
            "state": inst.state,
            "changed": [
                {"limit": e.limit, "device": e.device, "old": e.old, "new": e.new} for e in evs
            ],
        }
        for inst, evs in done
    ]


async def _exec_signal(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    exec_id = params.get("exec_id")
    if not isinstance(exec_id, int) or isinstance(exec_id, bool):
        raise SpecError("exec_id", f"expected an integer, got {exec_id!r:.40}")
    sup.signal_exec(exec_id, parse_signal(params.get("signal", "TERM")))
    return None


async def _handover(sup: Supervisor, params: dict[str, Any], ctx: Context) -> Any:
    # Ending the supervisor is root's (or its own user's): a member of
    # socket_group may drive sandboxes, not replace who supervises them.
    if not ctx.privileged:
        raise ControlError("forbidden", "handover: only root may replace the supervisor")
    sup.hand_over()
    return {"pid": os.getpid()}


METHODS: dict[str, Method] = {
    "ping": _ping,
    "ps": _ps,
    "inspect": _inspect,
    "stats": _stats,
    "stop": _stop,
    "start": _start,
    "restart": _restart,
    "kill": _kill,
    "pause": _pause,
    "resume": _resume,
    "exec": _exec,
    "exec_signal": _exec_signal,
    "add": _add,
    "rm": _rm,
    "update": _update,
    "checkpoint": _checkpoint,
    "restore": _restore,
    "checkpoints": _checkpoints,
    "handover": _handover,
}

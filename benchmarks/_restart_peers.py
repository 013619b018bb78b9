"""Peer supervisors for corral's crash-to-restart benchmark: supervisord and circus.

What is measured is the *crash-to-restart latency*: a tiny crash-loop program
(see :func:`build_crasher`) appends ``start <ns> <pid>`` to a timestamps file
as the first thing it does, then ``death <ns> <pid>`` right before it exits
with status 1.  Both stamps are ``CLOCK_MONOTONIC`` (system-wide, the clock of
:func:`time.monotonic`).  The supervisor under test restarts it; one sample is
the next ``start`` minus the previous ``death`` (:func:`read_latencies`), so
it covers the supervisor noticing the death, deciding to restart, forking and
exec-ing the program, up to the program's first instruction of ``main``.

Peers, each run as a foreground child of the benchmark with every socket,
pid, log and config file in a private directory below the scratch directory:

* :class:`SupervisordPeer`: supervisord (PyPI ``supervisor``) with
  ``autorestart=true``, ``startsecs=0`` (so a crash never counts as a failed
  start: no ``BACKOFF`` state, no growing delay, ``startretries`` never
  consulted; it is set huge anyway), ``exitcodes=0``, no child logs and
  ``loglevel=error``.  Nothing in its configuration shortens its main loop:
  ``supervisord.runforever`` waits in ``poll()`` with a hard-coded 1 s
  timeout, SIGCHLD only sets a flag (PEP 475 resumes the poll), and the
  restart happens in the ``transition()`` after the loop iteration that
  reaped the child, i.e. on the next wake-up: about 1 s after the crash.
* :class:`CircusPeer`: circusd with ``check_delay`` (the period of its
  reap-and-respawn timer; any positive float is accepted, 0 disables
  respawning altogether) at :data:`CIRCUS_CHECK_DELAY` by default,
  ``respawn = true``, ``max_retry = -1``, ``warmup_delay = 0``,
  ``graceful_timeout`` 0.1 s, no flapping plugin, no statsd/httpd, the UDP
  multicast discovery socket disabled, ipc:// endpoints in scratch.  It does
  not handle SIGCHLD either, so a restart waits for the next timer tick.

Measured with this module (Debian 12, 2 cores, Python 3.11, supervisor
4.3.0, circus 0.19.0, compiled crasher that dies at once):

* supervisord: p50 1.007 s.  About 80 % of restarts take 1.00-1.01 s, about
  18 % take 2.01 s (the child's pipe EOF wakes the poll a moment before the
  child can be reaped, so reaping waits one more 1 s poll), and a few are
  fast when some other event happens to wake the loop.  Its own CPU use is
  negligible.
* circus: p50 about 10 ms at ``check_delay = 0.01`` (the crasher dies
  within a millisecond of its spawn, so deaths are phase-locked to the
  timer: nearly a full period each), about 5-7 ms at 0.001, about 5.5 ms at
  0.0001; the floor is circus's own reap-and-spawn cost (3-5 ms).  The
  price is paid even when nothing crashes: circusd uses about 6 % of a core
  per watcher at 0.01 and about 25 % at 0.001 (0 % at the default 1.0).
  At very small delays circusd logs a harmless ``ConflictError`` or two
  while it starts its watchers.

Installing the peers: the PyPI distribution ``supervisor`` installs a
top-level package named ``supervisor`` -- the same name as corral's own
package.  Installed into corral's venv it lands in site-packages, which comes
*before* the editable install's path entry, and shadows corral (``corral``
and ``import supervisor`` would load supervisord's package).  So the peers are
installed with ``pip install --target`` into a separate directory
(:func:`install_peers`, default :data:`DEFAULT_SITE`) and the daemons are run
as ``python -P -m ...`` with that directory on ``PYTHONPATH`` and a working
directory of their own.  All of :data:`PEER_PACKAGES` come from PyPI as
wheels (pyzmq bundles its libzmq).

Typical use::

    crasher = build_crasher(scratch)
    ok, why = SupervisordPeer.available()  # (False, reason) if not installed
    if not ok:
        install_peers()  # pip install --target DEFAULT_SITE, wheels only
        ok, why = SupervisordPeer.available()
    peer = SupervisordPeer(scratch, crasher)
    peer.start()
    try:
        seconds = peer.collect(50, timeout=180.0)
    finally:
        peer.stop()

Running this file prints p50/p90/p99 (ms) per peer, installing the peers
first if needed::

    .venv/bin/python benchmarks/_restart_peers.py [--restarts 50]

Only the standard library is imported here; the peers' packages are only
imported by the daemons' own interpreters.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = [
    "CIRCUS_CHECK_DELAY",
    "DEFAULT_SITE",
    "PEER_PACKAGES",
    "CircusPeer",
    "DaemonPeer",
    "PeerError",
    "SupervisordPeer",
    "build_crasher",
    "crasher_is_native",
    "install_peers",
    "percentile_ms",
    "read_latencies",
]

#: What :func:`install_peers` installs: the versions this module was checked with.
PEER_PACKAGES: tuple[str, ...] = (
    "supervisor==4.3.0",
    "circus==0.19.0",
    "pyzmq==27.3.0",
    "tornado==6.6.1",
    "psutil==7.2.2",
)

#: circus ``check_delay`` (seconds) used unless another is given.
CIRCUS_CHECK_DELAY = 0.001


def _default_site() -> Path:
    env = os.environ.get("CORRAL_PEER_SITE")
    if env:
        return Path(env)
    if sys.prefix != sys.base_prefix:  # in a venv: keep it beside site-packages
        return Path(sys.prefix) / "corral-peer-site"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "corral-peer-site"


#: Where the peers' packages live (``pip install --target``): ``$CORRAL_PEER_SITE``,
#: else ``<venv>/corral-peer-site``, else ``~/.cache/corral-peer-site``.
DEFAULT_SITE: Path = _default_site()

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_UNIX_PATH_MAX = 107


class PeerError(RuntimeError):
    """A peer failed to start, to restart the crasher in time, or to stop."""


# --------------------------------------------------------------------------
# the crash-loop program

_CRASHER_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void note(int fd, const char *what, long long ns) {
    char buf[80];
    int n = snprintf(buf, sizeof buf, "%s %lld %ld\n", what, ns, (long)getpid());
    if (n > 0 && write(fd, buf, (size_t)n) != n) _exit(3);
}

/* argv[1]: timestamps file (appended to); argv[2]: optional microseconds
   to stay alive between the start and the death stamps. */
int main(int argc, char **argv) {
    long long t0 = now_ns();
    if (argc < 2) return 2;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return 2;
    note(fd, "start", t0);
    if (argc > 2) {
        long us = atol(argv[2]);
        if (us > 0) usleep((useconds_t)us);
    }
    note(fd, "death", now_ns());
    _exit(1);
}
"""

_CRASHER_PY = """\
import os, sys, time
t0 = time.monotonic_ns()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
os.write(fd, b"start %d %d\\n" % (t0, os.getpid()))
if len(sys.argv) > 2 and int(sys.argv[2]) > 0:
    time.sleep(int(sys.argv[2]) / 1e6)
os.write(fd, b"death %d %d\\n" % (time.monotonic_ns(), os.getpid()))
os._exit(1)
"""


def build_crasher(scratch: Path) -> Path:
    """Build the crash-loop program in *scratch*; return its path.

    With gcc (or ``cc``) it is ``scratch/crasher``, compiled from a 30-line C
    program, statically linked where libc.a exists (no dynamic loader at
    start), else dynamically.  Without a working C compiler it falls back to
    ``scratch/crasher.py``, a Python script run by ``python3 -SI``, which
    adds the interpreter's start-up (about 10-20 ms) to every sample;
    :func:`crasher_is_native` tells which one was built.

    Usage: ``crasher TIMESTAMPS [MICROSECONDS]``: appends ``start <ns> <pid>``
    (one ``write``, ``O_APPEND``), optionally sleeps, appends
    ``death <ns> <pid>`` and exits with status 1.
    """
    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is not None:
        source = scratch / "crasher.c"
        source.write_text(_CRASHER_C)
        binary = scratch / "crasher"
        for extra in (["-static"], []):
            argv = [compiler, "-O2", *extra, "-o", str(binary), str(source)]
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=120
            )
            if proc.returncode == 0 and _crasher_works(binary):
                return binary
    script = scratch / "crasher.py"
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    script.write_text(f"#!{python} -SI\n{_CRASHER_PY}")
    script.chmod(0o755)
    if not _crasher_works(script):
        raise PeerError(f"neither a compiled nor a Python crasher works in {scratch}")
    return script


def _crasher_works(crasher: Path) -> bool:
    probe = crasher.with_name(crasher.name + ".probe")
    try:
        proc = subprocess.run(
            [str(crasher), str(probe)], stdin=subprocess.DEVNULL, capture_output=True, timeout=30
        )
        words = probe.read_text().split()
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return proc.returncode == 1 and len(words) == 6 and words[0::3] == ["start", "death"]


def crasher_is_native(crasher: Path) -> bool:
    """Whether *crasher* is the compiled program (not the Python fallback)."""
    try:
        with open(crasher, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def read_latencies(path: Path) -> tuple[int, list[float]]:
    """Parse a timestamps file: (number of starts, restart latencies in seconds).

    A latency is a ``start`` minus the ``death`` that precedes it; a start
    with no death before it (the first one, or one after a process that was
    killed before it could write its death) gives none.  A partly written last
    line is ignored.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0, []
    starts = 0
    last_death: int | None = None
    out: list[float] = []
    for line in text.splitlines(keepends=True):
        fields = line.split()
        if not line.endswith("\n") or len(fields) != 3:
            continue
        kind, ns = fields[0], int(fields[1])
        if kind == "start":
            starts += 1
            if last_death is not None:
                out.append((ns - last_death) / 1e9)
            last_death = None
        elif kind == "death":
            last_death = ns
    return starts, out


def percentile_ms(samples: Sequence[float], q: float) -> float:
    """Nearest-rank *q*-th percentile (0 < q <= 100) of *samples* (s), in ms."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1] * 1000.0


# --------------------------------------------------------------------------
# installing and probing the peers


def install_peers(site: Path | None = None, *, quiet: bool = True) -> Path:
    """``pip install --target SITE`` :data:`PEER_PACKAGES` (wheels only); return SITE.

    Uses this interpreter's pip.  Never installs into the venv's own
    site-packages (see the module docstring for why).
    """
    target = Path(site or DEFAULT_SITE).resolve()
    argv = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--only-binary=:all:",
        "--upgrade",
        "--target",
        str(target),
        *PEER_PACKAGES,
    ]
    if quiet:
        argv.insert(4, "--quiet")
    proc = subprocess.run(
        argv, cwd="/", stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=600
    )
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
        raise PeerError(f"pip install --target {target} failed ({proc.returncode}): {err}")
    return target


def _peer_env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT"):
        env.pop(var, None)
    if site.is_dir():
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(site) + (os.pathsep + old if old else "")
    return env


def _probe(site: Path, code: str) -> tuple[bool, str]:
    argv = [sys.executable, "-P", "-c", code]
    try:
        proc = subprocess.run(
            argv,
            cwd="/",
            env=_peer_env(site),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"could not run {sys.executable}: {exc}"
    out = proc.stdout.decode("utf-8", "replace").strip()
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        last = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        return False, last
    return True, out


def _proc_stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, starttime, utime, stime) of *pid* from /proc, None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, starttime 22.
    return int(fields[1]), int(fields[19]), int(fields[11]), int(fields[12])


def _descendants(root: int) -> dict[int, int]:
    """Live descendants of *root*: {pid: starttime}."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry), stat[1]))
    found: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


# --------------------------------------------------------------------------
# the peers


class DaemonPeer:
    """A supervisor daemon run in the foreground as a child of this process.

    The common part of :class:`SupervisordPeer` and :class:`CircusPeer`;
    not used on its own.
    """

    #: Short name, also the name of the peer's directory below scratch.
    kind: ClassVar[str] = "daemon"
    #: Python code that imports the daemon and prints its version.
    _probe_code: ClassVar[str] = ""
    #: The PyPI distribution the daemon comes from.
    _dist: ClassVar[str] = ""

    def __init__(
        self,
        scratch: Path,
        crasher: Path,
        *,
        site: Path | None = None,
        linger_us: int = 0,
    ) -> None:
        """Prepare a peer whose files all go to ``scratch/<kind>/``.

        *crasher* is the program from :func:`build_crasher`, *site* the
        directory :func:`install_peers` filled (default :data:`DEFAULT_SITE`),
        *linger_us* how long each crasher stays alive between its stamps.
        """
        self.scratch: Path = Path(scratch).resolve()
        self.crasher: Path = Path(crasher).resolve()
        self.site: Path = Path(site or DEFAULT_SITE).resolve()
        self.linger_us: int = int(linger_us)
        #: Private directory of this peer: config, logs, sockets, pid file.
        self.workdir: Path = self.scratch / self.kind
        #: The crasher's timestamps file.
        self.timestamps: Path = self.workdir / "timestamps"
        #: stdout and stderr of the daemon.
        self.output: Path = self.workdir / "daemon.out"
        self.config: Path = self.workdir / "daemon.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, int] = {}
        self._cpu0 = 0.0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scratch={str(self.scratch)!r}, crasher={str(self.crasher)!r})"
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @classmethod
    def available(cls, site: Path | None = None) -> tuple[bool, str]:
        """(True, version and where) if the daemon can be imported and run here,
        else (False, why).  Never raises."""
        if not sys.platform.startswith("linux"):
            return False, "Linux only"
        where = Path(site or DEFAULT_SITE).resolve()
        ok, text = _probe(where, cls._probe_code)
        if not ok:
            return False, (
                f"{cls.kind} cannot be imported with {where} on PYTHONPATH ({text});"
                f" install it with install_peers() (pip install --target {where} {cls._dist})"
            )
        return True, text

    @property
    def pid(self) -> int | None:
        """The daemon's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        argv = [str(self.crasher), str(self.timestamps)]
        if self.linger_us > 0:
            argv.append(str(self.linger_us))
        return argv

    def _write_config(self) -> list[str]:  # pragma: no cover
        """Write the config; return the daemon's argv after ``python -P -m``."""
        raise NotImplementedError

    def start(self) -> None:
        """Write the config and start the daemon, which starts the crash loop."""
        if self._proc is not None:
            raise PeerError(f"{self.kind} is already running")
        if not os.access(self.crasher, os.X_OK):
            raise PeerError(f"crasher {self.crasher} is not executable")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.timestamps.unlink()
        self._known = {}
        argv = [sys.executable, "-P", "-m", *self._write_config()]
        with open(self.output, "wb") as out:
            self._proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=_peer_env(self.site),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self._cpu0 = self.daemon_cpu_seconds()

    def daemon_cpu_seconds(self) -> float:
        """CPU time (user + system, s) the daemon process itself has used so far."""
        if self._proc is None:
            return 0.0
        stat = _proc_stat(self._proc.pid)
        return 0.0 if stat is None else (stat[2] + stat[3]) / _CLK_TCK

    def cpu_since_start(self) -> float:
        """Daemon CPU seconds since :meth:`start` (its own, not the crashers')."""
        return self.daemon_cpu_seconds() - self._cpu0

    def _tail(self, lines: int = 15) -> str:
        chunks: list[str] = []
        for path in [*sorted(self.workdir.glob("*.log")), self.output]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").strip()
                if text:
                    chunks.append(f"[{path.name}] " + " | ".join(text.splitlines()[-lines:]))
        return "; ".join(chunks) or "(no output)"

    def collect(self, n: int, timeout: float, *, skip: int = 0) -> list[float]:
        """Wait for ``skip + n + 1`` starts; return latencies ``skip .. skip+n-1`` (s).

        Raises :class:`PeerError` if the daemon exits or *timeout* seconds
        pass first (the daemon keeps running: call :meth:`stop`).
        """
        if self._proc is None:
            raise PeerError(f"{self.kind} is not running")
        deadline = time.monotonic() + timeout
        while True:
            starts, lat = read_latencies(self.timestamps)
            if len(lat) >= skip + n:
                return lat[skip : skip + n]
            code = self._proc.poll()
            if code is not None:
                raise PeerError(
                    f"{self.kind} exited with status {code} after {starts} starts: {self._tail()}"
                )
            if time.monotonic() >= deadline:
                raise PeerError(
                    f"{self.kind}: only {starts} starts ({len(lat)} restarts) in {timeout} s,"
                    f" wanted {skip + n + 1}: {self._tail()}"
                )
            time.sleep(0.05)

    def _remember_children(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._known.update(_descendants(self._proc.pid))

    def _crasher_pids(self) -> set[int]:
        pids: set[int] = set()
        with contextlib.suppress(OSError):
            for line in self.timestamps.read_text().splitlines():
                fields = line.split()
                if len(fields) == 3 and fields[0] == "start":
                    pids.add(int(fields[2]))
        return pids

    def _is_our_crasher(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        # argv is [crasher, timestamps, ...] or, for the Python fallback,
        # [python3, -SI, crasher.py, timestamps, ...].
        return os.fsencode(self.timestamps) in cmdline and os.fsencode(self.crasher) in cmdline[:3]

    def leftovers(self) -> list[int]:
        """Pids still alive that this peer started (daemon, its children, crashers)."""
        alive: list[int] = []
        if self._proc is not None and self._proc.poll() is None:
            alive.append(self._proc.pid)
        for pid, start in self._known.items():
            stat = _proc_stat(pid)
            if stat is not None and stat[1] == start:
                alive.append(pid)
        for pid in self._crasher_pids():
            if pid not in alive and _proc_stat(pid) is not None and self._is_our_crasher(pid):
                alive.append(pid)
        return sorted(alive)

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, SIGKILL after 10 s) and kill anything it left.

        Only pids this peer started are signalled: the daemon, the processes
        seen below it (checked by start time against pid reuse) and crashers
        that ran with this peer's timestamps file.  Idempotent.  Raises
        :class:`PeerError` if something is still alive afterwards.
        """
        proc = self._proc
        if proc is not None:
            self._remember_children()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10.0)
        for pid in self.leftovers():
            if proc is not None and pid == proc.pid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while True:
            left = [pid for pid in self.leftovers() if proc is None or pid != proc.pid]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        self._proc = None
        if left:
            raise PeerError(f"{self.kind}: processes still alive after stop: {left}")


def _ini_value(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise PeerError(f"newline in config value {value!r}")
    return value


class SupervisordPeer(DaemonPeer):
    """supervisord 4.x, ``python -P -m supervisor.supervisord -n -c CONF``.

    Settings (the most aggressive its configuration allows): ``autorestart
    = true``, ``startsecs = 0``, ``startretries`` = :attr:`STARTRETRIES`,
    ``exitcodes = 0``, ``autostart = true``, ``stopsignal = KILL``,
    ``stopwaitsecs = 1``, ``stdout_logfile = NONE``/``stderr_logfile = NONE``,
    ``loglevel = error``; no ``unix_http_server``/``inet_http_server``
    (supervisorctl is not needed, so supervisord opens no socket).  Its
    poll timeout (1 s) is hard-coded, see the module docstring.
    """

    kind: ClassVar[str] = "supervisord"
    _dist: ClassVar[str] = "supervisor"
    #: supervisord's ``startretries``; never reached with ``startsecs = 0``.
    STARTRETRIES: ClassVar[int] = 1_000_000_000
    _probe_code: ClassVar[str] = (
        "import os, sys, sysconfig, importlib.metadata as m\n"
        "import supervisor.supervisord, supervisor.options\n"
        "d = os.path.dirname(os.path.dirname(supervisor.__file__))\n"
        "note = ''\n"
        "if os.path.realpath(d) == os.path.realpath(sysconfig.get_paths()['purelib']):\n"
        "    note = (' WARNING: installed in the venv site-packages, where it shadows'\n"
        '            " corral\'s own `supervisor` package")\n'
        "print('supervisor', m.version('supervisor'), 'in', d, 'python',"
        " sys.version.split()[0] + note)\n"
    )

    def config_text(self) -> str:
        """The supervisord config :meth:`start` writes."""
        w = self.workdir

        def esc(value: str | Path) -> str:  # supervisord expands %(name)s
            return _ini_value(str(value).replace("%", "%%"))

        lines = [
            "; corral restart benchmark peer (benchmarks/_restart_peers.py)",
            "[supervisord]",
            "nodaemon = true",
            "silent = true",
            f"logfile = {esc(w / 'supervisord.log')}",
            "logfile_maxbytes = 0",
            "loglevel = error",
            f"pidfile = {esc(w / 'supervisord.pid')}",
            f"childlogdir = {esc(w)}",
            f"directory = {esc(w)}",
            "identifier = corral-bench",
        ]
        if os.geteuid() == 0:
            lines.append("user = root")  # silences the "running as root" complaint
        lines += [
            "",
            "[program:crasher]",
            f"command = {esc(shlex.join(self._command()))}",
            f"directory = {esc(w)}",
            "autostart = true",
            "autorestart = true",
            "startsecs = 0",
            f"startretries = {self.STARTRETRIES}",
            "exitcodes = 0",
            "stopsignal = KILL",
            "stopwaitsecs = 1",
            "stdout_logfile = NONE",
            "stderr_logfile = NONE",
        ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> list[str]:
        self.config.write_text(self.config_text())
        return ["supervisor.supervisord", "-n", "-c", str(self.config)]


class CircusPeer(DaemonPeer):
    """circus 0.19, ``python -P -m circus.circusd --log-level error CONF``.

    Settings: ``check_delay`` = *check_delay* (default
    :data:`CIRCUS_CHECK_DELAY`), ``warmup_delay = 0`` (arbiter and
    watcher), ``respawn = true``, ``max_retry = -1``, ``numprocesses = 1``,
    ``graceful_timeout = 0.1``, ``stop_signal = KILL``, ``statsd = false``,
    ``httpd = false``, ``multicast_endpoint =`` (empty: no UDP multicast
    socket), ``endpoint``/``pubsub_endpoint``/``stats_endpoint`` as ipc://
    sockets in the peer's directory, ``pidfile`` there too.
    """

    kind: ClassVar[str] = "circus"
    _dist: ClassVar[str] = "circus"
    _probe_code: ClassVar[str] = (
        "import sys, zmq, circus, circus.circusd, circus.arbiter\n"
        "if not zmq.has('ipc'):\n"
        "    raise SystemExit('pyzmq was built without ipc:// support')\n"
        "print('circus', circus.__version__, 'pyzmq', zmq.__version__, 'libzmq',"
        " zmq.zmq_version(), 'python', sys.version.split()[0])\n"
    )

    def __init__(
        self,
        scratch: Path,
        crasher: Path,
        *,
        site: Path | None = None,
        linger_us: int = 0,
        check_delay: float = CIRCUS_CHECK_DELAY,
    ) -> None:
        """See :class:`DaemonPeer`; *check_delay* is circus's timer period (s, > 0)."""
        super().__init__(scratch, crasher, site=site, linger_us=linger_us)
        if not check_delay > 0:
            raise ValueError("check_delay must be > 0 (0 or less disables respawning)")
        self.check_delay: float = float(check_delay)

    def _endpoint(self, name: str) -> str:
        path = self.workdir / name
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise PeerError(f"socket path too long for ipc://: {path}")
        return f"ipc://{path}"

    def config_text(self) -> str:
        """The circus config :meth:`start` writes."""
        w = self.workdir
        crasher, *args = self._command()
        lines = [
            "# corral restart benchmark peer (benchmarks/_restart_peers.py)",
            "[circus]",
            f"check_delay = {self.check_delay!r}",
            f"endpoint = {_ini_value(self._endpoint('ctl.sock'))}",
            f"pubsub_endpoint = {_ini_value(self._endpoint('pub.sock'))}",
            f"stats_endpoint = {_ini_value(self._endpoint('stats.sock'))}",
            "multicast_endpoint =",
            "statsd = false",
            "httpd = false",
            "warmup_delay = 0",
            f"pidfile = {_ini_value(str(w / 'circusd.pid'))}",
            f"logoutput = {_ini_value(str(w / 'circusd.log'))}",
            "loglevel = error",
            "",
            "[watcher:crasher]",
            f"cmd = {_ini_value(shlex.quote(crasher))}",
            f"args = {_ini_value(shlex.join(args))}",
            f"working_dir = {_ini_value(str(w))}",
            "numprocesses = 1",
            "warmup_delay = 0",
            "respawn = true",
            "max_retry = -1",
            "graceful_timeout = 0.1",
            "stop_signal = KILL",
            "copy_env = false",
        ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> list[str]:
        self.config.write_text(self.config_text())
        return ["circus.circusd", "--log-level", "error", str(self.config)]


# --------------------------------------------------------------------------
# standalone check


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Crash-to-restart latency of supervisord, circus.")
    parser.add_argument("--restarts", type=int, default=50, help="samples per peer (default 50)")
    parser.add_argument("--skip", type=int, default=0, help="restarts dropped first (default 0)")
    parser.add_argument("--check-delay", type=float, default=CIRCUS_CHECK_DELAY)
    parser.add_argument("--linger-us", type=int, default=0, help="crasher lifetime (us)")
    parser.add_argument("--site", type=Path, default=DEFAULT_SITE, help="pip --target dir")
    parser.add_argument("--no-install", action="store_true", help="never run pip")
    parser.add_argument("--only", choices=["supervisord", "circus"], action="append")
    parser.add_argument(
        "--install-only", action="store_true", help="install the peers, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.install_only:  # make setup-bench
        try:
            install_peers(args.site)
        except PeerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"peers: {' '.join(PEER_PACKAGES)} in {args.site}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-restart-", dir="/tmp"))
    status = 0
    try:
        crasher = build_crasher(scratch)
        if crasher_is_native(crasher):
            print(f"crasher: compiled C program {crasher}")
        else:
            print(f"crasher: no C compiler, Python fallback {crasher} (adds interpreter start-up)")
        classes: list[type[DaemonPeer]] = [SupervisordPeer, CircusPeer]
        for cls in classes:
            if args.only and cls.kind not in args.only:
                continue
            ok, why = cls.available(args.site)
            if not ok and not args.no_install:
                print(f"{cls.kind}: installing {' '.join(PEER_PACKAGES)} into {args.site}")
                install_peers(args.site)
                ok, why = cls.available(args.site)
            if not ok:
                print(f"{cls.kind}: unavailable: {why}")
                status = 1
                continue
            print(f"{cls.kind}: {why}")
            peer: DaemonPeer
            if cls is CircusPeer:
                peer = CircusPeer(scratch, crasher, site=args.site, check_delay=args.check_delay)
            else:
                peer = cls(scratch, crasher, site=args.site)
            peer.linger_us = args.linger_us
            timeout = 30.0 + 3.0 * (args.restarts + args.skip)
            t0 = time.monotonic()
            try:
                peer.start()
                data = peer.collect(args.restarts, timeout, skip=args.skip)
                cpu = peer.cpu_since_start()
            finally:
                wall = time.monotonic() - t0
                peer.stop()
            extra = f" check_delay={peer.check_delay:g}s" if isinstance(peer, CircusPeer) else ""
            print(
                f"{peer.kind:11s} n={len(data)}  p50 {percentile_ms(data, 50):8.2f} ms"
                f"  p90 {percentile_ms(data, 90):8.2f} ms  p99 {percentile_ms(data, 99):8.2f} ms"
                f"  min {min(data) * 1e3:7.2f}  max {max(data) * 1e3:8.2f} ms"
                f"  daemon CPU {cpu:.2f} s in {wall:.1f} s{extra}"
            )
            left = peer.leftovers()
            if left:
                print(f"{peer.kind}: LEFT RUNNING: {left}")
                status = 1
    except PeerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(_main())

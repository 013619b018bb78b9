"""What each CLI path imports, and the paths that skip argparse agreeing with it.

A one-shot verb costs an interpreter start plus what it imports: ``corral
--version`` and the control verbs should cost little more than a bare
start (issue 19). The import tests run the real command under ``python -X
importtime`` and hold the set of modules it imports to what its path
needs, against the modules ``python -m`` itself loads (``runpy`` and its
own imports: the baseline). They count modules, never time them. A control
verb runs against a run directory where no supervisor listens: it fails
fast with its one-line error, having imported everything its round trip
would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from supervisor import __version__
from supervisor._cli import _control_verbs, _fleet, _run
from supervisor._cli._arguments import parse_plain
from supervisor._cli._main import VERBS, build_parser, main

from .conftest import requires_root

REPO = Path(__file__).resolve().parent.parent

# Never on the paths below: what typing, dataclasses, argparse and the
# runtime cost is the start-up these paths should not pay.
NEVER = {
    "typing",
    "dataclasses",
    "inspect",
    "argparse",
    "gettext",
    "locale",
    "re",
    "enum",
    "socket",
    "signal",
    "subprocess",
    "shutil",
    "threading",
    "ctypes",
    "json",
    "trio",
    "structlog",
    "pyroute2",
    "rootfs",
    "events",
}

# Our own modules on each path, exactly: a new import shows here first.
VERSION_OWN = {
    "supervisor",
    "supervisor._errors",
    "supervisor._version",
    "supervisor._cli",
    "supervisor._cli._main",
    "supervisor._cli._common",
}
CONTROL_OWN = VERSION_OWN | {
    "supervisor._cli._arguments",
    "supervisor._cli._control_verbs",
    "supervisor._control",
    "supervisor._control._client",
    "supervisor._runtime",
    "supervisor._runtime._dirs",
}
EXEC_OWN = CONTROL_OWN | {"supervisor._control._exec_client", "supervisor._runtime._signals"}

# Modules beyond the baseline, at most: measured 2026-12-07 (Python 3.11,
# msgpack 1.2) as 7 for --version, 25 for ps/pause/resume and 30 for exec,
# with a margin of two.
VERSION_BUDGET = 9
CONTROL_BUDGET = 27
EXEC_BUDGET = 32


def _importtime(
    args: Sequence[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[str], list[str]]:
    """Run ``python -X importtime ARGS``: the process, the modules it imported
    in order, and the lines of its stderr that are not importtime's."""
    p = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True, text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    modules, other = [], []
    for line in p.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":  # the header
                modules.append(name)
        else:
            other.append(line)
    return p, modules, other


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run and state directories where no supervisor runs (nothing is created there)."""
    base = tmp_path_factory.mktemp("cli-imports")
    return {
        **os.environ,
        "CORRAL_RUN_DIR": str(base / "run"),
        "CORRAL_STATE_DIR": str(base / "state"),
        "COLUMNS": "100",
    }


@pytest.fixture(scope="module")
def baseline(env: dict[str, str]) -> set[str]:
    """What ``python -m`` loads before any of ours: the interpreter's start and runpy."""
    p, modules, _ = _importtime(["-c", "import runpy"], env)
    assert p.returncode == 0
    return set(modules)


def _added(modules: Iterable[str], baseline: set[str]) -> list[str]:
    return [m for m in modules if m not in baseline]


def _own(modules: Iterable[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in ("supervisor", "events", "rootfs", "plugins")}


def test_version_imports_only_the_package_and_the_entry(
    baseline: set[str], env: dict[str, str]
) -> None:
    """``corral --version`` prints its line having imported six small modules of ours and nothing else."""
    p, modules, other = _importtime(["-m", "supervisor", "--version"], env)
    assert (p.returncode, p.stdout, other) == (0, f"corral {__version__}\n", [])
    added = _added(modules, baseline)
    assert _own(added) == VERSION_OWN
    assert not set(added) & (NEVER | {"msgpack"}), added
    assert len(added) <= VERSION_BUDGET, f"{len(added)} modules beyond the baseline: {added}"


@pytest.mark.parametrize(
    "verb",
    [["ps"], ["pause", "web-0"], ["resume", "web-0"], ["stop", "web", "-t", "5"]],
    ids=" ".join,
)
def test_control_verb_imports_the_client_and_msgpack_only(
    verb: list[str], baseline: set[str], env: dict[str, str]
) -> None:
    """A control verb's round trip needs the blocking client and msgpack: not argparse, typing, re or the runtime."""
    p, modules, other = _importtime(["-m", "supervisor", *verb], env)
    sock = Path(env["CORRAL_RUN_DIR"]) / "control.sock"
    assert p.returncode == 125
    assert other == [f"corral: no supervisor at {sock} (is `corral up` running? see --socket)"]
    added = _added(modules, baseline)
    assert _own(added) == CONTROL_OWN
    assert not set(added) & NEVER, sorted(set(added) & NEVER)
    assert "msgpack" in added
    assert len(added) <= CONTROL_BUDGET, f"{len(added)} modules beyond the baseline: {added}"
    assert not Path(env["CORRAL_RUN_DIR"]).exists()


@pytest.mark.parametrize(
    "verb",
    [["exec", "web-0", "--", "true"], ["exec", "-i", "-t", "web-0", "--", "sh"]],
    ids=" ".join,
)
def test_exec_adds_only_its_relay(verb: list[str], baseline: set[str], env: dict[str, str]) -> None:
    """``corral exec`` adds its stdio and signal relay to the client: not signal's enums, nor termios before it has a terminal."""
    p, modules, other = _importtime(["-m", "supervisor", *verb], env)
    sock = Path(env["CORRAL_RUN_DIR"]) / "control.sock"
    assert p.returncode == 125
    assert other == [f"corral: no supervisor at {sock} (is `corral up` running? see --socket)"]
    added = _added(modules, baseline)
    assert _own(added) == EXEC_OWN
    assert not set(added) & (NEVER | {"termios", "tty"}), sorted(set(added) & NEVER)
    assert len(added) <= EXEC_BUDGET, f"{len(added)} modules beyond the baseline: {added}"


def test_logs_reads_its_files_without_the_event_types(
    baseline: set[str], env: dict[str, str]
) -> None:
    """``corral logs`` needs the segment files, not the event types (dataclasses), msgpack, sockets or argparse."""
    p, modules, other = _importtime(["-m", "supervisor", "logs", "web"], env)
    logdir = Path(env["CORRAL_STATE_DIR"]) / "logs"
    assert p.returncode == 125
    assert other == [f"corral: no output logged for 'web' (looked in {logdir})"]
    added = set(_added(modules, baseline))
    assert "events.segments" in added
    unneeded = {"events._types", "events._codec", "dataclasses", "msgpack", "socket", "argparse"}
    assert not added & (unneeded | {"subprocess", "shutil", "trio", "json"}), added & unneeded


def test_events_needs_no_argparse_or_journal(baseline: set[str], env: dict[str, str]) -> None:
    """``corral events`` imports the blocking client and the event types, but not argparse, the journal or trio."""
    p, modules, other = _importtime(["-m", "supervisor", "events"], env)
    sock = Path(env["CORRAL_RUN_DIR"]) / "events.sock"
    assert p.returncode == 125
    assert other == [f"corral: no supervisor is listening on {sock} (is `corral up` running?)"]
    added = set(_added(modules, baseline))
    assert "events._blocking" in added or "events._codec" in added
    assert not added & {"argparse", "gettext", "events._journal", "trio", "subprocess", "json"}


# What a start does not use, and corral run once imported: typing (the
# runtime's named tuples: see supervisor/_runtime/_tuples.py), the image
# store's dataclasses (inspect, ast...), tempfile, urllib.parse and hashlib;
# CRIU's, nft's and lxcfs's subprocess; argparse for a plain command line.
RUN_NEVER = {
    "typing",
    "argparse",
    "gettext",
    "locale",
    "subprocess",
    "dataclasses",
    "inspect",
    "ast",
    "tempfile",
    "random",
    "urllib",
    "urllib.parse",
    "ipaddress",
    "hashlib",
    "pyseccomp",
    "trio",
    "structlog",
    "pyroute2",
    "events",
}


@requires_root
def test_run_imports_only_what_a_start_uses(env: dict[str, str]) -> None:
    """A second ``corral run -- true`` (the busybox image built and the
    seccomp filter compiled by the first) runs its sandbox without
    importing what only image builds, checkpoints, networks or argparse
    need. Read from ``sys.modules`` at the end: importtime does not show
    what rootfs imports lazily."""
    argv = ["run", "--no-lxcfs", "--no-userns", "--memory", "64M", "--", "true"]
    code = (
        "import sys; from supervisor._cli._main import main; "
        f"rc = main({argv!r}); print(rc, ' '.join(sorted(sys.modules)))"
    )
    for _ in range(2):  # the first builds the image
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        assert (p.returncode, p.stderr) == (0, "")
    rc, *modules = p.stdout.split()
    assert rc == "0"
    assert {"supervisor._runtime._sandbox", "rootfs._store"} <= set(modules)
    assert not set(modules) & RUN_NEVER, sorted(set(modules) & RUN_NEVER)


def test_help_still_lists_every_verb_and_option(env: dict[str, str]) -> None:
    """``corral --help`` lists every verb, and a verb's help its options, through argparse as before."""
    top = subprocess.run(
        [sys.executable, "-m", "supervisor", "--help"], capture_output=True, text=True, env=env
    )
    assert top.returncode == 0
    listed = {line.split()[0] for line in top.stdout.splitlines() if line.startswith("    ")}
    assert set(VERBS) <= listed
    pause = subprocess.run(
        [sys.executable, "-m", "supervisor", "pause", "--help"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert pause.returncode == 0
    assert pause.stdout.startswith("usage: corral pause [-h] [--socket SOCKET] NAME\n")


# -- the paths without argparse agree with it -----------------------------------------


def test_every_verb_is_known_to_the_dispatch() -> None:
    """``VERBS`` names every sub-parser of the full parser, each with the group that registers it."""
    full = _subparsers(build_parser())
    assert set(VERBS) == set(full)
    for verb, group in VERBS.items():
        assert full[verb].get_default("func").__module__ == f"supervisor._cli.{group}"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_verbs_own_group_gives_the_same_parser(verb: str) -> None:
    """Building only the verb's group gives its sub-parser the same help as the full parser's."""
    alone = _subparsers(build_parser(verb))
    assert verb in alone
    assert alone[verb].format_help() == _subparsers(build_parser())[verb].format_help()


def test_version_without_argparse_prints_what_argparse_would(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--version`` answered early prints argparse's line, and a terminal too narrow for it goes to argparse."""
    for columns in ("100", "14", "13", "5"):
        monkeypatch.setenv("COLUMNS", columns)
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["--version"])
        assert stop.value.code == 0
        expected = capsys.readouterr().out
        try:
            status = main(["--version"])
        except SystemExit as exc:  # argparse's turn: the narrow terminal
            status = int(exc.code or 0)
        assert (status, capsys.readouterr().out) == (0, expected), columns


# Command lines of the verbs the plain reader knows: it must read each as
# argparse does, or leave it to argparse.
COMMAND_LINES = [
    [],
    ["web"],
    ["web-0"],
    ["web", "extra"],
    ["--json"],
    ["--json", "web"],
    ["web", "--json"],
    ["--socket", "/s", "web"],
    ["web", "--socket", "/s"],
    ["web", "--socket", "/a", "--socket", "/b"],
    ["web", "--socket=/s"],
    ["web", "--sock", "/s"],
    ["web", "--socket"],
    ["web", "--socket", "-x"],
    ["web", "--socket", ""],
    ["-h"],
    ["web", "--help"],
    ["--", "web"],
    ["web", "--"],
    [""],
    ["-1"],
    ["-x"],
    ["web", "-t", "5"],
    ["-t", "5", "web"],
    ["web", "-t", "abc"],
    ["web", "-t", "-1"],
    ["web", "-t5"],
    ["web", "--time", "2.5"],
    ["web", "-s", "TERM"],
    ["web", "--signal", "9"],
    ["web", "--", "true"],
    ["web", "true"],
    ["web", "true", "-i"],
    ["web", "--", "--", "a"],
    ["web", "--", "-i"],
    ["web", "-i", "--", "true"],
    ["-i", "web", "--", "true"],
    ["-i", "-t", "web", "--", "sh", "-c", "echo hi"],
    ["-it", "web", "--", "sh"],
    ["-e", "A=1", "--env", "B=2", "-w", "/tmp", "-u", "0:0", "web", "--", "env"],
    ["-e", "A=1", "-e"],
    ["a", "b"],
    ["a", "--json", "b"],
    ["--watch", "a", "b", "--json"],
    ["--memory", "1G", "web"],
    ["--since", "3", "--kind", "oom", "--kind", "exited", "--sandbox", "web*"],
    ["--since", "x"],
    ["--since", "10m", "web", "-f", "--tail", "5", "-t"],
    ["web", "--tail", "q"],
    ["web", "--follow", "--timestamps"],
    ["/path/fleet.toml"],
    ["--memory", "64M", "--pids", "64", "--cpus", "0.5", "--no-userns", "--", "/bin/true"],
    ["--userns", "--", "x"],
    ["--no-userns", "--userns", "--", "a", "--no-userns"],
    ["--no-lxcfs", "-e", "A=1", "-e", "B=2", "sh", "-c", "x"],
    ["--", "--"],
    ["--"],
    ["--io-read-bps", "/dev/sda:1M", "--oom-group", "true"],
    ["-v", "/a:/b", "--read-only", "--", "true", "-x"],
    ["--userns-base", "100000", "--", "t"],
    ["--userns-base", "many", "--", "t"],
    ["--name", "x", "--rootfs", "debian:12", "--network", "bridge", "-p", "80:80", "--", "sh"],
    ["--privileged", "--cap-add", "NET_ADMIN", "--cap-drop", "CHOWN", "--ulimit", "core=0"],
    ["--no-lxcfs", "--no-lxcfs", "true"],
]

PLAIN = {**_control_verbs.VERBS, **_fleet.VERBS, **_run.VERBS}


@pytest.mark.parametrize("verb", sorted(PLAIN))
def test_the_plain_reader_reads_as_argparse_does(verb: str) -> None:
    """Every command line the plain reader accepts gives the namespace argparse gives."""
    parser = build_parser()
    for words in COMMAND_LINES:
        plain = parse_plain(verb, PLAIN[verb], words)
        if plain is None:
            continue
        assert vars(plain) == vars(parser.parse_args([verb, *words])), words


@pytest.mark.parametrize(
    "line",
    [
        "ps",
        "ps --json",
        "pause web-0",
        "resume web-0 --socket /run/x.sock",
        "stop web -t 5",
        "kill web -s TERM",
        "exec web-0 -- /bin/true",
        "exec -i -t -e A=1 web -- sh -c x",
        "stats --json a b",
        "logs web -f --tail 10",
        "events --since 3 --kind oom_kill --json",
        "run -- true",
        "run --memory 64M --pids 64 --cpus 0.5 --no-userns -- /bin/true",
        "run -e A=1 -v /data:/data --network bridge -p 8080:80 --image debian:12 -- sh",
    ],
)
def test_the_plain_reader_takes_the_usual_command_lines(line: str) -> None:
    """The command lines people type are read without argparse (else the start-up saving is lost)."""
    verb, *words = line.split()
    assert parse_plain(verb, PLAIN[verb], words) is not None


@pytest.mark.parametrize(
    "line",
    [
        "pause",
        "pause -h",
        "pause web --sock /s",
        "stop web --time=5",
        "exec -it web -- sh",
        "update web --memory 1G",
        "run -h",
        "run --memory=64M -- true",
        "run --mem 64M -- true",
        "run --userns-base -- true",
    ],
)
def test_the_plain_reader_leaves_the_rest_to_argparse(line: str) -> None:
    """Help, abbreviations, joined values, joined flags and verbs with more options are argparse's."""
    verb, *words = line.split()
    assert parse_plain(verb, PLAIN[verb], words) is None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of *parser*, by verb."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)

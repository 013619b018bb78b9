"""Plugins as users write and configure them: loading, checking their settings,
the event log, an example plugin."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

import events
from plugins import Handle, SettingsError, validate_with
from supervisor import Supervisor
from supervisor._control._client import ControlError, result_of
from supervisor._core._fleet import FleetError, load_fleet, parse_fleet
from supervisor._core._plugin_host import PluginError, PluginHandle, load_plugin
from supervisor._core._plugin_subscription import REPLAY_CHUNK

from .conftest import Dirs, corral, requires_root
from .supervising import of, request, run, wait_event

REPO = Path(__file__).resolve().parent.parent


def _conforms(handle: PluginHandle) -> Handle:
    # Not a test: mypy checks here that the supervisor's handle is a plugins.Handle.
    return handle


def test_builtin_plugins_load_by_entry_point() -> None:
    """restart and logging are found by name, like any third-party plugin."""
    fn, config = load_plugin("restart", {"policy": "always"})
    assert callable(fn) and config == {"policy": "always"}
    assert callable(load_plugin("logging", {})[0])


@pytest.mark.parametrize(
    ("name", "table", "message"),
    [
        ("nope", {}, "plugin 'nope' not found: no entry point 'nope'"),
        ("x", {"module": "no_such_module:plugin"}, "plugin 'x': cannot load: ModuleNotFoundError"),
        ("x", {"module": "json"}, "plugin 'x': module: expected \"package.module:attribute\""),
        ("x", {"module": "json:__version__"}, "is not callable"),
    ],
)
def test_bad_plugin_references_are_one_line_errors(
    name: str, table: dict[str, str], message: str
) -> None:
    """A plugin that cannot be found or loaded is a clear error before anything starts."""
    with pytest.raises(PluginError, match=message.replace("(", r"\(")):
        load_plugin(name, table)


def test_a_typo_in_a_sandbox_plugin_table_fails_at_start() -> None:
    """Per-sandbox settings for an unknown plugin stop the fleet from starting."""
    f = parse_fleet({"sandbox": [{"name": "a", "command": ["true"], "plugins": {"restrat": {}}}]})
    with pytest.raises(PluginError, match="plugin 'restrat' not found"):
        Supervisor(f)


POLICY_EXPECTED = "expected no, on-failure, on-failure:N, always or unless-stopped"


def _sandbox(name: str, **plugins: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "command": "true", "plugins": plugins}


def _refused(doc: dict[str, Any]) -> list[str]:
    """The problems a Supervisor of fleet *doc* is refused with."""
    with pytest.raises(FleetError) as err:
        Supervisor(parse_fleet(doc))
    assert str(err.value).splitlines() == [f"<fleet>: {p}" for p in err.value.problems]
    return err.value.problems


def test_a_bad_per_sandbox_restart_setting_is_refused_at_start_up() -> None:
    """A sandbox's bad restart setting is a fleet error naming the sandbox, the plugin,
    the field and what was expected: before anything runs, not at that sandbox's first exit."""
    doc = {
        "sandbox": [
            _sandbox("web", restart={"policy": "on-failure"}),
            _sandbox("db", restart={"policy": "sometimes"}),
        ]
    }
    assert _refused(doc) == [
        f"sandbox 'db': plugin 'restart': policy: {POLICY_EXPECTED}, got 'sometimes'"
    ]


def test_every_plugin_table_is_checked_and_every_problem_reported() -> None:
    """Each bad table is one line; a bad fleet-wide table is reported once, not per sandbox."""
    doc = {
        "plugins": {"restart": {"delay": "soon"}, "checkpoint": {}},
        "sandbox": [
            _sandbox("a", restart={"policy": "always"}, checkpoint={"max_disk": "1G"}),
            _sandbox("b", restart={"policy": "always"}, logging={"max_files": 2}),
            _sandbox("c", checkpoint={"interval": "0s"}, restart={}),
        ],
    }
    assert _refused(doc) == [
        "plugin 'restart': delay: expected a duration like 10s or 500ms, got 'soon'",
        "sandbox 'a': plugin 'checkpoint': max_disk: fleet-wide only: set it in [plugins.checkpoint], not per sandbox",
        "sandbox 'b': plugin 'logging': max_files: the event log has no per-sandbox settings: set it in [plugins.logging]",
        "sandbox 'c': plugin 'checkpoint': interval: expected a duration > 0, got '0s'",
    ]


async def unchecked(handle: Handle, config: Mapping[str, Any]) -> None:
    """A third-party plugin without a settings check."""


def _strict(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    if sandbox is not None and sandbox.get("level") not in (None, 1, 2):
        raise SettingsError("level", f"expected 1 or 2, got {sandbox['level']!r}")


@validate_with(_strict)
async def checked(handle: Handle, config: Mapping[str, Any]) -> None:
    """A third-party plugin with a settings check."""


def _broken(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    raise KeyError("oops")


@validate_with(_broken)
async def broken_check(handle: Handle, config: Mapping[str, Any]) -> None:
    """A plugin whose settings check itself fails."""


def test_third_party_plugins_are_checked_only_if_they_say_how() -> None:
    """A plugin without a check takes any table, as before; one with a check (plugins.validate_with)
    is checked like the built-ins; a check that crashes is one line too, not a traceback."""
    modules = {
        name: {"module": f"tests.test_plugins:{name}"}
        for name in ("unchecked", "checked", "broken_check")
    }
    ok = {
        "plugins": {k: v for k, v in modules.items() if k != "broken_check"},
        "sandbox": [_sandbox("a", unchecked={"anything": [1]}, checked={"level": 2})],
    }
    Supervisor(parse_fleet(ok))
    bad = {"plugins": modules, "sandbox": [_sandbox("a", checked={"level": 3})]}
    assert _refused(bad) == [
        "plugin 'broken_check': cannot check settings: KeyError: 'oops'",
        "sandbox 'a': plugin 'checked': level: expected 1 or 2, got 3",
    ]


def test_up_with_a_bad_plugin_setting_is_one_line(dirs: Dirs, tmp_path: Path) -> None:
    """`corral up` refuses a bad per-sandbox restart setting with one line and status 125."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "web"\ncommand = "true"\n'
        '[sandbox.plugins.restart]\npolicy = "sometimes"\n'
    )
    p = corral(dirs, "up", str(fleet))
    assert (p.returncode, p.stdout) == (125, b"")
    assert p.stderr.decode().splitlines() == [
        f"corral: {fleet}: sandbox 'web': plugin 'restart': policy: {POLICY_EXPECTED}, got 'sometimes'"
    ]


@requires_root
@pytest.mark.layout
def test_add_with_a_bad_plugin_table_is_refused_and_adds_nothing(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`add` of a file whose second sandbox has a bad restart table: refused with that line,
    and neither sandbox of the file is added (no instance, no event)."""
    f = parse_fleet({"sandbox": [{"name": "web", "command": "exec sleep 1000"}]})
    extra = tmp_path / "extra.toml"
    extra.write_text(
        '[[sandbox]]\nname = "good"\ncommand = "exec sleep 1000"\n'
        '[[sandbox]]\nname = "bad"\ncommand = "exec sleep 1000"\nreplicas = 2\n'
        '[sandbox.plugins.restart]\npolicy = "always"\ndelay = "soon"\n'
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        with pytest.raises(ControlError) as err:
            result_of(await request(str(dirs.run / "control.sock"), "add", {"path": str(extra)}))
        assert err.value.code == "invalid"
        assert str(err.value).splitlines() == [
            f"{extra}: sandbox 'bad': plugin 'restart': delay: expected a duration like 10s or 500ms, got 'soon'"
        ]
        assert [i.name for i in sup.instances] == ["web-0"]
        assert [c.name for c in sup.fleet.sandboxes] == ["web"]

    evs = run(f, dirs, body)
    assert {e.sandbox for e in evs} == {"", "web-0"}
    assert not [e for e in evs if isinstance(e, events.Added)]


@dataclass
class _Recording:
    """What the `recorder` plugin was given, run by run."""

    runs: int = 0
    seqs: list[int] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)
    # Opened by the test to let the restarted plugin subscribe again: until
    # then it is down, for as long as the test needs.
    back: trio.Event = field(default_factory=trio.Event)


RECORDING = _Recording()
RECORDED_KINDS = ["plugin", "exited", "supervisor_stopped"]


async def recorder(handle: Handle, config: Mapping[str, Any]) -> None:
    """Records the seq of every event it is given; raises on a `test.poison` plugin event."""
    RECORDING.runs += 1
    if RECORDING.runs > 1:
        await RECORDING.back.wait()
    with handle.subscribe(kinds=RECORDED_KINDS) as sub:
        async for ev in sub:
            if isinstance(ev, events.Gap):
                RECORDING.gaps.append((ev.first, ev.last))
                continue
            RECORDING.seqs.append(ev.seq)
            if isinstance(ev, events.PluginEvent) and ev.name == "test.poison":
                raise RuntimeError("poisoned")


def _tick(n: int) -> events.PluginEvent:
    return events.PluginEvent(sandbox="", name="test.tick", payload={"n": n})


@requires_root
@pytest.mark.layout
def test_a_restarted_plugin_gets_every_event_it_missed_once(dirs: Dirs) -> None:
    """A plugin that raised on one event is restarted and is given, first, every matching event
    published since the last one it was given (more than a journal read's chunk, an exit among
    them), then the live ones: no gap, none twice, none of the kinds it did not ask for."""
    global RECORDING
    RECORDING = _Recording()
    f = parse_fleet(
        {
            "plugins": {"recorder": {"module": "tests.test_plugins:recorder"}},
            "sandbox": [{"name": "job", "command": "exec sleep 1000"}],
        }
    )
    down = 2 * REPLAY_CHUNK + 10

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: isinstance(e, events.Started))
        with trio.fail_after(60):
            while not RECORDING.seqs:  # wait until it listens
                sup.publish(_tick(-1))
                await trio.sleep(0.01)
        sup.publish(events.PluginEvent(sandbox="", name="test.poison", payload={}))
        await wait_event(
            sup, lambda e: isinstance(e, events.PluginFailed) and e.plugin == "recorder"
        )
        # While it is down: ticks, and an exit (with a `signaled` it did not ask for).
        for n in range(down):
            sup.publish(_tick(n))
        await sup.kill_sandbox("job-0", int(signal.SIGTERM))
        await wait_event(sup, lambda e: isinstance(e, events.Exited))
        assert sup.bus is not None
        missed = sup.bus.last_seq
        RECORDING.back.set()
        with trio.fail_after(60):
            n = down
            while RECORDING.seqs[-1] <= missed:  # until it is given live ones again
                sup.publish(_tick(n))
                n += 1
                await trio.sleep(0.01)

    evs = run(f, dirs, body)
    assert RECORDING.runs == 2 and RECORDING.gaps == []
    first = RECORDING.seqs[0]
    assert RECORDING.seqs == [e.seq for e in evs if e.kind in RECORDED_KINDS and e.seq >= first]
    given = {e.seq: e for e in evs if e.seq in set(RECORDING.seqs)}
    ticks = [
        e.payload["n"]
        for e in given.values()
        if isinstance(e, events.PluginEvent) and e.name == "test.tick"
    ]
    assert ticks == sorted(ticks) and set(range(down + 1)) <= set(ticks)
    assert [e.sandbox for e in given.values() if isinstance(e, events.Exited)] == ["job-0"]
    assert [(e.plugin, e.action) for e in evs if isinstance(e, events.PluginFailed)] == [
        ("recorder", "restart")
    ]


@requires_root
@pytest.mark.layout
def test_example_plugin_and_event_log(dirs: Dirs, tmp_path: Path) -> None:
    """examples/oom_report.py, loaded from a fleet file as written, reports the OOM
    kill; the logging plugin's event log has every event as a JSON line."""
    for name in ("oom_report.py", "oom-report-fleet.toml"):
        shutil.copy(REPO / "examples" / name, tmp_path / name)
    f = load_fleet(tmp_path / "oom-report-fleet.toml")

    async def body(sup: Supervisor) -> None:
        await wait_event(
            sup, lambda e: isinstance(e, events.PluginEvent) and e.name == "oom_report.written"
        )
        await wait_event(sup, lambda e: isinstance(e, events.Exited) and e.status == 0)

    evs = run(f, dirs, body)
    report = (dirs.state / "plugins" / "oom_report" / "oom-report.txt").read_text().splitlines()
    assert len(report) == 1
    assert " hog-0 generation=0 oom_kills=1 memory_limit=33554432 status=137" in report[0]
    assert [e.status for e in of(evs, events.Exited, "hog-0")] == [137, 0]
    lines = (dirs.state / "plugins" / "logging" / "events.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [r["seq"] for r in logged] == [e.seq for e in evs]
    assert logged[-1]["kind"] == "supervisor_stopped"


async def late_publisher(handle: Any, config: Mapping[str, Any]) -> None:
    """A plugin still at work when the fleet has stopped (as a checkpoint
    prune under way is): it publishes after the bus has closed, then fails."""
    with handle.subscribe() as sub:
        async for _ in sub:
            pass  # ends when the bus closes
    handle.publish(events.PluginEvent(sandbox="", name="test.late", payload={}))
    raise RuntimeError("too late")


@requires_root
def test_a_plugin_at_work_after_the_fleet_stopped_does_not_fail_the_stop(dirs: Dirs) -> None:
    """Its event is dropped and its end is no failure: the supervisor stops cleanly
    (seen in CI: a prune's publish after the bus closed ended the supervisor)."""
    f = parse_fleet(
        {
            "plugins": {"late": {"module": "tests.test_plugins:late_publisher"}},
            "sandbox": [{"name": "job", "command": "exec sleep 1000"}],
        }
    )

    async def body(sup: Supervisor) -> None:
        await wait_event(sup, lambda e: e.kind == "started")

    evs = run(f, dirs, body)
    assert evs[-1].kind == "supervisor_stopped"
    assert not [
        e for e in evs if e.kind in ("plugin_failed",) or getattr(e, "name", "") == "test.late"
    ]

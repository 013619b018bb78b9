"""Plugins as users write and configure them: loading, the event log, an example plugin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import events
from supervisor import Supervisor
from supervisor._core._fleet import load_fleet, parse_fleet
from supervisor._core._plugin_host import PluginError, load_plugin

from .conftest import Dirs, requires_root
from .supervising import of, run, wait_event

REPO = Path(__file__).resolve().parent.parent


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

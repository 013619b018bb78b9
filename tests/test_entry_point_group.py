"""The plugin entry point group: defined once, in the supervisor, re-exported by plugins."""

from __future__ import annotations

from importlib.metadata import entry_points

import plugins
import supervisor


def test_one_entry_point_group_for_the_supervisor_and_plugins() -> None:
    """plugins.ENTRY_POINT_GROUP is the supervisor's, and the built-ins are registered in it."""
    assert supervisor.ENTRY_POINT_GROUP == "corral.plugins"
    assert plugins.ENTRY_POINT_GROUP is supervisor.ENTRY_POINT_GROUP
    assert "ENTRY_POINT_GROUP" in supervisor.__all__ and "ENTRY_POINT_GROUP" in plugins.__all__
    names = {ep.name for ep in entry_points(group=supervisor.ENTRY_POINT_GROUP)}
    assert {"restart", "logging", "checkpoint"} <= names

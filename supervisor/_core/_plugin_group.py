"""The name plugins are registered under, in a module of its own.

``import plugins`` re-exports it through ``supervisor.ENTRY_POINT_GROUP``;
kept apart from the plugin host so that reading it costs no import of
``importlib.metadata`` or trio.
"""

__all__ = ["ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "corral.plugins"
"""The Python entry point group plugins register under (``supervisor.ENTRY_POINT_GROUP``;
``plugins`` re-exports it)."""

"""The plugin interface and the built-in plugins (restart, checkpoint, logging).

Plugins act on the supervisor only through its public handle, never its
internals. (They arrive with the supervisor; see docs/architecture.md.)
"""

from __future__ import annotations

__all__: list[str] = []

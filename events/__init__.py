"""Typed sandbox events, their msgpack codec, the bus and the event socket.

Depends on nothing else in corral. (The event types and the bus arrive with
the supervisor; see docs/architecture.md.)
"""

from __future__ import annotations

__all__: list[str] = []

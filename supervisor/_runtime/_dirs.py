"""Where corral keeps its files on the host, by default.

A module of its own, with no imports, so that a one-shot CLI verb that only
needs a path (``corral ps`` finding the control socket) does not load the
whole runtime to learn it.
"""

from __future__ import annotations

__all__ = ["DEFAULT_RUN_DIR", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = "/var/lib/corral"
"""Sandboxes' writable layers, logs and checkpoints (``CORRAL_STATE_DIR`` overrides)."""
DEFAULT_RUN_DIR = "/run/corral"
"""A running supervisor's sockets (``CORRAL_RUN_DIR`` overrides)."""

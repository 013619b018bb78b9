"""Plugins: the interface, and the built-in plugins.

- :data:`Plugin`, :class:`Handle`, :class:`InstanceView`,
  :class:`Subscription`: what a plugin is and the narrow handle on the
  supervisor it acts through (docs/plugins.md).
- :class:`SettingsError` and the helpers in ``plugins._settings`` for
  validating a plugin's settings with errors that name the field;
  :func:`validate_with` and :data:`SettingsCheck`: how a plugin has the
  supervisor check its settings at start-up (docs/plugins.md).
- Built-in plugins, loaded by name like any other (entry point group
  ``corral.plugins``): ``restart`` (:mod:`plugins.restart`).
- :data:`ENTRY_POINT_GROUP`, that group's name: the supervisor's
  (``supervisor.ENTRY_POINT_GROUP``), re-exported, as the supervisor loads
  plugins without importing this package.
- :mod:`plugins.testing`: drive a plugin with an in-memory bus and a fake
  handle.
"""

from __future__ import annotations

from supervisor import ENTRY_POINT_GROUP as ENTRY_POINT_GROUP

from ._api import Handle as Handle
from ._api import InstanceView as InstanceView
from ._api import Plugin as Plugin
from ._api import SettingsCheck as SettingsCheck
from ._api import Subscription as Subscription
from ._api import validate_with as validate_with
from ._settings import SettingsError as SettingsError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Handle",
    "InstanceView",
    "Plugin",
    "SettingsCheck",
    "SettingsError",
    "Subscription",
    "validate_with",
]

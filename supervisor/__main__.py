"""``python -m supervisor`` is the ``corral`` command."""

from ._cli import entry

entry()

"""The command line: ``corral`` and its verbs."""

from ._main import entry as entry
from ._main import main as main

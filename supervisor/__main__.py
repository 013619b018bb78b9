"""``python -m supervisor`` is the ``corral`` command."""

from ._cli import main

raise SystemExit(main())

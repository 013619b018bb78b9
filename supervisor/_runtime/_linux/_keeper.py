"""Entry point of the spawn keeper process (see :class:`._spawn.Keeper`).

Started with ``python -m supervisor._runtime._linux._keeper FD``. It imports only the
standard library, msgpack and the spawn code, and checks that it is
single-threaded before it forks anything.
"""

from __future__ import annotations

import sys

from ._spawn import keeper_main

if __name__ == "__main__":
    keeper_main(int(sys.argv[1]))

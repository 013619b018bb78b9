"""The command line's layout: verbs dispatch through set_defaults, and the parser stays cheap."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from supervisor._cli._main import build_parser


def test_every_verb_names_the_function_that_runs_it() -> None:
    """Each sub-parser sets ``func``: main() dispatches on it, never on the verb's name."""
    parser = build_parser()
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(groups) == 1
    verbs = groups[0].choices
    assert len(verbs) >= 19
    for name, sub in verbs.items():
        assert callable(sub.get_default("func")), f"{name} has no func"


def test_building_the_parser_imports_none_of_what_verbs_use() -> None:
    """Every verb pays for building the parser: it loads no layer below the CLI, nor signal."""
    code = (
        "import sys, json; from supervisor._cli._main import build_parser; build_parser();"
        " print(json.dumps(sorted(sys.modules)))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    loaded = set(json.loads(p.stdout))
    assert "supervisor._cli._run" in loaded
    assert not loaded & {"trio", "msgpack", "pyroute2", "ctypes", "signal"}
    assert not [m for m in loaded if m.startswith(("supervisor._runtime", "supervisor._core"))]
    assert not [m for m in loaded if m.startswith(("supervisor._control", "events"))]


def test_finding_the_sockets_and_state_does_not_load_the_runtime() -> None:
    """A one-shot verb learns its directories without importing the sandbox runtime."""
    code = (
        "import sys, argparse; from supervisor._cli import _common;"
        " _common.control_path(argparse.Namespace(socket=None)); _common.state_dir();"
        " print('supervisor._runtime._sandbox' in sys.modules, 'ctypes' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert p.stdout.split() == ["False", "False"]

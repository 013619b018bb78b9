"""Fleet files: a complete example parses; each malformed one gives its one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor import SpecError
from supervisor._core._fleet import FleetError, load_fleet, parse_fleet

REPO = Path(__file__).resolve().parent.parent

GOOD = """
[supervisor]
grace_period = "2s"
journal_max_bytes = "64M"
socket_idle_timeout = "500ms"

[defaults]
memory = "64M"
pids = 64
env = { LANG = "C" }

[[sandbox]]
name = "web"
command = ["sh", "-c", "echo hi"]
replicas = 2
memory = "32M"
env = { PORT = "8080" }

[sandbox.plugins.restart]
policy = "on-failure:3"

[[sandbox]]
name = "batch"
command = "echo from a shell string"
cpus = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    return p


def test_complete_fleet_parses(tmp_path: Path) -> None:
    """Defaults apply, sandboxes override them, replicas expand to named instances."""
    fleet = load_fleet(write(tmp_path, GOOD))
    assert fleet.supervisor.grace_period == 2.0
    assert fleet.supervisor.socket_idle_timeout == 0.5
    web, batch = fleet.sandboxes
    assert web.limits.memory == 32 << 20 and web.limits.pids == 64
    assert batch.limits.memory == 64 << 20 and batch.limits.cpus == 0.5
    assert web.env == {"LANG": "C", "PORT": "8080"}
    assert batch.command == ("/bin/sh", "-c", "echo from a shell string")
    assert web.plugins == {"restart": {"policy": "on-failure:3"}}
    assert [(s.name, i) for s, i in fleet.instances()] == [("web", 0), ("web", 1), ("batch", 0)]
    assert web.spec(1).name == "web-1"


def test_examples_parse() -> None:
    """Every fleet file in examples/ is valid."""
    files = sorted((REPO / "examples").glob("*.toml"))
    assert files, "examples/ should have fleet files"
    for f in files:
        load_fleet(f)


BASE = '[[sandbox]]\nname = "web"\ncommand = ["true"]\n'

BAD = [
    (BASE + 'memory = "12Q"\n', "sandbox 'web': memory: expected a size like 64M or 1G, got '12Q'"),
    (BASE + "memory = true\n", "sandbox 'web': memory: expected a number or a string, got True"),
    (BASE + "cpus = -1\n", "sandbox 'web': cpus: expected a positive number of CPUs"),
    (BASE + 'cpus = "lots"\n', "sandbox 'web': cpus: expected a positive number of CPUs"),
    (BASE + "pids = 1\n", "sandbox 'web': pids: expected a whole number of tasks >= 2, got 1"),
    (BASE + "replicas = -1\n", "sandbox 'web': replicas: expected a whole number from 0 to 1000, got -1"),
    (BASE + 'replicas = "2"\n', "sandbox 'web': replicas: expected a whole number from 0 to 1000, got '2'"),
    (BASE + "colour = 1\n", "sandbox 'web': colour: unknown key"),
    (BASE + 'env = { "1BAD" = "x" }\n', "sandbox 'web': env: expected variable names like LANG, got '1BAD'"),
    (BASE + 'env = "A=1"\n', "sandbox 'web': env: expected a table"),
    (BASE + 'workdir = "relative"\n', "sandbox 'web': workdir: expected an absolute path, got 'relative'"),
    (BASE + 'hostname = "-bad-"\n', "sandbox 'web': hostname: expected a host name"),
    (BASE + "plugins = 3\n", "sandbox 'web': plugins: expected tables like [sandbox.plugins.restart]"),
    ('[[sandbox]]\ncommand = ["true"]\n', "sandbox #1: name: missing"),
    ('[[sandbox]]\nname = "bad name"\ncommand = ["true"]\n', "sandbox 'bad name': name: expected 1-63 letters"),
    ('[[sandbox]]\nname = 5\ncommand = ["true"]\n', "sandbox #1: name: expected a string, got 5"),
    ('[[sandbox]]\nname = "web"\n', "sandbox 'web': command: missing"),
    ('[[sandbox]]\nname = "web"\ncommand = []\n', "sandbox 'web': command: expected a list of strings"),
    ('[[sandbox]]\nname = "web"\ncommand = [1, 2]\n', "sandbox 'web': command: expected a list of strings"),
    (BASE + BASE, "sandbox 'web': name: duplicate (sandbox #1 has the same name)"),
    ("", "sandbox: expected at least one [[sandbox]] table"),
    ("sandbox = 3\n", "sandbox: expected [[sandbox]] tables"),
    ("[unknown]\n" + BASE, "unknown: unknown key"),
    ("[supervisor]\ngrace_period = \"soon\"\n" + BASE, "supervisor: grace_period: expected a duration like 10s or 500ms, got 'soon'"),
    ("[supervisor]\nsocket_group = \"no-such-group-xyz\"\n" + BASE, "supervisor: socket_group: no such group 'no-such-group-xyz'"),
    ("[supervisor]\nsocket_idle_timeout = 0\n" + BASE, "supervisor: socket_idle_timeout: expected a duration above 0, got 0"),
    ("[supervisor]\nsocket_idle_timeout = \"2d\"\n" + BASE, "supervisor: socket_idle_timeout: expected a duration between 0 and 24h, got '2d'"),
    ("[supervisor]\nretries = 3\n" + BASE, "supervisor: retries: unknown key"),
    ("[defaults]\nmemory = \"lots\"\n" + BASE, "defaults: memory: expected a size like 64M or 1G, got 'lots'"),
    ("[defaults]\nname = \"x\"\n" + BASE, "defaults: name: unknown key"),
    ("this is not toml", "not valid TOML"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_malformed_fleet_gives_its_one_line_error(tmp_path: Path, text: str, expected: str) -> None:
    """Each malformed file names the sandbox and field in exactly one line."""
    with pytest.raises(FleetError) as exc:
        load_fleet(write(tmp_path, text))
    lines = str(exc.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{tmp_path / 'fleet.toml'}: ")
    assert expected in lines[0]


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    """Several problems give several lines, one each."""
    text = BASE + 'memory = "12Q"\ncpus = -1\n[[sandbox]]\nname = "db"\n'
    with pytest.raises(FleetError) as exc:
        load_fleet(write(tmp_path, text))
    assert len(exc.value.problems) == 3


def test_missing_file() -> None:
    """A missing file is a one-line error, not a traceback."""
    with pytest.raises(FleetError, match="no such file"):
        load_fleet("/no/such/fleet.toml")


def test_parse_fleet_from_mapping() -> None:
    """parse_fleet takes an already decoded document (for `corral add`)."""
    fleet = parse_fleet({"sandbox": [{"name": "a", "command": ["true"], "replicas": 0}]})
    assert list(fleet.instances()) == []


@pytest.mark.parametrize(("replicas", "longest"), [(1, 50), (10, 50), (11, 49), (1000, 48)])
def test_a_name_is_checked_at_its_full_runtime_length(replicas: int, longest: int) -> None:
    """NAME-INDEX.GENERATION fits in 63 at any generation, so the limit is checked up front."""
    from supervisor._core._fleet import max_sandbox_name

    assert max_sandbox_name(replicas) == longest

    def doc(name: str) -> dict[str, object]:
        return {"sandbox": [{"name": name, "command": "true", "replicas": replicas}]}

    fleet = parse_fleet(doc("a" * longest))
    last = fleet.sandboxes[0].instance_name(replicas - 1)
    assert len(f"{last}.{10**10 - 1}") <= 63
    too_long = "a" * (longest + 1)
    with pytest.raises(FleetError) as err:
        parse_fleet(doc(too_long))
    assert err.value.problems == [
        f"sandbox {too_long!r}: name: expected at most {longest} characters"
        f" (NAME-INDEX.GENERATION must fit in 63 at any generation), got {too_long!r}"
        f" ({longest + 1})"
    ]


def test_a_restore_as_name_has_room_for_its_generation() -> None:
    """`restore --as NAME` is an instance name: at most 52 characters."""
    from supervisor._core._fleet import MAX_INSTANCE_NAME, check_instance_name

    assert MAX_INSTANCE_NAME == 52
    assert check_instance_name("b" * 52, "as") == "b" * 52
    with pytest.raises(
        SpecError, match=r"^as: expected at most 52 characters .* got 'b{53}' \(53\)$"
    ):
        check_instance_name("b" * 53, "as")


def test_additions_round_trip_and_bad_entries_are_named(tmp_path: Path) -> None:
    """What `add` and `restore --as` record reads back equal; an entry
    that cannot be used is left out with one line naming it."""
    from supervisor._core._additions import Addition, load_additions, save_additions

    fleet = parse_fleet(
        {
            "sandbox": [
                {"name": "a", "command": "sleep 1", "replicas": 2, "memory": "64M",
                 "env": {"K": "v"}, "plugins": {"restart": {"policy": "always"}}},
            ]
        }
    )  # fmt: skip
    added = [
        Addition(fleet.sandboxes[0], None, "/x/extra.toml"),
        Addition(fleet.sandboxes[0], "copy", "restore --as"),
    ]
    save_additions(str(tmp_path), added)
    assert load_additions(str(tmp_path)) == (added, [])
    data = json.loads((tmp_path / "added.json").read_text())
    data["sandboxes"].append({"name": "bad", "replicas": 1, "spec": {"argv": []}})
    (tmp_path / "added.json").write_text(json.dumps(data))
    got, problems = load_additions(str(tmp_path))
    assert got == added
    assert len(problems) == 1 and "the added sandbox 'bad' cannot be used" in problems[0]
    save_additions(str(tmp_path), [])
    assert not (tmp_path / "added.json").exists()

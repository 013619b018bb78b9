"""Parsing and validation of sandbox specs: pure functions, no kernel."""

from __future__ import annotations

import pytest

from supervisor import Limits, SandboxSpec, SpecError, parse_cpus, parse_env, parse_pids, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64M", 64 << 20), ("1g", 1 << 30), ("8192k", 8 << 20), ("1.5G", 3 << 29),
     ("64MiB", 64 << 20), ("33554432", 32 << 20), (8 << 20, 8 << 20)],
)  # fmt: skip
def test_parse_size_accepts_docker_style_sizes(text: str | int, expected: int) -> None:
    """Sizes use binary units and an optional B/iB suffix, like Docker."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12Q", "", "M", "-5M", "1..2M", "1M2", "1K", "0"])
def test_parse_size_rejects_garbage_naming_the_field(text: str) -> None:
    """A bad size is an error naming the field, the expectation and the input."""
    with pytest.raises(SpecError) as exc:
        parse_size(text, "--memory")
    assert str(exc.value).startswith("--memory: expected")
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize("text", ["-1", "0", "abc", "nan", "inf", "0.001", "4096"])
def test_parse_cpus_rejects_non_positive_and_absurd(text: str) -> None:
    """--cpus must be a positive number no larger than the host's CPUs."""
    with pytest.raises(SpecError, match=r"^--cpus: expected"):
        parse_cpus(text, "--cpus")


def test_parse_cpus_and_pids_accept_good_values() -> None:
    """Valid quotas and task limits come back as numbers."""
    assert parse_cpus("0.5") == 0.5
    assert parse_pids("64") == 64


@pytest.mark.parametrize("text", ["1", "-3", "x", "2.5"])
def test_parse_pids_rejects_small_or_non_integer(text: str) -> None:
    """A task limit below 2 cannot run init plus a command."""
    with pytest.raises(SpecError, match=r"^pids: expected a whole number"):
        parse_pids(text)


def test_parse_env() -> None:
    """K=V pairs parse; later ones win; a missing '=' or bad key is an error."""
    assert parse_env(["A=1", "B=x=y", "A=2"]) == {"A": "2", "B": "x=y"}
    for bad in ["NOVALUE", "1A=x", "=x"]:
        with pytest.raises(SpecError, match=r"^--env: expected KEY=VALUE"):
            parse_env([bad], "--env")


def test_spec_validates_fields() -> None:
    """Each bad field of a spec names itself in the error."""
    with pytest.raises(SpecError, match=r"^name: "):
        SandboxSpec(name="bad name!", argv=("true",))
    with pytest.raises(SpecError, match=r"^command: "):
        SandboxSpec(name="ok", argv=())
    with pytest.raises(SpecError, match=r"^hostname: "):
        SandboxSpec(name="ok", argv=("true",), hostname="-bad-")
    with pytest.raises(SpecError, match=r"^workdir: "):
        SandboxSpec(name="ok", argv=("true",), workdir="relative")


def test_spec_environment_defaults() -> None:
    """The command gets PATH, HOME and HOSTNAME unless the spec overrides them."""
    spec = SandboxSpec(name="web_1", argv=("true",), env={"HOME": "/srv"}, limits=Limits(pids=9))
    env = spec.environment()
    assert env["HOME"] == "/srv"
    assert env["HOSTNAME"] == spec.effective_hostname == "web-1"
    assert "/bin" in env["PATH"].split(":")

"""Privileges of a sandbox's processes: Docker's 14 capabilities, no
inheritable or ambient ones, no_new_privs; cap_add, cap_drop, privileged;
the same for the init's command and for everything exec'd into it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor import Runtime, SandboxSpec, SpecError
from supervisor._core._fleet import FleetError, parse_fleet
from supervisor._runtime._checkpoint import spec_from_dict, spec_to_dict
from supervisor._runtime._security import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    kept_capabilities,
    make_security,
)

from .conftest import Dirs, requires_root
from .helpers import run_capture

DOCKER_DEFAULT_MASK = 0xA80425FB
"""What `docker run` shows as CapEff (CapPrm, CapBnd) for root."""


def _status(out: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}


def _host_bounding() -> int:
    with open("/proc/self/status") as f:
        return int(_status(f.read())["CapBnd"], 16)


def test_the_default_set_is_dockers() -> None:
    mask = sum(1 << CAPABILITIES[n] for n in DEFAULT_CAPABILITIES)
    assert mask == DOCKER_DEFAULT_MASK and len(DEFAULT_CAPABILITIES) == 14
    last = 40
    assert kept_capabilities(make_security(), last) == sorted(
        CAPABILITIES[n] for n in DEFAULT_CAPABILITIES
    )
    added = kept_capabilities(make_security(cap_add=["cap_net_admin"], cap_drop=["CHOWN"]), last)
    assert CAPABILITIES["NET_ADMIN"] in added and CAPABILITIES["CHOWN"] not in added
    assert kept_capabilities(make_security(cap_drop=["ALL"], cap_add=["KILL"]), last) == [5]
    assert kept_capabilities(make_security(cap_add=["ALL"]), last) == list(range(41))
    assert kept_capabilities(make_security(privileged=True), 38) == list(range(39))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"cap_add": ["NOPE"]},
            "cap_add: expected capability names like NET_ADMIN or ALL, got 'NOPE'",
        ),
        ({"cap_drop": [5]}, "cap_drop: expected a list of capability names, got [5]"),
        ({"cap_add": ["KILL"], "cap_drop": ["KILL"]}, "cap_add: KILL is also in cap_drop"),
        ({"no_new_privs": "yes"}, "no_new_privs: expected true or false, got 'yes'"),
        ({"privileged": 1}, "privileged: expected true or false, got 1"),
    ],
)
def test_bad_settings_name_the_field(kw: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as err:
        make_security(**kw)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_fleet_settings_and_defaults() -> None:
    fleet = parse_fleet(
        {
            "defaults": {"cap_drop": ["NET_RAW"]},
            "sandbox": [
                {"name": "a", "command": "true"},
                {"name": "b", "command": "true", "cap_add": ["SYS_ADMIN"], "no_new_privs": False},
                {"name": "c", "command": "true", "privileged": True},
            ],
        }
    )
    a, b, c = (s.security for s in fleet.sandboxes)
    assert a.cap_drop == ("NET_RAW",) and a.no_new_privs and not a.privileged
    assert b.cap_add == ("SYS_ADMIN",) and not b.no_new_privs
    assert c.privileged
    with pytest.raises(FleetError) as err:
        parse_fleet({"sandbox": [{"name": "x", "command": "true", "cap_add": "BOGUS"}]})
    assert "sandbox 'x': cap_add: expected capability names" in str(err.value)


def test_a_checkpointed_spec_keeps_its_security() -> None:
    spec = SandboxSpec(
        name="s", argv=("true",), security=make_security(cap_add=["NET_ADMIN"], no_new_privs=False)
    )
    assert spec_from_dict(spec_to_dict(spec)) == spec
    # A checkpoint from before these settings ran with every capability.
    old = spec_to_dict(spec)
    del old["security"]
    assert spec_from_dict(old).security.privileged


@requires_root
@pytest.mark.layout
def test_status_lines_inside_match_the_settings(runtime: Runtime) -> None:
    def status(name: str, **kw: object) -> dict[str, str]:
        spec = SandboxSpec(
            name=name,
            argv=("cat", "/proc/self/status"),
            security=make_security(**kw),  # type: ignore[arg-type]
        )
        result, out, err = run_capture(runtime, spec)
        assert result.status == 0, err
        return _status(out)

    default = status("sec-default")
    for line in ("CapPrm", "CapEff", "CapBnd"):
        assert int(default[line], 16) == DOCKER_DEFAULT_MASK, line
    assert int(default["CapInh"], 16) == 0 and int(default["CapAmb"], 16) == 0
    assert default["NoNewPrivs"] == "1"

    adjusted = status("sec-adj", cap_add=["NET_ADMIN"], cap_drop=["NET_RAW"], no_new_privs=False)
    want = DOCKER_DEFAULT_MASK | 1 << CAPABILITIES["NET_ADMIN"]
    want &= ~(1 << CAPABILITIES["NET_RAW"])
    assert int(adjusted["CapEff"], 16) == int(adjusted["CapBnd"], 16) == want
    assert adjusted["NoNewPrivs"] == "0"

    privileged = status("sec-priv", privileged=True)
    assert int(privileged["CapBnd"], 16) == _host_bounding()
    assert privileged["NoNewPrivs"] == "0"


@requires_root
@pytest.mark.layout
def test_what_the_defaults_forbid(runtime: Runtime) -> None:
    """A few things root may do on the host and a default sandbox may not."""
    script = (
        "hostname x 2>/dev/null && echo hostname; "
        "mount -t tmpfs t /mnt 2>/dev/null && echo mount; "
        "ip link set lo mtu 1000 2>/dev/null && echo netadmin; "
        "chown 1 /tmp && echo chown; "
        "true"
    )
    result, out, err = run_capture(runtime, SandboxSpec(name="forbid", argv=("sh", "-c", script)))
    assert result.status == 0, err
    assert out.split() == ["chown"]  # CHOWN is one of the 14; the rest is not


@requires_root
def test_corral_run_flags(dirs: Dirs) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", "run", *args],
            env=dirs.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    r = run("--cap-add", "NET_ADMIN", "--", "sh", "-c", "grep CapEff /proc/self/status")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[1], 16) == DOCKER_DEFAULT_MASK | 1 << CAPABILITIES["NET_ADMIN"]
    r = run("--cap-drop", "nope", "--", "true")
    assert r.returncode == 125
    assert r.stderr == (
        "corral: --cap-drop: expected capability names like NET_ADMIN or ALL, got 'nope'\n"
    )
    r = run("--privileged", "--", "true")
    assert r.returncode == 0 and "WARNING" in r.stderr and "privileged" in r.stderr
    assert os.listdir(dirs.state / "sandboxes") == []


@requires_root
@pytest.mark.layout
def test_proc_and_sys_are_masked_and_read_only(runtime: Runtime) -> None:
    """Docker's masked paths are empty or unreadable, its read-only paths
    refuse writes; a privileged sandbox sees them as they are."""
    from supervisor._runtime._linux._child import MASKED_PATHS, READONLY_PATHS

    present = [p for p in MASKED_PATHS if os.path.exists(p)]
    writable = [p for p in READONLY_PATHS if os.path.exists(p)]
    assert "/proc/sys" in writable and "/sys/firmware" in present
    script = (
        "for p in " + " ".join(present) + "; do"
        '  if [ -d $p ]; then echo "$p $(ls -A $p | wc -l)"; else echo "$p $(wc -c < $p)"; fi;'
        " done;"
        " for p in " + " ".join(writable) + "; do"
        "  f=$p; [ -d $p ] && f=$(find $p -type f -perm -200 | head -1);"
        '  [ -n "$f" ] && { (: > $f) 2>/dev/null && echo "$p writable" || echo "$p read-only"; };'
        " done; true"
    )
    result, out, err = run_capture(runtime, SandboxSpec(name="masked", argv=("sh", "-c", script)))
    assert result.status == 0, err
    lines = out.splitlines()
    for p in present:
        assert f"{p} 0" in lines, (p, out)
    assert not [ln for ln in lines if ln.endswith("writable")], out
    assert "/proc/sys read-only" in lines

    spec = SandboxSpec(
        name="unmasked",
        argv=("sh", "-c", "ls -A /sys/firmware | wc -l"),
        security=make_security(privileged=True),
    )
    result, out, err = run_capture(runtime, spec)
    assert result.status == 0 and int(out) > 0, err

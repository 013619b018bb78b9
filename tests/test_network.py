"""Bridge networking, for real, without touching the host's network.

Every test runs corral inside a network namespace the test makes (the
"host" H), with a second one behind it (the "outside" O: a server there
stands for the Internet, reached through H's NAT). corral's bridge, its
nftables table and the forwarding switch are H's; traffic goes only to
addresses inside H, O and the sandboxes. Both lanes run these.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor import Runtime

from .conftest import Dirs, requires_root
from .helpers import wait_for

pytestmark = [requires_root, pytest.mark.layout]

OUTSIDE = "198.51.100.2"  # TEST-NET-2: an address that exists only in O
UPLINK = "198.51.100.1"


@dataclass
class Host:
    """The namespaces a test runs corral in (H) and talks to (O)."""

    h: int
    o: int

    def run(self, *argv: str, ns: str = "h", **kw: object) -> subprocess.CompletedProcess[str]:
        pid = self.h if ns == "h" else self.o
        return subprocess.run(  # type: ignore[call-overload,no-any-return]
            ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv],
            capture_output=True, text=True, timeout=60, **kw,
        )  # fmt: skip

    def popen(self, *argv: str, ns: str = "h", **kw: object) -> subprocess.Popen[str]:
        pid = self.h if ns == "h" else self.o
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
        )  # fmt: skip

    def corral(self, dirs: Dirs, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "supervisor", *args, env=dirs.env)

    def corral_bg(self, dirs: Dirs, *args: str) -> subprocess.Popen[str]:
        return self.popen(sys.executable, "-m", "supervisor", *args, env=dirs.env)


def _holder() -> subprocess.Popen[bytes]:
    """A process in a new network namespace of its own, holding it."""
    return subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])


@pytest.fixture
def host() -> Iterator[Host]:
    h, o = _holder(), _holder()
    try:
        for proc in (h, o):
            # unshare has exec'd sleep once its namespace is no longer ours.
            while os.readlink(f"/proc/{proc.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                os.sched_yield()
        env = Host(h.pid, o.pid)
        setup = [
            ("h", "ip", "link", "set", "lo", "up"),
            ("o", "ip", "link", "set", "lo", "up"),
            ("h", "ip", "link", "add", "up0", "type", "veth", "peer", "name", "out0",
             "netns", f"/proc/{o.pid}/ns/net"),
            ("h", "ip", "addr", "add", f"{UPLINK}/24", "dev", "up0"),
            ("h", "ip", "link", "set", "up0", "up"),
            ("o", "ip", "addr", "add", f"{OUTSIDE}/24", "dev", "out0"),
            ("o", "ip", "link", "set", "out0", "up"),
            ("h", "ip", "route", "add", "default", "via", OUTSIDE),
        ]  # fmt: skip
        for ns, *argv in setup:
            p = env.run(*argv, ns=ns)
            assert p.returncode == 0, (argv, p.stderr)
        yield env
    finally:
        for proc in (h, o):
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _server(host: Host, tmp_path: Path, port: int = 8000, bind: str = OUTSIDE) -> Iterator[None]:
    """An HTTP server in O at OUTSIDE:*port* (or *bind*) serving "hello from outside"."""
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www" / "index.html").write_text("hello from outside\n")
    proc = host.popen(
        sys.executable, "-u", "-m", "http.server", "--bind", bind, "--directory",
        str(tmp_path / "www"), str(port), ns="o",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once it listens
        assert "Serving HTTP" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate()


def _nothing_left(host: Host, dirs: Dirs) -> None:
    # A sandbox's veth goes with its network namespace, which the kernel
    # frees in its own time once the sandbox's last process has gone.
    wait_for(
        lambda: " vc" not in host.run("ip", "-o", "link").stdout,
        timeout=30,
        what="the sandboxes' veths to go with their namespaces",
    )
    links = host.run("ip", "-o", "link").stdout
    # corral0, a declared network's cr-NAME, a bridge being made (crn...).
    assert not re.search(r"^\d+: (corral0|cr-|crn|vc)", links, re.M), links
    assert host.run("nft", "list", "tables").stdout.strip() == ""
    assert host.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0"
    for leases in (dirs.state / "network").glob("*/leases"):
        assert os.listdir(leases) == [], leases


def _names(tmp_path: Path, names: dict[str, list[str]]) -> list[str]:
    """The argv prefix that runs a command in a mount namespace of its own
    whose /etc/hosts gives *names* (name -> addresses) and whose
    /etc/resolv.conf names a resolver on H's loopback where nothing
    listens: a name not in the file fails at once, and no query leaves the
    test's namespaces. The host's own files are not touched (the bind
    mounts are private to that namespace, which goes with its processes)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1\tlocalhost\n"
        + "".join(f"{a}\t{name}\n" for name, addrs in names.items() for a in addrs)
    )
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
    script = (
        'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", script, "sh", str(hosts), str(resolv),
    ]  # fmt: skip


def test_a_bridged_sandbox_reaches_the_outside_through_nat(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    with _server(host, tmp_path):
        p = host.corral(
            dirs, "run", "--network", "bridge", "--", "sh", "-c",
            f"ip -4 -o addr show eth0 | cut -d' ' -f7; ip route | head -1;"
            f" wget -qO- http://{OUTSIDE}:8000/",
        )  # fmt: skip
    assert p.returncode == 0, p.stderr
    address, route, body = p.stdout.splitlines()
    assert address.startswith("10.213.") and address.endswith("/24")
    assert route.startswith("default via 10.213.")
    assert body == "hello from outside"
    # Forwarding was off in H: said in one line, and off again after.
    assert p.stderr.count("turned IPv4 forwarding on") == 1
    _nothing_left(host, dirs)


def test_without_a_network_there_is_only_lo(host: Host, dirs: Dirs, tmp_path: Path) -> None:
    with _server(host, tmp_path):
        p = host.corral(
            dirs, "run", "--", "sh", "-c",
            f"ls /sys/class/net; nc -w 1 {OUTSIDE} 8000 </dev/null || echo unreachable",
        )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["lo", "unreachable"]
    _nothing_left(host, dirs)


def test_two_bridged_sandboxes_talk_and_leave_nothing(host: Host, dirs: Dirs) -> None:
    server = host.corral_bg(
        dirs, "run", "--name", "srv", "--network", "bridge", "--", "sh", "-c",
        "ip -4 -o addr show eth0 | cut -d' ' -f7 | cut -d/ -f1;"
        " exec nc -l -p 7000 -e echo hi-from-srv",
    )  # fmt: skip
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        assert address.startswith("10.213."), server.stderr.read() if server.stderr else ""
        # nc listens right after printing; a refused connection is retried.
        p = host.corral(
            dirs, "run", "--network", "bridge", "--", "sh", "-c",
            f"until nc {address} 7000 </dev/null; do :; done",
        )  # fmt: skip
        assert (p.returncode, p.stdout) == (0, "hi-from-srv\n"), p.stderr
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    _nothing_left(host, dirs)


def test_host_network_is_the_hosts(host: Host, dirs: Dirs) -> None:
    p = host.corral(dirs, "run", "--network", "host", "--", "sh", "-c", "ls /sys/class/net")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.split()) == ["lo", "up0"]


def test_a_bad_network_mode_is_one_line(dirs: Dirs) -> None:
    """A malformed mode, and the name of a network nobody declared here."""
    from .conftest import corral

    p = corral(dirs, "run", "--network", "bridge:web", "--", "true")
    assert p.returncode == 125
    assert p.stderr.decode() == (
        "corral: --network: expected one of none, bridge, host, sandbox:NAME or a network's"
        " name, got 'bridge:web'\n"
    )
    p = corral(dirs, "run", "--network", "bridged", "--", "true")
    assert p.returncode == 125
    assert p.stderr.decode() == (
        "corral: --network: no network 'bridged' here: expected none, bridge, host,"
        " sandbox:NAME or a network a fleet declared (none is known)\n"
    )


def test_the_supervisor_runs_bridged_replicas(host: Host, dirs: Dirs, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "web"\nreplicas = 3\nnetwork = "bridge"\n'
        f'command = ["sh", "-c", "wget -qO- http://{OUTSIDE}:8000/ && exec sleep 60"]\n'
    )
    with _server(host, tmp_path):
        up = host.corral_bg(dirs, "up", str(fleet))
        try:
            for i in range(3):
                log = dirs.state / "logs" / f"web-{i}.log"
                wait_for(
                    lambda log=log: (
                        up.poll() is not None  # type: ignore[misc]
                        or "hello from outside" in (log.read_text() if log.exists() else "")
                    ),
                    timeout=60,
                    what=f"web-{i} to reach the outside",
                    detail=lambda log=log: log.read_text() if log.exists() else "(no log)",  # type: ignore[misc]
                )
                assert up.poll() is None, up.stderr.read() if up.stderr else ""
            leases = os.listdir(dirs.state / "network" / "corral" / "leases")
            assert len(leases) == 3
            p = host.corral(dirs, "inspect", "web-1")
            assert p.returncode == 0, p.stderr
            net = json.loads(p.stdout)["network"]
            assert net["mode"] == "bridge" and net["address"] in leases and net["prefix"] == 24
            assert net["mac"] == "02:c0:" + ":".join(
                f"{int(b):02x}" for b in net["address"].split(".")
            )
            assert net["veth"].startswith("vc") and net["veth"] in host.run("ip", "link").stdout
            # It fetched a page from the outside: bytes both ways.
            assert net["counters"]["rx_bytes"] > 0 and net["counters"]["tx_packets"] > 0
            assert net["egress"] == "all" and net["ports"] == []
        finally:
            up.send_signal(signal.SIGTERM)
            _, err = up.communicate(timeout=60)
            print(err)  # shown with a failure: what the supervisor said
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_what_a_killed_corral_run_left_is_swept(host: Host, dirs: Dirs) -> None:
    """A `corral run` SIGKILLed with its bridged sandbox running: the
    sandbox dies with it, its lease, the bridge and the rules stay; the
    next `corral run` sweeps them."""
    run = host.corral_bg(
        dirs, "run", "--network", "bridge", "--", "sh", "-c", "echo up; exec sleep 60"
    )
    try:
        assert run.stdout is not None and run.stdout.readline() == "up\n"
        # Written once the command runs, which may print first; through a
        # NAME.json.tmp renamed into place, which a listing may catch.
        (name,) = wait_for(
            lambda: [n for n in os.listdir(dirs.run / "sandboxes") if n.endswith(".json")],
            what="its record",
        )
        record = json.loads((dirs.run / "sandboxes" / name).read_text())
        init = os.pidfd_open(record["pid"])
    finally:
        run.kill()  # ours, by its Popen
        run.communicate()
    try:
        # A bound, not a wait: the kernel kills it as its parent dies.
        assert select.select([init], [], [], 30)[0], "the sandbox outlived its corral run"
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, init, os.WEXITED)  # re-parented to us, a subreaper
    finally:
        os.close(init)
    leases = dirs.state / "network" / "corral" / "leases"
    assert len(os.listdir(leases)) == 1
    p = host.corral(dirs, "run", "--", "true")
    assert p.returncode == 0, p.stderr
    _nothing_left(host, dirs)


@pytest.mark.host_only  # scale; the VM lane checks its kernel with the others
def test_two_hundred_bridged_sandboxes_leave_nothing(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "many"\nreplicas = 200\nnetwork = "bridge"\n'
        'command = ["sleep", "600"]\n'
    )
    up = host.corral_bg(dirs, "up", str(fleet))
    try:
        wait_for(
            lambda: (
                up.poll() is not None or host.run("ip", "-o", "link").stdout.count(" vc") == 200
            ),
            timeout=600,  # a bound: the VM lanes emulate the CPU, slowly
            what="200 veths",
        )
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
        assert len(os.listdir(dirs.state / "network" / "corral" / "leases")) == 200
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=120)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_checkpoints_of_host_network_sandboxes_are_refused_in_one_line(runtime: Runtime) -> None:
    from supervisor import SandboxSpec
    from supervisor._errors import CheckpointError

    spec = SandboxSpec(name="hostnet", argv=("sleep", "60"), network="host")
    with runtime.create(spec, stdin_devnull=True) as sb:
        with pytest.raises(
            CheckpointError,
            match="network = 'host': only sandboxes with network 'none', 'bridge' or a fleet's",
        ):
            runtime.checkpoint(sb)
        sb.kill()


def test_a_published_port_is_reached_from_everywhere(host: Host, dirs: Dirs) -> None:
    """-p 8080:80: from the host's loopback and its address, from the
    outside namespace (another host's view of this machine), and from
    another sandbox through the host's address; a second sandbox asking
    for the same host port is refused in one line, leaving nothing."""
    server = host.corral_bg(
        dirs, "run", "--name", "pub", "--network", "bridge", "-p", "8080:80", "--",
        "sh", "-c", "while :; do nc -l -p 80 -e echo hi-published; done",
    )  # fmt: skip
    try:
        # The rule exists before the command runs; nc may not listen yet.
        reach = "until busybox nc {} 8080 </dev/null; do :; done"
        for where, ns in (("127.0.0.1", "h"), (UPLINK, "h"), (UPLINK, "o")):
            p = host.run("sh", "-c", reach.format(where), ns=ns)
            assert (p.returncode, p.stdout) == (0, "hi-published\n"), (where, ns, p.stderr)
        p = host.corral(
            dirs, "run", "--network", "bridge", "--", "sh", "-c",
            f"until nc {UPLINK} 8080 </dev/null; do :; done",
        )  # fmt: skip
        assert (p.returncode, p.stdout) == (0, "hi-published\n"), p.stderr
        p = host.corral(dirs, "run", "--network", "bridge", "-p", "8080:81", "--", "true")
        assert p.returncode == 125
        assert p.stderr.splitlines()[-1] == (
            "corral: ports: '8080:81/tcp': the host's port 8080/tcp is published by sandbox"
            " 'pub' already"
        )
        assert len(os.listdir(dirs.state / "network" / "corral" / "leases")) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    _nothing_left(host, dirs)


def test_ports_are_checked_and_need_a_bridge(dirs: Dirs) -> None:
    from supervisor import SpecError
    from supervisor._runtime._net import parse_port

    assert parse_port("127.0.0.1:8443:443/tcp").describe() == "127.0.0.1:8443:443/tcp"
    assert parse_port("53:53/udp").proto == "udp"
    for bad, message in (
        ("80", "expected [HOST_IP:]HOST_PORT:PORT"),
        ("0:80", "expected a port number 1-65535, got '0'"),
        ("8080:80/sctp", "expected the protocol tcp or udp"),
        ("localhost:8080:80", "expected an IPv4 address"),
    ):
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_port(bad)
    from .conftest import corral

    p = corral(dirs, "run", "-p", "8080:80", "--", "true")
    assert p.returncode == 125
    assert p.stderr.decode() == (
        "corral: ports: only a bridged sandbox (network = 'bridge' or a network's name)"
        " publishes ports\n"
    )


def test_an_egress_allow_list_lets_one_port_through_and_counts_the_rest(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """egress = ["198.51.100.2:8000/tcp"]: that server is reached, the same
    host's other port (served too) is not, and `corral stats` counts what
    was dropped; egress = "none" reaches nothing."""
    import json

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "locked"\nnetwork = "bridge"\n'
        f'egress = ["{OUTSIDE}:8000/tcp"]\n'
        f'command = ["sh", "-c", "wget -qO- http://{OUTSIDE}:8000/ && echo allowed;'
        f' nc -w 1 {OUTSIDE} 8001 </dev/null || echo denied; exec sleep 60"]\n'
        '[[sandbox]]\nname = "sealed"\nnetwork = "bridge"\negress = "none"\n'
        f'command = ["sh", "-c", "nc -w 1 {OUTSIDE} 8000 </dev/null || echo denied;'
        ' exec sleep 60"]\n'
    )
    with _server(host, tmp_path, 8000), _server(host, tmp_path, 8001):
        up = host.corral_bg(dirs, "up", str(fleet))
        try:
            for name in ("locked-0", "sealed-0"):
                log = dirs.state / "logs" / f"{name}.log"
                wait_for(
                    lambda log=log: (
                        up.poll() is not None  # type: ignore[misc]
                        or "denied" in (log.read_text() if log.exists() else "")
                    ),
                    timeout=60,
                    what=f"{name} to be denied",
                )
                assert up.poll() is None, up.stderr.read() if up.stderr else ""
            locked = (dirs.state / "logs" / "locked-0.log").read_text()
            assert "hello from outside" in locked and "allowed" in locked
            p = host.corral(dirs, "stats", "--json", "locked", "sealed")
            assert p.returncode == 0, p.stderr
            rows = {r["name"]: r["network"] for r in json.loads(p.stdout)}
            assert rows["locked-0"]["denied"] >= 1 and rows["sealed-0"]["denied"] >= 1
            assert rows["locked-0"]["tx_packets"] > rows["locked-0"]["denied"]
        finally:
            up.send_signal(signal.SIGTERM)
            _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_egress_is_checked(dirs: Dirs) -> None:
    from supervisor import SpecError
    from supervisor._runtime._net import parse_egress

    assert parse_egress("all") is None and parse_egress("none") == ()
    assert parse_egress(["10.1.2.3/8", "192.0.2.1:53/udp", "192.0.2.1:443"]) == (
        "10.0.0.0/8", "192.0.2.1/32:53/udp", "192.0.2.1/32:443/tcp",
    )  # fmt: skip
    assert parse_egress(["Deb.Debian.org:443", "example.internal", "ns1:53/udp", "a.test."]) == (
        "deb.debian.org:443/tcp", "example.internal", "ns1:53/udp", "a.test.",
    )  # fmt: skip
    for bad, message in (
        ("some", "expected 'all', 'none' or a list"),
        (["10.0.0.300"], "expected an IPv4 address, a CIDR or a host name, got '10.0.0.300'"),
        (["10.0.0.0/33"], "expected an IPv4 address, a CIDR or a host name"),
        (["-web.test"], "expected an IPv4 address, a CIDR or a host name, got '-web.test'"),
        (["web_1.test"], "a CIDR or a host name, got 'web_1.test'"),
        (["a..test"], "a CIDR or a host name"),
        ([f"{'a' * 64}.test"], "a CIDR or a host name"),
        ([".".join(["abcdefg"] * 32)], "a CIDR or a host name"),  # 255 characters
        (["example.com/24"], "a CIDR or a host name, got 'example.com/24'"),
        (["192.0.2.1:http"], "expected PORT[/tcp|udp] after the address"),
        (["deb.debian.org:0"], "expected PORT[/tcp|udp] after the name, got '0'"),
        (["deb.debian.org:65536"], "after the name, got '65536'"),
        (["deb.debian.org:443/sctp"], "after the name, got '443/sctp'"),
        (["deb.debian.org:"], "after the name, got ''"),
    ):
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_egress(bad)
    from .conftest import corral

    p = corral(dirs, "run", "--egress", "none", "--", "true")
    assert p.returncode == 125
    assert p.stderr.decode() == (
        "corral: egress: only a bridged sandbox (network = 'bridge' or a network's name)"
        " has egress to restrict\n"
    )


def test_names_in_an_allow_list_are_resolved_at_start(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """egress = ["outside.test:8000"], the name resolved by the host's
    resolver (/etc/hosts, here a file of the test's): that server is
    reached, the same host's other port is not and is counted. The list
    also has a CIDR holding the name's address (merged, not refused by
    nft), and a name with two addresses (both allowed). A name that
    changes is not followed until the sandbox restarts."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "named"\nnetwork = "bridge"\n'
        f'egress = ["outside.test:8000", "{OUTSIDE}/31:8000", "two.test:53/udp"]\n'
        f'command = ["sh", "-c", "wget -qO- http://{OUTSIDE}:8000/ && echo allowed;'
        f' nc -w 1 {OUTSIDE} 8001 </dev/null || echo denied; exec sleep 60"]\n'
    )
    names = {"outside.test": [OUTSIDE], "two.test": ["192.0.2.7", "192.0.2.8"]}
    with _server(host, tmp_path, 8000), _server(host, tmp_path, 8001):
        up = host.popen(
            *_names(tmp_path, names), sys.executable, "-m", "supervisor", "up", str(fleet),
            env=dirs.env,
        )  # fmt: skip
        try:
            log = dirs.state / "logs" / "named-0.log"
            wait_for(
                lambda: (
                    up.poll() is not None or "denied" in (log.read_text() if log.exists() else "")
                ),
                timeout=60,
                what="named-0 to be denied",
            )
            assert up.poll() is None, up.stderr.read() if up.stderr else ""
            assert "hello from outside" in log.read_text() and "allowed" in log.read_text()
            p = host.corral(dirs, "stats", "--json", "named")
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)[0]["network"]["denied"] >= 1
            p = host.corral(dirs, "inspect", "named-0")
            assert p.returncode == 0, p.stderr
            net = json.loads(p.stdout)["network"]
            assert net["egress"] == [
                "outside.test:8000/tcp",
                f"{OUTSIDE}/31:8000/tcp",
                "two.test:53/udp",
            ]
            assert net["egress_addresses"] == [
                f"{OUTSIDE}/32:8000/tcp", f"{OUTSIDE}/31:8000/tcp",
                "192.0.2.7/32:53/udp", "192.0.2.8/32:53/udp",
            ]  # fmt: skip
            p = host.run("nft", "-j", "list", "sets", "table", "inet", "corral")
            elements = [
                item["set"].get("elem", [])
                for item in json.loads(p.stdout)["nftables"]
                if "set" in item
            ]
            assert len(elements) == 1, elements  # services only: no -net set
            text = json.dumps(elements)
            assert "192.0.2.7" in text and "192.0.2.8" in text and '"len": 31' in text
            # The file changes in place (it is bind-mounted): the running
            # sandbox keeps what it started with; its restart resolves again.
            (tmp_path / "hosts").write_text("198.51.100.9\toutside.test\n192.0.2.7\ttwo.test\n")
            p = host.corral(dirs, "inspect", "named-0")
            assert f"{OUTSIDE}/32:8000/tcp" in json.loads(p.stdout)["network"]["egress_addresses"]
            p = host.corral(dirs, "restart", "named-0")
            assert p.returncode == 0, p.stderr
            p = host.corral(dirs, "inspect", "named-0")
            info = json.loads(p.stdout)
            assert info["generation"] == 1 and info["state"] == "running", info["state"]
            assert info["network"]["egress_addresses"] == [
                "198.51.100.9/32:8000/tcp", f"{OUTSIDE}/31:8000/tcp", "192.0.2.7/32:53/udp",
            ]  # fmt: skip
        finally:
            up.send_signal(signal.SIGTERM)
            _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_a_name_that_does_not_resolve_is_one_line(host: Host, dirs: Dirs, tmp_path: Path) -> None:
    """A name of the allow-list that does not resolve when the sandbox
    starts is its start failure in one line, naming the field and the
    name, and nothing is left (no lease, no bridge, no rule)."""
    p = host.run(
        *_names(tmp_path, {"outside.test": [OUTSIDE]}), sys.executable, "-m", "supervisor",
        "run", "--name", "lost", "--network", "bridge",
        "--egress", "outside.test:8000,nowhere.test:443", "--", "true",
        env=dirs.env,
    )  # fmt: skip
    assert p.returncode == 125, p.stderr
    assert p.stderr.startswith("corral: sandbox 'lost': egress: cannot resolve 'nowhere.test': "), (
        p.stderr
    )
    assert p.stderr.count("\n") == 1, p.stderr
    _nothing_left(host, dirs)


def test_a_sandbox_shares_another_sandboxes_network(host: Host, dirs: Dirs) -> None:
    """network = "sandbox:pod": the network namespace of the running
    sandbox pod (its loopback, its eth0, its /etc/hosts), as a pod's
    containers share one; an unknown name is one line, nothing left."""
    pod = host.corral_bg(
        dirs, "run", "--name", "pod", "--network", "bridge", "--", "sh", "-c",
        "echo up; exec nc -l -p 7000 -e echo hi-from-pod",
    )  # fmt: skip
    try:
        assert pod.stdout is not None and pod.stdout.readline() == "up\n"
        wait_for(lambda: (dirs.run / "sandboxes" / "pod.json").exists(), what="pod's record")
        p = host.corral(
            dirs, "run", "--network", "sandbox:pod", "--", "sh", "-c",
            "until nc 127.0.0.1 7000 </dev/null; do :; done; ls /sys/class/net; grep -c pod /etc/hosts",
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["hi-from-pod", "eth0", "lo", "1"]
        pod.communicate(timeout=30)
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.communicate()
    p = host.corral(dirs, "run", "--name", "joiner", "--network", "sandbox:nosuch", "--", "true")
    assert (p.returncode, p.stderr) == (
        125,
        "corral: sandbox 'joiner': network: no running sandbox 'nosuch' to share a network with\n",
    )
    _nothing_left(host, dirs)


def _leases(dirs: Dirs) -> list[str]:
    """The addresses leased (a lease being written is a dot file first)."""
    leases = dirs.state / "network" / "corral" / "leases"
    return [n for n in os.listdir(leases) if not n.startswith(".")] if leases.exists() else []


_ECHO_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 60
while True:  # until the sandbox's server listens (a bound, not a wait)
    try:
        s = socket.create_connection((sys.argv[1], 7000), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
s.settimeout(120)
f = s.makefile("rw")
print("connected", flush=True)
for line in sys.stdin:
    f.write(line)
    f.flush()
    print(f.readline(), end="", flush=True)
"""


def _owns_its_network(pid: int) -> bool:
    """True if the user namespace of process *pid* owns its network
    namespace (NS_GET_USERNS: the namespace's owner, compared by inode)."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        owner = fcntl.ioctl(fd, 0xB701)  # NS_GET_USERNS: a new descriptor
    finally:
        os.close(fd)
    try:
        return os.fstat(owner).st_ino == os.stat(f"/proc/{pid}/ns/user").st_ino
    finally:
        os.close(owner)


@pytest.mark.criu
@pytest.mark.parametrize("userns", [False, True], ids=["root-mapped", "userns"])
def test_a_bridged_sandbox_keeps_its_address_and_connection_across_a_checkpoint(
    host: Host, dirs: Dirs, tmp_path: Path, criu: None, userns: bool
) -> None:
    """A TCP connection from the host to a bridged sandbox's server lives
    on through a checkpoint (which stops the sandbox) and a restore: same
    address, same connection, data both ways after. A copy restored while
    the original runs would need its address: refused in one line.

    In a user namespace CRIU keeps the network namespace in its images and
    makes the veth at the restore: the restored sandbox's root owns its
    network namespace again, as at its start."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[sandbox]]\nname = "echo"\nnetwork = "bridge"\nuserns = {str(userns).lower()}\n'
        'command = ["nc", "-l", "-p", "7000", "-e", "cat"]\n'
    )
    leases = dirs.state / "network" / "corral" / "leases"
    up = host.corral_bg(dirs, "up", str(fleet))
    client = None
    try:
        wait_for(
            lambda: up.poll() is not None or _leases(dirs),
            timeout=60,
            what="the sandbox's lease",
        )
        (address,) = _leases(dirs)
        client = host.popen(
            sys.executable, "-u", "-c", _ECHO_CLIENT, address, stdin=subprocess.PIPE
        )
        assert client.stdin is not None and client.stdout is not None
        assert client.stdout.readline() == "connected\n", client.stderr.read()  # type: ignore[union-attr]
        client.stdin.write("one\n")
        client.stdin.flush()
        assert client.stdout.readline() == "one\n"

        p = host.corral(dirs, "checkpoint", "echo", "--tag", "live", "--leave-running")
        assert p.returncode == 0, p.stderr
        p = host.corral(dirs, "restore", "echo", "--from", "live", "--as", "echo-copy")
        assert p.returncode != 0
        assert p.stderr.strip().endswith(f"the address {address} is leased to sandbox 'echo-0.0'")
        assert len(p.stderr.strip().splitlines()) == 2, p.stderr  # "restoring ...", the error
        assert _leases(dirs) == [address]

        p = host.corral(dirs, "checkpoint", "echo", "--tag", "one")
        assert p.returncode == 0, p.stderr
        p = host.corral(dirs, "restore", "echo", "--from", "one")
        assert p.returncode == 0, p.stderr
        lease = json.loads((leases / address).read_text())
        assert lease["sandbox"] == "echo-0.1"  # its next generation, the same address
        client.stdin.write("two\n")
        client.stdin.flush()
        assert client.stdout.readline() == "two\n"
        links = host.run("ip", "-o", "link").stdout
        assert links.count(" vc") == 1, links
        record = json.loads((dirs.run / "sandboxes" / "echo-0.1.json").read_text())
        pid = int(record["pid"])
        assert _owns_its_network(pid)
        own_userns = os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        assert own_userns is userns
    finally:
        if client is not None:
            client.kill()
            client.communicate()
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=120)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


@pytest.mark.criu
def test_an_oom_killed_bridged_sandbox_is_restored_with_its_address(
    host: Host, dirs: Dirs, tmp_path: Path, criu: None
) -> None:
    """The restart plugin restores an OOM-killed bridged sandbox from its
    latest periodic checkpoint: the next generation has the same address
    (taken over from the generation that ended, whose removal may come
    after), and goes on from where it was."""
    # Counts; once told to (/grow), grows by 1 MB a step, 12 times. The
    # shell copies the string as it grows it (two or three times its size
    # at once): killed under 24 MB; restored with 48 MB, it lives on.
    hog = (
        "i=0; g=0; s=; while :; do i=$((i+1)); if [ -e /grow ] && [ $g -lt 12 ]; then"
        " g=$((g+1)); s=$s$(head -c 1048576 /dev/zero | tr '\\\\0' y); fi;"
        " echo $i; usleep 200000; done"
    )
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        f'[[sandbox]]\nname = "hog"\nnetwork = "bridge"\nmemory = "24M"\ncommand = "{hog}"\n'
        '[sandbox.plugins.checkpoint]\ninterval = "1s"\nkeep = 1\n'
        '[sandbox.plugins.restart]\npolicy = "on-failure"\nfrom_checkpoint = true\n'
        'on_oom = { grow = 2, max = "96M" }\n'
    )
    up = host.corral_bg(dirs, "up", str(fleet))
    log = dirs.state / "logs" / "hog-0.log"

    def holder() -> str:
        """Whose the lease is; "" between the ended generation's removal
        and the restore (which may also come first: see the docstring)."""
        for address in _leases(dirs):
            lease = dirs.state / "network" / "corral" / "leases" / address
            with contextlib.suppress(FileNotFoundError):  # given back meanwhile
                return str(json.loads(lease.read_text())["sandbox"])
        return ""

    seen: dict[str, Any] = {}
    try:
        wait_for(lambda: up.poll() is not None or _leases(dirs), timeout=60, what="a lease")
        (seen["address"],) = _leases(dirs)
        # A checkpoint first (slow in the VM lanes), then the growth.
        checkpoints = dirs.state / "checkpoints" / "hog-0"

        def checkpointed() -> bool:
            names = os.listdir(checkpoints) if checkpoints.exists() else []
            return up.poll() is not None or any(not n.startswith(".") for n in names)

        wait_for(checkpointed, timeout=300, what="a checkpoint of the hog")

        def grow() -> bool:
            # Refused while a checkpoint is taken (one a second): again, then.
            p = host.corral(dirs, "exec", "hog-0", "--", "touch", "/grow")
            assert p.returncode == 0 or "a checkpoint is being taken" in p.stderr, p.stderr
            return p.returncode == 0

        wait_for(grow, timeout=120, what="the hog to be told to grow")

        def restored() -> dict[str, Any] | None:
            # Its lease is taken as it is created; restored_from once it runs.
            p = host.corral(dirs, "inspect", "hog-0")
            doc: dict[str, Any] = json.loads(p.stdout) if p.returncode == 0 else {}
            return doc if up.poll() is not None or doc.get("restored_from") else None

        seen["inspect"] = wait_for(restored, timeout=300, what="the OOM-killed hog's restore")
        seen["leases"], seen["holder"] = _leases(dirs), holder()
        n = len(log.read_text().split())
        wait_for(lambda: len(log.read_text().split()) >= n + 3, timeout=60, what="more output")
    finally:
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=120)
        # Shown with a failure, here or above: what the supervisor said.
        print(out, err)
    assert up.returncode == 0, err
    assert seen["leases"] == [seen["address"]] and seen["holder"] == "hog-0.1", (seen, err)
    doc = seen["inspect"]
    assert doc["restored_from"] and doc["network"]["address"] == seen["address"], (seen, err)
    nums = [int(x) for x in log.read_text().split() if x.isdigit()]
    # Restored, not started again: one 1, then it went on from its checkpoint.
    assert nums.count(1) == 1 and nums[-1] > 3, nums
    _nothing_left(host, dirs)


# -- networks a fleet declares -------------------------------------------------


def _declare(host: Host, dirs: Dirs, fleet: Path, *names: str) -> None:
    """Have a supervisor declare *fleet*'s networks *names*, then stop it."""
    up = host.corral_bg(dirs, "up", str(fleet))
    try:
        wait_for(
            lambda: (
                up.poll() is not None
                or all((dirs.state / "network" / n / "config.json").exists() for n in names)
            ),
            timeout=60,
            what=f"networks {names} to be declared",
        )
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err


def _config(dirs: Dirs, network: str) -> dict[str, str]:
    data: dict[str, str] = json.loads(
        (dirs.state / "network" / network / "config.json").read_text()
    )
    return data


def _hosts(dirs: Dirs, instance: str) -> str:
    """The /etc/hosts of fleet instance *instance*'s running generation."""
    found = sorted((dirs.state / "sandboxes").glob(f"{instance}.*/hosts"))
    return found[-1].read_text() if found else ""


def test_two_networks_of_a_fleet_are_isolated_from_each_other(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """[network.front] with its subnet and gateway, [network.back] with
    the first free /24: each its bridge; a sandbox reaches one on its own
    network, not one on the other (only its published port, through the
    host, as from anywhere); /etc/hosts lists its own network's peers."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[network.front]\nsubnet = "10.50.1.0/24"\ngateway = "10.50.1.254"\n'
        "[network.back]\n"
        '[[sandbox]]\nname = "srv"\nnetwork = "front"\nports = ["8080:7000"]\n'
        'command = ["sh", "-c", "while :; do nc -l -p 7000 -e echo hi-srv; done"]\n'
        '[[sandbox]]\nname = "near"\nnetwork = "front"\ncommand = ["sleep", "600"]\n'
        '[[sandbox]]\nname = "far"\nnetwork = "back"\ncommand = ["sleep", "600"]\n'
    )
    up = host.corral_bg(dirs, "up", str(fleet))
    try:
        wait_for(
            lambda: (
                up.poll() is not None
                or ("srv-0 srv" in _hosts(dirs, "near-0") and "far-0 far" in _hosts(dirs, "far-0"))
            ),
            timeout=60,
            what="the peers in near-0's and far-0's /etc/hosts",
        )
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
        assert "srv" not in _hosts(dirs, "far-0") and "near" not in _hosts(dirs, "far-0")
        assert "far" not in _hosts(dirs, "near-0")
        assert _config(dirs, "front") == {
            "bridge": "cr-front", "subnet": "10.50.1.0/24", "gateway": "10.50.1.254",
            "chosen": "declared",
        }  # fmt: skip
        assert _config(dirs, "back") == {
            "bridge": "cr-back", "subnet": "10.213.0.0/24", "gateway": "10.213.0.1",
            "chosen": "auto",
        }  # fmt: skip
        (srv,) = (
            lease.name
            for lease in (dirs.state / "network" / "front" / "leases").iterdir()
            if json.loads(lease.read_text())["sandbox"].startswith("srv-0.")
        )
        # Same network: reached; the default route is the declared gateway.
        p = host.corral(
            dirs, "run", "--network", "front", "--", "sh", "-c",
            f"ip route | head -1; until nc {srv} 7000 </dev/null; do :; done",
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == ["default via 10.50.1.254 dev eth0 ", "hi-srv"]
        # The other network: dropped (nc -w bounds a wait for nothing); its
        # published port, through the host's address, is reached.
        p = host.corral(
            dirs, "run", "--network", "back", "--", "sh", "-c",
            f"nc -w 2 {srv} 7000 </dev/null || echo unreachable;"
            f" until nc {UPLINK} 8080 </dev/null; do :; done",
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == ["unreachable", "hi-srv"]
        # Added sandboxes join the fleet's networks; they declare none.
        more = tmp_path / "more.toml"
        more.write_text(
            '[[sandbox]]\nname = "late"\nnetwork = "back"\ncommand = ["sleep", "600"]\n'
        )
        p = host.corral(dirs, "add", str(more))
        assert p.returncode == 0, p.stderr
        wait_for(lambda: "far-0 far" in _hosts(dirs, "late-0"), what="far-0 in late-0's hosts")
        assert "srv" not in _hosts(dirs, "late-0")
        more.write_text(
            '[network.side]\n[[sandbox]]\nname = "side"\nnetwork = "side"\ncommand = ["true"]\n'
        )
        p = host.corral(dirs, "add", str(more))
        assert (p.returncode, p.stderr.splitlines()) == (
            125,
            [
                f"corral: {more}: [network] tables declare the fleet's networks: set them at start-up"
            ],
        )
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_bad_network_declarations_are_one_line_each(dirs: Dirs, tmp_path: Path) -> None:
    """Each mistake in a [network.NAME] table, or a sandbox on a network
    nobody declared, is one line naming the network (or sandbox) and the
    field."""
    from supervisor import FleetError, parse_fleet

    sandbox = {"name": "web", "command": ["true"], "network": "bridge"}
    for networks, line in (
        ({"a": {"subnet": "10.50.1.0/33"}},
         "network 'a': subnet: expected an IPv4 network like 10.20.0.0/24, got '10.50.1.0/33'"),
        ({"a": {"subnet": "10.50.1.7/24"}},
         "network 'a': subnet: '10.50.1.7/24' has host bits set: the network is '10.50.1.0/24'"),
        ({"a": {"subnet": "10.50.1.0/31"}},
         "network 'a': subnet: expected a prefix length from /8 to /30, got '10.50.1.0/31'"),
        ({"a": {"subnet": "10.50.1.0/24", "gateway": "10.50.2.1"}},
         "network 'a': gateway: '10.50.2.1' is not a host address of the subnet '10.50.1.0/24'"),
        ({"a": {"subnet": "10.50.1.0/24", "gateway": "10.50.1.255"}},
         "network 'a': gateway: '10.50.1.255' is not a host address of the subnet"
         " '10.50.1.0/24'"),
        ({"a": {"gateway": "10.50.1.1"}},
         "network 'a': gateway: a gateway needs the subnet it is in: set subnet too"),
        ({"a": {"subnet": "10.50.0.0/16"}, "b": {"subnet": "10.50.1.0/24"}},
         "network 'b': subnet: 10.50.1.0/24 overlaps network 'a''s 10.50.0.0/16"),
        ({"a": {"bridge": "br0"}, "b": {"bridge": "br0"}},
         "network 'b': bridge: 'br0' is network 'a''s bridge too"),
        ({"my net": {}},
         "network 'my net': name: expected a network name of 1-15 letters, digits, '_' or '-'"
         " (a network's name is an interface name's), got 'my net'"),
        ({"host": {}}, "network 'host': name: 'host' is reserved (none, bridge, host and corral are)"),
        ({"thirteen-char": {}},
         "network 'thirteen-char': bridge: the bridge 'cr-thirteen-char' would be longer than an"
         " interface name (15): name the bridge, or the network in 12 characters"),
        ({"a": {"bridge": "eth0:1"}},
         "network 'a': bridge: expected an interface name (1-15 letters, digits, '_', '.' or '-',"
         " starting with a letter or digit), got 'eth0:1'"),
        ({"a": {"bridge": "corral0"}}, "network 'a': bridge: 'corral0' is the default network's bridge"),
        ({"a": {"mtu": 1400}}, "network 'a': mtu: unknown key (expected one of: subnet, gateway, bridge, ipv6, subnet6)"),
    ):  # fmt: skip
        with pytest.raises(FleetError) as info:
            parse_fleet({"network": networks, "sandbox": [sandbox]})
        assert info.value.problems == [line]
    with pytest.raises(FleetError) as info:
        parse_fleet({"sandbox": [{**sandbox, "network": "nosuch"}]})
    assert info.value.problems == [
        "sandbox 'web': network: no network 'nosuch' in this fleet (declare it with a"
        " [network.nosuch] table)"
    ]
    from .conftest import corral

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[network.a]\nsubnet = "10.50.1.0/33"\n[[sandbox]]\nname = "web"\nnetwork = "a"\n'
        'command = ["true"]\n'
    )
    p = corral(dirs, "up", str(fleet))
    assert p.returncode == 125
    assert p.stderr.decode().splitlines() == [
        f"corral: {fleet}: network 'a': subnet: expected an IPv4 network like 10.20.0.0/24,"
        " got '10.50.1.0/33'",
        f"corral: {fleet}: sandbox 'web': network: no network 'a' in this fleet (declare it"
        " with a [network.a] table)",
    ]


def test_a_subnet_or_bridge_the_host_uses_is_refused_at_start_up(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """A declared subnet that overlaps a route or an address of the host,
    or a bridge name the host has a link of: `corral up` refuses it in one
    line, before anything starts, and records nothing."""
    for argv in (
        ("ip", "route", "add", "10.60.0.0/16", "via", OUTSIDE),
        ("ip", "addr", "add", "10.70.0.5/32", "dev", "lo"),
    ):
        p = host.run(*argv)
        assert p.returncode == 0, p.stderr
    fleet = tmp_path / "fleet.toml"
    for table, line in (
        ('subnet = "10.60.5.0/24"',
         "subnet: 10.60.5.0/24 collides with the host's route to 10.60.0.0/16 (dev up0)"),
        ('subnet = "10.70.0.0/24"',
         "subnet: 10.70.0.0/24 collides with the host's address 10.70.0.5/32 (dev lo)"),
        ('bridge = "up0"', "bridge: the host has a link 'up0' (not corral's)"),
    ):  # fmt: skip
        fleet.write_text(
            f"[network.front]\n{table}\n"
            '[[sandbox]]\nname = "web"\nnetwork = "front"\ncommand = ["sleep", "60"]\n'
        )
        p = host.corral(dirs, "up", str(fleet))
        assert (p.returncode, p.stderr) == (125, f"corral: network 'front': {line}\n")
        assert not (dirs.state / "network" / "front" / "config.json").exists()
        assert not os.path.exists(dirs.state / "sandboxes" / "web-0.0")
    _nothing_left(host, dirs)


def test_a_subnet_corral_chose_is_chosen_again_once_the_host_uses_it(
    host: Host, dirs: Dirs
) -> None:
    """The default network's subnet, chosen once and kept, is checked
    again when its bridge is made: a route the host has to it since makes
    corral choose the next free /24."""
    show = ("ip -4 -o addr show eth0 | cut -d' ' -f7",)
    p = host.corral(dirs, "run", "--network", "bridge", "--", "sh", "-c", *show)
    assert (p.returncode, p.stdout) == (0, "10.213.0.2/24\n"), p.stderr
    p = host.run("ip", "route", "add", "10.213.0.0/24", "via", OUTSIDE)
    assert p.returncode == 0, p.stderr
    p = host.corral(dirs, "run", "--network", "bridge", "--", "sh", "-c", *show)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("10.213.1.")
    assert _config(dirs, "corral")["subnet"] == "10.213.1.0/24"
    _nothing_left(host, dirs)


def test_a_declared_subnet_changes_only_while_no_sandbox_is_on_it(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """A fleet that changes its network's subnet while a sandbox holds an
    address of the old one is refused in one line; once none does, the
    new subnet is taken."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[network.front]\nsubnet = "10.50.1.0/24"\n'
        '[[sandbox]]\nname = "idle"\nreplicas = 0\nnetwork = "front"\ncommand = ["true"]\n'
    )
    _declare(host, dirs, fleet, "front")
    holder = host.corral_bg(
        dirs, "run", "--network", "front", "--", "sh", "-c", "echo up; exec sleep 60"
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        fleet.write_text(
            '[network.front]\nsubnet = "10.50.2.0/24"\n'
            '[[sandbox]]\nname = "web"\nnetwork = "front"\n'
            'command = ["sh", "-c", "ip -4 -o addr show eth0 | cut -d\' \' -f7; exec sleep 60"]\n'
        )
        p = host.corral(dirs, "up", str(fleet))
        assert (p.returncode, p.stderr) == (
            125,
            "corral: network 'front': subnet: 10.50.2.0/24 in the fleet, but 10.50.1.0/24 for"
            " the sandboxes on it now: stop them first, or keep the subnet\n",
        )
        assert _config(dirs, "front")["subnet"] == "10.50.1.0/24"
    finally:
        holder.send_signal(signal.SIGTERM)  # forwarded to its sleep
        holder.communicate(timeout=30)
    up = host.corral_bg(dirs, "up", str(fleet))
    log = dirs.state / "logs" / "web-0.log"
    try:
        wait_for(
            lambda: up.poll() is not None or "/24" in (log.read_text() if log.exists() else ""),
            timeout=60,
            what="web-0 to show its address",
        )
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
        assert " 10.50.2." in log.read_text()
        assert _config(dirs, "front")["subnet"] == "10.50.2.0/24"
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_corral_runs_killed_while_they_make_their_networks_are_swept(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """A `corral run` SIGKILLed while it sets its network up: as soon as
    the bridge is made (the default network's), as it is brought up (a
    declared network's: the table comes next), or as the sandbox's veth
    appears (the table is written, forwarding on). What it left (its lease
    and the bridge, at least) is swept by the next start, whatever the
    network: no veth, no bridge, no table, no lease, forwarding off again."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[network.front]\nsubnet = "10.50.1.0/24"\n'
        '[[sandbox]]\nname = "idle"\nreplicas = 0\nnetwork = "front"\ncommand = ["true"]\n'
    )
    _declare(host, dirs, fleet, "front")
    monitor = host.popen(sys.executable, "-c", _LINK_MONITOR)
    try:
        lines = _Lines(monitor)
        lines.find("subscribed")  # every link made or changed from now on is reported
        for network, name, bridge, reports in (
            ("bridge", "corral", "corral0", ["link corral0"]),
            ("front", "front", "cr-front", ["link cr-front", "link cr-front"]),
            ("front", "front", "cr-front", ["link vc"]),
        ):
            run = host.corral_bg(dirs, "run", "--network", network, "--", "sleep", "60")
            try:
                for report in reports:
                    lines.find(report)
            finally:
                run.kill()  # ours, by its Popen
                run.communicate()
            # Its lease was taken before the bridge was made.
            assert len(os.listdir(dirs.state / "network" / name / "leases")) == 1
            links = host.run("ip", "-o", "link").stdout
            assert f" {bridge}:" in links, links
            p = host.corral(dirs, "run", "--", "true")
            assert p.returncode == 0, p.stderr
            _nothing_left(host, dirs)
            _reap_orphans(host.h, host.o, monitor.pid)
    finally:
        monitor.kill()
        monitor.communicate()
    assert not (dirs.run / "network" / "forwarding-turned-on").exists()


def _reap_orphans(*keep: int) -> None:
    """Reap what a killed `corral run` left to this process (a subreaper)
    and has ended since: its ``nft`` (which held the networks' lock to its
    end, so the sweep that followed waited for it), its sandbox's init
    (which its cgroup's removal ended). The processes *keep* are not ours
    to reap."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in keep:
            return
        os.waitpid(info.si_pid, 0)


_LINK_MONITOR = """
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 1))  # RTMGRP_LINK: links made, changed, deleted
print("subscribed", flush=True)
while True:
    data = s.recv(1 << 16)
    while len(data) >= 16:
        length, kind = struct.unpack_from("=IH", data)
        if kind == 16:  # RTM_NEWLINK: nlmsghdr (16 bytes), ifinfomsg (16), attributes
            at = 32
            while at + 4 <= length:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                if attr == 3:  # IFLA_IFNAME
                    name = data[at + 4 : at + size].rstrip(b"\\0").decode()
                    print("link", name, flush=True)
                at += (size + 3) & ~3
        data = data[max((length + 3) & ~3, 16) :]
"""
"""Prints ``link NAME`` for every link made or changed in its network
namespace, once it has said ``subscribed``: unlike ``ip monitor``, it says
when it listens."""


class _Lines:
    """The lines a process prints, read from its pipe unbuffered (so that
    ``select`` says when there is more), each wait within a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def find(self, text: str) -> str:
        """The next line that has *text*."""
        while True:
            line, nl, rest = self.pending.partition(b"\n")
            if nl:
                self.pending = rest
                if text in line.decode():
                    return line.decode()
                continue
            assert select.select([self.fd], [], [], 60)[0], f"no line with {text!r} in 60 s"
            data = os.read(self.fd, 65536)
            assert data, f"the output ended before a line with {text!r}"
            self.pending += data


_SPOOF = """
import socket, sys
spoofed_from, outside, bridge_ll, gateway = sys.argv[1:5]
# As root in the sandbox's namespace with CAP_NET_RAW/ADMIN could: send
# as another address of the subnet (that sandbox's allow-list is "all").
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: any source address
s.bind((spoofed_from, 0))
s.sendto(b"spoofed", (outside, 9001))
# IPv6, which the sandbox has only a link-local address for, to the host's
# link-local address on the bridge.
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s6.sendto(b"ipv6", (bridge_ll, 9002, 0, socket.if_nametoindex("eth0")))
# Markers, allowed: sent after, they arrive after what was not dropped.
m = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
m.sendto(b"marker", (outside, 9001))
m.sendto(b"marker", (gateway, 9002))
"""

_LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(120)
while True:
    data = s.recv(100).decode()
    print(data, flush=True)
    if data == "marker":
        break
"""


def test_an_allow_list_is_not_walked_around_with_another_address_or_ipv6(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """A restricted sandbox's bridge port lets out only its own MAC and
    address, and no IPv6: a datagram sent from an unrestricted sandbox's
    address, or over IPv6 to the host, is dropped; the same sent by the
    unrestricted sandbox itself goes through (the test can fail)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[sandbox]]\nname = "free"\nnetwork = "bridge"\ncommand = ["sleep", "600"]\n'
        '[[sandbox]]\nname = "locked"\nnetwork = "bridge"\ncommand = ["sleep", "600"]\n'
        f'egress = ["{OUTSIDE}:9001/udp", "10.213.0.0/16:9002/udp"]\n'
    )
    up = host.corral_bg(dirs, "up", str(fleet))
    try:
        wait_for(lambda: up.poll() is not None or len(_leases(dirs)) == 2, timeout=60,
                 what="two leases")  # fmt: skip
        assert up.poll() is None, up.stderr.read() if up.stderr else ""
        nets = {}
        for name in ("free-0", "locked-0"):

            def running(name: str = name) -> dict[str, Any] | None:
                # A lease comes before the sandbox runs (and inspect shows it).
                p = host.corral(dirs, "inspect", name)
                assert p.returncode == 0, p.stderr
                doc: dict[str, Any] = json.loads(p.stdout)
                return doc if doc["pids"] and "address" in doc["network"] else None

            found = wait_for(running, timeout=60, what=f"{name} to run")
            assert found is not None
            nets[name] = (found["pids"][0], found["network"])
        gateway = nets["free-0"][1]["gateway"]

        def bridge_link_local() -> str:
            # Once its duplicate detection is done: a tentative one takes nothing.
            shown = host.run("ip", "-6", "-o", "addr", "show", "dev", "corral0", "scope", "link")
            ready = "fe80" in shown.stdout and "tentative" not in shown.stdout
            return shown.stdout.split()[3].split("/")[0] if ready else ""

        bridge_ll = wait_for(bridge_link_local, timeout=60, what="the bridge's link-local address")

        def attempt(sender: str) -> tuple[list[str], list[str]]:
            outside = host.popen(sys.executable, "-u", "-c", _LISTEN, "9001", ns="o")
            inside = host.popen(sys.executable, "-u", "-c", _LISTEN, "9002")
            try:
                for proc in (outside, inside):
                    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
                pid = nets[sender][0]

                def link_local_ready() -> bool:
                    # Its eth0's fe80:: address, once duplicate detection is done.
                    shown = subprocess.run(
                        ["nsenter", f"--net=/proc/{pid}/ns/net", "--", "ip", "-6", "-o",
                         "addr", "show", "dev", "eth0", "scope", "link"],
                        capture_output=True, text=True, timeout=60,
                    ).stdout  # fmt: skip
                    return "fe80" in shown and "tentative" not in shown

                wait_for(link_local_ready, timeout=60, what=f"{sender}'s link-local address")
                p = subprocess.run(
                    ["nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable, "-c", _SPOOF,
                     nets["free-0"][1]["address"], OUTSIDE, bridge_ll, gateway],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert p.returncode == 0, p.stderr
                got = [proc.communicate(timeout=60)[0].split() for proc in (outside, inside)]
                return got[0], got[1]
            finally:
                for proc in (outside, inside):
                    if proc.poll() is None:
                        proc.kill()
                        proc.communicate()

        assert attempt("free-0") == (["spoofed", "marker"], ["ipv6", "marker"])
        assert attempt("locked-0") == (["marker"], ["marker"])
    finally:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


OUTSIDE6, UPLINK6 = "2001:db8:1::2", "2001:db8:1::1"  # documentation prefix: only in O and H


def _ipv6(host: Host, forwarding: bool) -> None:
    """IPv6 between H and O (H's default route through O), and H's IPv6
    forwarding: the host's own setting, which corral does not turn on."""
    setup = [
        ("h", "ip", "-6", "addr", "add", f"{UPLINK6}/64", "dev", "up0", "nodad"),
        ("o", "ip", "-6", "addr", "add", f"{OUTSIDE6}/64", "dev", "out0", "nodad"),
        ("h", "ip", "-6", "route", "add", "default", "via", OUTSIDE6),
        ("h", "sysctl", "-qw", f"net.ipv6.conf.all.forwarding={int(forwarding)}"),
    ]  # fmt: skip
    for ns, *argv in setup:
        p = host.run(*argv, ns=ns)
        assert p.returncode == 0, (argv, p.stderr)


def test_a_declared_network_with_ipv6_reaches_the_outside_over_ipv6(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """ipv6 = true: each sandbox has an IPv6 address (its IPv4 address's
    place in the subnet, in the network's prefix), a default route, and
    NAT66 to the outside; /etc/hosts has its name at both addresses."""
    _ipv6(host, forwarding=True)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[network.six]\nsubnet = "10.70.0.0/24"\nsubnet6 = "fd00:70::/64"\n'
        '[[sandbox]]\nname = "web"\nnetwork = "six"\n'
        f'command = ["sh", "-c", "cat /etc/hosts; wget -qO- http://[{OUTSIDE6}]:8000/'
        ' && exec sleep 60"]\n'
    )
    with _server(host, tmp_path, bind=OUTSIDE6):
        up = host.corral_bg(dirs, "up", str(fleet))
        log = dirs.state / "logs" / "web-0.log"
        try:
            wait_for(
                lambda: (
                    up.poll() is not None
                    or "hello from outside" in (log.read_text() if log.exists() else "")
                ),
                timeout=60,
                what="web-0 to reach the outside over IPv6",
            )
            assert up.poll() is None, up.stderr.read() if up.stderr else ""
            p = host.corral(dirs, "inspect", "web-0")
            assert p.returncode == 0, p.stderr
            net = json.loads(p.stdout)["network"]
            offset = int(net["address"].rsplit(".", 1)[1])
            assert net["address6"] == f"fd00:70::{offset:x}" and net["prefix6"] == 64
            assert net["gateway6"] == "fd00:70::1"
            assert f"{net['address6']}\tweb-0" in log.read_text()
            link = host.run("ip", "-6", "-o", "addr", "show", "dev", "cr-six").stdout
            assert "fd00:70::1/64" in link, link
        finally:
            up.send_signal(signal.SIGTERM)
            _, err = up.communicate(timeout=60)
    assert up.returncode == 0, err
    _nothing_left(host, dirs)


def test_ipv6_is_refused_in_one_line_where_the_host_does_not_forward_it(
    host: Host, dirs: Dirs, tmp_path: Path
) -> None:
    """corral up of a fleet with an IPv6 network, on a host that does not
    forward IPv6: one line at start-up, nothing started, nothing left."""
    _ipv6(host, forwarding=False)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        "[network.six]\nipv6 = true\n"
        '[[sandbox]]\nname = "web"\nnetwork = "six"\ncommand = ["sleep", "60"]\n'
    )
    p = host.corral(dirs, "up", str(fleet))
    assert p.returncode == 125, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line == (
        "corral: network 'six': ipv6: the host does not forward IPv6"
        " (net.ipv6.conf.all.forwarding = 0); corral does not turn it on, since that changes"
        " how the host takes its own routes (docs/network.md)"
    ), line
    assert not (dirs.state / "network" / "six").exists()
    _nothing_left(host, dirs)


def test_ipv6_settings_are_checked(dirs: Dirs) -> None:
    from supervisor import SpecError
    from supervisor._runtime._net import parse_network_decl
    from supervisor._runtime._net._model import ula_prefix

    assert parse_network_decl("six", {"ipv6": True}).subnet6 == ula_prefix("six")
    assert ula_prefix("six").startswith("fd") and ula_prefix("six").endswith("::/64")
    assert ula_prefix("six") != ula_prefix("seven")
    for table, message in [
        ({"ipv6": "yes"}, "ipv6: expected true or false, got 'yes'"),
        ({"subnet6": "fd00::1/64"}, "subnet6: 'fd00::1/64' has host bits set"),
        ({"subnet6": "10.0.0.0/8"}, "subnet6: expected an IPv6 network like fd00:10:20::/64"),
        ({"subnet6": "fd00::/40"}, "subnet6: expected a prefix length from /48 to /120"),
        ({"subnet6": "fe80::/64"}, "subnet6: expected a unicast network"),
        ({"ipv6": False, "subnet6": "fd00::/64"}, "subnet6: set with ipv6 = false"),
        ({"subnet": "10.8.0.0/16", "subnet6": "fd00::/120"}, "is smaller than the IPv4 subnet"),
    ]:
        with pytest.raises(SpecError, match=re.escape(message)):
            parse_network_decl("six", table)


_HOSTS_READER = """
import os, sys
path, stop, prefix = sys.argv[1], sys.argv[2], sys.argv[3].encode()
seen = 0
while not os.path.exists(stop):
    with open(path, "rb") as f:
        text = f.read()
    seen += 1
    if not text.startswith(prefix) or b"\\0" in text:
        print("saw", repr(text), flush=True)
        sys.exit(1)
print("reads", seen, flush=True)
"""


def test_a_hosts_file_rewritten_in_place_always_has_the_sandbox_s_own_lines(
    tmp_path: Path,
) -> None:
    """The supervisor rewrites a running sandbox's /etc/hosts in place (it
    is bind-mounted) while the sandbox may read it: a reader in another
    process, reading all the while, always finds the sandbox's own lines
    (what every version begins with) and never a zero byte, as the peers
    come and go. (Truncating first, as corral once did, let a sandbox's
    `cat /etc/hosts` at its start print nothing.) The file keeps its inode
    and ends holding the last text, blank lines aside."""
    from supervisor._runtime._net._bridge import hosts_file
    from supervisor._runtime._sandbox import _rewrite_in_place

    own = hosts_file("10.0.0.2", "web-0", (), "fd00::2")
    peers = [(f"10.0.0.{n}", f"peer-{n} peer") for n in range(3, 40)]
    texts = [hosts_file("10.0.0.2", "web-0", peers[: n % 37], "fd00::2") for n in range(3000)]
    path = tmp_path / "hosts"
    path.write_text(own)
    inode = path.stat().st_ino
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", _HOSTS_READER, str(path), str(stop), own],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for text in texts:
            _rewrite_in_place(str(path), text.encode())
            if reader.poll() is not None:
                break
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0, out
    assert out.startswith("reads "), out
    assert path.read_text().rstrip("\n") + "\n" == texts[-1]
    assert path.stat().st_ino == inode
    before = path.stat().st_mtime_ns
    _rewrite_in_place(str(path), texts[-1].encode())  # the same text: not written again
    assert path.stat().st_mtime_ns == before

"""Leases of a corral network's addresses, on disk (no kernel network needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from supervisor._errors import SandboxError
from supervisor._runtime._net._ipam import NetworkDir, locked

SUBNET, GATEWAY = "10.213.0.0/24", "10.213.0.1"


def _holder(d: NetworkDir, address: str) -> str:
    return str(json.loads(Path(d.leases_dir, address).read_text())["sandbox"])


def test_a_restore_takes_its_address_back_only_from_a_sandbox_that_ended(tmp_path: Path) -> None:
    d = NetworkDir(str(tmp_path), "corral")
    with locked(str(tmp_path)):
        old = d.lease("web-0.0", SUBNET, GATEWAY)
        # Its next generation, restored from its checkpoint while the one
        # that ended still waits for its removal: the address moves over.
        new = d.lease(
            "web-0.1", SUBNET, GATEWAY, address=old.address, gone={"web-0.0"}.__contains__
        )
        assert new.address == old.address and new.mac == old.mac
        assert _holder(d, old.address) == "web-0.1"
        d.release(old)  # the late removal of the ended one gives back nothing of the new one's
        assert _holder(d, old.address) == "web-0.1"
        # A copy while the holder runs: refused in one line, nothing written.
        with pytest.raises(SandboxError) as info:
            d.lease("copy", SUBNET, GATEWAY, address=old.address, gone=lambda name: False)
        assert str(info.value) == (
            f"network 'corral': the address {old.address} is leased to sandbox 'web-0.1'"
        )
        with pytest.raises(
            SandboxError, match=re.escape("is not one of 10.213.0.0/24's sandbox addresses")
        ):
            d.lease("elsewhere", SUBNET, GATEWAY, address="10.9.9.9")
        with pytest.raises(SandboxError, match="is not one of"):
            d.lease("gw", SUBNET, GATEWAY, address=GATEWAY)
        assert sorted(p.name for p in Path(d.leases_dir).iterdir()) == [old.address]

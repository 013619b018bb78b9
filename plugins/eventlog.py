"""The ``logging`` plugin's event log: every event as a JSON line in a file.

Settings (``[plugins.logging]``):

===============  ===============================================  =====================
key              meaning                                          default
===============  ===============================================  =====================
``events_file``  where the JSON lines go                          ``STATE_DIR/plugins/
                                                                  logging/events.jsonl``
``max_bytes``    size at which the file is rotated (``.1``...)    ``64M``
``max_files``    files kept, the current one included             ``5``
===============  ===============================================  =====================

Each line is one JSON object: ``seq``, ``kind``, ``sandbox``, ``instance``,
``generation``, ``wall`` (ISO 8601, UTC), ``mono`` and ``data``. A gap in
the subscription is filled from the journal, so the file has every event.
The supervisor's own log lines (structlog: console on a terminal, JSON
otherwise) and each sandbox's output files are not this plugin's; see
docs/plugins.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import events
from events.segments import NumberedSegments

from ._api import Handle, validate_with
from ._settings import SettingsError, number, size

__all__ = ["EventLog", "check_settings", "plugin"]

_KEYS = {"events_file", "max_bytes", "max_files"}


class EventLog:
    """An append-only JSON-lines file with size-based rotation.

    The files are :class:`events.segments.NumberedSegments`: ``path``,
    ``path.1`` ... at most *max_files* of them, each at most *max_bytes*
    (but for a single larger line). A line torn by a crash is ended before
    the next one is written, so only that line is lost.
    """

    def __init__(self, path: str, max_bytes: int, max_files: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._files = NumberedSegments(
            path, segment_bytes=max_bytes, max_files=max_files, mode=0o640, terminator=b"\n"
        )
        self.last_seq = self._last_logged()

    def _last_logged(self) -> int:
        """The seq of the last complete line already in the file (0 if none)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, self._files.current.size - 65536))
                lines = f.read().splitlines()
        except OSError:
            return 0
        for line in reversed(lines):
            try:
                return int(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                continue
        return 0

    def write(self, event: events.Event) -> None:
        """Append one event as one line (one write, never split)."""
        record = {
            "seq": event.seq,
            "kind": event.kind,
            "sandbox": event.sandbox,
            "instance": event.instance,
            "generation": event.generation,
            "wall": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.wall))
            + f".{int(event.wall * 1e6) % 1_000_000:06d}Z",
            "mono": event.mono,
            "data": event.data(),
        }
        line = (json.dumps(record, default=repr) + "\n").encode()
        self._files.write_records((line,))
        self.last_seq = event.seq

    def close(self) -> None:
        """Close the file."""
        self._files.close()


def _parse(config: Mapping[str, Any]) -> tuple[str | None, int, int]:
    """``events_file`` (None: the default in the state directory),
    ``max_bytes`` and ``max_files``, checked."""
    for key in config:
        if key not in _KEYS:
            raise SettingsError(key, f"unknown key (expected one of: {', '.join(sorted(_KEYS))})")
    path = config.get("events_file")
    if path is not None and (not isinstance(path, str) or not path):
        raise SettingsError("events_file", f"expected a file path, got {path!r}")
    max_bytes = size(config.get("max_bytes", 64 << 20), "max_bytes")
    max_files = int(number(config.get("max_files", 5), "max_files", low=1, high=1000, whole=True))
    return path, max_bytes, max_files


def check_settings(config: Mapping[str, Any], sandbox: Mapping[str, Any] | None) -> None:
    """The supervisor's up-front check (``plugins.SettingsCheck``). The event
    log is one file for the fleet: a sandbox's own table would do nothing,
    so one with settings is refused."""
    if sandbox:
        raise SettingsError(
            sorted(sandbox)[0],
            "the event log has no per-sandbox settings: set it in [plugins.logging]",
        )
    _parse(config)


def _settings(handle: Handle, config: Mapping[str, Any]) -> EventLog:
    path, max_bytes, max_files = _parse(config)
    if path is None:
        path = os.path.join(handle.state_dir, "events.jsonl")
    return EventLog(path, max_bytes, max_files)


@validate_with(check_settings)
async def plugin(handle: Handle, config: Mapping[str, Any]) -> None:
    """Write every event to the event log file, in order, gaps filled.

    It carries on from the last event the file has: whatever was published
    before the plugin subscribed (or while the supervisor was down) comes
    from the journal first.
    """
    log = _settings(handle, config)
    try:
        with handle.subscribe(maxsize=4096) as sub:
            async for missed in handle.replay(log.last_seq + 1):
                if not isinstance(missed, events.Gap):
                    log.write(missed)
            async for event in sub:
                if isinstance(event, events.Gap):
                    async for missed in handle.replay(event.first, event.last):
                        if not isinstance(missed, events.Gap):
                            log.write(missed)
                elif event.seq > log.last_seq:
                    log.write(event)
    finally:
        log.close()

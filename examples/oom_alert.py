"""React to OOM kills: an outside consumer of corral's event stream.

    python examples/oom_alert.py [--socket /run/corral/events.sock] [--count N]

Connects to a running `corral up`, replays what is still in the journal
and then follows live; for every OOM kill it prints one alert line with the
sandbox and, once the sandbox has exited, whether the kill ended it. Swap
the print for a pager, a chat webhook or a ticket. Uses only the blocking
client (no trio), so it starts fast and fits in any script.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import events


def main() -> int:
    parser = argparse.ArgumentParser(description="Print an alert for every OOM kill.")
    run_dir = os.environ.get("CORRAL_RUN_DIR", "/run/corral")
    parser.add_argument("--socket", default=os.path.join(run_dir, "events.sock"))
    parser.add_argument("--count", type=int, help="stop after this many alerts")
    parser.add_argument("--since", type=int, default=1, help="replay from this sequence number")
    args = parser.parse_args()

    alerts = 0
    killed: dict[str, int] = {}
    try:
        stream = events.iter_events(args.socket, kinds=["oom_kill", "exited"], since=args.since)
        for ev in stream:
            if isinstance(ev, events.OomKill):
                killed[ev.sandbox] = ev.total
            elif isinstance(ev, events.Exited) and ev.sandbox in killed:
                when = time.strftime("%H:%M:%S", time.localtime(ev.wall))
                outcome = (
                    "it died of it"
                    if ev.oom_killed and ev.status == 137
                    else (f"it survived and later exited with status {ev.status}")
                )
                print(
                    f"{when} ALERT sandbox {ev.sandbox} (generation {ev.generation}):"
                    f" {killed.pop(ev.sandbox)} OOM kill(s); {outcome}",
                    flush=True,
                )
                alerts += 1
                if args.count is not None and alerts >= args.count:
                    break
    except events.SocketError as exc:
        print(f"oom_alert: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

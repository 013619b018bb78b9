#!/usr/bin/env bash
# What `make demo` shows (as root), on the built-in busybox rootfs:
#   1. `corral run`: one isolated sandbox, and an OOM kill reported as such;
#   2. `corral up examples/fleet.toml`: a supervised fleet whose events
#      stream on the terminal and, at the same time, to an outside consumer
#      (`corral events`), while a user lists, execs into, pauses and resumes
#      a sandbox over the control socket; after 15 s a SIGINT (what Ctrl-C
#      sends) stops it cleanly.
set -u
cd "$(dirname "$0")/.."
# A private state and run directory, so the demo shows only its own events
# and leaves nothing behind.
demo_dir=$(mktemp -d /tmp/corral-demo.XXXXXX)
# Searchable (not listable) by others: a sandbox's root is an unprivileged
# host user by default, and mounts its layers below the state directory.
chmod 711 "$demo_dir"
trap 'rm -rf "$demo_dir"' EXIT
export CORRAL_STATE_DIR=$demo_dir/state CORRAL_RUN_DIR=$demo_dir/run
corral() { .venv/bin/corral "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "corral run: an isolated sandbox (own hostname, PID 1 is tini, only lo, overlay root)"
echo "\$ corral run --hostname demo -- sh -c 'hostname; ps -o pid,comm; ip -o link | cut -d: -f2'"
corral run --hostname demo -- sh -c 'hostname; ps -o pid,comm; ip -o link | cut -d: -f2'

say "corral run: a hog under --memory 32M is OOM-killed (exit 137), not swapped out"
echo "\$ corral run --memory 32M -- sh -c 'x=a; while :; do x=\$x\$x; done'"
corral run --memory 32M -- sh -c 'x=a; while :; do x=$x$x; done'
echo "exit status: $?"

say "corral up examples/fleet.toml: 5 sandboxes; the hog is OOM-killed and restarted with more memory; SIGINT after 15 s"
run_dir=$CORRAL_RUN_DIR
log=$(mktemp)
# An outside consumer: it connects as soon as the socket exists and prints
# what a monitoring system would get.
(
  for _ in $(seq 100); do [ -S "$run_dir/events.sock" ] && break; sleep 0.1; done
  exec .venv/bin/corral events --since 1 --kind oom_kill --kind exited --kind restarting --kind limit_changed --kind failed
) > "$log" 2>&1 &
consumer=$!
# And a user at the control socket: ps, exec, pause/resume, while it runs.
control=$(mktemp)
(
  for _ in $(seq 100); do [ -S "$run_dir/control.sock" ] && break; sleep 0.1; done
  for _ in $(seq 100); do corral ps 2>/dev/null | grep -q '^web-0 *running' && break; sleep 0.1; done
  echo "\$ corral ps"; corral ps
  echo "\$ corral exec web -- sh -c 'hostname; ls /proc | grep -c \"^[0-9]\"'"
  corral exec web -- sh -c 'hostname; ls /proc | grep -c "^[0-9]"'
  # What the sandbox's root may not do (docs/security.md).
  echo "\$ corral exec web -- sh -c 'grep -E \"^(CapEff|NoNewPrivs|Seccomp):\" /proc/self/status; mount -t tmpfs t /mnt'"
  corral exec web -- sh -c 'grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status; mount -t tmpfs t /mnt'
  echo "\$ corral pause web"; corral pause web
  echo "\$ corral exec web -- true"; corral exec web -- true; echo "exit status: $?"
  echo "\$ corral resume web"; corral resume web
  echo "\$ corral stats web"; corral stats web
) > "$control" 2>&1 &
controller=$!
timeout --preserve-status -s INT 15 .venv/bin/corral up examples/fleet.toml
echo "corral up exit status: $?"
wait "$consumer" "$controller"

say "what a user at the control socket saw meanwhile (docs/control.md)"
cat "$control"
rm -f "$control"

say "what an outside consumer (corral events --kind oom_kill --kind exited ...) received"
cat "$log"
rm -f "$log"

say "what the hog printed (corral logs hog)"
.venv/bin/corral logs hog

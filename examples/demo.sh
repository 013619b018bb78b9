#!/usr/bin/env bash
# A short tour of what `corral run` does, on the built-in busybox rootfs.
# Run by `make demo` (as root); each step prints the command it runs.
set -u
cd "$(dirname "$0")/.."
corral() { .venv/bin/corral "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n$ corral %s\n' "$1" "${*:2}"; }

step "An isolated sandbox: own hostname, PID 1 is tini, only lo, overlay root" \
     run --hostname demo -- sh -c '"hostname; ps -o pid,comm; ip -o link | cut -d: -f2; grep \" / \" /proc/mounts"'
corral run --hostname demo -- sh -c 'hostname; ps -o pid,comm; ip -o link | cut -d: -f2; grep " / " /proc/mounts'

step "Writes stay in the sandbox's private layer" run -- sh -c '"echo hi > /etc/motd; cat /etc/motd"'
corral run -- sh -c 'echo hi > /etc/motd; cat /etc/motd'
corral run -- sh -c 'test -e /etc/motd && echo "leaked!" || echo "the next sandbox starts clean"'

step "A memory hog under --memory 32M is OOM-killed (exit 137), not swapped out" \
     run --memory 32M -- sh -c '"x=a; while :; do x=\$x\$x; done"'
corral run --memory 32M -- sh -c 'x=a; while :; do x=$x$x; done'
echo "exit status: $?"

step "A fork bomb under --pids 64 is contained; the sandbox still ends cleanly" \
     run --pids 64 -- sh -c '"b() { b | b & }; b 2>/dev/null; echo bomb contained"'
corral run --pids 64 -- sh -c 'b() { b | b & }; b 2>/dev/null; echo bomb contained'
echo "exit status: $?"

step "Bad input: one line, no traceback, nothing left behind" run --memory 12Q -- true
corral run --memory 12Q -- true
echo "exit status: $?"

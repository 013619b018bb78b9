# corral — developer and CI entry points. Run as root on Debian 12.
#
#   make demo      set everything up, then show the main job on the busybox rootfs
#   make test      set everything up, then run the test lanes (host; VM v2; VM v1)
#   make bench     the benchmarks of docs/performance.md (runc, LXC, podman, supervisord,
#                  circus, plain CRIU in the VM)
#   make lint      ruff + mypy --strict
#
# Setup is idempotent: apt packages, a venv in .venv, the package (editable).

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
PKGS  := supervisor events plugins rootfs

# Runtime needs: busybox-static (the built-in rootfs), tini (PID 1 in every
# sandbox), python3-venv; lxcfs (each sandbox's own /proc/meminfo, cpuinfo,
# uptime...: docs/view.md; corral runs its own instance, not the package's
# service). Checkpoints: CRIU, and nft to lift the network
# lock CRIU 3.17 leaves in a restored sandbox (docs/checkpoint.md). Images:
# mmdebstrap (the debian builder, docs/images.md); the lxc-template builder
# runs LXC's template scripts, which users install with Debian's lxc (not a
# runtime need: its package also brings LXC's own runtime and network). The
# VM lane: QEMU and Debian's own kernel (CRIU works there; see tests/vm/run).
APT_RUNTIME := busybox-static tini python3-venv python3-dev iproute2 util-linux procps \
               criu nftables libseccomp2 mmdebstrap lxcfs
APT_VM      := qemu-system-x86 linux-image-amd64
# The escape tests compile a static probe program into a test rootfs; the OCI
# tests also read image layouts that skopeo and umoci write (offline); the
# lxc-template tests run the lxc package's /usr/share/lxc/templates/lxc-busybox.
APT_TEST    := gcc libc6-dev skopeo umoci lxc
# The network benchmark's podman peer: Debian's podman 4.3 with runc and its
# netavark backend (which calls iptables); it runs in the benchmark's own
# namespaces only (benchmarks/_podman.py).
APT_BENCH   := runc lxc gcc libc6-dev debootstrap podman netavark iptables

.PHONY: setup setup-vm setup-bench demo test test-host test-vm test-vm-v1 lint bench \
        bench-checkpoint clean

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

$(VENV)/.installed: pyproject.toml
	$(call apt_install,$(APT_RUNTIME))
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' virtme-ng \
	    --config-settings editable_mode=compat
	touch $@

# Byte-compile our packages: `corral run` is a one-shot command and should
# not pay for compiling its modules (PYTHONDONTWRITEBYTECODE may be set).
setup: $(VENV)/.installed
	@$(PY) -m compileall -q $(PKGS)

setup-vm: setup
	$(call apt_install,$(APT_VM) $(APT_TEST))

# The restart benchmark's peers, supervisord and circus, from PyPI (pinned
# wheels, in a directory of their own beside the venv: supervisord's
# package is named `supervisor` too), installed here and never by a run.
PEER_SITE := $(VENV)/corral-peer-site

setup-bench: setup $(PEER_SITE)/.installed
	$(call apt_install,$(APT_BENCH))

$(PEER_SITE)/.installed: benchmarks/_restart_peers.py
	$(PY) benchmarks/_restart_peers.py --install-only --site $(PEER_SITE)
	touch $@

demo: setup
	@bash examples/demo.sh

test: setup-vm
	$(MAKE) --no-print-directory test-host
	$(MAKE) --no-print-directory test-vm
	$(MAKE) --no-print-directory test-vm-v1

test-host:
	@echo "== host lane: $$(stat -fc %T /sys/fs/cgroup | sed 's/tmpfs/cgroup v1 (hybrid)/;s/cgroup2fs/cgroup v2/') =="
	$(PY) -m pytest -q -p no:cacheprovider

# Everything that depends on the cgroup layout or a kernel feature, again on
# Debian 12's own kernel with pure cgroup v2 (see tests/vm/run); CRIU works
# there, so the checkpoint tests run too.
# The lane emulates its CPU (no nested KVM here): some 470 tests took 26 to
# 34 minutes in the last runs (2026-12-07: 28.2). Tests marked host_only
# (pipes, log files, the 200-sandbox scale test: some 4 minutes here) are
# the host lane's alone; the bound leaves room for the slow end.
test-vm:
	@echo "== VM lane: Debian kernel, cgroup v2 =="
	CORRAL_VM_TIMEOUT=50m tests/vm/run -- $(PY) -m pytest -q -p no:cacheprovider -m "(layout or criu) and not host_only" --durations=12

# The CRIU checkpoint tests again, on the same kernel with the cgroup v1
# (hybrid) layout: the host kernel is too new for CRIU, so only a VM can
# exercise checkpoints against the v1 backend (its freezer, its OOM
# counters). Not test_network.py's: a bridged sandbox's checkpoint differs
# in its network (namespaces, veth, nftables), which is the same on either
# layout; the v2 lane runs them, and here they took 3 of 10 minutes.
test-vm-v1:
	@echo "== VM lane: Debian kernel, cgroup v1 =="
	tests/vm/run --cgroup v1 -- $(PY) -m pytest -q -p no:cacheprovider -m criu --ignore=tests/test_network.py --durations=8

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup-bench setup-vm
	$(PY) benchmarks/start.py --runs 50
	$(PY) benchmarks/event_stream.py
	$(PY) benchmarks/restart.py
	$(PY) benchmarks/control.py
	$(PY) benchmarks/takeover.py
	$(PY) benchmarks/images.py
	$(PY) benchmarks/network.py --runs 30
	$(PY) benchmarks/view.py --runs 100
	$(PY) benchmarks/pressure.py
	$(MAKE) --no-print-directory bench-checkpoint

# CRIU needs a kernel it knows: the checkpoint benchmark runs in the VM lane
# (it compiles its memory hog with gcc inside, from the shared host tools).
bench-checkpoint: setup-bench setup-vm
	tests/vm/run --memory 3G -- $(PY) benchmarks/checkpoint.py

clean:
	rm -rf $(VENV) build *.egg-info

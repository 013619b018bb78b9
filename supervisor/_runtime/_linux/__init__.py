"""The Linux runtime: the only code in corral that makes raw system calls.

Namespaces, mounts and ``pivot_root`` (:mod:`._child`), spawning
(:mod:`._spawn`), cgroups (:mod:`._cgroups`) and the syscall wrappers
(:mod:`._syscalls`). Nothing here imports trio or structlog: parts of it run
in forked children and in the single-threaded keeper.
"""

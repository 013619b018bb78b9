/*
 * The escape battery of security issue 7: one static program that, run
 * inside a sandbox, makes each escape or abuse attempt below and prints one
 * line per attempt:
 *
 *     NAME RESULT DETAIL
 *
 * RESULT is "blocked", "succeeded" or "error" (the attempt crashed, timed
 * out or lacked its input). "succeeded" means the attempt reached its goal,
 * or, for calls whose only question is permission (swapoff of a missing
 * file, a module that does not exist, a clock value the kernel refuses),
 * that the call got past the permission check: EPERM, EACCES, EROFS and
 * ENOSYS (seccomp's usual answers, or a kernel without the call) count as
 * blocked, any other errno as succeeded. DETAIL says what happened.
 * Before the attempts come three lines from /proc/self/status:
 *
 *     status CapEff <hex>
 *     status NoNewPrivs <n>
 *     status Seccomp <n>
 *
 * Build: gcc -static -O1 -o probe probe.c. Usage: probe [NAME...] (no
 * names: every attempt, in order).
 *
 * The battery also runs in privileged sandboxes, as real root with every
 * capability, where many attempts succeed; each one is therefore harmless
 * when it succeeds. Reboot: only LINUX_REBOOT_CMD_CAD_OFF (which a PID
 * namespace refuses, and which is what systemd sets at boot anyway). The
 * clock: an out-of-range time zone and an absurd tick length, which the
 * kernel refuses after the permission check, so nothing is set. kexec_load:
 * an unknown flag and too many segments, refused before anything is loaded
 * (a nr_segments of 0 would unload the loaded image). Modules: loading an
 * empty image, unloading a module that does not exist. Swap and process
 * accounting: files that do not exist. /proc/sysrq-trigger, core_pattern
 * and the /sys knobs are opened for writing, never written. Block devices
 * and /dev/mem are only read. Mounts are undone, and made in a private mount
 * namespace where that is possible. Every node, directory and process the
 * battery makes is removed before it exits (a final sweep catches what a
 * crashed attempt left).
 *
 * Each attempt runs in a forked child (its result comes back through a
 * shared page), so a crash of one does not stop the others, and namespace
 * or chroot changes stay in that child.
 *
 * Inputs, from the environment (set by tests/test_escape.py):
 *   PROBE_HOST_PID, PROBE_HOST_COMM  a host process (the sandbox's owner)
 *   PROBE_HOST_PORT                  a TCP port listening on the host's 127.0.0.1
 *   PROBE_HOST_ABSTRACT              an abstract Unix socket name the host listens on
 *   PROBE_HOST_MARKER                an absolute host path outside the rootfs
 *   PROBE_PIDS_LIMIT                 the sandbox's pids limit: the fork bomb stops 64
 *                                    processes past it (at 10000 without it)
 *   PROBE_MEM_TRY                    bytes the memory hog tries to touch (256 MiB)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>

/* Numbers of calls newer than some C libraries' headers: since Linux 5.1
 * new calls have the same number on every architecture. */
#ifndef SYS_io_uring_setup
#define SYS_io_uring_setup 425
#endif
#ifndef SYS_fsopen
#define SYS_fsopen 430
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif

#define KEY_SPEC_PROCESS_KEYRING (-2)
#define REBOOT_MAGIC1 0xfee1deadUL
#define REBOOT_MAGIC2 672274793UL
#define REBOOT_CMD_CAD_OFF 0UL
#define FILEID_INO32_GEN 1
#define MIB (1UL << 20)

enum { BLOCKED, SUCCEEDED, ERROR };
static const char *const OUTCOME[] = {"blocked", "succeeded", "error"};

/* One attempt's result, in a MAP_SHARED page: written by the attempt's
 * child (or its children), read by the main process. */
struct result {
    int set;
    int outcome;
    long counter;
    char detail[1536];
};
static struct result *R;

static void say(int outcome, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void say(int outcome, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(R->detail, sizeof R->detail, fmt, ap);
    va_end(ap);
    for (char *p = R->detail; *p; p++)
        if (*p == '\n')
            *p = ' ';
    R->outcome = outcome;
    R->set = 1;
}

static const char *en(int e)
{
    const char *name = strerrorname_np(e);
    static char buf[32];
    if (name)
        return name;
    snprintf(buf, sizeof buf, "errno %d", e);
    return buf;
}

/* The answers of a permission check that said no (or of seccomp). */
static int denied(int e)
{
    return e == EPERM || e == EACCES || e == EROFS || e == ENOSYS;
}

/* For a call whose only question is whether it got past the permission
 * check: report its return value or errno. */
static void judge(const char *call, long rc, int e, const char *what)
{
    if (rc >= 0)
        say(SUCCEEDED, "%s: ok (%s)", call, what);
    else if (denied(e))
        say(BLOCKED, "%s: %s", call, en(e));
    else
        say(SUCCEEDED, "%s: %s (past the permission check; %s)", call, en(e), what);
}

static const char *need_env(const char *name)
{
    const char *v = getenv(name);
    if (!v || !*v)
        say(ERROR, "%s is not set", name);
    return v && *v ? v : NULL;
}

static void read_comm(pid_t pid, char *buf, size_t len)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    snprintf(buf, len, "?");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n < 0)
        n = 0;
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
}

static ssize_t read_file(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    buf[n < 0 ? 0 : n] = 0;
    return n;
}

/* Open PATH for writing without writing (no O_TRUNC, no O_CREAT). */
static int open_for_writing(const char *path)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOCTTY);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    return errno;
}

static int wait_child(pid_t pid)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return st;
}

/* --- mounts and namespaces -------------------------------------------- */

static void a_mount_proc(void)
{
    const char *dir = "/tmp/probe-proc";
    mkdir(dir, 0755);
    if (mount("proc", dir, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0) {
        umount2(dir, MNT_DETACH);
        say(SUCCEEDED, "mount proc on %s: ok (unmounted again)", dir);
    } else {
        say(BLOCKED, "mount proc on %s: %s", dir, en(errno));
    }
    rmdir(dir);
}

static void a_bind_mount_root(void)
{
    const char *dir = "/tmp/probe-bind";
    mkdir(dir, 0755);
    if (mount("/", dir, NULL, MS_BIND | MS_REC, NULL) == 0) {
        umount2(dir, MNT_DETACH);
        say(SUCCEEDED, "bind mount / on %s: ok (unmounted again)", dir);
    } else {
        say(BLOCKED, "bind mount / on %s: %s", dir, en(errno));
    }
    rmdir(dir);
}

static void a_umount_mask(void)
{
    /* Docker's masked paths that exist on most kernels; umount2 looks the
     * path up before it checks permission, so it must exist. */
    static const char *const masks[] = {"/proc/kcore", "/proc/keys", "/proc/timer_list",
                                        "/proc/sched_debug", "/proc/interrupts",
                                        "/sys/firmware", NULL};
    const char *path = NULL;
    struct stat st;
    for (int i = 0; masks[i]; i++)
        if (lstat(masks[i], &st) == 0) {
            path = masks[i];
            break;
        }
    if (!path) {
        say(BLOCKED, "none of Docker's masked paths exists here");
        return;
    }
    /* Work on a private copy of the mount table where allowed, so that the
     * sandbox keeps its masks for the other attempts. */
    const char *where = unshare(CLONE_NEWNS) == 0 ? "a private mount namespace"
                                                  : "the sandbox's mount namespace";
    if (umount2(path, MNT_DETACH) == 0)
        say(SUCCEEDED, "umount2 %s: ok, the mask is gone (in %s)", path, where);
    else if (errno == EINVAL)
        say(SUCCEEDED, "umount2 %s: EINVAL: nothing is mounted there (no mask) and the"
            " caller may unmount", path);
    else
        say(denied(errno) ? BLOCKED : SUCCEEDED, "umount2 %s: %s", path, en(errno));
}

static void a_unshare_mount(void)
{
    long rc = unshare(CLONE_NEWNS);
    judge("unshare(CLONE_NEWNS)", rc, errno, "a new mount namespace");
}

static void a_unshare_user(void)
{
    long rc = unshare(CLONE_NEWUSER);
    judge("unshare(CLONE_NEWUSER)", rc, errno, "a new user namespace");
}

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static void a_clone3_newuser(void)
{
    /* clone3's flags live in memory, where seccomp cannot look: a filter
     * that checks clone's flags must refuse clone3 as a whole. */
    struct clone_args_v0 args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_NEWUSER;
    args.exit_signal = SIGCHLD;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0)
        _exit(0);
    if (pid > 0) {
        wait_child((pid_t)pid);
        say(SUCCEEDED, "clone3(CLONE_NEWUSER): ok, child %ld in a new user namespace", pid);
    } else {
        say(BLOCKED, "clone3(CLONE_NEWUSER): %s", en(errno));
    }
}

static void a_setns(void)
{
    char comm[64];
    read_comm(1, comm, sizeof comm);
    int fd = open("/proc/1/ns/mnt", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        say(BLOCKED, "open /proc/1/ns/mnt: %s", en(errno));
        return;
    }
    if (setns(fd, CLONE_NEWNS) == 0)
        say(SUCCEEDED, "setns to the mount namespace of PID 1 (%s): ok", comm);
    else
        say(BLOCKED, "setns to the mount namespace of PID 1 (%s): %s", comm, en(errno));
    close(fd);
}

static void a_pivot_root(void)
{
    /* At the root, pivot_root(".", ".") can only fail (EBUSY) once past the
     * permission check; a private mount namespace makes sure of it. */
    int private = unshare(CLONE_NEWNS) == 0;
    if (chdir("/") != 0) {
        say(ERROR, "chdir /: %s", en(errno));
        return;
    }
    long rc = syscall(SYS_pivot_root, ".", ".");
    judge("pivot_root(\".\", \".\")", rc, errno,
          private ? "in a private mount namespace" : "in the sandbox's mount namespace");
}

static void a_fsopen(void)
{
    long fd = syscall(SYS_fsopen, "tmpfs", 1 /* FSOPEN_CLOEXEC */);
    int e = errno;
    if (fd >= 0) {
        close((int)fd);
        say(SUCCEEDED, "fsopen(tmpfs): ok (a mount context of the new mount API; closed)");
    } else {
        say(BLOCKED, "fsopen(tmpfs): %s", en(e));
    }
}

/* --- /proc and /sys ----------------------------------------------------- */

static void a_read_kcore(void)
{
    int fd = open("/proc/kcore", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        say(BLOCKED, "open /proc/kcore: %s", en(errno));
        return;
    }
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    int e = errno;
    close(fd);
    if (n > 0)
        say(SUCCEEDED, "read %zd bytes of /proc/kcore%s", n,
            n >= 4 && memcmp(buf, "\177ELF", 4) == 0 ? " (the kernel's ELF header)" : "");
    else if (n == 0)
        say(BLOCKED, "read 0 bytes of /proc/kcore (masked)");
    else
        say(BLOCKED, "read /proc/kcore: %s", en(e));
}

static void open_for_writing_only(const char *path)
{
    int e = open_for_writing(path);
    if (e == 0)
        say(SUCCEEDED, "opened %s for writing (nothing written)", path);
    else
        say(BLOCKED, "open %s for writing: %s", path, en(e));
}

static void a_sysrq(void)
{
    open_for_writing_only("/proc/sysrq-trigger");
}

static void a_core_pattern(void)
{
    open_for_writing_only("/proc/sys/kernel/core_pattern");
}

static const char *const SYS_KNOBS[] = {"kernel/uevent_helper",
                                        "kernel/mm/transparent_hugepage/enabled",
                                        "kernel/mm/ksm/run", NULL};

static void a_write_sys(void)
{
    char path[256], first[320] = "";
    for (int i = 0; SYS_KNOBS[i]; i++) {
        snprintf(path, sizeof path, "/sys/%s", SYS_KNOBS[i]);
        int e = open_for_writing(path);
        if (e == 0) {
            say(SUCCEEDED, "opened %s for writing (nothing written)", path);
            return;
        }
        if (e != ENOENT && !*first)
            snprintf(first, sizeof first, "open %s for writing: %s", path, en(e));
    }
    if (!*first)
        snprintf(first, sizeof first, "none of the knobs exists in /sys");
    /* A writable sysfs of its own is the same thing. */
    if (unshare(CLONE_NEWNS) != 0) {
        say(BLOCKED, "%s; a new sysfs: unshare(CLONE_NEWNS): %s", first, en(errno));
        return;
    }
    const char *dir = "/tmp/probe-sys";
    mkdir(dir, 0755);
    if (mount("sysfs", dir, "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        say(BLOCKED, "%s; mount a new sysfs: %s", first, en(errno));
        rmdir(dir);
        return;
    }
    /* A new mount of sysfs in the same network namespace shares the
     * sandbox's superblock, read-only if /sys was mounted so: make the
     * superblock writable (the sandbox's /sys stays a read-only mount), and
     * read-only again afterwards. Only if it was read-only: in the host's
     * network namespace this would be the host's sysfs. */
    unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    struct statvfs sv;
    int read_only = statvfs(dir, &sv) == 0 && (sv.f_flag & ST_RDONLY);
    int remounted = read_only && mount(NULL, dir, NULL, MS_REMOUNT | flags, NULL) == 0;
    int opened = -1, e = ENOENT;
    for (int i = 0; SYS_KNOBS[i] && opened < 0; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, SYS_KNOBS[i]);
        int err = open_for_writing(path);
        if (err == 0)
            opened = i;
        else if (err != ENOENT)
            e = err;
    }
    if (remounted)
        mount(NULL, dir, NULL, MS_REMOUNT | MS_RDONLY | flags, NULL);
    umount2(dir, MNT_DETACH);
    rmdir(dir);
    if (opened >= 0)
        say(SUCCEEDED, "%s; but a new sysfs mounted%s in a private mount namespace opened"
            " /sys/%s for writing (nothing written)", first, remounted ? " and remounted rw" : "",
            SYS_KNOBS[opened]);
    else
        say(BLOCKED, "%s; a new sysfs mounted%s, no knob opened for writing: %s", first,
            remounted ? " and remounted rw" : read_only ? " (remount rw refused)" : "", en(e));
}

static void a_cgroup_write(void)
{
    char detail[1024];
    const char *newdir = "/sys/fs/cgroup/probe-corral";
    if (mkdir(newdir, 0755) == 0) {
        rmdir(newdir);
        say(SUCCEEDED, "mkdir %s: ok (removed again)", newdir);
        return;
    }
    int n = snprintf(detail, sizeof detail, "mkdir %s: %s", newdir, en(errno));
    int found = 0;
    char path[512];
    DIR *d = opendir("/sys/fs/cgroup");
    struct dirent *ent;
    while (d && (ent = readdir(d))) {
        if (strcmp(ent->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "/sys/fs/cgroup/%s/cgroup.procs", ent->d_name);
        int e = open_for_writing(path);
        if (e == ENOENT || e == ENOTDIR)
            continue;
        found++;
        if (e == 0) {
            closedir(d);
            say(SUCCEEDED, "opened %s for writing (nothing written)", path);
            return;
        }
    }
    if (d)
        closedir(d);
    n += snprintf(detail + n, sizeof detail - n,
                  "; %d cgroup.procs files in /sys/fs/cgroup, none opens for writing", found);
    /* A cgroup file system of its own is the same thing. */
    if (unshare(CLONE_NEWNS) != 0) {
        say(BLOCKED, "%s; mount cgroup2: unshare(CLONE_NEWNS): %s", detail, en(errno));
        return;
    }
    const char *dir = "/tmp/probe-cg";
    mkdir(dir, 0755);
    if (mount("cgroup2", dir, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
        say(BLOCKED, "%s; mount cgroup2: %s", detail, en(errno));
        rmdir(dir);
        return;
    }
    snprintf(path, sizeof path, "%s/cgroup.procs", dir);
    int e = open_for_writing(path);
    umount2(dir, MNT_DETACH);
    rmdir(dir);
    if (e == 0)
        say(SUCCEEDED, "%s; but mounted cgroup2 in a private mount namespace and opened its"
            " cgroup.procs for writing (nothing written)", detail);
    else
        say(BLOCKED, "%s; mounted cgroup2, its cgroup.procs: %s", detail, en(e));
}

/* --- devices and file handles ----------------------------------------- */

static void a_mknod_block(void)
{
    char line[256], name[64] = "";
    unsigned maj = 0, min = 0;
    unsigned long long blocks;
    int have = 0;
    FILE *f = fopen("/proc/partitions", "re");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, " %u %u %llu %63s", &maj, &min, &blocks, name) == 4) {
            have = 1;
            break;
        }
    if (f)
        fclose(f);
    if (!have) {
        say(BLOCKED, "no block device listed in /proc/partitions");
        return;
    }
    const char *node = "/tmp/probe-blk";
    unlink(node);
    if (mknod(node, S_IFBLK | 0600, makedev(maj, min)) != 0) {
        say(BLOCKED, "mknod %s b %u %u (%s): %s", node, maj, min, name, en(errno));
        return;
    }
    int fd = open(node, O_RDONLY | O_CLOEXEC);
    int e = errno;
    unlink(node);
    if (fd < 0) {
        say(BLOCKED, "mknod b %u %u (%s): ok; open: %s", maj, min, name, en(e));
        return;
    }
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf);
    e = errno;
    close(fd);
    if (n > 0)
        say(SUCCEEDED, "mknod b %u %u: ok; read %zd bytes of the host's disk %s", maj, min, n,
            name);
    else
        say(BLOCKED, "mknod b %u %u (%s): ok; open: ok; read: %s", maj, min, name,
            n == 0 ? "0 bytes" : en(e));
}

static void a_mknod_mem(void)
{
    const char *node = "/dev/probe-mem";
    char dev_err[96] = "";
    unlink(node);
    if (mknod(node, S_IFCHR | 0600, makedev(1, 1)) != 0) {
        snprintf(dev_err, sizeof dev_err, "mknod %s: %s; ", node, en(errno));
        node = "/tmp/probe-mem";
        unlink(node);
        if (mknod(node, S_IFCHR | 0600, makedev(1, 1)) != 0) {
            say(BLOCKED, "%smknod %s c 1 1: %s", dev_err, node, en(errno));
            return;
        }
    }
    int fd = open(node, O_RDONLY | O_CLOEXEC);
    int e = errno;
    unlink(node);
    if (fd < 0) {
        say(BLOCKED, "%smknod %s c 1 1: ok; open: %s", dev_err, node, en(e));
        return;
    }
    char buf[64];
    ssize_t n = read(fd, buf, sizeof buf); /* at offset 0: low memory, readable if any is */
    e = errno;
    close(fd);
    if (n > 0)
        say(SUCCEEDED, "%smknod %s c 1 1: ok; read %zd bytes of physical memory", dev_err,
            node, n);
    else
        say(BLOCKED, "%smknod %s c 1 1: ok; open: ok; read: %s", dev_err, node,
            n == 0 ? "0 bytes" : en(e));
}

static void a_open_by_handle(void)
{
    /* The "shocker" attack: a file handle forged for inode 2 (the root of
     * an ext4 file system), opened through a file of the host's file system
     * (tini, bind-mounted at /dev/init), names the host's root directory. */
    struct {
        struct file_handle fh;
        unsigned char bytes[MAX_HANDLE_SZ];
    } h;
    const char *anchor = "/dev/init";
    int mfd = open(anchor, O_RDONLY | O_CLOEXEC);
    if (mfd < 0) {
        anchor = "/";
        mfd = open(anchor, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    }
    if (mfd < 0) {
        say(ERROR, "open %s: %s", anchor, en(errno));
        return;
    }
    int mount_id;
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    int named = name_to_handle_at(mfd, "", &h.fh, &mount_id, AT_EMPTY_PATH) == 0;
    int name_err = errno;
    const char *what;
    char whatbuf[160];
    if (!named || h.fh.handle_type == FILEID_INO32_GEN) {
        uint32_t ino_gen[2] = {2, 0};
        memcpy(h.fh.f_handle, ino_gen, sizeof ino_gen);
        h.fh.handle_bytes = sizeof ino_gen;
        h.fh.handle_type = FILEID_INO32_GEN;
        if (named)
            what = "a handle forged for inode 2";
        else {
            snprintf(whatbuf, sizeof whatbuf,
                     "a handle forged for inode 2 (name_to_handle_at: %s)", en(name_err));
            what = whatbuf;
        }
    } else {
        snprintf(whatbuf, sizeof whatbuf, "the handle of %s itself (type %d)", anchor,
                 h.fh.handle_type);
        what = whatbuf;
    }
    int fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_CLOEXEC);
    int e = errno;
    close(mfd);
    if (fd < 0) {
        if (denied(e))
            say(BLOCKED, "open_by_handle_at(%s, %s): %s", anchor, what, en(e));
        else
            say(SUCCEEDED, "open_by_handle_at(%s, %s): %s (past the permission check;"
                " nothing decodable here)", anchor, what, en(e));
        return;
    }
    struct stat st;
    fstat(fd, &st);
    char names[256] = "";
    size_t used = 0;
    const char *marker = getenv("PROBE_HOST_MARKER");
    const char *seen = "";
    if (S_ISDIR(st.st_mode)) {
        if (marker && marker[0] == '/') {
            int m = openat(fd, marker + 1, O_RDONLY | O_CLOEXEC);
            if (m >= 0) {
                close(m);
                seen = "; the host's marker is readable through it";
            }
        }
        DIR *d = fdopendir(dup(fd));
        struct dirent *ent;
        int count = 0;
        while (d && (ent = readdir(d)) && count < 8) {
            if (ent->d_name[0] == '.')
                continue;
            used += snprintf(names + used, sizeof names - used, "%s%s", count ? "," : "",
                             ent->d_name);
            if (used >= sizeof names)
                break;
            count++;
        }
        if (d)
            closedir(d);
    }
    close(fd);
    say(SUCCEEDED, "open_by_handle_at(%s, %s): opened %s inode %lu%s%s%s", anchor, what,
        S_ISDIR(st.st_mode) ? "the directory" : "a file", (unsigned long)st.st_ino,
        *names ? " holding " : "", names, seen);
}

/* --- the sandbox's borders --------------------------------------------- */

static void a_chroot_breakout(void)
{
    const char *marker = need_env("PROBE_HOST_MARKER");
    if (!marker)
        return;
    const char *jail = "/tmp/probe-jail";
    mkdir(jail, 0755);
    pid_t pid = fork();
    if (pid == 0) {
        if (chroot(jail) != 0) {
            say(BLOCKED, "chroot %s: %s", jail, en(errno));
            _exit(0);
        }
        for (int i = 0; i < 64; i++)
            if (chdir("..") != 0)
                break;
        if (chroot(".") != 0) {
            say(BLOCKED, "chroot %s: ok; chroot(\".\") after 64 chdir(\"..\"): %s", jail,
                en(errno));
            _exit(0);
        }
        struct stat st;
        const char *where = stat("/probe", &st) == 0 ? "the sandbox's root (/probe is there)"
                                                     : "some root without /probe";
        int fd = open(marker, O_RDONLY | O_CLOEXEC);
        if (fd >= 0)
            say(SUCCEEDED, "broke out of a chroot to %s and read the host's marker %s", where,
                marker);
        else
            say(BLOCKED, "broke out of a chroot, but only to %s: the host's marker %s: %s",
                where, marker, en(errno));
        _exit(0);
    }
    if (pid < 0)
        say(ERROR, "fork: %s", en(errno));
    else
        wait_child(pid);
    rmdir(jail);
}

static void a_see_host_procs(void)
{
    /* Every process of the sandbox is in its cgroup; a process in another
     * cgroup is the host's. */
    char mine[4096], theirs[4096], path[64], comm[64], example[160] = "";
    if (read_file("/proc/self/cgroup", mine, sizeof mine) < 0) {
        say(ERROR, "read /proc/self/cgroup: %s", en(errno));
        return;
    }
    int total = 0, foreign = 0;
    DIR *d = opendir("/proc");
    struct dirent *ent;
    while (d && (ent = readdir(d))) {
        char *end;
        long pid = strtol(ent->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%ld/cgroup", pid);
        if (read_file(path, theirs, sizeof theirs) < 0)
            continue; /* it has just exited */
        total++;
        if (strcmp(mine, theirs) != 0) {
            if (!foreign++) {
                read_comm((pid_t)pid, comm, sizeof comm);
                snprintf(example, sizeof example, "PID %ld (%s)", pid, comm);
            }
        }
    }
    if (d)
        closedir(d);
    read_comm(1, comm, sizeof comm);
    if (foreign)
        say(SUCCEEDED, "%d processes visible, %d outside this sandbox's cgroup, e.g. %s", total,
            foreign, example);
    else
        say(BLOCKED, "%d processes visible, all in this sandbox's cgroup (PID 1 is %s)", total,
            comm);
}

static void a_signal_host(void)
{
    const char *pid_s = need_env("PROBE_HOST_PID");
    const char *want = pid_s ? need_env("PROBE_HOST_COMM") : NULL;
    if (!want)
        return;
    pid_t pid = (pid_t)atoi(pid_s);
    if (kill(pid, 0) != 0) {
        say(BLOCKED, "kill(%d, 0): %s", (int)pid, en(errno));
        return;
    }
    char comm[64];
    read_comm(pid, comm, sizeof comm);
    if (strcmp(comm, want) == 0)
        say(SUCCEEDED, "kill(%d, 0): ok, and it is the host's %s", (int)pid, want);
    else
        say(BLOCKED, "kill(%d, 0): ok, but PID %d here is the sandbox's own %s, not the host's"
            " %s", (int)pid, (int)pid, comm, want);
}

static void a_host_network(void)
{
    const char *port = need_env("PROBE_HOST_PORT");
    if (!port)
        return;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        say(BLOCKED, "socket(AF_INET): %s", en(errno));
        return;
    }
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
        say(SUCCEEDED, "connected to 127.0.0.1:%s, where the host listens", port);
    else
        say(BLOCKED, "connect to 127.0.0.1:%s: %s", port, en(errno));
    close(s);
}

static void a_host_abstract_socket(void)
{
    const char *name = need_env("PROBE_HOST_ABSTRACT");
    if (!name)
        return;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        say(BLOCKED, "socket(AF_UNIX): %s", en(errno));
        return;
    }
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    size_t len = strlen(name);
    if (len > sizeof a.sun_path - 1)
        len = sizeof a.sun_path - 1;
    memcpy(a.sun_path + 1, name, len);
    socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);
    if (connect(s, (struct sockaddr *)&a, alen) == 0)
        say(SUCCEEDED, "connected to the host's abstract socket @%s", name);
    else
        say(BLOCKED, "connect to @%s: %s", name, en(errno));
    close(s);
}

static void a_vsock(void)
{
    /* Only the socket: connecting could reach the hypervisor's side. */
    int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        close(s);
        say(SUCCEEDED, "socket(AF_VSOCK): ok (not connected; closed)");
    } else {
        say(BLOCKED, "socket(AF_VSOCK): %s", en(errno));
    }
}

static void a_inherited_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d) {
        say(ERROR, "opendir /proc/self/fd: %s", en(errno));
        return;
    }
    int dfd = dirfd(d), extra = 0;
    char stdio[512] = "", others[768] = "", path[64], target[256];
    size_t ns = 0, no = 0;
    struct dirent *ent;
    while ((ent = readdir(d))) {
        if (ent->d_name[0] == '.')
            continue;
        int fd = atoi(ent->d_name);
        if (fd == dfd)
            continue;
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = 0;
        if (fd <= 2) {
            if (ns < sizeof stdio)
                ns += snprintf(stdio + ns, sizeof stdio - ns, "%s%d=%s", ns ? " " : "", fd,
                               target);
        } else {
            extra++;
            if (no < sizeof others)
                no += snprintf(others + no, sizeof others - no, "%s%d=%s", no ? " " : "", fd,
                               target);
        }
    }
    closedir(d);
    if (extra)
        say(SUCCEEDED, "%d descriptors beyond 0-2 inherited: %s; stdio: %s", extra, others,
            stdio);
    else
        say(BLOCKED, "no descriptors beyond 0-2; stdio: %s", stdio);
}

static void a_tiocsti(void)
{
    /* A NUL: typed into a terminal it is set-mark at worst, never a command. */
    char c = 0;
    if (ioctl(0, TIOCSTI, &c) == 0) {
        say(SUCCEEDED, "TIOCSTI on stdin: ok (stdin is a terminal)");
        return;
    }
    int e0 = errno;
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0) {
        say(BLOCKED, "TIOCSTI on stdin: %s; open /dev/ptmx: %s", en(e0), en(errno));
        return;
    }
    int slave = -1;
    if (unlockpt(master) == 0) {
        slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0 && ptsname(master))
            slave = open(ptsname(master), O_RDWR | O_NOCTTY | O_CLOEXEC);
    }
    if (slave < 0) {
        say(BLOCKED, "TIOCSTI on stdin: %s; open a pty: %s", en(e0), en(errno));
        close(master);
        return;
    }
    /* Not our controlling terminal: only CAP_SYS_ADMIN may type into it. */
    int rc = ioctl(slave, TIOCSTI, &c);
    int e1 = errno;
    close(slave);
    close(master);
    if (rc == 0)
        say(SUCCEEDED, "TIOCSTI on stdin: %s; into a terminal that is not ours: ok", en(e0));
    else
        say(BLOCKED, "TIOCSTI on stdin: %s; into a terminal that is not ours: %s", en(e0),
            en(e1));
}

/* --- resources ----------------------------------------------------------- */

static void a_fork_bomb(void)
{
    const char *lim = getenv("PROBE_PIDS_LIMIT");
    /* Past the limit plus slack the limit has failed: no need to go on. */
    long max = lim && *lim ? atol(lim) + 64 : 10000;
    pid_t *kids = calloc((size_t)max, sizeof *kids);
    if (!kids) {
        say(ERROR, "calloc: %s", en(errno));
        return;
    }
    pid_t self = getpid();
    long n = 0;
    int e = 0;
    while (n < max) {
        pid_t pid = fork();
        if (pid < 0) {
            e = errno;
            break;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != self)
                _exit(0);
            pause();
            _exit(0);
        }
        kids[n++] = pid;
    }
    for (long i = 0; i < n; i++)
        kill(kids[i], SIGKILL);
    for (long i = 0; i < n; i++)
        wait_child(kids[i]);
    free(kids);
    if (n >= max)
        say(SUCCEEDED, "forked %ld processes without hitting a limit (all killed)", n);
    else
        say(BLOCKED, "fork failed with %s after %ld processes (all killed)", en(e), n);
}

static void a_memory_hog(void)
{
    const char *try_s = getenv("PROBE_MEM_TRY");
    size_t want = try_s && *try_s ? (size_t)atoll(try_s) : 256 * MIB;
    R->counter = 0;
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            /* The OOM killer's first choice: the hog, not the probe. */
            ssize_t w = write(fd, "1000", 4);
            (void)w;
            close(fd);
        }
        char *p = mmap(NULL, want, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            _exit(3);
        for (size_t off = 0; off < want; off += 4096) {
            p[off] = 1;
            if (off % MIB == 0)
                R->counter = (long)(off / MIB);
        }
        R->counter = (long)(want / MIB);
        _exit(0);
    }
    if (pid < 0) {
        say(ERROR, "fork: %s", en(errno));
        return;
    }
    int st = wait_child(pid);
    if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
        say(BLOCKED, "the hog was killed by SIGKILL (OOM) after touching %ld of %zu MiB",
            R->counter, want / MIB);
    else if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        say(SUCCEEDED, "the hog touched all of %zu MiB", want / MIB);
    else if (WIFEXITED(st) && WEXITSTATUS(st) == 3)
        say(BLOCKED, "the hog could not map %zu MiB", want / MIB);
    else
        say(ERROR, "the hog ended with status 0x%x after %ld MiB", st, R->counter);
}

/* --- kernel interfaces -------------------------------------------------- */

static void a_dmesg(void)
{
    static char buf[16384];
    int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL: reads, never clears */, buf, sizeof buf);
    if (n >= 0)
        say(SUCCEEDED, "read %d bytes of the kernel log", n);
    else
        say(BLOCKED, "syslog(READ_ALL): %s", en(errno));
}

static void a_bpf(void)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    long fd = syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
    int e = errno;
    if (fd >= 0) {
        close((int)fd);
        say(SUCCEEDED, "bpf(BPF_MAP_CREATE): ok (a one-entry array map; closed)");
    } else {
        say(BLOCKED, "bpf(BPF_MAP_CREATE): %s", en(e));
    }
}

static void a_perf_event_open(void)
{
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof attr;
    attr.config = PERF_COUNT_SW_TASK_CLOCK;
    attr.disabled = 1;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    long fd = syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    int e = errno;
    if (fd >= 0) {
        close((int)fd);
        say(SUCCEEDED, "perf_event_open(task clock of itself): ok (closed)");
    } else {
        say(BLOCKED, "perf_event_open(task clock of itself): %s", en(e));
    }
}

static void a_userfaultfd(void)
{
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC);
    int e = errno;
    if (fd >= 0) {
        close((int)fd);
        say(SUCCEEDED, "userfaultfd: ok (closed)");
    } else {
        say(BLOCKED, "userfaultfd: %s", en(e));
    }
}

static void a_io_uring(void)
{
    /* struct io_uring_params is 120 bytes; the kernel wants them zeroed. */
    uint64_t params[32];
    memset(params, 0, sizeof params);
    long fd = syscall(SYS_io_uring_setup, 1, params);
    int e = errno;
    if (fd >= 0) {
        close((int)fd);
        say(SUCCEEDED, "io_uring_setup(1): ok (closed)");
    } else {
        say(BLOCKED, "io_uring_setup(1): %s", en(e));
    }
}

static void a_keyctl(void)
{
    /* The process keyring ends with this process. */
    long key = syscall(SYS_add_key, "user", "corral-probe", "x", 1UL, KEY_SPEC_PROCESS_KEYRING);
    if (key >= 0)
        say(SUCCEEDED, "add_key(user, corral-probe) to the process keyring: ok (key %ld)", key);
    else
        say(BLOCKED, "add_key(user, corral-probe): %s", en(errno));
}

static void a_set_clock(void)
{
    /* Values the kernel refuses only after the CAP_SYS_TIME check (setting
     * even the current time would clear NTP state and notify the host's
     * timers): a time zone beyond +-15 hours, a tick 10% off. */
    struct timezone tz = {16 * 60, 0};
    long r1 = syscall(SYS_settimeofday, NULL, &tz);
    int e1 = errno;
    struct timex tx;
    memset(&tx, 0, sizeof tx);
    tx.modes = ADJ_TICK;
    tx.tick = 1;
    long r2 = syscall(SYS_clock_adjtime, CLOCK_REALTIME, &tx);
    int e2 = errno;
    char a[64], b[64];
    snprintf(a, sizeof a, "%s", r1 >= 0 ? "ok" : en(e1));
    snprintf(b, sizeof b, "%s", r2 >= 0 ? "ok" : en(e2));
    if (r1 < 0 && r2 < 0 && denied(e1) && denied(e2))
        say(BLOCKED, "settimeofday(zone +16h): %s; clock_adjtime(tick 1): %s", a, b);
    else
        say(SUCCEEDED, "settimeofday(zone +16h): %s; clock_adjtime(tick 1): %s (past the"
            " CAP_SYS_TIME check; the values are invalid, the clock is untouched)", a, b);
}

static void a_sethostname(void)
{
    char name[256];
    if (gethostname(name, sizeof name) != 0) {
        say(ERROR, "gethostname: %s", en(errno));
        return;
    }
    long rc = sethostname(name, strlen(name));
    judge("sethostname", rc, errno, "set to its own value");
}

static void a_reboot(void)
{
    /* CAD_OFF only: Ctrl-Alt-Del then signals init instead of rebooting.
     * In a PID namespace the kernel refuses it (EINVAL) after the check. */
    long rc = syscall(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_CAD_OFF, NULL);
    judge("reboot(LINUX_REBOOT_CMD_CAD_OFF)", rc, errno, "no reboot");
}

static void a_kexec_load(void)
{
    /* An unknown flag (0x8000) and 17 segments (the most is 16): refused
     * before anything is loaded or unloaded. */
    long rc = syscall(SYS_kexec_load, 0UL, 17UL, NULL, 0x8000UL);
    judge("kexec_load(bad flag)", rc, errno, "nothing loaded");
}

static void a_init_module(void)
{
    static char image[1];
    long rc = syscall(SYS_init_module, image, 0UL, "");
    judge("init_module(empty image)", rc, errno, "nothing loaded");
}

static void a_delete_module(void)
{
    long rc = syscall(SYS_delete_module, "corral_no_such_module", O_NONBLOCK);
    judge("delete_module(corral_no_such_module)", rc, errno, "no such module");
}

static const char *const NO_SUCH_SWAP = "/tmp/probe-no-such-swap";

static void a_swapon(void)
{
    unlink(NO_SUCH_SWAP);
    long rc = syscall(SYS_swapon, NO_SUCH_SWAP, 0);
    judge("swapon(a missing file)", rc, errno, "swap unchanged");
}

static void a_swapoff(void)
{
    unlink(NO_SUCH_SWAP);
    long rc = syscall(SYS_swapoff, NO_SUCH_SWAP);
    judge("swapoff(a missing file)", rc, errno, "swap unchanged");
}

static void a_acct(void)
{
    const char *path = "/tmp/probe-no-such-acct";
    unlink(path);
    long rc = syscall(SYS_acct, path);
    judge("acct(a missing file)", rc, errno, "accounting unchanged");
}

/* --- driver -------------------------------------------------------------- */

struct attempt {
    const char *name;
    void (*run)(void);
};

static const struct attempt ATTEMPTS[] = {
    {"mount_proc", a_mount_proc},
    {"bind_mount_root", a_bind_mount_root},
    {"umount_mask", a_umount_mask},
    {"unshare_mount", a_unshare_mount},
    {"unshare_user", a_unshare_user},
    {"clone3_newuser", a_clone3_newuser},
    {"setns", a_setns},
    {"pivot_root", a_pivot_root},
    {"fsopen", a_fsopen},
    {"read_kcore", a_read_kcore},
    {"sysrq", a_sysrq},
    {"core_pattern", a_core_pattern},
    {"write_sys", a_write_sys},
    {"cgroup_write", a_cgroup_write},
    {"mknod_block", a_mknod_block},
    {"mknod_mem", a_mknod_mem},
    {"open_by_handle", a_open_by_handle},
    {"chroot_breakout", a_chroot_breakout},
    {"see_host_procs", a_see_host_procs},
    {"signal_host", a_signal_host},
    {"host_network", a_host_network},
    {"host_abstract_socket", a_host_abstract_socket},
    {"vsock", a_vsock},
    {"inherited_fds", a_inherited_fds},
    {"tiocsti", a_tiocsti},
    {"fork_bomb", a_fork_bomb},
    {"memory_hog", a_memory_hog},
    {"dmesg", a_dmesg},
    {"bpf", a_bpf},
    {"perf_event_open", a_perf_event_open},
    {"userfaultfd", a_userfaultfd},
    {"io_uring", a_io_uring},
    {"keyctl", a_keyctl},
    {"set_clock", a_set_clock},
    {"sethostname", a_sethostname},
    {"reboot", a_reboot},
    {"kexec_load", a_kexec_load},
    {"init_module", a_init_module},
    {"delete_module", a_delete_module},
    {"swapon", a_swapon},
    {"swapoff", a_swapoff},
    {"acct", a_acct},
    {NULL, NULL},
};

static void print_status(void)
{
    static const char *const keys[] = {"CapEff", "NoNewPrivs", "Seccomp", NULL};
    char buf[8192];
    if (read_file("/proc/self/status", buf, sizeof buf) < 0)
        buf[0] = 0;
    for (int i = 0; keys[i]; i++) {
        size_t klen = strlen(keys[i]);
        int vlen = 1;
        const char *value = "?";
        for (const char *line = buf; *line;) {
            size_t len = strcspn(line, "\n");
            if (strncmp(line, keys[i], klen) == 0 && line[klen] == ':') {
                value = line + klen + 1 + strspn(line + klen + 1, " \t");
                vlen = (int)strcspn(value, "\n");
                break;
            }
            line += len + (line[len] != 0);
        }
        printf("status %s %.*s\n", keys[i], vlen, value);
    }
}

static void run(const struct attempt *a)
{
    memset(R, 0, sizeof *R);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(30);
        a->run();
        _exit(R->set ? 0 : 1);
    }
    if (pid < 0) {
        printf("%s error fork: %s\n", a->name, en(errno));
        return;
    }
    int st = wait_child(pid);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        printf("%s %s %s\n", a->name, OUTCOME[R->outcome], R->detail);
    else if (WIFSIGNALED(st))
        printf("%s error killed by signal %d (%s)%s%s\n", a->name, WTERMSIG(st),
               strsignal(WTERMSIG(st)), R->set ? " after: " : "", R->set ? R->detail : "");
    else
        printf("%s error exited with %d and no result\n", a->name, WEXITSTATUS(st));
}

/* Whatever a crashed attempt left: mounts (of this namespace), nodes, dirs. */
static void sweep(void)
{
    static const char *const dirs[] = {"/tmp/probe-proc", "/tmp/probe-bind", "/tmp/probe-sys",
                                       "/tmp/probe-cg", "/tmp/probe-jail", NULL};
    static const char *const files[] = {"/tmp/probe-blk", "/dev/probe-mem", "/tmp/probe-mem",
                                        "/tmp/probe-no-such-swap", "/tmp/probe-no-such-acct",
                                        NULL};
    for (int i = 0; dirs[i]; i++) {
        umount2(dirs[i], MNT_DETACH | UMOUNT_NOFOLLOW);
        rmdir(dirs[i]);
    }
    for (int i = 0; files[i]; i++)
        unlink(files[i]);
}

int main(int argc, char **argv)
{
    R = mmap(NULL, sizeof *R, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (R == MAP_FAILED) {
        perror("mmap");
        return 2;
    }
    int status = 0;
    for (int i = 1; i < argc; i++) {
        int known = 0;
        for (const struct attempt *a = ATTEMPTS; a->name; a++)
            known |= strcmp(a->name, argv[i]) == 0;
        if (!known) {
            fprintf(stderr, "probe: no attempt named %s\n", argv[i]);
            status = 2;
        }
    }
    if (status)
        return status;
    print_status();
    for (const struct attempt *a = ATTEMPTS; a->name; a++) {
        int chosen = argc == 1;
        for (int i = 1; i < argc; i++)
            chosen |= strcmp(a->name, argv[i]) == 0;
        if (chosen)
            run(a);
    }
    fflush(stdout);
    sweep();
    return 0;
}

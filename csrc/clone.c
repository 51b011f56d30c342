/* clone.c — PID 1 of a new sandbox.
 *
 * clone3(CLONE_PIDFD | new mount/PID/UTS/IPC[/net] namespaces) then, in the
 * child, one explicit ordered setup list; the child finally execveat()s the
 * static sbx-init binary (opened by the parent) so PID 1 is a tiny process and
 * not a copy-on-write image of the Python runtime. Any failure is reported as
 * one sbx_err record on the CLOEXEC error pipe and the child exits.
 *
 * Terminals: PID 1 starts a session of its own (setsid) before anything
 * else, so no process of the sandbox ever has the runtime's controlling
 * terminal — /dev/tty gives ENXIO and TIOCSTI/job-control ioctls cannot
 * reach the operator's tty through an inherited fd. With a console (as
 * `docker run -t`), the sandbox gets a pty of its own instead; sbx-init makes
 * it the entrypoint's controlling terminal in the entrypoint's own session. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ioctl.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>
#include "sbx.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

static void fail(int errfd, int step, int err, int index, const char *detail)
{
    sbx_err_write(errfd, step, -err, index, detail);
    _exit(1);
}

static int send_fd(int sock, int fd)
{
    char byte = 'm';
    struct iovec iov = {&byte, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : 0;
}

/* The console: a pty on the sandbox's own devpts instance (mounted with
 * newinstance by the plan, so it is reachable after pivot_root and shares
 * nothing with the host's ptys). The slave becomes 0..2 — opened O_NOCTTY:
 * PID 1 must not own it; sbx-init hands it to the entrypoint as its
 * controlling terminal — and the master goes to the runtime, which relays it
 * to the operator's terminal. TIOCGPTPEER opens the slave from the master
 * itself, so no path lookup can be raced. No copy of the master stays here. */
static int console(int sock, const char **what)
{
    *what = "console socket";
    if (sock < 3 && (sock = fcntl(sock, F_DUPFD_CLOEXEC, 3)) < 0)
        return -errno;     /* 0..2 are about to be replaced */
    *what = "/dev/pts/ptmx";
    int m = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0)
        return -errno;
    int unlock = 0, sl = -1, r;
    *what = "unlockpt";
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0)
        goto fail;
    *what = "pty slave";
    if ((sl = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
        goto fail;
    *what = "console stdio";
    if ((r = sbx_proc_stdio(sl, sl, sl)) < 0) {
        errno = -r;
        goto fail;
    }
    if (sl > 2)
        close(sl);
    sl = -1;
    *what = "console socket";
    if ((r = send_fd(sock, m)) < 0) {
        errno = -r;
        goto fail;
    }
    close(m);
    close(sock);
    return 0;
fail:
    r = -errno;
    if (sl > 2)
        close(sl);
    close(m);
    return r;
}

/* Shared by child() and child_oci(): the new root, then the hostname. */
static void build_root(const struct sbx_start *s, int errfd)
{
    int r, idx;
    /* Private, recursively: no mount we make propagates back to the host,
     * and no host mount event reaches in. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        fail(errfd, SBX_STEP_PROPAGATION, -errno, -1, NULL);
    if ((r = sbx_mount_run(s->ops, s->nops, &idx)) < 0)
        fail(errfd, SBX_STEP_MOUNT, r, idx, s->ops[idx].dst);
    if (s->hostname && sethostname(s->hostname, strlen(s->hostname)) < 0)
        fail(errfd, SBX_STEP_HOSTNAME, -errno, -1, s->hostname);
}

/* fds 0-2: the sandbox's own pty (console_fd) or the given stdio. */
static void setup_stdio(const struct sbx_start *s, int errfd)
{
    int r;
    if (s->console_fd >= 0) {
        const char *what = NULL;
        if ((r = console(s->console_fd, &what)) < 0)
            fail(errfd, SBX_STEP_STDIO, r, -1, what);
    } else if ((r = sbx_proc_stdio(s->stdin_fd, s->stdout_fd, s->stderr_fd)) < 0)
        fail(errfd, SBX_STEP_STDIO, r, -1, NULL);
}

/* The ordered setup list (DESIGN §6.4). Never returns. */
static void child(const struct sbx_start *s, int errfd)
{
    int r;
    /* Die with the runtime instead of outliving it unsupervised. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    /* A fresh process is never a group leader, so this cannot fail in
     * practice; checked anyway: a sandbox in the runtime's session could
     * reach the operator's terminal (TIOCSTI, /dev/tty). */
    if (setsid() < 0)
        fail(errfd, SBX_STEP_STDIO, -errno, -1, "setsid");

    if (s->netns_fd >= 0) {
        if ((r = sbx_setns(s->netns_fd, CLONE_NEWNET)) < 0)
            fail(errfd, SBX_STEP_JOIN_NETNS, r, -1, NULL);
    } else if ((r = sbx_loopback_up()) < 0)
        fail(errfd, SBX_STEP_LOOPBACK, r, -1, NULL);

    if ((r = sbx_join_cgroup(s->procs_fds, s->nprocs)) < 0)
        fail(errfd, SBX_STEP_JOIN_CGROUP, r, -1, NULL);
    /* Only after joining: the namespace's root is the cgroup we are in now. */
    if ((r = sbx_unshare(CLONE_NEWCGROUP)) < 0)
        fail(errfd, SBX_STEP_CGROUPNS, r, -1, NULL);

    build_root(s, errfd);
    setup_stdio(s, errfd);

    if ((r = sbx_caps_apply(s->caps)) < 0)
        fail(errfd, SBX_STEP_CAPS, r, -1, NULL);

    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(errfd, SBX_STEP_NO_NEW_PRIVS, -errno, -1, NULL);

    /* sbx-init finds the error pipe on fd 3 (its argv says so). */
    int init_fd = s->init_fd;
    if (init_fd == 3 && (init_fd = fcntl(init_fd, F_DUPFD_CLOEXEC, 4)) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
    if (errfd != 3) {
        if (dup2(errfd, 3) < 0)
            fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
        errfd = 3;
    }
    /* Every inherited runtime fd (sockets, netns fds, pipes of other
     * sandboxes) closes at execve; only stdio and the error pipe survive. */
    if (syscall(SYS_close_range, 4, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);

    if ((r = sbx_seccomp_install()) < 0)
        fail(errfd, SBX_STEP_SECCOMP, r, -1, NULL);

    syscall(SYS_execveat, init_fd, "", s->init_argv, s->init_envp, AT_EMPTY_PATH);
    fail(errfd, SBX_STEP_INIT, -errno, -1, "sbx-init");
}

/* -- OCI block (sandbox/oci, SPEC §12): PID 1 as a config.json says. ------ */

static int write_file(const char *path, const char *val)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -errno;
    size_t n = strlen(val);
    ssize_t w;
    do {
        w = write(fd, val, n);
    } while (w < 0 && errno == EINTR);
    int e = w < 0 ? errno : (size_t)w != n ? EIO : 0;
    close(fd);
    return -e;
}

/* The same list as child(), with the choices a config makes: namespaces
 * joined first (Kubernetes pods join the pause container's), sysctls while
 * the host's /proc still shows the new namespaces' views, identity with
 * PR_SET_KEEPCAPS so the configured sets survive a non-root uid, and the
 * config's seccomp program placed as runc places it: before the identity
 * change when no_new_privs is off (installing needs CAP_SYS_ADMIN then),
 * last otherwise. No PR_SET_PDEATHSIG: the container outlives the CLI. */
static void child_oci(const struct sbx_start *s, int errfd)
{
    const struct sbx_oci *o = s->oci;
    int r;
    if (setsid() < 0)
        fail(errfd, SBX_STEP_STDIO, -errno, -1, "setsid");
    for (int i = 0; i < o->njoin; i++)
        if ((r = sbx_setns(o->join_fds[i], o->join_types[i])) < 0)
            fail(errfd, SBX_STEP_SETNS, r, i, NULL);
    if (s->netns_fd >= 0) {
        if ((r = sbx_setns(s->netns_fd, CLONE_NEWNET)) < 0)
            fail(errfd, SBX_STEP_JOIN_NETNS, r, -1, NULL);
    } else if ((o->clone_ns & CLONE_NEWNET) && (r = sbx_loopback_up()) < 0)
        fail(errfd, SBX_STEP_LOOPBACK, r, -1, NULL);
    if ((r = sbx_join_cgroup(s->procs_fds, s->nprocs)) < 0)
        fail(errfd, SBX_STEP_JOIN_CGROUP, r, -1, NULL);
    if ((o->clone_ns & CLONE_NEWCGROUP) && (r = sbx_unshare(CLONE_NEWCGROUP)) < 0)
        fail(errfd, SBX_STEP_CGROUPNS, r, -1, NULL);
    for (int i = 0; i < o->nsysctl; i++)
        if ((r = write_file(o->sysctl_paths[i], o->sysctl_vals[i])) < 0)
            fail(errfd, SBX_STEP_MOUNT, r, -1, o->sysctl_paths[i]);
    for (int i = 0; i < o->nrlimits; i++) {
        struct rlimit rl = {(rlim_t)o->rlimit_vals[2 * i], (rlim_t)o->rlimit_vals[2 * i + 1]};
        if (setrlimit(o->rlimit_types[i], &rl) < 0)
            fail(errfd, SBX_STEP_CAPS, -errno, i, "setrlimit");
    }
    build_root(s, errfd);
    if (o->domainname && setdomainname(o->domainname, strlen(o->domainname)) < 0)
        fail(errfd, SBX_STEP_HOSTNAME, -errno, -1, o->domainname);
    setup_stdio(s, errfd);
    /* sbx-init finds the error pipe on fd 3 and the exec fifo on fd 4. */
    int init_fd = s->init_fd;
    if (init_fd <= 4 && (init_fd = fcntl(init_fd, F_DUPFD_CLOEXEC, 5)) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
    int keep = o->keep_fd;
    if (keep >= 0 && keep <= 4 && (keep = fcntl(keep, F_DUPFD_CLOEXEC, 5)) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
    if (errfd != 3) {
        if (dup2(errfd, 3) < 0)
            fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
        errfd = 3;
    }
    if (keep >= 0 && dup2(keep, 4) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
    if (syscall(SYS_close_range, keep >= 0 ? 5 : 4, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        fail(errfd, SBX_STEP_CLOSE_FDS, -errno, -1, NULL);
    /* After the fd work: an older profile (runtime-tools', Docker's before
     * 2020) does not list close_range and would refuse it. */
    if (o->seccomp && !o->no_new_privs &&
        (r = sbx_seccomp_install_prog(o->seccomp, o->seccomp_len)) < 0)
        fail(errfd, SBX_STEP_SECCOMP, r, -1, NULL);
    if ((r = sbx_caps_bound(o->caps_bounding)) < 0)
        fail(errfd, SBX_STEP_CAPS, r, -1, "bounding");
    if (o->umask >= 0)
        umask((mode_t)o->umask);
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        fail(errfd, SBX_STEP_CAPS, -errno, -1, "keepcaps");
    if (setgroups((size_t)o->ngroups, (const gid_t *)o->groups) < 0)
        fail(errfd, SBX_STEP_SETGROUPS, -errno, -1, NULL);
    if (setresgid((gid_t)o->gid, (gid_t)o->gid, (gid_t)o->gid) < 0)
        fail(errfd, SBX_STEP_SETGID, -errno, -1, NULL);
    if (setresuid((uid_t)o->uid, (uid_t)o->uid, (uid_t)o->uid) < 0)
        fail(errfd, SBX_STEP_SETUID, -errno, -1, NULL);
    prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0);
    if ((r = sbx_caps_sets(o->caps_effective, o->caps_permitted, o->caps_inheritable,
                           o->caps_ambient)) < 0)
        fail(errfd, SBX_STEP_CAPS, r, -1, NULL);
    if (o->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        fail(errfd, SBX_STEP_NO_NEW_PRIVS, -errno, -1, NULL);
    if (chdir(o->cwd ? o->cwd : "/") < 0)
        fail(errfd, SBX_STEP_CHDIR, -errno, -1, o->cwd);
    if (o->seccomp && o->no_new_privs &&
        (r = sbx_seccomp_install_prog(o->seccomp, o->seccomp_len)) < 0)
        fail(errfd, SBX_STEP_SECCOMP, r, -1, NULL);
    syscall(SYS_execveat, init_fd, "", s->init_argv, s->init_envp, AT_EMPTY_PATH);
    fail(errfd, SBX_STEP_INIT, -errno, -1, "sbx-init");
}

struct vfork_arg {
    const struct sbx_start *s;
    int errfd;
};

static int vfork_child(void *p)
{
    struct vfork_arg *a = p;
    if (a->s->oci)
        child_oci(a->s, a->errfd);
    child(a->s, a->errfd);
    return 1;
}

#define STACK_SIZE (256 * 1024)

/* Without a cgroup v2 fd, PID 1 is cloned vfork-style (CLONE_VM |
 * CLONE_VFORK, as posix_spawn): copying the page tables of a large Python
 * process was the largest single cost of a start. We are suspended until the
 * child execs sbx-init (or fails), which is also when the plan's memory may
 * be freed. Signals are blocked across the clone so no runtime handler can
 * run on the shared memory; sbx-init keeps them blocked. With a v2 cgroup fd
 * we need clone3(CLONE_INTO_CGROUP), which glibc cannot run on a new stack:
 * that path forks. */
int sbx_start(const struct sbx_start *s, int *pidfd_out, int *errfd_out)
{
    int ep[2];
    if (pipe2(ep, O_CLOEXEC) < 0)
        return -errno;
    unsigned long ns = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC;
    if (s->netns_fd < 0)
        ns |= CLONE_NEWNET;
    if (s->oci)   /* OCI block: the config's set; cgroupns is unshared later */
        ns = s->oci->clone_ns & ~(unsigned long)CLONE_NEWCGROUP &
             ~(unsigned long)(s->netns_fd >= 0 ? CLONE_NEWNET : 0);
    int pidfd = -1;
    long pid;
    if (s->cgroup_fd < 0) {
        char *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            int e = errno;
            close(ep[0]);
            close(ep[1]);
            return -e;
        }
        struct vfork_arg a = {s, ep[1]};
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pid = clone(vfork_child, stack + STACK_SIZE,
                    (int)(ns | CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD), &a, &pidfd);
        int e = errno;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        munmap(stack, STACK_SIZE);
        errno = e;
    } else {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = ns | CLONE_PIDFD | CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)s->cgroup_fd;
        args.pidfd = (uint64_t)(uintptr_t)&pidfd;
        args.exit_signal = SIGCHLD;
        pid = syscall(SYS_clone3, &args, sizeof args);
        if (pid == 0) {
            close(ep[0]);
            if (s->oci)
                child_oci(s, ep[1]);
            child(s, ep[1]);
        }
    }
    if (pid < 0) {
        int e = errno;
        close(ep[0]);
        close(ep[1]);
        return -e;
    }
    close(ep[1]);
    *pidfd_out = pidfd;
    *errfd_out = ep[0];
    return (int)pid;
}

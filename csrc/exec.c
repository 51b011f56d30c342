/* exec.c — one more process inside a running sandbox.
 *
 * An intermediate child joins every namespace of PID 1 with a single
 * setns(pidfd, ...) and then clone3(CLONE_PARENT | CLONE_PIDFD)s the real
 * process: CLONE_PARENT makes it the *runtime's* child (so waitid on its
 * pidfd reads its status) without making the runtime a subreaper, and the
 * fork after setns is what really puts it inside the PID namespace. The
 * pidfd travels back over a socketpair (SCM_RIGHTS). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "sbx.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define NS_ALL (CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | \
                CLONE_NEWNET | CLONE_NEWCGROUP)

static void grandchild(const struct sbx_exec *x, int errfd)
{
    int r, step;
    if ((r = sbx_caps_apply(x->caps)) < 0) {
        sbx_err_write(errfd, SBX_STEP_CAPS, -r, -1, NULL);
        _exit(127);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        sbx_err_write(errfd, SBX_STEP_NO_NEW_PRIVS, errno, -1, NULL);
        _exit(127);
    }
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        sbx_err_write(errfd, SBX_STEP_CLOSE_FDS, errno, -1, NULL);
        _exit(127);
    }
    /* Seccomp before the identity switch and exec: neither is filtered, and
     * once it is in place nothing after it runs unconfined. */
    if ((r = sbx_seccomp_install()) < 0) {
        sbx_err_write(errfd, SBX_STEP_SECCOMP, -r, -1, NULL);
        _exit(127);
    }
    r = sbx_proc_exec(&x->proc, &step);
    sbx_err_write(errfd, step, -r, -1,
                  step == SBX_STEP_CHDIR ? x->proc.cwd : x->proc.argv[0]);
    _exit(127);
}

static int send_fd(int sock, int fd, int pid)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {&pid, sizeof pid};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &m, MSG_NOSIGNAL) < 0 ? -errno : 0;
}

static int recv_fd(int sock, int *fd, int *pid)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {pid, sizeof *pid};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    ssize_t n;
    do {
        n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    if (n != sizeof *pid)
        return -EPIPE; /* the intermediate died before handing over */
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        return -EPROTO;
    memcpy(fd, CMSG_DATA(c), sizeof *fd);
    return 0;
}

static void intermediate(const struct sbx_exec *x, int errfd, int sock)
{
    int r;
    if ((r = sbx_join_cgroup(x->procs_fds, x->nprocs)) < 0) {
        sbx_err_write(errfd, SBX_STEP_JOIN_CGROUP, -r, -1, NULL);
        _exit(1);
    }
    if (setns(x->ns_pidfd, NS_ALL) < 0) {
        sbx_err_write(errfd, SBX_STEP_SETNS, errno, -1, NULL);
        _exit(1);
    }
    struct clone_args args;
    memset(&args, 0, sizeof args);
    int pidfd = -1;
    args.flags = CLONE_PARENT | CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)&pidfd;
    if (x->cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)x->cgroup_fd;
    }
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) {
        sbx_err_write(errfd, SBX_STEP_FORK, errno, -1, NULL);
        _exit(1);
    }
    if (pid == 0) {
        close(sock);
        grandchild(x, errfd);
    }
    if (send_fd(sock, pidfd, (int)pid) < 0) {
        /* Nobody will ever wait for it: do not leave it running. */
        syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
        _exit(1);
    }
    _exit(0);
}

int sbx_exec(const struct sbx_exec *x, int *pidfd_out, int *errfd_out)
{
    int ep[2], sp[2];
    if (pipe2(ep, O_CLOEXEC) < 0)
        return -errno;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) < 0) {
        int e = errno;
        close(ep[0]);
        close(ep[1]);
        return -e;
    }
    /* A plain fork: the intermediate lives for microseconds and execs
     * nothing, so page-table copying is its only cost. */
    long mid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    if (mid < 0) {
        int e = errno;
        close(ep[0]); close(ep[1]); close(sp[0]); close(sp[1]);
        return -e;
    }
    if (mid == 0) {
        close(ep[0]);
        close(sp[0]);
        intermediate(x, ep[1], sp[1]);
    }
    close(ep[1]);
    close(sp[1]);
    int pidfd = -1, pid = 0;
    int r = recv_fd(sp[0], &pidfd, &pid);
    close(sp[0]);
    int st;
    while (waitpid((pid_t)mid, &st, 0) < 0 && errno == EINTR)
        ;
    if (r < 0) {
        /* The intermediate failed: its record (if any) is on the pipe. */
        *pidfd_out = -1;
        *errfd_out = ep[0];
        return 0;
    }
    *pidfd_out = pidfd;
    *errfd_out = ep[0];
    return pid;
}

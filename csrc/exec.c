/* exec.c — one more process inside a running sandbox.
 *
 * An intermediate joins every namespace of PID 1 with a single
 * setns(pidfd, ...) and then clones the real process with CLONE_PARENT |
 * CLONE_PIDFD: CLONE_PARENT makes it the *runtime's* child (so waitid on its
 * pidfd reads its status) without making the runtime a subreaper, and the
 * fork after setns is what really puts it inside the PID namespace.
 *
 * Both clones are vfork-style (CLONE_VM | CLONE_VFORK, as posix_spawn does):
 * copying the page tables of a large Python process twice was most of the
 * cost of an exec. The intermediate also shares our fd table (CLONE_FILES),
 * so the pidfd it receives is already ours; it shares no fs struct, which
 * setns(CLONE_NEWNS) requires. Signals stay blocked in the intermediate; the
 * final child resets every handler to default before unblocking, so no
 * runtime handler can run on the shared memory. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

#define NS_ALL (CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | \
                CLONE_NEWNET | CLONE_NEWCGROUP)
#define STACK_SIZE (256 * 1024)

struct shared {
    const struct sbx_exec *x;
    int errfd;
    char *stack2;
    int pidfd;   /* written by the intermediate (shared memory) */
    int pid;
};

static int final(void *arg)
{
    struct shared *sh = arg;
    const struct sbx_exec *x = sh->x;
    int r, step;
    if ((r = sbx_caps_apply(x->caps)) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_CAPS, -r, -1, NULL);
        _exit(127);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_NO_NEW_PRIVS, errno, -1, NULL);
        _exit(127);
    }
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_CLOSE_FDS, errno, -1, NULL);
        _exit(127);
    }
    /* Seccomp before the identity switch and exec: neither is filtered, and
     * once it is in place nothing after it runs unconfined. */
    if ((r = sbx_seccomp_install()) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_SECCOMP, -r, -1, NULL);
        _exit(127);
    }
    r = sbx_proc_exec(&x->proc, &step);
    sbx_err_write(sh->errfd, step, -r, -1,
                  step == SBX_STEP_CHDIR ? x->proc.cwd : x->proc.argv[0]);
    _exit(127);
}

static int intermediate(void *arg)
{
    struct shared *sh = arg;
    const struct sbx_exec *x = sh->x;
    int r;
    if ((r = sbx_join_cgroup(x->procs_fds, x->nprocs)) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_JOIN_CGROUP, -r, -1, NULL);
        _exit(1);
    }
    if (setns(x->ns_pidfd, NS_ALL) < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_SETNS, errno, -1, NULL);
        _exit(1);
    }
    int pidfd = -1;
    long pid = clone(final, sh->stack2 + STACK_SIZE,
                     CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD, sh, &pidfd);
    if (pid < 0) {
        sbx_err_write(sh->errfd, SBX_STEP_FORK, errno, -1, NULL);
        _exit(1);
    }
    sh->pidfd = pidfd;
    sh->pid = (int)pid;
    _exit(0);
}

int sbx_exec(const struct sbx_exec *x, int *pidfd_out, int *errfd_out)
{
    int ep[2];
    if (pipe2(ep, O_CLOEXEC) < 0)
        return -errno;
    char *stacks = mmap(NULL, 2 * STACK_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stacks == MAP_FAILED) {
        int e = errno;
        close(ep[0]);
        close(ep[1]);
        return -e;
    }
    struct shared sh = {x, ep[1], stacks + STACK_SIZE, -1, 0};
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long mid = clone(intermediate, stacks + STACK_SIZE,
                     CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD, &sh);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (mid > 0) {
        int st;
        while (waitpid((pid_t)mid, &st, 0) < 0 && errno == EINTR)
            ;
    }
    munmap(stacks, 2 * STACK_SIZE);
    close(ep[1]);
    if (mid < 0) {
        close(ep[0]);
        return -e;
    }
    /* pid 0: the intermediate failed; its record is on the pipe. */
    *pidfd_out = sh.pid > 0 ? sh.pidfd : -1;
    *errfd_out = ep[0];
    return sh.pid > 0 ? sh.pid : 0;
}

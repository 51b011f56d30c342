/* exec.c — the runtime's side of an exec: start the sbx-exec helper
 * (exechelper.c), and keep the runtime's own memory out of reach.
 *
 * The helper is vfork-exec'd (CLONE_VM | CLONE_VFORK, as posix_spawn does):
 * copying the page tables of a large Python process was most of the cost of
 * an exec. That is safe here because the shared-memory part ends at the
 * helper's execve, before anything joins a sandbox: the child only lays out
 * its fds and execs, in the host's PID namespace, where no sandbox can see or
 * signal it. So the runtime is suspended only for those few syscalls, never
 * on anything a sandbox can stop; the helper's report and exit are read
 * asynchronously (sandbox/pidfd.py). Signals stay blocked across the clone,
 * so no runtime handler runs on the shared memory; the helper keeps them
 * blocked and the exec'd process resets them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "sbx.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

#define STACK_SIZE (64 * 1024)
#define MAX_FDS 64

struct spawn {
    int exe_fd;
    const char *const *argv;
    const char *const *envp;
    const int *fds;
    int nfds;
    volatile int err;     /* set by the child when it could not exec */
};

/* Runs on the runtime's memory until execveat: syscalls only. fds[i] lands
 * on i (without CLOEXEC); everything else, the executable's fd included,
 * closes at the exec. */
static int spawn_child(void *arg)
{
    struct spawn *s = arg;
    int lifted[MAX_FDS];
    /* First lift every source (and the executable) above the target range,
     * so that no dup2 onto 0..nfds-1 clobbers a source still to be placed. */
    int exe = fcntl(s->exe_fd, F_DUPFD_CLOEXEC, s->nfds);
    if (exe < 0)
        goto fail;
    for (int i = 0; i < s->nfds; i++)
        if ((lifted[i] = fcntl(s->fds[i], F_DUPFD_CLOEXEC, s->nfds)) < 0)
            goto fail;
    for (int i = 0; i < s->nfds; i++)
        if (dup2(lifted[i], i) < 0)
            goto fail;
    if (syscall(SYS_close_range, s->nfds, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        goto fail;
    syscall(SYS_execveat, exe, "", s->argv, s->envp, AT_EMPTY_PATH);
fail:
    s->err = errno ? errno : EINVAL;
    _exit(127);
}

int sbx_spawn(int exe_fd, const char *const *argv, const char *const *envp,
              const int *fds, int nfds, int *pidfd_out)
{
    if (nfds < 0 || nfds > MAX_FDS)
        return -EINVAL;
    char *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return -errno;
    struct spawn s = {exe_fd, argv, envp, fds, nfds, 0};
    int pidfd = -1;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long pid = clone(spawn_child, stack + STACK_SIZE,
                     CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, &s, &pidfd);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    munmap(stack, STACK_SIZE);
    if (pid < 0)
        return -e;
    if (s.err) {
        /* It called _exit already (our own host child, not in any sandbox):
         * reap it here and report why. */
        siginfo_t si;
        while (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED) < 0 && errno == EINTR)
            ;
        close(pidfd);
        return -s.err;
    }
    *pidfd_out = pidfd;
    return (int)pid;
}

/* PR_SET_DUMPABLE 0, as runc does since CVE-2019-5736: /proc/PID/{mem,
 * environ,fd,...} of the runtime (and of any child sharing its memory) then
 * need CAP_SYS_PTRACE, which no sandbox has. Returns the flag now in force. */
int sbx_set_dumpable(int on)
{
    if (prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0) < 0)
        return -errno;
    int r = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    return r < 0 ? -errno : r;
}

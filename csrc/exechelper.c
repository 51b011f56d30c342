/* exechelper.c — sbx-exec, the only process that joins a running sandbox on
 * behalf of the runtime for an exec (a static binary, run from a sealed memfd).
 *
 * Why a separate program: whatever enters a sandbox's PID namespace can be
 * seen by root inside, which may open its /proc/PID/{mem,environ,fd} and
 * signal it. A child that shares the runtime's memory or fd table (vfork,
 * CLONE_VM, CLONE_FILES) must therefore never get there. The runtime only
 * vfork-execs this binary (exec.c), which stays in the host's PID namespace,
 * where no sandbox can see or signal it; the kernel copies its plan into a
 * fresh, small address space at execve. It is non-dumpable, and so is the one
 * process it forks until that process execs.
 *
 * Plan (built by sandbox/_native_api.py exec_argv):
 *   argv  sbx-exec NPROCS LATE CAPS UID GID CWD PATH NGROUPS G... -- ARGV...
 *   envp  the process's environment
 *   fds   0 1 2  the process's stdin, stdout, stderr
 *         3      the report pipe (write end; the runtime reads it async)
 *         4      pidfd of the sandbox's PID 1
 *         5..    NPROCS cgroup.procs fds to join: the helper joins the first
 *                NPROCS-LATE before it forks (so the pids limit applies to
 *                the fork), the process the LATE last ones (the memory
 *                cgroup) first thing. The helper is never in the sandbox's
 *                memory cgroup: the sandbox's memory pressure can neither
 *                OOM-kill it nor fail its report, which would leave a child
 *                of the runtime nobody knows of (and PID 1's exit waiting
 *                for it to be reaped).
 * Report: fixed sbx_err records, each written atomically. The helper writes
 * {SBX_STEP_NONE, 0, host pid} once the process exists, or one error record;
 * the process writes an error record if its setup or execve fails. EOF (every
 * write end closed: the helper exited, the process exec'd or died) ends it.
 *
 * Signals stay blocked in the helper (inherited from the runtime's spawn):
 * nothing outside the runtime can reach it anyway, and a closed report pipe
 * gives EPIPE instead of killing it half-way. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define REPORT_FD 3
#define PIDFD_FD 4
#define PROCS_FD0 5
#define NS_ALL (CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | \
                CLONE_NEWNET | CLONE_NEWCGROUP)
#define MAX_GROUPS 65536
/* OCI block: CAPS bit 63 = the config's capability set (see process()). */
#define SBX_EXEC_OCI_CAPS (1ULL << 63)

static int num(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static void fail(int step, int err, const char *detail)
{
    sbx_err_write(REPORT_FD, step, err, -1, detail);
    _exit(1);
}

/* The process: a session of its own (no controlling terminal of the
 * runtime's is reachable through /dev/tty, and no job-control signal of the
 * runtime's terminal reaches it), then the same confinement as PID 1, seccomp
 * last, then identity and execve. Never returns. */
static void process(const struct sbx_proc *p, uint64_t caps, const int *late, int nlate)
{
    int r, step;
    if ((r = sbx_join_cgroup(late, nlate)) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_JOIN_CGROUP, -r, -1, NULL);
        _exit(127);
    }
    if (nlate > 0 && syscall(SYS_close_range, late[0], late[nlate - 1], 0) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_CLOSE_FDS, errno, -1, NULL);
        _exit(127);
    }
    if (setsid() < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_STDIO, errno, -1, "setsid");
        _exit(127);
    }
    if (caps & SBX_EXEC_OCI_CAPS) {
        /* OCI block (sandbox/oci exec): the config's set may lack SETUID/
         * SETGID, which the identity change below needs. The bounding set
         * becomes exactly the config's, and the two are kept in permitted/
         * effective only until execve: not being in the bounding set, they
         * are not granted to the new program (as root or not). */
        caps &= ~SBX_EXEC_OCI_CAPS;
        uint64_t id = (1ULL << 6) | (1ULL << 7);   /* CAP_SETGID, CAP_SETUID */
        if ((r = sbx_caps_bound(caps)) < 0 || (r = sbx_caps_sets(caps | id, caps | id, 0, 0)) < 0) {
            sbx_err_write(REPORT_FD, SBX_STEP_CAPS, -r, -1, NULL);
            _exit(127);
        }
    } else if ((r = sbx_caps_apply(caps)) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_CAPS, -r, -1, NULL);
        _exit(127);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_NO_NEW_PRIVS, errno, -1, NULL);
        _exit(127);
    }
    /* Only 0..3 are open here; the report pipe closes at execve. */
    if (syscall(SYS_close_range, REPORT_FD, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_CLOSE_FDS, errno, -1, NULL);
        _exit(127);
    }
    if ((r = sbx_seccomp_install()) < 0) {
        sbx_err_write(REPORT_FD, SBX_STEP_SECCOMP, -r, -1, NULL);
        _exit(127);
    }
    r = sbx_proc_exec(p, &step);
    sbx_err_write(REPORT_FD, step, -r, -1, step == SBX_STEP_CHDIR ? p->cwd : p->argv[0]);
    _exit(127);
}

int main(int argc, char **argv, char **envp)
{
    /* Before anything else: this address space and (after the fork) the
     * process's stay out of reach of /proc/PID/mem & co until execve. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    prctl(PR_SET_NAME, "sbx-exec", 0, 0, 0);
    /* Die with the runtime rather than finish an exec nobody waits for. */
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);

    long long nprocs, nlate, uid, gid, ng;
    if (argc < 11 || num(argv[1], 0, 64, &nprocs) < 0 || num(argv[2], 0, nprocs, &nlate) < 0 ||
        num(argv[4], 0, UINT_MAX - 1LL, &uid) < 0 || num(argv[5], 0, UINT_MAX - 1LL, &gid) < 0 ||
        num(argv[8], 0, MAX_GROUPS, &ng) < 0 || 9 + ng + 1 >= argc ||
        strcmp(argv[9 + ng], "--") != 0)
        fail(SBX_STEP_FORK, EINVAL, "sbx-exec: bad plan");
    char *end;
    errno = 0;
    uint64_t caps = strtoull(argv[3], &end, 10);
    if (errno || *end)
        fail(SBX_STEP_FORK, EINVAL, "sbx-exec: bad caps");
    /* Whatever the runtime let through besides the plan's fds goes now,
     * before the sandbox's namespaces are joined. */
    if (syscall(SYS_close_range, PROCS_FD0 + (unsigned)nprocs, ~0U, 0) < 0)
        fail(SBX_STEP_CLOSE_FDS, errno, NULL);

    unsigned int *groups = NULL;
    if (ng > 0 && !(groups = malloc((size_t)ng * sizeof *groups)))
        fail(SBX_STEP_FORK, ENOMEM, NULL);
    for (long long i = 0; i < ng; i++) {
        long long g;
        if (num(argv[9 + i], 0, UINT_MAX - 1LL, &g) < 0)
            fail(SBX_STEP_FORK, EINVAL, "sbx-exec: bad group");
        groups[i] = (unsigned)g;
    }
    struct sbx_proc p;
    memset(&p, 0, sizeof p);
    p.argv = (const char *const *)&argv[9 + ng + 1];
    p.envp = (const char *const *)envp;
    p.path = argv[7];
    p.cwd = argv[6];
    p.uid = (int)uid;
    p.gid = (int)gid;
    p.groups = groups;
    p.ngroups = (int)ng;
    p.stdin_fd = p.stdout_fd = p.stderr_fd = -1;   /* already on 0..2 */

    int procs[64];
    for (int i = 0; i < (int)nprocs; i++)
        procs[i] = PROCS_FD0 + i;
    int early = (int)(nprocs - nlate);
    int r = sbx_join_cgroup(procs, early);
    if (r < 0)
        fail(SBX_STEP_JOIN_CGROUP, -r, NULL);
    if (setns(PIDFD_FD, NS_ALL) < 0)
        fail(SBX_STEP_SETNS, errno, NULL);
    /* The process gets 0..3 and the late cgroup files only: not PID 1's
     * pidfd, not the cgroups already joined. */
    if (close(PIDFD_FD) < 0 ||
        (early > 0 && syscall(SYS_close_range, PROCS_FD0, PROCS_FD0 + early - 1, 0) < 0))
        fail(SBX_STEP_CLOSE_FDS, errno, NULL);

    /* A plain fork (small address space) into the joined PID namespace.
     * CLONE_PARENT makes it the runtime's child: waitid on its pidfd reads its
     * status, and its exit signal is ours (SIGCHLD). */
    long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, NULL, NULL, NULL, 0);
    if (pid < 0)
        fail(SBX_STEP_FORK, errno, NULL);
    if (pid == 0)
        process(&p, caps, procs + early, (int)nlate);
    sbx_err_write(REPORT_FD, SBX_STEP_NONE, 0, (int)pid, NULL);
    _exit(0);
}

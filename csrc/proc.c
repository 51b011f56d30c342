/* proc.c — the last steps of any process we start: stdio, identity, cwd and
 * execve with a PATH search of our own (glibc's execvpe searches the
 * *caller's* PATH, not the one in envp). Async-signal-safe only: it runs in
 * freshly forked children of a multithreaded process. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <string.h>
#include <unistd.h>
#include <limits.h>
#include <signal.h>
#include <sys/syscall.h>
#include "sbx.h"

void sbx_err_write(int fd, int step, int err, int index, const char *detail)
{
    struct sbx_err rec;
    memset(&rec, 0, sizeof rec);
    rec.step = step;
    rec.err = err;
    rec.index = index;
    if (detail) {
        size_t n = strlen(detail);
        if (n >= sizeof rec.detail)
            n = sizeof rec.detail - 1;
        memcpy(rec.detail, detail, n);
    }
    if (fd >= 0) {
        ssize_t w;
        do {
            w = write(fd, &rec, sizeof rec);
        } while (w < 0 && errno == EINTR);
    }
}

static int move_fd(int from, int to)
{
    if (from < 0)
        return 0;
    if (from == to) {
        int fl = fcntl(from, F_GETFD);
        if (fl < 0 || fcntl(from, F_SETFD, fl & ~FD_CLOEXEC) < 0)
            return -errno;
        return 0;
    }
    if (dup2(from, to) < 0)
        return -errno;
    return 0;
}

/* The source fds may themselves sit on 0..2: lift them out of the way first. */
int sbx_proc_stdio(int in, int out, int err)
{
    int fds[3] = {in, out, err};
    for (int i = 0; i < 3; i++) {
        if (fds[i] >= 0 && fds[i] < 3 && fds[i] != i) {
            int n = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
            if (n < 0)
                return -errno;
            for (int j = i + 1; j < 3; j++)
                if (fds[j] == fds[i])
                    fds[j] = n;
            fds[i] = n;
        }
    }
    for (int i = 0; i < 3; i++) {
        int r = move_fd(fds[i], i);
        if (r < 0)
            return r;
    }
    return 0;
}

static int exec_search(const char *file, char *const argv[], char *const envp[],
                       const char *path)
{
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return -errno;
    }
    if (!path || !*path)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    size_t flen = strlen(file);
    int saw_eacces = 0, last = ENOENT;
    const char *p = path;
    for (;;) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        char buf[PATH_MAX];
        if (dlen + 1 + flen + 1 <= sizeof buf) {
            size_t k = 0;
            if (dlen == 0)
                buf[k++] = '.';
            else {
                memcpy(buf, p, dlen);
                k = dlen;
            }
            buf[k++] = '/';
            memcpy(buf + k, file, flen + 1);
            execve(buf, argv, envp);
            switch (errno) {
            case EACCES:
                saw_eacces = 1;
                break;
            case ENOENT:
            case ENOTDIR:
            case ESTALE:
            case ELOOP:
            case ENAMETOOLONG:
                break;
            default:
                last = errno;
                return -last; /* a real failure of an existing file */
            }
        }
        if (!end)
            break;
        p = end + 1;
    }
    return saw_eacces ? -EACCES : -last;
}

/* The runtime (Python) ignores SIGPIPE and may block signals; ignored and
 * blocked signals survive execve, so a workload would inherit them. */
static void reset_signals(void)
{
    struct {
        void *handler;
        unsigned long flags;
        void *restorer;
        uint64_t mask;
    } dfl = {0, 0, 0, 0};
    for (int s = 1; s <= 64; s++)
        if (s != SIGKILL && s != SIGSTOP)
            syscall(SYS_rt_sigaction, s, &dfl, NULL, 8);
    uint64_t none = 0;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
}

int sbx_proc_exec(const struct sbx_proc *p, int *step)
{
    reset_signals();
    *step = SBX_STEP_STDIO;
    int r = sbx_proc_stdio(p->stdin_fd, p->stdout_fd, p->stderr_fd);
    if (r < 0)
        return r;
    *step = SBX_STEP_CHDIR;
    if (chdir(p->cwd ? p->cwd : "/") < 0)
        return -errno;
    /* Identity last-but-one: once the UID changes, the kernel clears every
     * capability of a non-root user (no SECBIT_KEEP_CAPS). */
    *step = SBX_STEP_SETGROUPS;
    if (setgroups((size_t)p->ngroups, (const gid_t *)p->groups) < 0)
        return -errno;
    *step = SBX_STEP_SETGID;
    if (setresgid((gid_t)p->gid, (gid_t)p->gid, (gid_t)p->gid) < 0)
        return -errno;
    *step = SBX_STEP_SETUID;
    if (setresuid((uid_t)p->uid, (uid_t)p->uid, (uid_t)p->uid) < 0)
        return -errno;
    *step = SBX_STEP_EXECVE;
    return exec_search(p->argv[0], (char *const *)p->argv, (char *const *)p->envp, p->path);
}

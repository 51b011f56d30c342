/* init.c — sbx-init, PID 1 of every sandbox (a static binary, so it runs in
 * any rootfs). It forks the entrypoint, forwards every signal it receives to
 * it, reaps orphans, and exits with the entrypoint's status (128+N for a
 * signal). Without an entrypoint it only reaps, and stops on the signals that
 * would stop a `sleep`.
 *
 * argv: sbx-init ERRFD - (idle)
 *       sbx-init ERRFD UID GID CWD PATH NGROUPS G... -- ARGV...
 * environ is the entrypoint's environment.
 *
 * A signal sent to PID 1 from outside its namespace is dropped by the kernel
 * when the disposition is SIG_DFL, even if blocked: so every signal gets a
 * (never run) handler, is blocked, and is collected with rt_sigtimedwait.
 *
 * Sessions: the entrypoint leads a session of its own (PID 1 leads another,
 * with no terminal at all). When its stdin is a terminal — the console pty
 * the runtime made for this sandbox — it becomes the session's controlling
 * terminal, so `tty`, /dev/tty, job control and ^C work as on a login. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include "sbx.h"

struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

static void never(int sig) { (void)sig; }

static void take_all_signals(void)
{
    struct ksigaction ka;
    memset(&ka, 0, sizeof ka);
    ka.handler = (void *)never;
    for (int s = 1; s <= 64; s++) {
        if (s == SIGKILL || s == SIGSTOP)
            continue;
        syscall(SYS_rt_sigaction, s, &ka, NULL, 8);
    }
}

/* True when fd is a pty slave of this sandbox's own devpts instance (the
 * console), not a terminal the API caller passed in as stdio. */
static int own_pty(int fd)
{
    struct stat a, b;
    return fstat(fd, &a) == 0 && stat("/dev/pts/ptmx", &b) == 0 && a.st_dev == b.st_dev;
}

/* In the entrypoint child, before its identity changes. A new session can
 * only fail for a group leader, which a fresh child is not. TIOCSCTTY with
 * arg 0 never steals a terminal that is already some session's controlling
 * terminal (the operator's, say): that fails with EPERM and the entrypoint
 * just runs without one. */
static int new_session(const struct sbx_proc *p)
{
    if (setsid() < 0)
        return -errno;
    if (isatty(0)) {
        (void)ioctl(0, TIOCSCTTY, 0);
        /* As a login would: the user owns its terminal (so a non-root
         * entrypoint may reopen /dev/pts/N). Only our own pty, never one
         * from the host. */
        if (p->uid != 0 && own_pty(0))
            (void)fchown(0, (uid_t)p->uid, (gid_t)-1);
    }
    return 0;
}

static int status_code(int st)
{
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return 1;
}

/* -- OCI block: `sbx-init ERRFD @oci -- ARGV...` (sandbox/oci, SPEC §12) ---
 * The container is set up (identity, caps, seccomp: csrc/clone.c
 * child_oci); this only waits for `sandbox-oci start` and becomes the
 * process, PID 1 of the container as with runc. args[0] is looked up first,
 * so a missing binary fails `create` (as runc) through the error pipe; then
 * the pipe closes (create returns) and the open of the exec fifo (fd 4, an
 * O_PATH fd of the state dir's fifo) for writing blocks until start opens it
 * for reading. */
static int find_exec(const char *file, char *buf, size_t cap)
{
    if (strchr(file, '/')) {
        if (strlen(file) >= cap)
            return -ENAMETOOLONG;
        strcpy(buf, file);
        return access(buf, X_OK) < 0 ? -errno : 0;
    }
    const char *path = getenv("PATH");
    if (!path)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    int last = -ENOENT;
    for (const char *p = path;; p++) {
        const char *end = strchr(p, ':');
        size_t dlen = end ? (size_t)(end - p) : strlen(p);
        if (dlen + strlen(file) + 2 < cap) {
            memcpy(buf, dlen ? p : ".", dlen ? dlen : 1);
            size_t k = dlen ? dlen : 1;
            buf[k++] = '/';
            strcpy(buf + k, file);
            struct stat st;
            if (stat(buf, &st) == 0 && S_ISREG(st.st_mode)) {
                if (access(buf, X_OK) == 0)
                    return 0;
                last = -EACCES;
            }
        }
        if (!end)
            return last;
        p = end;
    }
}

static int oci_main(int argc, char **argv, char **envp, int errfd)
{
    if (argc < 5 || strcmp(argv[3], "--") != 0)
        return 125;
    char exe[4096];
    int r = find_exec(argv[4], exe, sizeof exe);
    if (r < 0) {
        sbx_err_write(errfd, SBX_STEP_EXECVE, -r, -1, argv[4]);
        return 127;
    }
    /* PID 1 leads its session (clone.c); a console pty becomes its
     * controlling terminal, as for runc's `terminal: true`. */
    if (isatty(0))
        (void)ioctl(0, TIOCSCTTY, 0);
    close(errfd);
    int fifo = open("/proc/self/fd/4", O_WRONLY | O_CLOEXEC);
    if (fifo < 0)
        return 125;
    ssize_t w;
    do {
        w = write(fifo, "0", 1);
    } while (w < 0 && errno == EINTR);
    close(fifo);
    close(4);
    if (w != 1)
        return 125;
    /* The clone ran with every signal blocked; the process starts clean. */
    uint64_t none = 0;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
    execve(exe, &argv[4], envp);
    return 127;
}

int main(int argc, char **argv, char **envp)
{
    if (argc < 3)
        return 125;
    int errfd = atoi(argv[1]);
    if (strcmp(argv[2], "@oci") == 0)
        return oci_main(argc, argv, envp, errfd);
    uint64_t all = ~0ULL;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, NULL, 8);
    take_all_signals();

    pid_t entry = -1;
    if (strcmp(argv[2], "-") != 0) {
        if (argc < 8)
            return 125;
        struct sbx_proc p;
        memset(&p, 0, sizeof p);
        p.uid = atoi(argv[2]);
        p.gid = atoi(argv[3]);
        p.cwd = argv[4];
        p.path = argv[5];
        int ng = atoi(argv[6]);
        if (ng < 0 || ng > 64 || 7 + ng >= argc)
            return 125;
        unsigned int groups[64];
        for (int i = 0; i < ng; i++)
            groups[i] = (unsigned)strtoul(argv[7 + i], NULL, 10);
        p.groups = groups;
        p.ngroups = ng;
        int k = 7 + ng;
        if (strcmp(argv[k], "--") != 0 || k + 1 >= argc)
            return 125;
        p.argv = (const char *const *)&argv[k + 1];
        p.envp = (const char *const *)envp;
        p.stdin_fd = p.stdout_fd = p.stderr_fd = -1; /* already on 0..2 */
        fcntl(errfd, F_SETFD, FD_CLOEXEC);
        entry = fork();
        if (entry < 0) {
            sbx_err_write(errfd, SBX_STEP_FORK, errno, -1, NULL);
            return 125;
        }
        if (entry == 0) {
            int step = SBX_STEP_STDIO;
            int r = new_session(&p);
            if (r == 0)
                r = sbx_proc_exec(&p, &step);
            sbx_err_write(errfd, step, -r, -1, step == SBX_STEP_CHDIR ? p.cwd : p.argv[0]);
            _exit(127);
        }
    }
    /* Our copies would keep the runtime's pipes open past the entrypoint. */
    close(errfd);
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int fd = 0; fd < 3; fd++) {
        if (devnull >= 0)
            dup2(devnull, fd);
        else
            close(fd);
    }
    if (devnull > 2)
        close(devnull);

    for (;;) {
        siginfo_t si;
        int sig = (int)syscall(SYS_rt_sigtimedwait, &all, &si, NULL, 8);
        if (sig < 0)
            continue;
        if (sig == SIGCHLD) {
            int st;
            pid_t p;
            while ((p = waitpid(-1, &st, WNOHANG)) > 0)
                if (p == entry)
                    return status_code(st);
            continue;
        }
        if (entry > 0)
            kill(entry, sig);
        else if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP || sig == SIGQUIT)
            return 128 + sig;
    }
}

/* sbx.h — the whole C API of sandbox._native.
 *
 * The part between the CDEF markers is fed verbatim to cffi's cdef(), so it
 * holds only plain declarations (no includes, no macros with expressions).
 * Every function returns >= 0 on success or -errno; nothing prints or exits.
 */
#ifndef SBX_H
#define SBX_H
#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
#define SBX_ABI_VERSION 4

/* The ordered steps of a child's setup; Python mirrors the names. */
enum sbx_step {
    SBX_STEP_NONE = 0,
    SBX_STEP_CLONE,
    SBX_STEP_JOIN_NETNS,
    SBX_STEP_LOOPBACK,
    SBX_STEP_JOIN_CGROUP,
    SBX_STEP_CGROUPNS,
    SBX_STEP_PROPAGATION,
    SBX_STEP_MOUNT,
    SBX_STEP_PIVOT_ROOT,
    SBX_STEP_HOSTNAME,
    SBX_STEP_STDIO,
    SBX_STEP_CAPS,
    SBX_STEP_NO_NEW_PRIVS,
    SBX_STEP_CLOSE_FDS,
    SBX_STEP_CHDIR,
    SBX_STEP_SETGROUPS,
    SBX_STEP_SETGID,
    SBX_STEP_SETUID,
    SBX_STEP_SECCOMP,
    SBX_STEP_EXECVE,
    SBX_STEP_SETNS,
    SBX_STEP_FORK,
    SBX_STEP_INIT,
    SBX_STEP_MAX
};

/* Written once, atomically (< PIPE_BUF), on the CLOEXEC error pipe.
 * EOF with no record means execve succeeded. */
struct sbx_err {
    int32_t step;
    int32_t err;
    int32_t index;        /* mount op index for SBX_STEP_MOUNT, else -1 */
    char detail[244];
};

/* -- mount plan (csrc/mount.c, csrc/fs.c; built by sandbox/rootfs.py) ------
 * Paths flagged SBX_AT_*_IN_ROOT are resolved confined to the root opened by
 * the last SBX_OP_ROOT (openat2 RESOLVE_IN_ROOT|RESOLVE_NO_MAGICLINKS): the
 * content below the root is hostile. Other paths are trusted (chosen by the
 * runtime: the root and scratch mount points, host sources of binds). */
enum sbx_mount_kind {
    SBX_OP_MOUNT = 1,     /* mount(src, dst, fstype, flags, data) */
    SBX_OP_MKDIR,         /* a directory at dst (mode); see SBX_AT_REPLACE */
    SBX_OP_FILE,          /* a new regular file dst with data[0..len), mode */
    SBX_OP_SYMLINK,       /* dst replaced by a symlink with content src */
    SBX_OP_PIVOT,         /* pivot_root into the root (dst), detach the old one */
    SBX_OP_UMOUNT,        /* umount2(dst, MNT_DETACH) */
    SBX_OP_ROOT,          /* open dst (trusted) as the root of later in-root paths */
    SBX_OP_MKNOD          /* char device dst, mode, device number in flags */
};

enum sbx_mount_at {
    SBX_AT_DST_IN_ROOT = 1,   /* dst resolves inside the root */
    SBX_AT_SRC_IN_ROOT = 2,   /* src (a bind source) resolves inside the root */
    SBX_AT_REPLACE = 4,       /* MKDIR: only a real directory will do (mount points) */
    SBX_AT_KEEP = 8           /* OCI block: MKDIR/FILE keep whatever is there (create if missing) */
};

struct sbx_mount_op {
    int kind;
    const char *src;
    const char *dst;
    const char *fstype;
    unsigned long flags;
    const char *data;
    size_t len;
    unsigned int mode;
    unsigned int at;      /* SBX_AT_* bits */
};

/* Opens path below rootfd, every component confined to it (RESOLVE_IN_ROOT |
 * RESOLVE_NO_MAGICLINKS, plus the RESOLVE_* bits in resolve). No O_CREAT.
 * Returns a CLOEXEC fd or -errno. */
int sbx_open_in_root(int rootfd, const char *path, int flags, uint64_t resolve);
/* -- end of mount plan ------------------------------------------------------- */

/* -- OCI front end (sandbox/oci; SPEC §12) -----------------------------------
 * With sbx_start.oci set, PID 1 is set up as the bundle's config.json says
 * instead of the fixed Python-API setup: which namespaces are new or joined,
 * the process's identity, the five capability sets, rlimits, sysctls,
 * no_new_privs only when asked and the caller's seccomp program (none when
 * NULL). No parent-death signal: the container outlives the CLI process.
 * It then execs sbx-init in its "@oci" mode, which waits on the exec fifo
 * (keep_fd, moved to fd 4) until `sandbox-oci start` and execs the process. */
struct sbx_oci {
    unsigned long clone_ns;      /* CLONE_NEW* to create; NEWCGROUP unshared after the cgroup join */
    const int *join_fds;         /* namespaces to setns() first, in order */
    const int *join_types;       /* their CLONE_NEW* type */
    int njoin;
    const char *domainname;      /* NULL: unchanged */
    const int *rlimit_types;     /* RLIMIT_* */
    const uint64_t *rlimit_vals; /* soft, hard pairs */
    int nrlimits;
    const char *const *sysctl_paths;  /* "/proc/sys/..." written in the new namespaces */
    const char *const *sysctl_vals;
    int nsysctl;
    int uid;
    int gid;
    const unsigned int *groups;
    int ngroups;
    int umask;                   /* -1: unchanged */
    uint64_t caps_bounding;
    uint64_t caps_effective;
    uint64_t caps_permitted;
    uint64_t caps_inheritable;
    uint64_t caps_ambient;
    int no_new_privs;
    const void *seccomp;         /* struct sock_filter[seccomp_len], or NULL: no filter */
    int seccomp_len;
    const char *cwd;
    int keep_fd;                 /* the exec fifo (O_PATH); lands on fd 4 for sbx-init */
};
/* -- end of OCI front end ---------------------------------------------------- */

/* One process to execve: argv/envp NULL-terminated. */
struct sbx_proc {
    const char *const *argv;
    const char *const *envp;
    const char *path;     /* PATH used to look up argv[0] */
    const char *cwd;
    int uid;
    int gid;
    const unsigned int *groups;
    int ngroups;
    int stdin_fd;
    int stdout_fd;
    int stderr_fd;
};

struct sbx_start {
    int netns_fd;         /* -1: a fresh netns with only lo up */
    int cgroup_fd;        /* cgroup v2 dir fd for CLONE_INTO_CGROUP, or -1 */
    const int *procs_fds; /* cgroup.procs fds to join (v1), written "0" */
    int nprocs;
    const char *hostname;
    const struct sbx_mount_op *ops;
    int nops;
    uint64_t caps;        /* capabilities kept (bounding = effective) */
    int init_fd;          /* fd of the sbx-init executable */
    const char *const *init_argv;
    const char *const *init_envp;
    int stdin_fd;
    int stdout_fd;
    int stderr_fd;
    /* -1, or one end of a unix socket: the child then makes a pty on the
     * sandbox's own devpts, puts the slave on 0..2 (stdin_fd..stderr_fd are
     * ignored) and sends the master back over it (SCM_RIGHTS) before it
     * execs sbx-init. (tty/session block) */
    int console_fd;
    /* NULL (the Python API): the fixed setup above. Otherwise the OCI
     * front end's plan (sandbox/oci, SPEC §12), obeyed as written: see
     * struct sbx_oci. (OCI block; appended, zero = no change) */
    const struct sbx_oci *oci;
};

int sbx_abi_version(void);
/* Clones PID 1 of a new sandbox. Returns its host pid; *pidfd and *errfd
 * (the read end of the error pipe) belong to the caller. */
int sbx_start(const struct sbx_start *s, int *pidfd, int *errfd);
/* -- exec (csrc/exec.c; the helper is csrc/exechelper.c, sbx-exec) --------
 * vfork-execs the executable exe_fd (a sealed memfd) with fds[i] on fd i and
 * nothing else open. Returns its pid and *pidfd, or -errno if it could not
 * exec. The caller reaps it (asynchronously). */
int sbx_spawn(int exe_fd, const char *const *argv, const char *const *envp,
              const int *fds, int nfds, int *pidfd);
/* PR_SET_DUMPABLE; returns the flag now in force. */
int sbx_set_dumpable(int on);
/* -- end of exec ------------------------------------------------------------ */
int sbx_pidfd_signal(int pidfd, int sig);
/* 0 with *code (0..255, 128+N for signal N) once exited; -EAGAIN before. */
int sbx_pidfd_wait(int pidfd, int *code);
int sbx_setns(int fd, int nstype);
int sbx_unshare(int flags);
/* CDEF END */

/* Internal, shared by the C files (not part of the cdef). */
void sbx_err_write(int fd, int step, int err, int index, const char *detail);
int sbx_mount_run(const struct sbx_mount_op *ops, int n, int *failed);
int sbx_caps_apply(uint64_t keep);
int sbx_seccomp_install(void);
/* OCI block: the caller's program (struct sock_filter[len]); the capability
 * bounding set alone (while CAP_SETPCAP is still held); then the other sets. */
int sbx_seccomp_install_prog(const void *filter, int len);
int sbx_caps_bound(uint64_t bounding);
int sbx_caps_sets(uint64_t eff, uint64_t perm, uint64_t inh, uint64_t amb);
int sbx_loopback_up(void);
int sbx_join_cgroup(const int *fds, int n);
/* Child side of running a process: chdir, identity, exec with PATH search.
 * Only returns on failure, with *step set. */
int sbx_proc_exec(const struct sbx_proc *p, int *step);
int sbx_proc_stdio(int in, int out, int err);

#endif

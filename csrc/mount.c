/* mount.c — executes a rootfs plan built (and validated) in Python: one
 * switch over a flat list of ops, so the policy lives in one readable place
 * and can be inspected without a kernel. Runs in the sandbox child, in its
 * fresh mount namespace, before pivot_root.
 *
 * The new root holds hostile content (rootfs=DIR, images): any component of
 * a path below it may be a symlink to "/etc", "../../..", a FIFO, a file where
 * a directory belongs. So the plan says which paths are inside the root
 * (SBX_AT_*), SBX_OP_ROOT opens the root once, and every such path is
 * resolved confined to it (fs.c, openat2 RESOLVE_IN_ROOT): parents through
 * sbx_open_in_root, the last component created with *at() calls in that
 * parent (O_EXCL|O_NOFOLLOW after removing what was there), and mounts land
 * on "/proc/self/fd/N" of the resolved O_PATH fd, never on a path the kernel
 * would walk again. Paths outside the root (the root and scratch mount points,
 * host sources of binds) are chosen by the runtime and trusted.
 *
 * No allocation here: with CLONE_VM the child shares the runtime's heap. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include "sbx.h"

#define PATH_CAP 4096

/* "/proc/self/fd/N": the host's /proc, still mounted before pivot_root. */
static void fd_path(char buf[32], int fd)
{
    static const char prefix[] = "/proc/self/fd/";
    char digits[12];
    int n = 0;
    unsigned int v = (unsigned int)fd;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < (int)sizeof digits);
    memcpy(buf, prefix, sizeof prefix - 1);
    int i = sizeof prefix - 1;
    while (n)
        buf[i++] = digits[--n];
    buf[i] = '\0';
}

static void close_fd(int fd)
{
    if (fd >= 0)
        close(fd);
}

/* Where the last component of an op's path lives: for an in-root path a
 * confined O_PATH fd of its parent (*dirfd, the caller closes it), else
 * AT_FDCWD and the whole trusted path. *name points into path. */
static int locate(int rootfd, const char *path, int in_root, int *dirfd, const char **name)
{
    *dirfd = AT_FDCWD;
    *name = path;
    if (!in_root)
        return 0;
    if (rootfd < 0)
        return -EBADF;
    size_t len = strlen(path);
    if (len == 0 || len >= PATH_CAP)
        return -ENAMETOOLONG;
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    if (*base == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return -EINVAL;
    char parent[PATH_CAP];
    size_t plen = slash ? (size_t)(slash - path) : 0;
    if (plen == 0) {
        parent[0] = slash ? '/' : '.';
        parent[1] = '\0';
    } else {
        memcpy(parent, path, plen);
        parent[plen] = '\0';
    }
    int fd = sbx_open_in_root(rootfd, parent, O_PATH | O_DIRECTORY, 0);
    if (fd < 0)
        return fd;
    *dirfd = fd;
    *name = base;
    return 0;
}

/* Clears the way for a new entry: a symlink, file or node goes, an empty
 * directory goes, a non-empty directory is an error (ENOTEMPTY names the
 * op's path). In the overlay this only writes whiteouts to the upper layer. */
static int remove_entry(int dirfd, const char *name)
{
    if (unlinkat(dirfd, name, 0) == 0 || errno == ENOENT)
        return 0;
    if (errno != EISDIR)
        return -errno;
    if (unlinkat(dirfd, name, AT_REMOVEDIR) == 0)
        return 0;
    return -errno;
}

static int write_all(int fd, const char *data, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        off += (size_t)w;
    }
    return 0;
}

static int op_file(int rootfd, const struct sbx_mount_op *op)
{
    int dirfd;
    const char *name;
    int r = locate(rootfd, op->dst, op->at & SBX_AT_DST_IN_ROOT, &dirfd, &name);
    if (r < 0)
        return r;
    if (op->at & SBX_AT_KEEP) {
        /* OCI mount point of a file bind: made if missing, never truncated;
         * a symlink there fails (O_NOFOLLOW) instead of being followed. */
        int fd = openat(dirfd, name, O_RDONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC,
                        op->mode ? op->mode : 0644);
        r = fd < 0 ? -errno : 0;
        if (fd >= 0)
            close(fd);
    } else if ((r = remove_entry(dirfd, name)) == 0) {
        /* An image may ship /etc/resolv.conf as a symlink out of its tree. */
        int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
                        op->mode ? op->mode : 0644);
        if (fd < 0) {
            r = -errno;
        } else {
            r = write_all(fd, op->data, op->len);
            close(fd);
        }
    }
    if (dirfd >= 0)
        close(dirfd);
    return r;
}

/* Makes sure a directory is at name. In the root, what is there may be
 * anything: a directory stays; a symlink stays only when it resolves
 * (confined) to a directory and the op does not ask for a real one
 * (SBX_AT_REPLACE, mount points); anything else is replaced. */
static int ensure_dir(int rootfd, const struct sbx_mount_op *op, int dirfd, const char *name)
{
    mode_t mode = op->mode ? op->mode : 0755;
    if (mkdirat(dirfd, name, mode) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    if (!(op->at & SBX_AT_DST_IN_ROOT) || (op->at & SBX_AT_KEEP))
        return 0;   /* a trusted path of ours, or an OCI mount point: EEXIST is fine */
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -errno;
    if (S_ISDIR(st.st_mode))
        return 0;
    if (S_ISLNK(st.st_mode) && !(op->at & SBX_AT_REPLACE)) {
        /* etc -> private/etc is kept; etc -> /etc (a loop inside the root)
         * or a dangling link is not. */
        int fd = sbx_open_in_root(rootfd, op->dst, O_PATH | O_DIRECTORY, 0);
        if (fd >= 0) {
            close(fd);
            return 0;
        }
    }
    int r = remove_entry(dirfd, name);
    if (r < 0)
        return r;
    return mkdirat(dirfd, name, mode) < 0 ? -errno : 0;
}

static int op_mkdir(int rootfd, const struct sbx_mount_op *op)
{
    int dirfd;
    const char *name;
    int r = locate(rootfd, op->dst, op->at & SBX_AT_DST_IN_ROOT, &dirfd, &name);
    if (r < 0)
        return r;
    r = ensure_dir(rootfd, op, dirfd, name);
    if (dirfd >= 0)
        close(dirfd);
    return r;
}

static int op_symlink(int rootfd, const struct sbx_mount_op *op)
{
    int dirfd;
    const char *name;
    int r = locate(rootfd, op->dst, op->at & SBX_AT_DST_IN_ROOT, &dirfd, &name);
    if (r < 0)
        return r;
    if ((r = remove_entry(dirfd, name)) == 0 && symlinkat(op->src, dirfd, name) < 0)
        r = -errno;
    if (dirfd >= 0)
        close(dirfd);
    return r;
}

/* A character device on the sandbox's own /dev tmpfs: its inode belongs to
 * the sandbox, so chmod/chown inside never reach a host node. */
static int op_mknod(int rootfd, const struct sbx_mount_op *op)
{
    int dirfd;
    const char *name;
    int r = locate(rootfd, op->dst, op->at & SBX_AT_DST_IN_ROOT, &dirfd, &name);
    if (r < 0)
        return r;
    if ((r = remove_entry(dirfd, name)) == 0 &&
        mknodat(dirfd, name, ((op->mode & S_IFMT) ? (op->mode & S_IFMT) : S_IFCHR) |
                (op->mode & 07777), (dev_t)op->flags) < 0)
        r = -errno;
    if (dirfd >= 0)
        close(dirfd);
    return r;
}

/* An O_PATH fd of an in-root path with its last component not followed:
 * a mount never lands where a symlink points. */
static int resolve_mount_path(int rootfd, const char *path, char buf[32], int *fd)
{
    int f = sbx_open_in_root(rootfd, path, O_PATH | O_NOFOLLOW, 0);
    if (f < 0)
        return f;
    struct stat st;
    int e = fstat(f, &st) < 0 ? errno : S_ISLNK(st.st_mode) ? ELOOP : 0;
    if (e) {
        close(f);
        return -e;
    }
    fd_path(buf, f);
    *fd = f;
    return 0;
}

static int op_mount(int rootfd, const struct sbx_mount_op *op, int umount)
{
    char tbuf[32], sbuf[32];
    const char *target = op->dst, *src = op->src;
    int tfd = -1, sfd = -1, r = 0;
    if (op->at & SBX_AT_DST_IN_ROOT) {
        if (rootfd < 0)
            return -EBADF;
        if ((r = resolve_mount_path(rootfd, op->dst, tbuf, &tfd)) < 0)
            return r;
        target = tbuf;
    }
    if (op->at & SBX_AT_SRC_IN_ROOT) {
        if (rootfd < 0 || !op->src) {
            r = -EBADF;
            goto out;
        }
        if ((r = resolve_mount_path(rootfd, op->src, sbuf, &sfd)) < 0)
            goto out;
        src = sbuf;
    }
    if (umount)
        r = umount2(target, MNT_DETACH) < 0 ? -errno : 0;
    else
        r = mount(src, target, op->fstype, op->flags, op->data) < 0 ? -errno : 0;
out:
    close_fd(tfd);
    close_fd(sfd);
    return r;
}

/* pivot_root(".", ".") stacks the old root under the new one at "/"; a lazy
 * detach then drops every host mount from this namespace, so nothing of the
 * host stays reachable through a forgotten path. */
static int pivot(int rootfd, const char *root)
{
    if ((rootfd >= 0 ? fchdir(rootfd) : chdir(root)) < 0)
        return -errno;
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        return -errno;
    if (umount2(".", MNT_DETACH) < 0)
        return -errno;
    if (chdir("/") < 0)
        return -errno;
    return 0;
}

static int run_op(int *rootfd, const struct sbx_mount_op *op)
{
    switch (op->kind) {
    case SBX_OP_ROOT: {
        int fd = open(op->dst, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            return -errno;
        close_fd(*rootfd);
        *rootfd = fd;
        return 0;
    }
    case SBX_OP_MOUNT:
        return op_mount(*rootfd, op, 0);
    case SBX_OP_UMOUNT:
        return op_mount(*rootfd, op, 1);
    case SBX_OP_MKDIR:
        return op_mkdir(*rootfd, op);
    case SBX_OP_FILE:
        return op_file(*rootfd, op);
    case SBX_OP_SYMLINK:
        return op_symlink(*rootfd, op);
    case SBX_OP_MKNOD:
        return op_mknod(*rootfd, op);
    case SBX_OP_PIVOT:
        return pivot(*rootfd, op->dst);
    default:
        return -EINVAL;
    }
}

int sbx_mount_run(const struct sbx_mount_op *ops, int n, int *failed)
{
    int rootfd = -1, r = 0;
    /* Modes in the plan are exact (0666 device nodes, 1777 shm). */
    mode_t old = umask(0);
    *failed = -1;
    for (int i = 0; i < n; i++) {
        if ((r = run_op(&rootfd, &ops[i])) < 0) {
            *failed = i;
            break;
        }
    }
    close_fd(rootfd);
    umask(old);
    return r;
}

/* mount.c — executes a rootfs plan built (and validated) in Python: one
 * switch over a flat list of ops, so the policy lives in one readable place
 * and can be inspected without a kernel. Runs in the sandbox child. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

static int write_file(const struct sbx_mount_op *op)
{
    /* An image may ship /etc/resolv.conf as a symlink out of its tree. */
    if (unlink(op->dst) < 0 && errno != ENOENT)
        return -errno;
    int fd = open(op->dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                  op->mode ? op->mode : 0644);
    if (fd < 0)
        return -errno;
    size_t off = 0;
    while (off < op->len) {
        ssize_t w = write(fd, op->data + off, op->len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            close(fd);
            return -e;
        }
        off += (size_t)w;
    }
    close(fd);
    return 0;
}

/* pivot_root(".", ".") stacks the old root under the new one at "/"; a lazy
 * detach then drops every host mount from this namespace, so nothing of the
 * host stays reachable through a forgotten path. */
static int pivot(const char *root)
{
    if (chdir(root) < 0)
        return -errno;
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        return -errno;
    if (umount2(".", MNT_DETACH) < 0)
        return -errno;
    if (chdir("/") < 0)
        return -errno;
    return 0;
}

int sbx_mount_run(const struct sbx_mount_op *ops, int n, int *failed)
{
    for (int i = 0; i < n; i++) {
        const struct sbx_mount_op *op = &ops[i];
        int r = 0;
        *failed = i;
        switch (op->kind) {
        case SBX_OP_MOUNT:
            if (mount(op->src, op->dst, op->fstype, op->flags, op->data) < 0)
                r = -errno;
            break;
        case SBX_OP_MKDIR:
            if (mkdir(op->dst, op->mode ? op->mode : 0755) < 0 && errno != EEXIST)
                r = -errno;
            break;
        case SBX_OP_FILE:
            r = write_file(op);
            break;
        case SBX_OP_SYMLINK:
            if (symlink(op->src, op->dst) < 0 && errno != EEXIST)
                r = -errno;
            break;
        case SBX_OP_PIVOT:
            r = pivot(op->dst);
            break;
        case SBX_OP_UMOUNT:
            if (umount2(op->dst, MNT_DETACH) < 0)
                r = -errno;
            break;
        default:
            r = -EINVAL;
        }
        if (r < 0)
            return r;
    }
    *failed = -1;
    return 0;
}

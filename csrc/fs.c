/* fs.c — confined path resolution: the one way the runtime (and the mount
 * plan, in the sandbox child) opens a path whose components a sandbox or an
 * image controls. openat2(2) resolves every component below `rootfd`:
 * RESOLVE_IN_ROOT makes "/" and ".." (also inside symlinks) stop at rootfd,
 * RESOLVE_NO_MAGICLINKS refuses /proc/PID/{root,cwd,fd/N}-style jumps. The
 * caller adds RESOLVE_NO_XDEV where crossing a mount is never legitimate.
 * Async-signal-safe (no allocation): mount.c runs it in a vfork-style child. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

int sbx_open_in_root(int rootfd, const char *path, int flags, uint64_t resolve)
{
    struct open_how how = {
        .flags = (uint64_t)(unsigned int)(flags | O_CLOEXEC),
        .mode = 0,
        .resolve = resolve | RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    if (rootfd < 0 || path == NULL)
        return -EBADF;
    /* Opening only: creation goes through mkdirat/openat in a resolved
     * parent (mount.c), where O_EXCL|O_NOFOLLOW pin the last component. */
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE)   /* O_TMPFILE includes O_DIRECTORY */
        return -EINVAL;
    /* EAGAIN: a rename or mount raced the lookup and the kernel could not
     * prove confinement; retrying is what the man page asks for. */
    for (int tries = 0; tries < 32; tries++) {
        long fd = syscall(SYS_openat2, rootfd, path, &how, sizeof how);
        if (fd >= 0)
            return (int)fd;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
    }
    return -EAGAIN;
}

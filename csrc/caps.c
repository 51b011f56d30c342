/* caps.c — reduce capabilities to the kept set. The bounding set is cut
 * first (needs CAP_SETPCAP, which we still hold), then effective = permitted
 * = kept, inheritable and ambient empty: an execve as root then gets exactly
 * the kept set, and no file capability can add to it. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/capability.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

int sbx_caps_apply(uint64_t keep)
{
    for (int c = 0; c < 64; c++) {
        if (keep & (1ULL << c))
            continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {
        {(uint32_t)keep, (uint32_t)keep, 0},
        {(uint32_t)(keep >> 32), (uint32_t)(keep >> 32), 0},
    };
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -errno;
    return 0;
}

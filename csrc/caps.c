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

/* -- OCI block: the five sets of a config.json, applied as written. --------
 * Bounding first, as root (dropping needs CAP_SETPCAP); the caller then
 * changes identity with PR_SET_KEEPCAPS and sets the rest: capset
 * (effective, permitted, inheritable), then ambient, which must be in both
 * permitted and inheritable. An ambient cap the kernel refuses is skipped,
 * as runc does (it only matters for a non-root process). */
int sbx_caps_bound(uint64_t bounding)
{
    for (int c = 0; c < 64; c++) {
        if (bounding & (1ULL << c))
            continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    }
    return 0;
}

int sbx_caps_sets(uint64_t eff, uint64_t perm, uint64_t inh, uint64_t amb)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {
        {(uint32_t)eff, (uint32_t)perm, (uint32_t)inh},
        {(uint32_t)(eff >> 32), (uint32_t)(perm >> 32), (uint32_t)(inh >> 32)},
    };
    if (syscall(SYS_capset, &hdr, data) < 0)
        return -errno;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    for (int c = 0; c < 64; c++)
        if (amb & (1ULL << c))
            (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0);
    return 0;
}

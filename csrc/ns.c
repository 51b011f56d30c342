/* ns.c — namespace and cgroup membership primitives. */
#define _GNU_SOURCE
#include <errno.h>
#include <net/if.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include "sbx.h"

int sbx_setns(int fd, int nstype)
{
    return setns(fd, nstype) < 0 ? -errno : 0;
}

int sbx_unshare(int flags)
{
    return unshare(flags) < 0 ? -errno : 0;
}

/* A fresh network namespace has lo down; processes expect 127.0.0.1. */
int sbx_loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    int r = 0;
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        r = -errno;
    else {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            r = -errno;
    }
    close(s);
    return r;
}

/* Writing "0" to cgroup.procs moves the writer itself (v1 and v2), so the
 * child joins before it unshares its cgroup namespace or execs. */
int sbx_join_cgroup(const int *fds, int n)
{
    for (int i = 0; i < n; i++) {
        ssize_t w;
        do {
            w = pwrite(fds[i], "0", 1, 0);
        } while (w < 0 && errno == EINTR);
        if (w < 0)
            return -errno;
    }
    return 0;
}

/* pidfd.c — signals and exit status through pidfds: PIDs can be reused,
 * pidfds cannot. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include "sbx.h"

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

int sbx_abi_version(void)
{
    return SBX_ABI_VERSION;
}

int sbx_pidfd_signal(int pidfd, int sig)
{
    if (syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) < 0)
        return -errno;
    return 0;
}

int sbx_pidfd_wait(int pidfd, int *code)
{
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &si, WEXITED | WNOHANG) < 0)
        return -errno;
    if (si.si_pid == 0)
        return -EAGAIN;
    *code = si.si_code == CLD_EXITED ? si.si_status : 128 + si.si_status;
    return 0;
}

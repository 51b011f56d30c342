/* seccomp.c — the syscall filter every sandboxed process runs under.
 *
 * Assembled here from __NR_* constants (no libseccomp at build or run time).
 * Denied calls fail with EPERM rather than killing the process, so programs
 * that probe (e.g. for unshare) degrade instead of crashing. Order matters:
 *   1. a foreign audit arch (i386 via int 0x80) -> EPERM;
 *   2. x32 numbers (bit 30) -> EPERM: they alias the 64-bit table;
 *   3. clone3 -> ENOSYS: its flags live in memory we cannot inspect, so libc
 *      falls back to clone(), whose flags register we can;
 *   4. clone with any namespace flag -> EPERM;
 *   5. the deny list -> EPERM; everything else is allowed.
 * Installed last, right before execve, after no_new_privs. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

#define NS_FLAGS (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | \
                  CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP | 0x00000080 /* CLONE_NEWTIME */)

static const int denied[] = {
    __NR_mount, __NR_umount2, __NR_pivot_root, __NR_unshare, __NR_setns,
    __NR_ptrace, __NR_kexec_load, __NR_kexec_file_load, __NR_init_module,
    __NR_finit_module, __NR_delete_module, __NR_bpf, __NR_perf_event_open,
    __NR_keyctl, __NR_add_key, __NR_request_key, __NR_userfaultfd,
    __NR_open_by_handle_at, __NR_name_to_handle_at, __NR_swapon, __NR_swapoff,
    __NR_reboot, __NR_settimeofday, __NR_clock_settime, __NR_clock_adjtime,
    __NR_adjtimex, __NR_acct, __NR_quotactl,
    /* the new mount API reaches the same places as mount(2) */
    __NR_fsopen, __NR_fsconfig, __NR_fsmount, __NR_fspick, __NR_move_mount,
    __NR_open_tree, __NR_mount_setattr,
    /* other ways to reach or tamper with kernel or foreign process state */
    __NR_process_vm_readv, __NR_process_vm_writev, __NR_kcmp,
    __NR_lookup_dcookie, __NR_iopl, __NR_ioperm, __NR_syslog,
    __NR_vhangup, __NR_uselib, __NR_nfsservctl,
    __NR_sethostname, __NR_setdomainname,
};

#define NDENIED ((int)(sizeof denied / sizeof denied[0]))
#define ARCH_NR AUDIT_ARCH_X86_64
#define EPERM_RET (SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))

int sbx_seccomp_install(void)
{
    struct sock_filter f[16 + 2 * 64];
    int k = 0;
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH_NR, 1, 0);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
    /* clone: flags are the first argument; namespace bits are in the low word. */
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0]));
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, NS_FLAGS, 0, 1);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    for (int i = 0; i < NDENIED; i++) {
        f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)denied[i], 0, 1);
        f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, EPERM_RET);
    }
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)k, f};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        return -errno;
    return 0;
}

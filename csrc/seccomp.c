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
 *   5. calls judged by an argument: ioctl (terminal injection), socket and
 *      socketpair (address family), personality (execution domain);
 *   6. the deny list -> EPERM; everything else is allowed.
 * Installed last, right before execve, after no_new_privs.
 *
 * Arguments are compared on their low 32 bits only, and that is the whole
 * value the kernel sees: ioctl's cmd, socket's family and personality's
 * persona are `unsigned int`/`int` parameters, so the kernel drops the upper
 * half of the register. A filter that compared all 64 bits could be walked
 * around by setting bits the kernel then ignores (ioctl(fd, 1<<32|TIOCSTI)). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "sbx.h"

/* The syscall numbers, the audit arch, the x32 bit and the offset of an
 * argument's low half (little-endian) below are all x86_64 facts. Another
 * architecture needs its own table and checks, not a silent mis-filter. */
#if !defined(__x86_64__) || defined(__ILP32__)
#error "csrc/seccomp.c: the syscall filter is written for x86_64 (64-bit ABI) only"
#endif

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
    /* io_uring: the operations an io_uring performs (openat, connect, send,
     * read/write, ...) are executed by the kernel from the ring, not as
     * system calls, so this filter never sees them — every rule here (and
     * every future argument check) would have a way around. It has also been
     * one of the kernel's richest sources of privilege-escalation bugs.
     * Docker's default profile dropped it in 2023 for both reasons; the
     * sandbox's workloads (servers, tools, language runtimes) fall back to
     * epoll/threads when io_uring_setup fails. */
    __NR_io_uring_setup, __NR_io_uring_enter, __NR_io_uring_register,
};

/* ioctl commands refused on any fd. TIOCSTI pushes bytes into a terminal's
 * input queue as if typed: on a terminal the operator's shell reads later,
 * that runs commands on the host. TIOCLINUX on a virtual console can paste
 * the selection buffer (the same injection) and reach other console
 * controls. The sandbox's own console is a pty: neither is needed there.
 * TIOCSETD (a sibling, same class: terminal code the sandbox has no use
 * for) swaps a tty's line discipline; with dev.tty.ldisc_autoload=1 (the
 * default) that makes the host load n_gsm, n_hdlc & co. on demand — code
 * with a record of root exploits. Terminals here only ever need n_tty. */
static const uint32_t ioctl_refused[] = {TIOCSTI, TIOCLINUX, TIOCSETD};

/* socket()/socketpair() families allowed; all others fail with EPERM.
 *  AF_UNIX    local IPC: every libc, runtime and tool uses it.
 *  AF_INET/6  the network, which the netns and the proxy confine.
 *  AF_NETLINK getifaddrs() and getaddrinfo(AI_ADDRCONFIG) query the interface
 *             list over NETLINK_ROUTE, and `ip addr` needs it; changing
 *             anything through it takes CAP_NET_ADMIN, which no sandbox
 *             has, and the netns it sees is the sandbox's own.
 * Refused, among others: AF_VSOCK (vsock ports are not per network
 * namespace: a sandbox could take or reach host ports), AF_PACKET (raw
 * frames), AF_KEY/AF_XFRM-like key management, AF_BLUETOOTH, AF_CAN,
 * AF_RDS, AF_TIPC, AF_X25... (module-autoloaded, rarely audited protocol
 * code), and AF_ALG: the kernel's crypto API as a socket has a long CVE
 * history and no sandbox workload needs it (TLS and hashing run in user
 * space; OpenSSL's afalg engine is off by default). */
static const uint32_t families_allowed[] = {AF_UNIX, AF_INET, AF_INET6, AF_NETLINK};

/* personality() values allowed, as in Docker's default profile: 0
 * (PER_LINUX), 8 (PER_LINUX32: only changes uname's machine; the 32-bit
 * syscall entry stays refused above), 0x20000 (UNAME26) and 0x20008, and
 * 0xffffffff, which only queries. Everything else is refused, in particular
 * the flags that weaken the process's own hardening for an exploit:
 * READ_IMPLIES_EXEC (every readable mapping executable), ADDR_NO_RANDOMIZE
 * (no ASLR), MMAP_PAGE_ZERO (maps page 0, the NULL-dereference primitive),
 * ADDR_LIMIT_32BIT/3GB. */
static const uint32_t personas_allowed[] = {0x0, 0x8, 0x20000, 0x20008, 0xffffffff};

#define NDENIED ((int)(sizeof denied / sizeof denied[0]))
#define N(a) ((int)(sizeof a / sizeof a[0]))
#define ARCH_NR AUDIT_ARCH_X86_64
#define EPERM_RET (SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA))
#define STMT(code, k) ((struct sock_filter)BPF_STMT(code, k))
#define JUMP(code, k, jt, jf) ((struct sock_filter)BPF_JUMP(code, k, jt, jf))
#define ARG_LO(i) ((uint32_t)offsetof(struct seccomp_data, args[i]))  /* little-endian */

/* Emits, with A holding the syscall number:
 *   if (nr == NR) return (low32(args[arg]) in vals) ? in_set : otherwise;
 * and otherwise falls through with A unchanged. Jumps are relative and
 * forward: from the i-th comparison, the `in_set` return is n - i ahead. */
static int by_arg(struct sock_filter *f, int k, uint32_t nr, int arg,
                  const uint32_t *vals, int n, uint32_t in_set, uint32_t otherwise)
{
    f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, (uint8_t)(n + 3));
    f[k++] = STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(arg));
    for (int i = 0; i < n; i++)
        f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, vals[i], (uint8_t)(n - i), 0);
    f[k++] = STMT(BPF_RET | BPF_K, otherwise);
    f[k++] = STMT(BPF_RET | BPF_K, in_set);
    return k;
}

int sbx_seccomp_install(void)
{
    struct sock_filter f[64 + 2 * NDENIED];
    int k = 0;
    f[k++] = STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, ARCH_NR, 1, 0);
    f[k++] = STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    f[k++] = JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 0, 1);
    f[k++] = STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1);
    f[k++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
    /* clone: flags are the first argument; namespace bits are in the low word. */
    f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4);
    f[k++] = STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(0));
    f[k++] = JUMP(BPF_JMP | BPF_JSET | BPF_K, NS_FLAGS, 0, 1);
    f[k++] = STMT(BPF_RET | BPF_K, EPERM_RET);
    f[k++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    k = by_arg(f, k, __NR_ioctl, 1, ioctl_refused, N(ioctl_refused), EPERM_RET, SECCOMP_RET_ALLOW);
    k = by_arg(f, k, __NR_socket, 0, families_allowed, N(families_allowed), SECCOMP_RET_ALLOW, EPERM_RET);
    k = by_arg(f, k, __NR_socketpair, 0, families_allowed, N(families_allowed), SECCOMP_RET_ALLOW, EPERM_RET);
    k = by_arg(f, k, __NR_personality, 0, personas_allowed, N(personas_allowed), SECCOMP_RET_ALLOW, EPERM_RET);
    for (int i = 0; i < NDENIED; i++) {
        f[k++] = JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)denied[i], 0, 1);
        f[k++] = STMT(BPF_RET | BPF_K, EPERM_RET);
    }
    f[k++] = STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)k, f};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        return -errno;
    return 0;
}

/* OCI block: install the caller's program (an OCI profile compiled by
 * sandbox/oci/seccomp.py) instead of the filter above. */
int sbx_seccomp_install_prog(const void *filter, int len)
{
    if (!filter || len <= 0 || len > 4096)
        return -EINVAL;
    struct sock_fprog prog = {(unsigned short)len, (struct sock_filter *)(uintptr_t)filter};
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) < 0)
        return -errno;
    return 0;
}

"""The capability set every sandbox keeps.

Docker's default set minus NET_RAW (raw sockets spoof packets past the proxy),
MKNOD (device nodes are the runtime's business), AUDIT_WRITE and SETFCAP
(neither needed by ordinary workloads). Kept:
  CHOWN, DAC_OVERRIDE, FOWNER, FSETID  - root inside can manage its own files;
  KILL                                 - signal processes of other users inside;
  SETGID, SETUID, SETPCAP              - drop privileges (su, setpriv, daemons);
  NET_BIND_SERVICE                     - servers on ports < 1024;
  SYS_CHROOT                           - build tools that chroot.
Everything else (SYS_ADMIN, NET_ADMIN, SYS_PTRACE, SYS_MODULE, ...) is dropped
from the bounding set too, so no execve can regain it. The seccomp filter
(csrc/seccomp.c) is the second wall behind this one.
"""
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_FSETID = 4
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_SYS_CHROOT = 18

DEFAULT_CAPS = (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_KILL, CAP_SETGID,
                CAP_SETUID, CAP_SETPCAP, CAP_NET_BIND_SERVICE, CAP_SYS_CHROOT)
DEFAULT_CAP_MASK = sum(1 << c for c in DEFAULT_CAPS)

"""The static helpers as sealed memfds (see sandbox/runtime.py
sealed_executable, whose reasoning applies; re-done here so the OCI CLI does
not import the runtime's stack)."""
from __future__ import annotations

import errno
import fcntl
import os

_MFD_EXEC = 0x0010
_F_SEAL_EXEC = 0x0020


def sealed(path: str) -> int:
    with open(path, "rb") as f:
        data = f.read()
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create(os.path.basename(path), flags | _MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.memfd_create(os.path.basename(path), flags)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | _F_SEAL_EXEC)
    except OSError:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd

"""`kill`: kept apart from lifecycle.py so it loads no executor (lean path)."""
from __future__ import annotations

import os
import signal

from .cgroup import Cgroups
from .state import Container, OciError, load


def parse_signal(sig: str) -> int:
    s = sig.upper()
    if s.isdigit():
        n = int(s)
        if not 0 < n < 65:
            raise OciError(f"unknown signal {sig!r}")
        return n
    s = s if s.startswith("SIG") else "SIG" + s
    try:
        return int(getattr(signal.Signals, s))
    except AttributeError:
        raise OciError(f"unknown signal {sig!r}") from None


def signal_init(c: Container, signo: int) -> None:
    try:
        pidfd = os.pidfd_open(c.pid)
    except ProcessLookupError:
        raise OciError("container not running") from None
    try:
        if not c.alive():  # after the open: the pidfd pins the process we checked
            raise OciError("container not running")
        signal.pidfd_send_signal(pidfd, signo)
    except ProcessLookupError:
        raise OciError("container not running") from None
    finally:
        os.close(pidfd)


def kill(root: str, cid: str, sig: str, all_: bool) -> None:
    c = load(root, cid)
    signo = parse_signal(sig)
    if c.status() == "stopped":
        raise OciError("container not running")
    if all_:
        for p in Cgroups(c.data.get("cgroups") or {}).pids():
            try:
                os.kill(p, signo)
            except ProcessLookupError:
                pass
    else:
        signal_init(c, signo)

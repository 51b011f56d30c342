"""`run` = create + start, then (unless --detach) wait as the container's
parent for its exit code, and delete it, as runc does."""
from __future__ import annotations

import os
import signal

from .lifecycle import create, destroy, start
from .state import load


def run(root: str, cid: str, bundle, pid_file, console_socket, detach: bool) -> int:
    c = create(root, cid, bundle, pid_file, console_socket)
    pid = c.pid
    try:
        start(root, cid)
    except BaseException:
        destroy(load(root, cid))
        raise
    if detach:
        return 0

    def fwd(signo, _frame):
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2):
        signal.signal(s, fwd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    destroy(load(root, cid))
    return code

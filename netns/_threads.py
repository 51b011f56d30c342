"""Run a function in a fresh, short-lived OS thread and hand back its result.

Two reasons we do work in a throwaway thread instead of the caller's thread:

* Namespace switches (``unshare``/``setns`` with CLONE_NEWNET) apply to the
  calling *thread* only.  Doing them in a thread that then exits means the
  caller's thread (often the asyncio loop thread) never changes netns, and no
  thread is ever "returned" in the wrong namespace (CPython does not pool
  ``threading.Thread`` OS threads: the OS thread ends with ``run()``).
* pyroute2's synchronous ``IPRoute`` drives a private event loop with
  ``run_until_complete``, which raises if the calling thread already runs an
  asyncio loop.  A fresh thread has no loop, so our blocking API also works when
  called straight from a coroutine.

The thread is always joined before we return: nothing is left running.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def run_in_thread(fn: Callable[..., T], *args: Any, name: str = "netns") -> T:
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller below
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        # Re-raise with the worker's traceback attached; break the reference
        # cycle (exc -> frame -> error list) explicitly.
        exc = error.pop()
        try:
            raise exc
        finally:
            del exc
    return result[0]

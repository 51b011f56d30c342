"""JSON in and out of `sandbox serve`'s endpoints, and errors to statuses.

Argument checks (each failure is one line naming the field, answered 400),
the JSON views of a sandbox (`summary`, `details`), and `error_status`, the
exception -> HTTP status contract of docs/api.md.  Pure functions, kept apart
from the handlers in `api` so that file stays about the endpoints.
"""
from __future__ import annotations

import errno
import signal as _signal
import time

import h11

from ..errors import ExecError, SandboxError, SandboxNotRunning
from .http import HttpError


# -- argument checks (one line, naming the field) ------------------------------

def check_fields(obj: dict, allowed: tuple[str, ...], what: str) -> None:
    extra = sorted(set(obj) - set(allowed))
    if extra:
        raise HttpError(400, f"{what}: unknown field(s) {', '.join(extra)}; "
                             f"known: {', '.join(allowed)}")


def opt_field(obj: dict, key: str, types, what: str):
    v = obj.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
        raise TypeError(f"{key} must be {what}")
    return v


def host_list(obj: dict, key: str) -> list[str] | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(h, str) for h in v):
        raise TypeError(f"{key} must be a list of str")
    return v


def handler_map(obj: dict, key: str) -> dict[str, str]:
    v = obj.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(u, str)
                                          for k, u in v.items()):
        raise TypeError(f"{key} must be an object of target -> URL string")
    for t, u in v.items():
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"{key}[{t!r}]: handler must be an http:// or https:// URL, got {u!r}")
    return v


def parse_signal(v) -> int:
    if isinstance(v, str):
        name = v.upper()
        if name.isdigit():
            return int(name)
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal {v!r}") from None
    return v  # box.signal validates ints (1..64, not bool)


def box_stats(box) -> dict:
    res = getattr(box, "_res", None)
    cg = getattr(res, "cgroup", None)
    if cg is None or not hasattr(cg, "stats"):
        return {}
    try:
        return dict(cg.stats())
    except (OSError, ValueError):
        return {}


def _uptime(box) -> float | None:
    if box.state != "running" or not box.pid:
        return None
    try:
        import psutil
        return round(max(0.0, time.time() - psutil.Process(box.pid).create_time()), 3)
    except Exception:  # psutil missing or the process just exited
        return None


def summary(box) -> dict:
    st = box_stats(box)
    return {
        "id": box.id, "name": box.name, "state": box.state, "pid": box.pid or None,
        "address": getattr(box, "address", None),
        "uptime_s": _uptime(box),
        "cpu_ns": st.get("cpu_usage_ns"),
        "memory_bytes": st.get("memory_current"),
    }


def _policy(box) -> dict | None:
    """The sandbox's outbound policy as JSON (targets as text; a handler that
    is a URL as its URL, any other as its kind)."""
    pol = getattr(box, "policy", None)
    if pol is None:
        return None

    def hosts(v):
        return None if v is None else [str(t) for t in v]

    def handler(h):
        return h if isinstance(h, str) else f"<{type(h).__name__}>"

    http, https = {}, {}
    for r in getattr(pol, "routes", ()):
        for scheme in getattr(r, "schemes", ("http",)):
            (https if scheme == "https" else http)[str(r.target)] = handler(r.handler)
    return {"allowed_hosts": hosts(getattr(pol, "allowed_hosts", None)),
            "denied_hosts": hosts(getattr(pol, "denied_hosts", ())),
            "http_handlers": http, "https_handlers": https,
            "intercept_https": getattr(pol, "intercept_https", None)}


def details(box) -> dict:
    out = summary(box)
    lim = getattr(box, "_limits", None)
    out["limits"] = {"memory": getattr(lim, "memory", None), "pids": getattr(lim, "pids", None),
                     "cpus": getattr(lim, "cpus", None)}
    out["rootfs"] = getattr(box, "_rootfs", None)
    out["env_keys"] = sorted(getattr(box, "_env", {}) or {})
    out["enable_internet"] = getattr(box, "enable_internet", None)
    out["stats"] = box_stats(box)
    policy = _policy(box)
    if policy is not None:
        out["policy"] = policy
    return out


def _exec_status(e: ExecError) -> int:
    # "no such executable / directory" is a missing thing (404); anything
    # else (not executable, bad user...) is a bad argument (400). `step` and
    # `errno` tell them apart precisely.
    return 404 if e.errno in (errno.ENOENT, errno.ENOTDIR) else 400


def error_status(e: BaseException) -> tuple[int, dict]:
    if isinstance(e, HttpError):
        return e.status, {"error": str(e), **e.extra}
    if isinstance(e, h11.RemoteProtocolError):       # e.g. a broken chunked body
        return e.error_status_hint, {"error": f"bad HTTP request: {e}"}
    if isinstance(e, ExecError):
        return _exec_status(e), {"error": str(e), "errno": e.errno, "step": e.step}
    if isinstance(e, SandboxNotRunning):
        return 409, {"error": str(e)}
    if isinstance(e, (TypeError, ValueError)):
        return 400, {"error": str(e)}
    if type(e) is SandboxError:
        # Plain SandboxError is how the Sandbox reports state conflicts
        # ("already running", "was destroyed"); subclasses are runtime failures.
        return 409, {"error": str(e)}
    return 500, {"error": f"{type(e).__name__}: {e}"}

"""Hooks of config.json: each runs with the container's state JSON on its
stdin, its env and args as given, killed after its timeout (seconds)."""
from __future__ import annotations

import json
import subprocess

from .state import OciError


def run(cfg_hooks: dict | None, kind: str, state: dict, *, fatal: bool = True) -> None:
    for h in (cfg_hooks or {}).get(kind) or ():
        path = h.get("path")
        args = h.get("args") or [path]
        timeout = h.get("timeout")
        try:
            r = subprocess.run(args, executable=path, env=dict(
                e.split("=", 1) for e in h.get("env") or () if "=" in e),
                input=json.dumps(state).encode(), timeout=timeout if timeout else None,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True)
        except subprocess.TimeoutExpired:
            err = f"{kind} hook {path}: timed out after {timeout} s"
        except OSError as e:
            err = f"{kind} hook {path}: {e.strerror}"
        else:
            if r.returncode == 0:
                continue
            msg = r.stderr.decode(errors="replace").strip().splitlines()
            err = f"{kind} hook {path}: exit status {r.returncode}" + (f": {msg[-1]}" if msg else "")
        if fatal:
            raise OciError(err)

"""Validation of public input, once, at the edge (SPEC §2, §4, §10)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDIN_MODES = ("pipe",)
STDOUT_MODES = ("pipe", "ignore")
STDERR_MODES = ("pipe", "ignore", "combined")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"invalid sandbox name {name!r}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,63}}")
    return name


def check_signal(signo: Any) -> int:
    # signal.Signals members are ints (IntEnum) and count; a bool does not.
    if not isinstance(signo, int) or isinstance(signo, bool) or not 1 <= signo <= 64:
        raise ValueError(f"signal must be an int in 1..64, got {signo!r}")
    return int(signo)


def check_port(port: Any) -> int:
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int in 1..65535, got {port!r}")
    return port


def check_env(env: Mapping[str, str] | None, what: str = "env") -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"{what} must be a mapping of str to str")
    out = {}
    for k, v in env.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{what} keys and values must be str, got {k!r}: {v!r}")
        if not k or "=" in k or "\0" in k:
            raise ValueError(f"invalid {what} name {k!r}")
        if "\0" in v:
            raise ValueError(f"{what} value of {k!r} contains NUL")
        out[k] = v
    return out


def check_cmd(cmd: Any, what: str = "cmd") -> tuple[str, ...]:
    if isinstance(cmd, (str, bytes)) or not isinstance(cmd, (list, tuple)):
        raise TypeError(f"{what} must be a list of str, got {type(cmd).__name__}")
    if not cmd:
        raise TypeError(f"{what} must not be empty")
    for a in cmd:
        if not isinstance(a, str):
            raise TypeError(f"{what} items must be str, got {type(a).__name__}")
        if "\0" in a:
            raise ValueError(f"{what} item contains NUL: {a!r}")
    return tuple(cmd)


@dataclass(frozen=True)
class ExecArgs:
    cmd: tuple[str, ...]
    stdin: Any          # None | "pipe" | bytes | async iterable
    stdout: str
    stderr: str
    cwd: str | None
    env: dict
    user: str | int | None


def check_exec(cmd, stdin, stdout, stderr, cwd, env, user) -> ExecArgs:
    cmd = check_cmd(cmd)
    if isinstance(stdin, str):
        if stdin not in STDIN_MODES:
            raise TypeError(f"stdin must be None, 'pipe', bytes or an async iterable, got {stdin!r}")
    elif isinstance(stdin, (bytearray, memoryview)):
        stdin = bytes(stdin)
    elif stdin is not None and not isinstance(stdin, bytes) and not hasattr(stdin, "__aiter__"):
        raise TypeError(f"stdin must be None, 'pipe', bytes or an async iterable, got {type(stdin).__name__}")
    if stdout not in STDOUT_MODES:
        raise TypeError(f"stdout must be one of {STDOUT_MODES}, got {stdout!r}")
    if stderr not in STDERR_MODES:
        raise TypeError(f"stderr must be one of {STDERR_MODES}, got {stderr!r}")
    if stderr == "combined" and stdout != "pipe":
        raise TypeError("stderr='combined' requires stdout='pipe'")
    if cwd is not None:
        if not isinstance(cwd, str):
            raise TypeError(f"cwd must be str, got {type(cwd).__name__}")
        if "\0" in cwd:
            raise ValueError("cwd contains NUL")
    env = check_env(env)
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise TypeError(f"user must be a name or a numeric UID, got {type(user).__name__}")
        if isinstance(user, str) and "\0" in user:
            raise ValueError("user contains NUL")
        if isinstance(user, int) and not 0 <= user < 2**32 - 1:
            raise ValueError(f"invalid UID {user}")
    return ExecArgs(cmd, stdin, stdout, stderr, cwd, env, user)


LOG_LIMIT_DEFAULT = 1 << 20
LOG_LIMIT_MAX = 1 << 30


def check_log_limit(value: Any) -> int:
    """Per-stream entrypoint log ring size: bytes or "<n>[KMG]"; None = 1 MiB."""
    if value is None:
        return LOG_LIMIT_DEFAULT
    from .cgroup_base import parse_size
    n = parse_size(value)
    if n > LOG_LIMIT_MAX:
        raise ValueError(f"log_limit must be at most 1G, got {value!r}")
    return n

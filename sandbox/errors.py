"""The error types of SPEC §10."""
from __future__ import annotations

import os


class SandboxError(Exception):
    """Base of every runtime error."""


class SandboxNotRunning(SandboxError):
    """The sandbox is not running (never started, or stopped)."""


class ContainerError(SandboxError):
    """The sandbox was destroyed with a message (destroy(error))."""


class ContainerExitError(ContainerError):
    """The entrypoint exited nonzero or died by a signal (128 + N)."""

    def __init__(self, exit_code: int, message: str | None = None):
        self.exit_code = exit_code
        super().__init__(message or f"container exited with code {exit_code}")


class ExecError(SandboxError, OSError):
    """A process could not be created or started; `step` names what failed."""

    def __init__(self, err: int, step: str, detail: str = ""):
        strerror = os.strerror(err) if err else "failed"
        msg = f"{step}: {strerror}" + (f" ({detail})" if detail else "")
        OSError.__init__(self, err, msg)
        self.errno = err
        self.strerror = strerror
        self.step = step
        self.detail = detail

    def __str__(self) -> str:
        return self.args[1] if len(self.args) > 1 else super().__str__()

    def __reduce__(self):
        return (type(self), (self.errno, self.step, self.detail))


class NativeError(SandboxError, OSError):
    """A call into the C core failed in the runtime itself."""

    def __init__(self, err: int, step: str, detail: str = ""):
        strerror = os.strerror(err)
        OSError.__init__(self, err, f"{step}: {strerror}" + (f" ({detail})" if detail else ""))
        self.errno = err
        self.strerror = strerror
        self.step = step
        self.detail = detail

    def __str__(self) -> str:
        return self.args[1]


class ImageError(SandboxError):
    """An image could not be had (SPEC §11): a bad reference, an unknown image,
    a digest mismatch, an unreachable or refusing registry, a refused layer.
    `ref` is the reference as given, `reason` one line; `kind` says which
    (bad-reference, not-found, unreachable, denied, digest, refused, in-use)."""

    def __init__(self, ref: str, reason: str, kind: str = "failed"):
        super().__init__(f"image {ref}: {reason}")
        self.ref = ref
        self.reason = reason
        self.kind = kind

    def __reduce__(self):
        return (type(self), (self.ref, self.reason, self.kind))


__all__ = ["SandboxError", "SandboxNotRunning", "ContainerError", "ContainerExitError",
           "ExecError", "NativeError", "ImageError"]

"""A low-level Linux sandbox runtime (see SPEC.md)."""
from .errors import (ContainerError, ContainerExitError, ExecError, SandboxError,
                     SandboxNotRunning)
from .process import ExecOutput, ExecProcess
from .runtime import Runtime
from .sandbox import Sandbox

__all__ = ["Runtime", "Sandbox", "ExecProcess", "ExecOutput", "SandboxError",
           "SandboxNotRunning", "ContainerError", "ContainerExitError", "ExecError"]

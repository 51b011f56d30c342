"""A low-level Linux sandbox runtime (see SPEC.md)."""
from .errors import (ContainerError, ContainerExitError, ExecError, ImageError, SandboxError,
                     SandboxNotRunning)
from .images import Image
from .process import ExecOutput, ExecProcess
from .ports import TcpPort
from .proxy.client import fetch
from .proxy.models import Request, Response
from .runtime import Runtime
from .sandbox import Sandbox
from .container import Container

__all__ = ["TcpPort", "Request", "Response", "fetch", "Runtime", "Sandbox", "Container", "ExecProcess", "ExecOutput", "SandboxError",
           "SandboxNotRunning", "ContainerError", "ContainerExitError", "ExecError",
           "ImageError", "Image"]

"""A low-level Linux sandbox runtime (see SPEC.md)."""
# The public names load on first use (PEP 562): `import sandbox.<module>` —
# e.g. the sandbox-oci CLI, a new process for every containerd call — must
# not pay for the proxy, network and image stacks (~1 s here) it never uses.
_EXPORTS = {
    "ContainerError": ".errors", "ContainerExitError": ".errors", "ExecError": ".errors",
    "ImageError": ".errors", "SandboxError": ".errors", "SandboxNotRunning": ".errors",
    "Image": ".images", "ExecOutput": ".process", "ExecProcess": ".process",
    "TcpPort": ".ports", "fetch": ".proxy.client", "Request": ".proxy.models",
    "Response": ".proxy.models", "Runtime": ".runtime", "Sandbox": ".sandbox",
    "Container": ".container",
}

__all__ = ["TcpPort", "Request", "Response", "fetch", "Runtime", "Sandbox", "Container", "ExecProcess", "ExecOutput", "SandboxError",
           "SandboxNotRunning", "ContainerError", "ContainerExitError", "ExecError",
           "ImageError", "Image"]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

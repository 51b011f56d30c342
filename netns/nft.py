"""Run nft commands through libnftables (ctypes), falling back to the ``nft`` binary.

libnftables applies a whole ruleset in about a millisecond, a ``nft -f``
subprocess costs ~6 ms, and pyroute2's nftables module cannot express
``tproxy``.  Every command buffer is one netlink batch, so it is applied
atomically: all of it or nothing.

A failed load must never pass silently (it would leave sandbox traffic
unfiltered): every non-zero return raises ``NftError`` carrying nft's own
error text.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import threading

_LIBNAMES = ("libnftables.so.1", "/usr/lib/x86_64-linux-gnu/libnftables.so.1")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def check_identifier(value: str, what: str = "name") -> None:
    """Reject anything but a plain nft identifier: names end up in command text."""
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise ValueError(f"{what}: not an nft identifier: {value!r}")


class NftError(RuntimeError):
    """nft refused a command buffer; ``str()`` holds nft's error text."""

    def __init__(self, message: str, commands: str) -> None:
        super().__init__(message)
        self.commands = commands


def _load() -> ctypes.CDLL | None:
    for name in _LIBNAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        return lib
    return None


_lib = _load()
_NFT_CTX_DEFAULT = 0


class Nft:
    """One nft context.  Thread-safe (a lock serialises commands on the context).

    Its netlink socket belongs to the netns of the thread that created the
    context: create and use it from host-netns threads only (the runtime never
    moves those).
    ``close()`` frees the context and is idempotent.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ctx: int | None = None
        self._closed = False
        if _lib is not None:
            ctx = _lib.nft_ctx_new(_NFT_CTX_DEFAULT)
            if not ctx:
                raise MemoryError("nft_ctx_new failed")
            # Buffer output and errors instead of letting the library print
            # them to our stdout/stderr; we read them back after each command.
            if _lib.nft_ctx_buffer_output(ctx) or _lib.nft_ctx_buffer_error(ctx):
                _lib.nft_ctx_free(ctx)
                raise RuntimeError("nft: cannot buffer output")
            self._ctx = ctx
        elif shutil.which("nft") is None:
            raise RuntimeError("nft: neither libnftables.so.1 nor the nft binary is available")

    @property
    def backend(self) -> str:
        return "libnftables" if self._ctx is not None else "nft-binary"

    def run(self, commands: str) -> str:
        """Apply ``commands`` as one atomic batch; return nft's output text."""
        with self._lock:
            if self._closed:
                raise ValueError("nft context is closed")
            if self._ctx is not None:
                rc = _lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
                out = (_lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
                err = (_lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            else:
                # Fallback only: libnftables missing.  Same batch semantics.
                proc = subprocess.run(
                    ["nft", "-f", "-"], input=commands, capture_output=True, text=True, check=False
                )
                rc, out, err = proc.returncode, proc.stdout, proc.stderr
        if rc != 0:
            raise NftError(f"nft failed: {err.strip() or f'exit status {rc}'}", commands)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ctx, self._ctx = self._ctx, None
            if ctx is not None:
                _lib.nft_ctx_free(ctx)

    def __enter__(self) -> "Nft":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def list_tables(family: str = "inet") -> list[str]:
    """Names of the nft tables of ``family`` in this netns."""
    check_identifier(family, "family")
    with Nft() as nft:
        out = nft.run(f"list tables {family}")
    names = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] == family:
            names.append(parts[2])
    return names


def delete_table(name: str, family: str = "inet") -> None:
    """Delete a table; no error if it does not exist.

    nft 1.0.6 has no ``destroy``: ``add`` (a no-op when the table exists)
    followed by ``delete`` in one batch deletes it either way.
    """
    check_identifier(name)
    check_identifier(family, "family")
    with Nft() as nft:
        nft.run(f"add table {family} {name}\ndelete table {family} {name}\n")

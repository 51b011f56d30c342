"""cffi builder for sandbox._native (and the static sbx-init binary).

`csrc/sbx.h` is both the C header and, between its CDEF markers, the cdef.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
LIB_SOURCES = ["proc.c", "ns.c", "pidfd.c", "fs.c", "mount.c", "caps.c", "seccomp.c", "clone.c", "exec.c"]
INIT_SOURCES = ["init.c", "proc.c"]
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-D_FORTIFY_SOURCE=2"]


def _cdef() -> str:
    with open(os.path.join(HERE, "sbx.h")) as f:
        text = f.read()
    m = re.search(r"/\* CDEF BEGIN \*/(.*)/\* CDEF END \*/", text, re.S)
    return m.group(1)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "sandbox._native",
    '#include "sbx.h"',
    sources=[os.path.join("csrc", s) for s in LIB_SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

import os
import subprocess

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


# Static helpers next to the package, static so they run in any rootfs:
# sbx-init is PID 1 of every sandbox; sbx-exec joins a running sandbox for
# an exec (csrc/exechelper.c), so that nothing sharing the runtime's memory does.
HELPERS = {
    "sbx-init": ("init.c", "proc.c"),
    "sbx-exec": ("exechelper.c", "proc.c", "caps.c", "seccomp.c", "ns.c"),
}


class BuildExtWithInit(build_ext):
    """Also builds the static HELPERS."""

    def run(self):
        super().run()
        cc = os.environ.get("CC", "cc")
        for name, sources in HELPERS.items():
            srcs = [os.path.join(HERE, "csrc", s) for s in sources]
            targets = {os.path.join(HERE, "sandbox", name)}
            if not self.inplace and not getattr(self, "editable_mode", False):
                targets.add(os.path.join(self.build_lib, "sandbox", name))
            for out in targets:
                os.makedirs(os.path.dirname(out), exist_ok=True)
                subprocess.check_call([cc, "-O2", "-static", "-Wall", "-Wextra", "-Werror",
                                       "-std=gnu11", "-I", os.path.join(HERE, "csrc"),
                                       "-o", out, *srcs])


setup(
    name="sandbox",
    version="0.1.0",
    description="A low-level Linux sandbox runtime: namespaces, seccomp, pidfds, outbound policy",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["sandbox", "sandbox.*", "netns", "netns.*"]),
    package_data={"sandbox": list(HELPERS)},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build.py:ffibuilder"],
    install_requires=[
        "cffi>=1.15",
        "pyroute2>=0.7",
        "psutil>=5.9",
        "click>=8.1",
        "structlog>=23.1",
        "h11>=0.14",
        "dnspython>=2.4",
        "cryptography>=41",
        "httpx>=0.24",        # image registry client (sandbox/images/registry.py)
        "zstandard>=0.19",    # zstd image layers
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6"]},
    cmdclass={"build_ext": BuildExtWithInit},
    entry_points={"console_scripts": ["sandbox=sandbox.cli:main",
                                    "sandbox-oci=sandbox.oci.cli:main"]},
)

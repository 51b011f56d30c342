#!/usr/bin/env python3
"""create+start+wait+delete of `true`, and exec of `true`, for sandbox-oci
next to runc and crun (whichever are installed), in one run; prints the
medians and the ratios to runc. Run as root under the test lock:
    flock /tmp/sbx-test.lock python3 scripts/bench_oci.py [-n 10]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def bundle(d: str, args: list[str]) -> str:
    b = os.path.join(d, "bundle")
    os.makedirs(os.path.join(b, "rootfs", "bin"), exist_ok=True)
    bb = os.path.join(b, "rootfs", "bin", "busybox")
    if not os.path.exists(bb):
        shutil.copy("/bin/busybox", bb)
        for a in ("sh", "true", "sleep"):
            os.symlink("busybox", os.path.join(b, "rootfs", "bin", a))
    cfgp = os.path.join(b, "config.json")
    if os.path.exists(cfgp):
        os.unlink(cfgp)
    subprocess.run(["runc", "spec", "--bundle", b], check=True) if shutil.which("runc") else \
        subprocess.run([*OCI, "spec", "--bundle", b], check=True)
    cfg = json.load(open(cfgp))
    cfg["process"].update(terminal=False, args=args)
    json.dump(cfg, open(cfgp, "w"))
    return b


OCI = [sys.executable, "-m", "sandbox.oci.cli"]


def wait_pid(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    select.select([fd], [], [], 30)
    os.close(fd)


def lifecycle(rt: list[str], root: str, b: str, i: int) -> float:
    cid = f"bench{i}"
    pidf = os.path.join(root, f"{cid}.pid")
    q = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    subprocess.run([*rt, "--root", root, "create", "--bundle", b, "--pid-file", pidf, cid], check=True, **q)
    pid = int(open(pidf).read())
    subprocess.run([*rt, "--root", root, "start", cid], check=True, **q)
    wait_pid(pid)
    subprocess.run([*rt, "--root", root, "delete", cid], check=True, **q)
    return time.perf_counter() - t0


def exec_true(rt: list[str], root: str, cid: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([*rt, "--root", root, "exec", cid, "true"], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    n = ap.parse_args().n
    runtimes = {"sandbox-oci": OCI}
    for name in ("runc", "crun"):
        if shutil.which(name):
            runtimes[name] = [name]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, rt in runtimes.items():
            try:
                results[name] = one(name, rt, d, n)
            except subprocess.CalledProcessError as e:
                print(f"{name}: failed ({' '.join(e.cmd[-3:])} -> {e.returncode}); left out")
    base = results.get("runc")
    print(f"{'runtime':<12} {'create+start+wait+delete':>26} {'exec true':>12} {'list':>10}")
    for name, r in results.items():
        ratio = (lambda k: f" ({r[k] / base[k]:.2f}x)") if base else (lambda k: "")
        print(f"{name:<12} {r['lifecycle_ms']:>17.1f} ms{ratio('lifecycle_ms'):>8} "
              f"{r['exec_ms']:>7.1f} ms{ratio('exec_ms')} {r['list_ms']:>6.1f} ms{ratio('list_ms')}")


def one(name: str, rt: list[str], d: str, n: int) -> dict[str, float]:
    root = os.path.join(d, f"root-{name}")
    os.makedirs(root)
    b = bundle(d, ["true"])
    life = [lifecycle(rt, root, b, i) for i in range(n)]
    b = bundle(d, ["sleep", "1000"])
    q = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([*rt, "--root", root, "run", "-d", "--bundle", b, "long"], check=True, **q)
    try:
        ex = [exec_true(rt, root, "long") for _ in range(n)]
    finally:
        subprocess.run([*rt, "--root", root, "delete", "--force", "long"], **q)
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([*rt, "--root", root, "list"], check=True, **q)
    return {"lifecycle_ms": statistics.median(life) * 1000,
            "exec_ms": statistics.median(ex) * 1000,
            "list_ms": (time.perf_counter() - t0) / n * 1000}


if __name__ == "__main__":
    main()

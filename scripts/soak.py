#!/usr/bin/env python3
"""Soak: N sandboxes x M execs with random kills for T seconds, then zero
leaked kernel objects and zero lost output bytes. Not part of CI.

    python3 scripts/soak.py -n 50 -m 20 -t 120
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import random
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sandbox  # noqa: E402


def snapshot() -> dict[str, set]:
    links = set(os.listdir("/sys/class/net"))
    tables = set(subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.split("\n"))
    rules = set(subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout.split("\n"))
    cgs = set(glob.glob("/sys/fs/cgroup/*/sandbox/*/")) | set(glob.glob("/sys/fs/cgroup/*/sandbox/"))
    with open("/proc/self/mountinfo") as f:
        mounts = {" ".join(line.split()[3:5]) for line in f}
    kids = {p.pid for p in psutil.Process().children(recursive=True)}
    fds = set(os.listdir("/proc/self/fd"))
    return dict(links=links, tables=tables, rules=rules, cgroups=cgs, mounts=mounts, children=kids, fds=fds)


class Stats:
    def __init__(self):
        self.execs = self.checked = self.killed = self.lost = self.restarts = self.errors = 0
        self.bytes = 0


async def worker(rt, i: int, m: int, deadline: float, st: Stats) -> None:
    rnd = random.Random(i)
    while time.monotonic() < deadline:
        box = rt.sandbox()
        await box.start()
        for _ in range(m):
            if time.monotonic() >= deadline:
                break
            lines = rnd.randint(1, 20000)
            p = await box.exec(["sh", "-c", f"yes soak-line | head -n {lines}; echo err >&2"])
            st.execs += 1
            if rnd.random() < 0.15:
                p.kill(9)
                st.killed += 1
                await p.output()
                continue
            out = await p.output()
            st.checked += 1
            st.bytes += len(out.stdout)
            if out.stdout != b"soak-line\n" * lines or out.stderr != b"err\n" or out.exit_code != 0:
                st.lost += 1
        if rnd.random() < 0.3:
            box.signal(9)   # kill the whole sandbox from under its execs
            try:
                await box.monitor()
            except sandbox.ContainerExitError:
                pass
        await box.destroy()
        st.restarts += 1


async def main(n: int, m: int, t: float) -> int:
    before = snapshot()
    st = Stats()
    t0 = time.monotonic()
    async with sandbox.Runtime() as rt:
        results = await asyncio.gather(*(worker(rt, i, m, t0 + t, st) for i in range(n)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                st.errors += 1
                print("worker error:", repr(r), file=sys.stderr)
    elapsed = time.monotonic() - t0
    after = snapshot()
    leaks = {k: after[k] - before[k] for k in before if after[k] - before[k]}
    print(f"sandboxes={n} execs/sandbox={m} seconds={elapsed:.1f}")
    print(f"execs={st.execs} checked={st.checked} killed={st.killed} sandbox_cycles={st.restarts} "
          f"bytes_checked={st.bytes} lost_or_corrupt={st.lost} worker_errors={st.errors}")
    print("leaks:", leaks or "none")
    return 0 if not leaks and st.lost == 0 and st.errors == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50)
    ap.add_argument("-m", type=int, default=20)
    ap.add_argument("-t", type=float, default=120)
    a = ap.parse_args()
    sys.exit(asyncio.run(main(a.n, a.m, a.t)))

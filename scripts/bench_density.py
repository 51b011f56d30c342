#!/usr/bin/env python3
"""N idle sandboxes in one runtime: what start, exec and memory cost at N (as root).

    python3 scripts/bench_density.py [-n 1000] [-k 20] [--profile]

One `sandbox.Runtime`, default rootfs, every sandbox in its own netns with
internet off (the default sandbox of `rt.sandbox()` started without an
entrypoint, i.e. an idle PID 1). Measured in the same run:

  at N=1   start of one more sandbox (timed alone, then destroyed), and
           exec `true` into the first sandbox, k samples each;
  fill     sandboxes 2..N started one after another (progress on stderr);
  at N     the same k start and k exec samples (exec into sandboxes spread
           over the N held ones);
  memory   runtime RSS (VmRSS of this process) and host memory
           (MemTotal - MemAvailable) at N=1 and at N, per sandbox;
  destroy  all N destroyed concurrently (wall time, per sandbox), then the
           Runtime closed: nothing is left (`sandbox gc --dry-run` style
           checks are the tests' job; here we print what is left in the
           runtime's own bookkeeping).

--profile: cProfile of the k execs (and the k starts) at N, top entries.
The process's RLIMIT_NOFILE is raised to fs.nr_open (each sandbox holds a
few fds: netns, pidfd, cgroup.procs); nothing else on the host is changed.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import os
import pstats
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))     # the sandbox package of this checkout

import sandbox  # noqa: E402


def vm_rss_kb(pid: int = 0) -> int:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def host_used_kb() -> int:
    vals = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            vals[k] = int(v.split()[0])
    return vals["MemTotal"] - vals["MemAvailable"]


def med_p90(times: list[float]) -> tuple[float, float]:
    ms = sorted(t * 1000 for t in times)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return statistics.median(ms), p90


def raise_nofile() -> int:
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return want


async def time_starts(rt, k: int) -> tuple[list[float], list[float]]:
    """k starts of one more sandbox (timed), each destroyed (timed separately)."""
    starts, destroys = [], []
    for _ in range(k):
        box = rt.sandbox()
        t0 = time.perf_counter()
        await box.start(enable_internet=False)
        t1 = time.perf_counter()
        await box.destroy()
        t2 = time.perf_counter()
        starts.append(t1 - t0)
        destroys.append(t2 - t1)
    return starts, destroys


async def time_execs(boxes: list, k: int) -> list[float]:
    out = []
    step = max(1, len(boxes) // k)
    for i in range(k):
        box = boxes[(i * step) % len(boxes)]
        t0 = time.perf_counter()
        p = await box.exec(["true"])
        code = await p.exit_code
        out.append(time.perf_counter() - t0)
        if code != 0:
            raise RuntimeError(f"exec true exited {code}")
    return out


def print_profile(prof: cProfile.Profile, title: str, top: int = 25) -> None:
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
        text = s.getvalue()
        start = text.find("   ncalls")
        print(f"\n{title}: top {top} by {key}")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())


async def bench(n: int, k: int, profile: bool) -> int:
    nofile = raise_nofile()
    rows = []
    t_all = time.perf_counter()
    async with sandbox.Runtime() as rt:
        boxes = []
        first = rt.sandbox()
        await first.start(enable_internet=False)
        boxes.append(first)
        # Warm-up: the C core, page cache, the netns pool's first refill.
        await time_starts(rt, 3)
        await time_execs(boxes, 3)
        gc.collect()
        rss1, host1 = vm_rss_kb(), host_used_kb()
        s1, d1 = await time_starts(rt, k)
        e1 = await time_execs(boxes, k)
        rows.append((1, s1, e1, d1))

        fill_t0 = time.perf_counter()
        last = fill_t0
        while len(boxes) < n:
            box = rt.sandbox()
            try:
                await box.start(enable_internet=False)
            except BaseException:
                await box.destroy()
                print(f"start failed at N={len(boxes) + 1}", file=sys.stderr)
                raise
            boxes.append(box)
            if time.perf_counter() - last > 10 or len(boxes) == n:
                last = time.perf_counter()
                rate = (len(boxes) - 1) / (last - fill_t0)
                print(f"  N={len(boxes)}  {rate:.1f} starts/s  rss {vm_rss_kb() // 1024} MiB",
                      file=sys.stderr)
        fill_s = time.perf_counter() - fill_t0
        gc.collect()
        rssN, hostN = vm_rss_kb(), host_used_kb()
        if n > 1:
            prof = cProfile.Profile() if profile else None
            if prof:
                prof.enable()
            eN = await time_execs(boxes, k)
            if prof:
                prof.disable()
                print_profile(prof, f"exec true at N={n}")
                prof = cProfile.Profile()
                prof.enable()
            sN, dN = await time_starts(rt, k)
            if prof:
                prof.disable()
                print_profile(prof, f"start+destroy at N={n}")
            rows.append((n, sN, eN, dN))

        t0 = time.perf_counter()
        res = await asyncio.gather(*(b.destroy() for b in boxes), return_exceptions=True)
        destroy_all = time.perf_counter() - t0
        errors = [r for r in res if isinstance(r, BaseException)]
        left = rt.sandboxes
        t0 = time.perf_counter()
    close_s = time.perf_counter() - t0
    wall = time.perf_counter() - t_all

    print()
    print(f"N idle sandboxes in one runtime (default rootfs, own netns, internet off); "
          f"k={k} samples per cell; wall {wall:.0f} s")
    print(f"{'N':>7} {'start ms':>9} {'p90':>7} {'exec ms':>8} {'p90':>7} {'destroy ms':>11}")
    for N, s, e, d in rows:
        sm, sp = med_p90(s)
        em, ep = med_p90(e)
        dm, _ = med_p90(d)
        print(f"{N:>7} {sm:>9.2f} {sp:>7.2f} {em:>8.2f} {ep:>7.2f} {dm:>11.2f}")
    if len(rows) == 2:
        print(f"ratio N={n}/N=1: start {med_p90(rows[1][1])[0] / med_p90(rows[0][1])[0]:.2f}  "
              f"exec {med_p90(rows[1][2])[0] / med_p90(rows[0][2])[0]:.2f}  (target <= 1.5)")
    per = max(1, n - 1)
    print(f"fill 2..{n}: {fill_s:.1f} s ({fill_s / per * 1000:.2f} ms per start on average)")
    print(f"runtime RSS: {rss1 // 1024} MiB at N=1, {rssN // 1024} MiB at N={n}: "
          f"{(rssN - rss1) / per:.1f} KiB per sandbox (target <= 100)")
    print(f"host memory: {(hostN - host1) / per / 1024:.2f} MiB per sandbox")
    print(f"destroy all {n} concurrently: {destroy_all:.1f} s "
          f"({destroy_all / n * 1000:.2f} ms per sandbox); Runtime close {close_s:.1f} s")
    print(f"errors: {len(errors)} {errors[:3]}; sandboxes left in the runtime: {len(left)}; "
          f"RLIMIT_NOFILE {nofile}")
    return 1 if errors or left else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, help="idle sandboxes to hold (default 1000)")
    ap.add_argument("-k", type=int, default=20, help="samples per measurement (default 20)")
    ap.add_argument("--profile", action="store_true", help="cProfile the execs and starts at N")
    a = ap.parse_args(argv)
    if a.n < 1 or a.k < 1:
        ap.error("-n and -k must be >= 1")
    if os.geteuid() != 0:
        print("bench_density.py: must run as root", file=sys.stderr)
        return 2
    return asyncio.run(bench(a.n, a.k, a.profile))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Sandbox start and exec latency next to bubblewrap, crun, runc and nsenter (as root).

    python3 scripts/bench_start.py [-n 50] [--rounds 5] [--warmup 3]
    python3 scripts/bench_start.py --profile [-n 50]   # (a) under cProfile only

Measured in one run, with one warm `sandbox.Runtime` in this process:

  (a)  box = rt.sandbox(); await box.start(); p = await box.exec(["true"]);
       await p.exit_code; await box.destroy()          start -> exec -> exit -> destroy
  (a2) box = rt.sandbox(); await box.start(entrypoint=["true"]);
       await box.monitor(); await box.destroy()        start(true) -> exit -> destroy
  (b)  p = await box.exec(["true"]); await p.exit_code  exec into one running sandbox

and, from scripts/anchors.py (apt-installed if missing): `bwrap --unshare-all ... true`,
`crun run` and `runc run` of `true` (wall time of the runtime's process), and
`nsenter -a -t <pid> true` into a running namespace set.

The n samples of each are taken in `--rounds` rounds that alternate the order
(ours then anchors, anchors then ours, ...), so background load hits both sides
alike.  Targets on medians: (a)/crun <= 0.5 and (b)/nsenter <= 1.0; (a)/bwrap and
(a)/runc are printed for information.  Also: peak RSS of this process and the RSS
of one sandbox's PID 1 (sbx-init).  Everything is cleaned up: sandboxes by the
Runtime's `async with`, anchors by anchors.py.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                      # anchors
sys.path.insert(0, os.path.dirname(HERE))     # the sandbox package of this checkout

import anchors  # noqa: E402
import sandbox  # noqa: E402

TARGETS = {"(a)/crun": 0.5, "(b)/nsenter": 1.0}


# -- ours ---------------------------------------------------------------------------------

async def one_a(rt: sandbox.Runtime) -> float:
    t0 = time.perf_counter()
    box = rt.sandbox()
    await box.start()
    p = await box.exec(["true"])
    code = await p.exit_code
    await box.destroy()
    dt = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"(a): `true` exited {code}")
    return dt


async def one_a2(rt: sandbox.Runtime) -> float:
    t0 = time.perf_counter()
    box = rt.sandbox()
    await box.start(entrypoint=["true"])
    await box.monitor()          # raises ContainerExitError unless `true` exited 0
    await box.destroy()
    return time.perf_counter() - t0


async def one_b(box: sandbox.Sandbox) -> float:
    t0 = time.perf_counter()
    p = await box.exec(["true"])
    code = await p.exit_code
    dt = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"(b): `true` exited {code}")
    return dt


async def many(fn, arg, k: int) -> list[float]:
    return [await fn(arg) for _ in range(k)]


# -- helpers ------------------------------------------------------------------------------

def rounds_of(n: int, rounds: int) -> list[int]:
    rounds = max(1, min(rounds, n))
    return [n // rounds + (i < n % rounds) for i in range(rounds)]


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip() if out else "?"
    except OSError:
        return "?"


def fmt_ratio(name: str, value: float) -> str:
    target = TARGETS.get(name)
    if target is None:
        return f"  {name:<13} {value:6.2f}   (information)"
    verdict = "PASS" if value <= target else "MISS"
    return f"  {name:<13} {value:6.2f}   target <= {target:.1f}  {verdict}"


# -- the benchmark ------------------------------------------------------------------------

async def bench(n: int, rounds: int, warmup: int) -> int:
    anchors.ensure_installed()
    sizes = rounds_of(n, rounds)
    samples: dict[str, list[float]] = {k: [] for k in
                                       ("(a)", "(a2)", "(b)", "bwrap", "crun", "runc", "nsenter")}
    init_rss = 0
    t_start = time.perf_counter()
    async with sandbox.Runtime() as rt:
        exec_box = rt.sandbox()
        await exec_box.start()
        init_rss = vm_rss_kb(exec_box.pid)
        with anchors.nsenter_target() as target:
            anchor_fns = (("bwrap", anchors.time_bwrap), ("crun", anchors.time_crun),
                          ("runc", anchors.time_runc),
                          ("nsenter", lambda k: anchors.time_nsenter(k, pid=target)))

            async def ours(k: int) -> None:
                samples["(a)"] += await many(one_a, rt, k)
                samples["(a2)"] += await many(one_a2, rt, k)
                samples["(b)"] += await many(one_b, exec_box, k)

            def theirs(k: int) -> None:
                for label, fn in anchor_fns:
                    samples[label] += fn(k)

            # Warm-up: page cache, the C core, the runtimes' binaries; discarded.
            if warmup:
                await many(one_a, rt, warmup)
                await many(one_a2, rt, warmup)
                await many(one_b, exec_box, warmup)
                for _, fn in anchor_fns:
                    fn(warmup)

            for i, k in enumerate(sizes):
                if i % 2 == 0:
                    await ours(k)
                    theirs(k)
                else:
                    theirs(k)
                    await ours(k)
                print(f"  round {i + 1}/{len(sizes)} done ({k} each)", file=sys.stderr)
        if vm_rss_kb(exec_box.pid) > init_rss:
            init_rss = vm_rss_kb(exec_box.pid)  # after the execs: still the same init
        await exec_box.destroy()
        left = rt.sandboxes
    wall = time.perf_counter() - t_start
    if left:
        raise RuntimeError(f"sandboxes left behind: {left}")
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    med = {}
    print()
    print(f"{'':<9} {'median ms':>10} {'p90 ms':>8}   n={n} in {len(sizes)} alternating rounds, "
          f"{warmup} warm-up, {wall:.0f} s")
    rows = (("(a)", "start -> exec true -> exit -> destroy"),
            ("(a2)", "start(entrypoint=true) -> monitor -> destroy"),
            ("(b)", "exec true into a running sandbox"),
            ("bwrap", "bwrap --unshare-all ... true"),
            ("crun", "crun run (true)"),
            ("runc", "runc run (true)"),
            ("nsenter", "nsenter -a -t PID true"))
    for label, what in rows:
        m, p90 = anchors.summary(samples[label])
        med[label] = m
        print(f"{label:<9} {m:>10.2f} {p90:>8.2f}   {what}")
    print()
    print("ratios of medians:")
    for name, num, den in (("(a)/crun", "(a)", "crun"), ("(b)/nsenter", "(b)", "nsenter"),
                           ("(a)/bwrap", "(a)", "bwrap"), ("(a)/runc", "(a)", "runc"),
                           ("(a2)/crun", "(a2)", "crun")):
        print(fmt_ratio(name, med[num] / med[den]))
    print()
    print(f"peak RSS of this benchmark process: {peak_rss_kb / 1024:.1f} MiB")
    print(f"RSS of one sandbox's PID 1 (sbx-init, VmRSS): {init_rss} kB")
    print(f"({version('bwrap')}; {version('crun')}; {version('runc')}; "
          f"{os.uname().release}; {os.cpu_count()} CPUs; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


async def profile(n: int, warmup: int, top: int = 20) -> int:
    prof = cProfile.Profile()
    async with sandbox.Runtime() as rt:
        await many(one_a, rt, warmup)
        t0 = time.perf_counter()
        prof.enable()
        times = await many(one_a, rt, n)
        prof.disable()
        wall = time.perf_counter() - t0
    m, p90 = anchors.summary(times)
    print(f"(a) under cProfile: median {m:.2f} ms, p90 {p90:.2f} ms (n={n}; "
          f"the profiler itself slows Python code down)")
    # Where the wall time went: idle in the event loop's epoll (waiting for the
    # children / the kernel) versus everything else (Python and in-process syscalls).
    idle = sum(st[2] for (_, _, fn), st in pstats.Stats(prof).stats.items()
               if fn == "<method 'poll' of 'select.epoll' objects>")
    print(f"per (a): {wall / n * 1000:.2f} ms wall = {idle / n * 1000:.2f} ms waiting in epoll "
          f"+ {(wall - idle) / n * 1000:.2f} ms in this process")
    for key, k in (("cumulative", top), ("tottime", 10)):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(k)
        text = s.getvalue()
        # Keep the table, drop pstats' preamble up to the header line.
        start = text.find("   ncalls")
        print(f"\ntop {k} by {key}:")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=50, help="samples of each measurement (default 50)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating rounds the n samples are split into (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="discarded warm-up runs (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="only run (a) under cProfile and print the top 20 cumulative entries")
    a = ap.parse_args(argv)
    if a.n < 1 or a.rounds < 1 or a.warmup < 0:
        ap.error("-n and --rounds must be >= 1, --warmup >= 0")
    if os.geteuid() != 0:
        print("bench_start.py: must run as root", file=sys.stderr)
        return 2
    if a.profile:
        return asyncio.run(profile(a.n, a.warmup))
    return asyncio.run(bench(a.n, a.rounds, a.warmup))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

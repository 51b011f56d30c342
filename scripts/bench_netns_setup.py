#!/usr/bin/env python3
"""Time per-sandbox network setup and teardown with netns (run as root).

create   = NetNS.create + Veth.create (veth pair, addresses, lo/eth0 up,
           default route, IPv6 off)
teardown = Veth.close + NetNS.close
Also: the runtime's nft table (libnftables, one atomic batch), HostNetwork
setup/close (table + ip rule + local route) and one set_internet() toggle.

Usage: sudo python3 scripts/bench_netns_setup.py [-n 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from netns import AddressPool, HostNetwork, NetNS, Veth  # noqa: E402
from netns.nft import Nft  # noqa: E402


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return f"median {statistics.median(s) * 1000:7.2f} ms   p90 {p90 * 1000:7.2f} ms   (n={len(s)})"


def bench_sandboxes(n: int, state_dir: str, prefix: str) -> tuple[list[float], list[float]]:
    pool = AddressPool(f"10.252.{os.getpid() % 256}.0/24")
    create, teardown = [], []
    for i in range(n):
        block = pool.allocate()
        t0 = time.perf_counter()
        ns = NetNS.create(state_dir, f"b{i}")
        try:
            veth = Veth.create(ns, f"{prefix}{i % 64}", block)
        except BaseException:
            ns.close()
            raise
        t1 = time.perf_counter()
        veth.close()
        ns.close()
        t2 = time.perf_counter()
        pool.release(block)
        create.append(t1 - t0)
        teardown.append(t2 - t1)
    return create, teardown


def bench_host(n: int, tag: str, prefix: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"nft": [], "setup": [], "toggle": [], "close": []}
    for _ in range(n):
        hn = HostNetwork(tag, prefix, 40001, 40002)
        # The nft batch alone, as HostNetwork applies it.
        with Nft() as nft:
            t0 = time.perf_counter()
            nft.run(hn.ruleset())
            out["nft"].append(time.perf_counter() - t0)
            nft.run(f"delete table inet {hn.table_name}")
        t0 = time.perf_counter()
        hn.setup()
        t1 = time.perf_counter()
        try:
            hn.set_internet(prefix + "0", True)
            t2 = time.perf_counter()
        finally:
            hn.close()
        t3 = time.perf_counter()
        out["setup"].append(t1 - t0)
        out["toggle"].append(t2 - t1)
        out["close"].append(t3 - t2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50, help="iterations (default 50)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_netns_setup: needs root")
    prefix = f"bn{os.getpid() % 100000}-"
    tag = f"bench{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="bench-netns-") as state_dir:
        create, teardown = bench_sandboxes(args.n, state_dir, prefix)
        host = bench_host(args.n, tag, prefix)
    print(f"sandbox netns+veth create  {ms(create)}")
    print(f"sandbox netns+veth close   {ms(teardown)}")
    with Nft() as nft:
        backend = nft.backend
    print(f"nft table apply            {ms(host['nft'])}   backend={backend}")
    print(f"HostNetwork.setup()        {ms(host['setup'])}")
    print(f"HostNetwork.set_internet() {ms(host['toggle'])}")
    print(f"HostNetwork.close()        {ms(host['close'])}")


if __name__ == "__main__":
    main()

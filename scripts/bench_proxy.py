#!/usr/bin/env python3
"""Proxy at line rate (issue 13): `wrk` run INSIDE a sandbox, -c1 and -c16, one run:

  (a) a trivial Python handler `Response("ok")`     (http://bench.test/, handler path)
  (b) an upstream in a netns this script makes, through the proxy
      (http://up.bench/: the runtime's resolver is a fake DNS mapping up.bench to it)
  (c) the same upstream directly (enable_internet, port 8080 is not intercepted)
  (z) a raw asyncio Protocol server inside the sandbox on loopback (language ceiling)

and prints req/s, mean/p99 latency, (a)/(z), (b)/(c), the p99 latency the proxy adds
at -c1, and HTTPS pass-through: a 100 MB download through the proxy (spliced TLS, 443)
vs directly (8443). Targets: (a)/(z) >= 0.35 at -c16, (b)/(c) >= 0.5, added p99 at -c1
<= 1 ms, HTTPS >= 0.8x direct. Requires `wrk` (Debian package wrk).

    python3 scripts/bench_proxy.py [-d 5] [--profile] [--uvloop]

Traffic stays on this machine: the upstream is in 10.215.0.0/24 behind a veth.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import io
import json
import os
import pstats
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import netns  # noqa: E402
import sandbox  # noqa: E402
from sandbox import Response  # noqa: E402
from helpers import FakeDNS  # noqa: E402

NAME = "up.bench"
BIG = 100 * 1024 * 1024

# The upstream process: keep-alive HTTP on inherited fds (80, 8080), and a 100 MB TLS
# download on the others (443, 8443), one thread per TLS connection.
UPSTREAM = r'''
import asyncio, socket, ssl, sys, threading
http_fds, tls_fds, cert, key, big = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3], sys.argv[4], int(sys.argv[5])
BODY = b"upstream ok\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t; self.buf = b""
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]   # GETs without bodies only
            self.t.write(RESP * n)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(cert, key)
CHUNK = b"x" * (1 << 20)
def serve_tls(ls):
    while True:
        c, _ = ls.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()
def one(c):
    try:
        s = ctx.wrap_socket(c, server_side=True)
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d: return
            buf += d
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % big)
        for _ in range(big // len(CHUNK)): s.sendall(CHUNK)
        s.close()
    except OSError:
        pass
    finally:
        c.close()
for fd in tls_fds:
    ls = socket.socket(fileno=int(fd)); ls.setblocking(True)
    threading.Thread(target=serve_tls, args=(ls,), daemon=True).start()
async def main():
    loop = asyncio.get_running_loop()
    for fd in http_fds:
        await loop.create_server(P, sock=socket.socket(fileno=int(fd)), backlog=1024)
    sys.stdout.write("ready\n"); sys.stdout.flush()
    await loop.run_in_executor(None, sys.stdin.read)
asyncio.run(main())
'''

# (z): the language ceiling, a raw asyncio Protocol server inside the sandbox.
RAW = r'''
import asyncio, socket, sys
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        self.buf += d
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            self.t.write(RESP * n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 9000, backlog=1024)
    print("ready", flush=True)
    await asyncio.sleep(1e9)
asyncio.run(main())
'''

# The HTTPS download, timed inside the sandbox (certificate not verified: a test host).
DOWNLOAD = r'''
import socket, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = time.perf_counter()
s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode())
n = 0
buf = bytearray(1 << 20)
while True:
    k = s.recv_into(buf)
    if not k: break
    n += k
dt = time.perf_counter() - t
print(n, dt)
'''


def listen_in(ns, ip: str, port: int) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        s.listen(1024)
        return s
    return ns.run_in(make)


def udp_in(ns, ip: str, port: int) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, port))
        s.setblocking(False)
        return s
    return ns.run_in(make)


def self_signed(dirname: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    c, k = os.path.join(dirname, "cert.pem"), os.path.join(dirname, "key.pem")
    with open(c, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(k, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return c, k


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    mean = _ms(re.search(r"Latency\s+(\S+)", out).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    return {"rps": round(rps, 1), "mean_ms": round(mean, 3), "p99_ms": round(p99, 3),
            **({"errors": errors.group(0)} if errors else {})}


async def run_in(box, argv: list[str], timeout: float) -> str:
    proc = await box.exec(argv)
    try:
        out = await asyncio.wait_for(proc.output(), timeout)
    except TimeoutError:
        proc.kill(9)
        await proc.exit_code
        raise RuntimeError(f"{argv[0]} timed out") from None
    if out.exit_code != 0:
        raise RuntimeError(f"{argv} failed: {out.stderr.decode()[-2000:]}")
    return out.stdout.decode()


async def wrk(box, url: str, conns: int, seconds: int) -> dict:
    return parse_wrk(await run_in(box, ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url],
                                  seconds + 30))


async def download(box, port: int, runs: int = 3) -> dict:
    """The median of `runs` downloads (one is ~0.3 s: noisy)."""
    times = []
    for _ in range(runs):
        n, dt = (await run_in(box, ["python3", "-c", DOWNLOAD, NAME, str(port)], 120)).split()
        if int(n) < BIG:
            raise RuntimeError(f"download got {n} bytes")
        times.append(float(dt))
    dt = sorted(times)[len(times) // 2]
    return {"MB_s": round(BIG / dt / 1e6, 1), "seconds": round(dt, 3)}


def top(prof: cProfile.Profile, limit: int = 30) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(limit)
    return s.getvalue()


async def main(seconds: int, profile: bool) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("bench_proxy: wrk is required (apt-get install wrk)")
    state = tempfile.mkdtemp(prefix="bench-proxy-")
    ns = netns.NetNS.create(state, "upstream")
    veth = up = None
    try:
        block = netns.AddressPool("10.215.0.0/24").allocate()
        veth = netns.Veth.create(ns, f"sbb{os.getpid() % 100000}", block)
        ip = str(block.peer)
        cert, key = self_signed(state)
        http_socks = [listen_in(ns, ip, p) for p in (80, 8080)]
        tls_socks = [listen_in(ns, ip, p) for p in (443, 8443)]
        fds = [s.fileno() for s in http_socks + tls_socks]
        up = subprocess.Popen([sys.executable, "-c", UPSTREAM, ",".join(str(s.fileno()) for s in http_socks),
                               ",".join(str(s.fileno()) for s in tls_socks), cert, key, str(BIG)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=fds)
        for s in http_socks + tls_socks:
            s.close()
        assert up.stdout.readline() == b"ready\n"
        dns = FakeDNS(udp_in(ns, ip, 53), listen_in(ns, ip, 53), {NAME: ip})
        async with dns, sandbox.Runtime(state_dir=os.path.join(state, "rt"), resolver=f"{ip}:53") as rt:
            box = rt.sandbox("bench")

            async def trivial(request, ctx):
                return Response("ok")

            await box.intercept_outbound_http("bench.test", trivial)
            await box.start(enable_internet=True)
            raw = await box.exec(["python3", "-c", RAW])
            assert (await raw.stdout.read(6)).strip() == b"ready"
            try:
                cases = {"a_handler": "http://bench.test/", "b_egress_proxy": f"http://{NAME}/",
                         "c_direct": f"http://{NAME}:8080/", "z_raw_asyncio": "http://127.0.0.1:9000/"}
                result: dict = {"loop": type(asyncio.get_running_loop()).__module__}
                profs = {}
                for c in (1, 16):
                    for name, url in cases.items():
                        print(f"bench: {name} -c{c} ...", file=sys.stderr, flush=True)
                        prof = cProfile.Profile() if profile and name[0] in "ab" and c == 16 else None
                        if prof:
                            prof.enable()
                        result[f"{name}_c{c}"] = await wrk(box, url, c, seconds)
                        if prof:
                            prof.disable()
                            profs[name] = prof
                print("bench: https 100 MB ...", file=sys.stderr, flush=True)
                result["https_proxy"] = await download(box, 443)
                result["https_direct"] = await download(box, 8443)
            finally:
                raw.kill(9)
                await raw.exit_code
            r = result
            ratios = {
                "a/z_c16": r["a_handler_c16"]["rps"] / r["z_raw_asyncio_c16"]["rps"],
                "a/z_c1": r["a_handler_c1"]["rps"] / r["z_raw_asyncio_c1"]["rps"],
                "b/c_c16": r["b_egress_proxy_c16"]["rps"] / r["c_direct_c16"]["rps"],
                "b/c_c1": r["b_egress_proxy_c1"]["rps"] / r["c_direct_c1"]["rps"],
                "added_p99_ms_c1_b-c": r["b_egress_proxy_c1"]["p99_ms"] - r["c_direct_c1"]["p99_ms"],
                "added_p99_ms_c1_a-z": r["a_handler_c1"]["p99_ms"] - r["z_raw_asyncio_c1"]["p99_ms"],
                "https_proxy/direct": r["https_proxy"]["MB_s"] / r["https_direct"]["MB_s"],
            }
            result["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
            result["targets"] = {"a/z>=0.35": ratios["a/z_c16"] >= 0.35, "b/c>=0.5": ratios["b/c_c16"] >= 0.5,
                                 "added_p99<=1ms": ratios["added_p99_ms_c1_b-c"] <= 1.0,
                                 "https>=0.8": ratios["https_proxy/direct"] >= 0.8}
            for name, prof in profs.items():
                print(f"--- cProfile of the runtime during {name} -c16 (by own time) ---", file=sys.stderr)
                print(top(prof), file=sys.stderr)
            return result
    finally:
        if up is not None:
            up.stdin.close()
            up.kill()
            up.wait(10)
        if veth is not None:
            veth.close()
        ns.close()
        shutil.rmtree(state, ignore_errors=True)


def _terminate(signo, frame):
    raise SystemExit(128 + signo)   # so that every finally (kernel objects) runs


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-d", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--profile", action="store_true", help="cProfile the runtime during (a) and (b) at -c16")
    ap.add_argument("--uvloop", action="store_true", help="run the runtime on uvloop (if installed)")
    a = ap.parse_args()
    if a.uvloop:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    print(json.dumps(asyncio.run(main(a.d, a.profile)), indent=2))

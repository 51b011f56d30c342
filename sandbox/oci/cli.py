"""sandbox-oci's command line: runc's commands, flags and error style
(`Error: <message>` on one stderr line, exit 1; with --log, the same error as
a log record there, which containerd reads).

Lean by design: argparse, and each command imports only what it needs, so
`state`, `kill`, `list` never load the executor, the proxy or the network stack.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .state import DEFAULT_ROOT, OciError, list_ids, load

VERSION = "0.1.0"
SPEC_VERSION = "1.1.0"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise OciError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sandbox-oci", add_help=True)
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--log", default="")
    p.add_argument("--log-format", default="text", choices=("text", "json"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--systemd-cgroup", action="store_true")
    p.add_argument("--rootless", default="auto")
    p.add_argument("--criu", default="")
    p.add_argument("-v", "--version", action="store_true")
    sub = p.add_subparsers(dest="cmd")

    def cmd(name, *ids):
        s = sub.add_parser(name)
        for i in ids:
            s.add_argument(i)
        return s

    for name in ("create", "run"):
        s = cmd(name)
        s.add_argument("-b", "--bundle", default=None)
        s.add_argument("--pid-file", default=None)
        s.add_argument("--console-socket", default=None)
        s.add_argument("--no-pivot", action="store_true")
        s.add_argument("--no-new-keyring", action="store_true")
        s.add_argument("--preserve-fds", type=int, default=0)
        if name == "run":
            s.add_argument("-d", "--detach", action="store_true")
        s.add_argument("id")
    cmd("start", "id")
    cmd("state", "id")
    s = cmd("kill")
    s.add_argument("-a", "--all", action="store_true")
    s.add_argument("id")
    s.add_argument("signal", nargs="?", default="SIGTERM")
    s = cmd("delete")
    s.add_argument("-f", "--force", action="store_true")
    s.add_argument("id")
    s = cmd("exec")
    s.add_argument("-p", "--process", default=None)
    s.add_argument("-d", "--detach", action="store_true")
    s.add_argument("--pid-file", default=None)
    s.add_argument("-t", "--tty", action="store_true")
    s.add_argument("--console-socket", default=None)
    s.add_argument("--cwd", default=None)
    s.add_argument("-e", "--env", action="append", default=[])
    s.add_argument("-u", "--user", default=None)
    s.add_argument("id")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s = cmd("list")
    s.add_argument("-f", "--format", default="table", choices=("table", "json"))
    s.add_argument("-q", "--quiet", action="store_true")
    s = cmd("ps")
    s.add_argument("-f", "--format", default="table", choices=("table", "json"))
    s.add_argument("id")
    s.add_argument("ps_args", nargs=argparse.REMAINDER)
    cmd("pause", "id")
    cmd("resume", "id")
    s = cmd("update")
    s.add_argument("-r", "--resources", default=None)
    s.add_argument("--memory", type=int, default=None)
    s.add_argument("--pids-limit", type=int, default=None)
    s.add_argument("id")
    s = cmd("events")
    s.add_argument("--stats", action="store_true")
    s.add_argument("--interval", default="5s")
    s.add_argument("id")
    cmd("features")
    s = cmd("spec")
    s.add_argument("-b", "--bundle", default=None)
    s.add_argument("--rootless", action="store_true")
    for name in ("checkpoint", "restore"):
        s = sub.add_parser(name)
        s.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _log(args, level: str, msg: str) -> None:
    if not getattr(args, "log", ""):
        return
    try:
        with open(args.log, "a") as f:
            if args.log_format == "json":
                f.write(json.dumps({"level": level, "msg": msg,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
            else:
                f.write(f'time="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}" level={level} msg="{msg}"\n')
    except OSError:
        pass


def _list(a) -> int:
    rows = []
    for cid in list_ids(a.root):
        try:
            c = load(a.root, cid)
        except OciError:
            continue
        s = c.spec_state()
        rows.append({"ociVersion": s["ociVersion"], "id": cid, "pid": s["pid"], "status": s["status"],
                     "bundle": s["bundle"], "rootfs": c.data.get("rootfs", ""),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z",
                                              time.gmtime(c.data.get("created", 0))),
                     "owner": "root", "annotations": s.get("annotations") or {}})
    if a.quiet:
        for r in rows:
            print(r["id"])
    elif a.format == "json":
        print(json.dumps(rows))
    else:
        print(f"{'ID':<20}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}{'CREATED':<32}OWNER")
        for r in rows:
            print(f"{r['id']:<20}{r['pid']:<10}{r['status']:<10}{r['bundle']:<40}{r['created']:<32}root")
    return 0


def _ps(a) -> int:
    from .cgroup import Cgroups
    c = load(a.root, a.id)
    pids = Cgroups(c.data.get("cgroups") or {}).pids()
    if a.format == "json":
        print(json.dumps(pids))
        return 0
    import subprocess
    out = subprocess.run(["ps", *(a.ps_args or ["-ef"])], capture_output=True, text=True).stdout
    lines = out.splitlines()
    if not lines:
        return 0
    head = lines[0].split()
    col = head.index("PID") if "PID" in head else 1
    print(lines[0])
    for line in lines[1:]:
        f = line.split()
        if len(f) > col and f[col].isdigit() and int(f[col]) in pids:
            print(line)
    return 0


def _freeze(a, state: str) -> int:
    c = load(a.root, a.id)
    st = c.status()
    if st == "stopped" or st == "created":
        raise OciError("container not running")
    dirs = [d for n, d in (c.data.get("cgroups") or {}).items() if "freezer" in n.split(",") or n == ""]
    if not dirs:
        raise OciError("no freezer cgroup for this container")
    d = dirs[0]
    f = "freezer.state" if os.path.exists(os.path.join(d, "freezer.state")) else "cgroup.freeze"
    with open(os.path.join(d, f), "w") as fh:
        fh.write(state if f == "freezer.state" else ("1" if state == "FROZEN" else "0"))
    return 0


def _update(a) -> int:
    from .cgroup import Cgroups
    c = load(a.root, a.id)
    res: dict = {}
    if a.resources:
        text = sys.stdin.read() if a.resources == "-" else open(a.resources).read()
        try:
            res = json.loads(text)
        except ValueError as e:
            raise OciError(f"resources: {e}") from None
    if a.memory is not None:
        res.setdefault("memory", {})["limit"] = a.memory
    if a.pids_limit is not None:
        res.setdefault("pids", {})["limit"] = a.pids_limit
    Cgroups(c.data.get("cgroups") or {}).apply(res)
    return 0


def _events(a) -> int:
    from .cgroup import Cgroups
    c = load(a.root, a.id)
    if c.status() == "stopped":
        raise OciError("container not running")
    cg = Cgroups(c.data.get("cgroups") or {})
    def rd(ctl, f):
        d = cg._dir(ctl)
        try:
            return int(open(os.path.join(d, f)).read().split()[0]) if d else 0
        except (OSError, ValueError, IndexError):
            return 0
    data = {"memory": {"usage": {"usage": rd("memory", "memory.usage_in_bytes"),
                                 "limit": rd("memory", "memory.limit_in_bytes")}},
            "pids": {"current": len(cg.pids()), "limit": rd("pids", "pids.max")},
            "cpu": {"usage": {"total": rd("cpuacct", "cpuacct.usage")}}}
    print(json.dumps({"type": "stats", "id": a.id, "data": data}))
    return 0


def dispatch(a) -> int:
    if a.systemd_cgroup:
        raise OciError("--systemd-cgroup is not supported by sandbox-oci: use cgroupfs "
                       "(containerd: SystemdCgroup = false; podman: --cgroup-manager cgroupfs)")
    if a.version:
        print(f"sandbox-oci version {VERSION}\nspec: {SPEC_VERSION}")
        return 0
    cmd = a.cmd
    if cmd is None:
        raise OciError("no command given; see sandbox-oci --help")
    if cmd in ("checkpoint", "restore"):
        raise OciError(f"{cmd} is not supported by sandbox-oci")
    if cmd == "state":
        print(json.dumps(load(a.root, a.id).spec_state(), indent=2))
        return 0
    if cmd == "list":
        return _list(a)
    if cmd == "kill":
        from .signals import kill
        kill(a.root, a.id, a.signal, a.all)
        return 0
    if cmd == "delete":
        from .lifecycle import delete
        delete(a.root, a.id, a.force)
        return 0
    if cmd == "start":
        from .lifecycle import start
        start(a.root, a.id)
        return 0
    if cmd == "create":
        from .lifecycle import create
        create(a.root, a.id, a.bundle, a.pid_file, a.console_socket)
        return 0
    if cmd == "run":
        from .run import run
        return run(a.root, a.id, a.bundle, a.pid_file, a.console_socket, a.detach)
    if cmd == "exec":
        from .execproc import run_exec
        args = a.args[1:] if a.args[:1] == ["--"] else a.args
        return run_exec(a.root, a.id, args, process_file=a.process, cwd=a.cwd, env=a.env,
                        user=a.user, detach=a.detach, pid_file=a.pid_file, tty=a.tty,
                        console_socket=a.console_socket)
    if cmd == "ps":
        return _ps(a)
    if cmd in ("pause", "resume"):
        return _freeze(a, "FROZEN" if cmd == "pause" else "THAWED")
    if cmd == "update":
        return _update(a)
    if cmd == "events":
        return _events(a)
    if cmd == "features":
        from .spec import features
        print(json.dumps(features(), indent=2))
        return 0
    if cmd == "spec":
        from .spec import write_spec
        write_spec(a.bundle or os.getcwd())
        return 0
    raise OciError(f"unknown command {cmd}")


def main(argv=None) -> int:
    a = None
    try:
        a = _parser().parse_args(argv)
        return dispatch(a)
    except OciError as e:
        msg = str(e)
    except OSError as e:
        msg = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    except Exception as e:  # a bug, still one line as runc
        msg = f"{type(e).__name__}: {e}"
    _log(a, "error", msg)
    print(f"Error: {msg}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

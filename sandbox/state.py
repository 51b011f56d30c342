"""Crash-safe records of what a runtime created, for `sandbox gc` (SPEC §10 "gc and leaks").

One JSON file per runtime, `<state_dir>/runtimes/<tag>.json`:

    {"version": 1, "pid": 1234, "start_time": 1718000000.12, "start_ticks": 51234,
     "boot_id": "...",
     "pidns": "pid:[4026531836]", "tag": "a1b2c3",
     "host": {"table": "sandbox_a1b2c3", "mark": 1526..., "rt_table": 1526..., ...},
     "sandboxes": {"<sid>": {"netns": "/run/sandbox/netns/x", "veth": "sa1b2c3h0",
                             "cgroup": "a1b2c3.<id>", "block": "10.213.0.0/30",
                             "certs": "/run/sandbox/certs/<tag>.<id>"}}}

Write-ahead, not write-behind: a name is recorded *before* the object exists
and forgotten only *after* it is gone, so after a kill -9 at any point the file
lists a superset of what is left; gc tolerates the names that never came to be.

The header (and a snapshot of the sandboxes) is written whole to a temporary
file and swapped with the record atomically (see write_atomic), so a reader
(gc, possibly while we die) sees the old or the new record, never half of one.
Per-sandbox changes do not rewrite it: with 10 000 sandboxes the record is
megabytes, and rewriting it three times per start made start O(N) (issue 14).
They are appended, one JSON line each, to the journal the record names,
`<state_dir>/journal/<tag>.<gen>.jsonl`; a reader replays it over the snapshot
(a torn last line is an entry whose objects were never made: skipped). When
the journal outgrows the live entries, a new snapshot with generation gen+1
is written (after its empty journal exists) and the old journal unlinked:
O(1) amortised per change, and a crash between the steps leaves a record
whose journal lists a superset at worst.  No fsync: the records
describe kernel objects, which a reboot removes anyway; what must survive is
the process, not the machine.

The owner is identified by pid *and* process start time, so a recycled pid is
not mistaken for the runtime.  The start time is kept twice: psutil's
create_time (wall clock) and the raw start ticks since boot, which gc compares
because a stepped wall clock shifts create_time of a live process.  The boot id and the pid namespace are recorded
too: a record from an earlier boot is dead whatever its pid, and one written
from another pid namespace cannot be judged by pid at all, so gc leaves it.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
from typing import Any

import psutil

from .log import get_logger

__all__ = ["RuntimeState", "is_alive", "owner_status", "load_all", "load", "runtimes_dir",
           "record_path", "VERSION"]

log = get_logger("sandbox.state")

VERSION = 1
_SUFFIX = ".json"
_TMP_SUFFIX = ".json.tmp"
# psutil derives create_time from boot time + start ticks; two reads of one
# process agree to well under this.
_START_TIME_SLACK = 0.01


def runtimes_dir(state_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(state_dir), "runtimes")


def record_path(state_dir: str | os.PathLike, tag: str) -> str:
    return os.path.join(runtimes_dir(state_dir), tag + _SUFFIX)


def _journal_dir(path: str) -> str:
    """The journal directory next to `runtimes/` of the record at `path`."""
    return os.path.join(os.path.dirname(os.path.dirname(path)), "journal")


def _journal_path(path: str, gen: int) -> str:
    tag = os.path.basename(path)[: -len(_SUFFIX)]
    return os.path.join(_journal_dir(path), f"{tag}.{gen}.jsonl")


def remove_journals(path: str) -> None:
    """Unlink every journal of the record at `path` (gc, after the record's objects)."""
    tag = os.path.basename(path)[: -len(_SUFFIX)]
    d = _journal_dir(path)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for name in names:
        head, _, rest = name.partition(".")
        if head == tag and rest.endswith(".jsonl"):
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _check_tag(tag: str) -> None:
    if not isinstance(tag, str) or not tag or not all(c.isalnum() or c in "_-" for c in tag) \
            or len(tag) > 64:
        raise ValueError(f"tag: invalid runtime tag {tag!r}")


def _check_sid(sid: str) -> None:
    if not isinstance(sid, str) or not sid:
        raise ValueError(f"sid: must be a non-empty str, got {sid!r}")


class RuntimeState:
    """The record of one live runtime.  Owner of `<state_dir>/runtimes/<tag>.json`.

    Call order (the runtime's):
      open(**host)              before creating any host object
      update_host(**kv)         whenever a host object is added (before creating it)
      add_sandbox(sid, **objs)  before creating a sandbox's kernel objects
      remove_sandbox(sid)       after they are all gone
      close()                   after the host objects are gone: deletes the file

    Every call is one atomic replace of the file.  Thread-safe.  Values must be
    JSON-serialisable (str/int/float/bool/None/lists/dicts).
    """

    def __init__(self, state_dir: str | os.PathLike, tag: str):
        _check_tag(tag)
        self.state_dir = os.path.abspath(os.fspath(state_dir))
        self.tag = tag
        self.path = record_path(self.state_dir, tag)
        self._tmp = self.path[: -len(_SUFFIX)] + _TMP_SUFFIX
        self._lock = threading.Lock()
        self._record: dict[str, Any] | None = None
        self._gen = 0
        self._jfd = -1          # O_APPEND fd of the current journal
        self._jlines = 0        # lines in it

    @property
    def opened(self) -> bool:
        return self._record is not None

    @property
    def record(self) -> dict[str, Any]:
        """A copy of what is on disk (for tests and inspection)."""
        with self._lock:
            return json.loads(json.dumps(self._record)) if self._record is not None else {}

    def open(self, **host: Any) -> None:
        """Create the record.  Refuses if one exists for this tag (live twin or a dead one's
        leftovers: its objects would lose their only record)."""
        me = psutil.Process()
        record = {
            "version": VERSION,
            "pid": me.pid,
            "start_time": me.create_time(),
            "start_ticks": _start_ticks(me.pid),
            "boot_id": _boot_id(),
            "pidns": _pidns(),
            "tag": self.tag,
            "host": dict(host),
            "sandboxes": {},
        }
        with self._lock:
            if self._record is not None:
                raise RuntimeError(f"runtime state {self.path} is already open")
            os.makedirs(runtimes_dir(self.state_dir), mode=0o700, exist_ok=True)
            if os.path.lexists(self.path):
                other = load(self.path)
                why = ("it belongs to a live runtime" if other is not None and
                       owner_status(other) == "alive" else "run `sandbox gc` first")
                raise FileExistsError(errno.EEXIST, f"runtime state exists ({why})", self.path)
            self._record = record
            try:
                self._compact()
            except BaseException:
                self._record = None
                raise

    def update_host(self, **kv: Any) -> None:
        with self._lock:
            rec = self._need_open()
            rec["host"] = {**rec["host"], **kv}
            self._compact()

    def add_sandbox(self, sid: str, **objs: Any) -> None:
        """Record a sandbox's planned objects (insertion order = creation order)."""
        _check_sid(sid)
        with self._lock:
            boxes = self._need_open()["sandboxes"]
            entry = dict(objs)
            self._append(["a", sid, entry])
            boxes.pop(sid, None)  # re-adding moves it to the end: newest last
            boxes[sid] = entry

    def update_sandbox(self, sid: str, **objs: Any) -> None:
        """Add names to an existing sandbox entry (e.g. a name known only later)."""
        _check_sid(sid)
        with self._lock:
            boxes = self._need_open()["sandboxes"]
            if sid not in boxes:
                raise KeyError(sid)
            self._append(["u", sid, dict(objs)])
            boxes[sid] = {**boxes[sid], **objs}

    def remove_sandbox(self, sid: str) -> None:
        """Forget a sandbox whose objects are all gone.  Unknown sid: no-op."""
        with self._lock:
            boxes = self._need_open()["sandboxes"]
            if sid not in boxes:
                return
            del boxes[sid]      # forgotten after the objects are gone: before the line is fine
            self._append(["r", sid])

    def close(self) -> None:
        """Delete the record (the host objects are gone).  Idempotent."""
        with self._lock:
            if self._record is None:
                return
            self._record = None
            if self._jfd >= 0:
                os.close(self._jfd)
                self._jfd = -1
            for p in (self.path, self._tmp, _journal_path(self.path, self._gen)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def _need_open(self) -> dict[str, Any]:
        if self._record is None:
            raise RuntimeError(f"runtime state {self.path} is not open")
        return self._record

    def _write(self, record: dict[str, Any]) -> None:
        write_atomic(self.path, self._tmp, record)

    def _append(self, op: list) -> None:
        """One journal line, appended before the in-memory record changes."""
        if self._jlines > 2 * len(self._record["sandboxes"]) + 256:
            self._compact()
        os.write(self._jfd, json.dumps(op, separators=(",", ":")).encode() + b"\n")
        self._jlines += 1

    def _compact(self) -> None:
        """New empty journal (gen+1), then the snapshot naming it, then the old journal goes."""
        old_fd, old_gen = self._jfd, self._gen
        gen = old_gen + 1 if old_fd >= 0 else old_gen
        jpath = _journal_path(self.path, gen)
        os.makedirs(os.path.dirname(jpath), mode=0o700, exist_ok=True)
        fd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        try:
            self._write(dict(self._record, journal=gen))
        except BaseException:
            os.close(fd)
            if gen != old_gen:
                os.unlink(jpath)
            raise
        self._jfd, self._gen, self._jlines = fd, gen, 0
        if old_fd >= 0:
            os.close(old_fd)
            if old_gen != gen:
                try:
                    os.unlink(_journal_path(self.path, old_gen))
                except FileNotFoundError:
                    pass


def write_atomic(path: str, tmp: str, record: dict[str, Any]) -> None:
    """Atomically replace `path` with `record` as JSON (via `tmp`).

    Readers see the old or the new content, never a mix.  Not rename(tmp, path):
    on ext4 (where /run may live) replacing an existing file by rename makes the
    kernel force the new file's blocks out (auto_da_alloc), ~120 us with spikes
    past 1 ms.  RENAME_EXCHANGE swaps the two names atomically without that,
    and the old content, now under `tmp`, is unlinked: ~25 us (tmpfs: ~15 us).
    """
    data = json.dumps(record, separators=(",", ":")).encode()
    _create(tmp, data)
    if _exchange(tmp, path):
        os.unlink(tmp)  # the previous record
    else:
        os.rename(tmp, path)


def _create(tmp: str, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by an interrupted write: never truncate (see above)
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _exchange(a: str, b: str) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE); False if `b` is missing or the call is unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # first write (nothing to swap with), or a filesystem without exchange
    raise OSError(err, f"renameat2 exchange: {os.strerror(err)}", b)


# -- readers (gc) -------------------------------------------------------------------

def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, start_time: float, start_ticks: int | None = None) -> bool:
    """True if process `pid` exists, is not a zombie, and is the one that started then.

    With `start_ticks` (recorded by RuntimeState) the comparison is exact and
    immune to clock steps; `start_time` alone (psutil's create_time) is derived
    from the boot time, which moves when the wall clock is stepped (NTP, VM
    resume), so prefer the ticks whenever the record has them.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if isinstance(start_ticks, int) and not isinstance(start_ticks, bool):
            if _start_ticks(pid) != start_ticks:
                return False  # the pid was recycled
        elif abs(proc.create_time() - float(start_time)) > _START_TIME_SLACK:
            return False  # the pid was recycled
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie holds no resources
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: never collect what might be live
    except (TypeError, ValueError):
        return False


def owner_status(record: dict[str, Any]) -> str:
    """"alive", "dead", or "foreign" (written in another pid namespace: cannot judge)."""
    boot = record.get("boot_id")
    if boot and _boot_id() and boot != _boot_id():
        return "dead"  # an earlier boot: every process of it is gone
    pidns = record.get("pidns")
    if pidns and _pidns() and pidns != _pidns():
        return "foreign"
    alive = is_alive(record.get("pid"), record.get("start_time"), record.get("start_ticks"))
    return "alive" if alive else "dead"


def _valid(record: Any, tag: str) -> str | None:
    """Why `record` is not a usable runtime record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("tag") != tag:
        return f"tag {record.get('tag')!r} does not match the file name"
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return "bad pid"
    st = record.get("start_time")
    if isinstance(st, bool) or not isinstance(st, (int, float)):
        return "bad start_time"
    if not isinstance(record.get("host"), dict):
        return "bad host"
    boxes = record.get("sandboxes")
    if not isinstance(boxes, dict) or not all(isinstance(v, dict) for v in boxes.values()):
        return "bad sandboxes"
    return None


def load(path: str, problems: list[tuple[str, str]] | None = None) -> dict[str, Any] | None:
    """One record (with "path" set), or None if missing, torn or garbage (reported)."""
    tag = os.path.basename(path)[: -len(_SUFFIX)]
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: torn JSON, bad UTF-8
        why = f"unreadable: {e}"
    else:
        why = _valid(record, tag)
        if why is None:
            _replay(path, record)
            record["path"] = path
            return record
    if problems is not None:
        problems.append((path, why))  # the caller reports it
    else:
        log.warning("state.bad_record", path=path, reason=why)
    return None


def _replay(path: str, record: dict[str, Any]) -> None:
    """Apply the record's journal (if it names one) to its sandboxes snapshot."""
    gen = record.pop("journal", None)
    if isinstance(gen, bool) or not isinstance(gen, int):
        return
    boxes = record["sandboxes"]
    try:
        with open(_journal_path(path, gen), "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return
    for line in lines:
        try:
            op = json.loads(line)
        except ValueError:
            continue     # empty, or torn by a kill mid-write: its objects never came to be
        if not isinstance(op, list) or len(op) < 2 or not isinstance(op[1], str):
            continue
        kind, sid = op[0], op[1]
        objs = op[2] if len(op) > 2 and isinstance(op[2], dict) else {}
        if kind == "a":
            boxes.pop(sid, None)
            boxes[sid] = objs
        elif kind == "u":
            boxes[sid] = {**boxes.get(sid, {}), **objs}
        elif kind == "r":
            boxes.pop(sid, None)


def load_all(state_dir: str | os.PathLike,
             problems: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Every valid record under `<state_dir>/runtimes`, oldest file first.

    Torn or garbage files are skipped (appended to `problems` as (path, reason)
    and logged); temporary files of in-flight writes are ignored.
    """
    directory = runtimes_dir(state_dir)
    try:
        entries = [e for e in os.scandir(directory)
                   if e.name.endswith(_SUFFIX) and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []

    def mtime(e: os.DirEntry) -> float:
        try:
            return e.stat(follow_symlinks=False).st_mtime
        except OSError:
            return 0.0

    out = []
    for e in sorted(entries, key=lambda e: (mtime(e), e.name)):
        rec = load(e.path, problems)
        if rec is not None:
            out.append(rec)
    return out

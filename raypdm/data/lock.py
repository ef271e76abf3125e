"""One writer per output root: a lock file with a heartbeat, refused while its holder lives, taken over once
it is gone.

Every command that writes (protect, purify, train, sample, evaluate, sweep, redteam, bench, the demo) holds
`<output>/.raypdm.lock` from before its first write until it ends. Two runs into one root would otherwise
interleave their rows and files (24 of 42 files not matching their rows, `config.yaml` naming one config),
and one run's start-up `recover` would remove the other's staged files.

The lock file is JSON: run id, host, pid (and the process's start time, so a reused pid is not mistaken for
the holder), user, start time, command and a heartbeat the holder rewrites every `stale/10` seconds.
A second run into the root exits at once, naming the holder. A lock is stale, and the next run takes it over
with a message, when
  - its holder ran on this host and that process is gone (a SIGKILL, a crash, a reboot), or
  - its heartbeat is older than the limit (`RAYPDM_LOCK_STALE_S`, default 300 s): the only sign of life a
    holder on another host can give. Hosts sharing a root must keep their clocks in sync (NTP) to within
    a small part of that limit.

What each store guarantees for the atomic create (the whole exclusion rests on it):
  - local disks (and NFSv3+): the lock is written to a temporary name and hard-linked to its final name;
    `link` fails if the name exists, so exactly one of several racing runs wins and a lock file is never
    seen half-written. Where a file system has no hard links, `O_CREAT|O_EXCL` is used instead.
  - S3 (`s3fs>=2025.7`, AWS and S3-compatible stores that honour `If-None-Match: *`), GCS (`gcsfs>=2024.12`:
    `ifGenerationMatch=0`), Azure (`adlfs`: `overwrite=False`): fsspec's exclusive mode `"xb"`, a
    conditional create done by the server.
  - a back-end without an exclusive mode: check, then write, with a warning that two runs starting within
    the same moment could both proceed.
A stale lock is taken over under a second, short-lived exclusive file (`.raypdm.lock.takeover`), so two
runs that find the same stale lock cannot both take it.

Nesting: a run that holds a root may write sub-roots (the red-team matrix's stages, the demo's) without
locks of their own; a run into a folder inside a root another live run holds is refused. The reverse (a run
into a parent of a live run's root) is not detected: it would take listing the whole tree.
Read-only commands (`raypdm report`, `raypdm data check`) take no lock.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import posixpath
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from raypdm.data.roots import resolved_root
from raypdm.data.uri import fs_and_path

__all__ = ["LOCK_NAME", "STALE_ENV", "OutputLock", "OutputLockedError", "Holder", "hold_output", "hold_outputs",
           "held_root_of", "live_writer", "outputs_of", "read_holder", "stale_after_seconds"]

LOCK_NAME = ".raypdm.lock"
TAKEOVER_NAME = ".raypdm.lock.takeover"
STALE_ENV = "RAYPDM_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
# A takeover file lives for milliseconds; one older than this was left by a run killed in the middle of it.
TAKEOVER_GRACE_S = 30.0


class OutputLockedError(RuntimeError):
    """Another live run holds the output root (or a root it lies inside)."""


def stale_after_seconds() -> float:
    raw = os.environ.get(STALE_ENV)
    if not raw:
        return DEFAULT_STALE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALE_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{STALE_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _now() -> float:
    return time.time()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 (no psutil, or the process is gone: the pid check alone decides)
        return None


def _alive(pid: int, started: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    if started is not None:
        now_started = _process_started(pid)
        if now_started is not None and abs(now_started - started) > 1.0:
            return False  # the pid was reused by an unrelated process
    return True


@dataclass
class Holder:
    run_id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    command: str
    user: str = ""
    pid_started: float | None = None

    @classmethod
    def here(cls, run_id: str, command: str) -> Holder:
        now = _now()
        try:
            user = getpass.getuser()
        except Exception:  # noqa: BLE001 (no passwd entry in some containers)
            user = ""
        return cls(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                   command=command, user=user, pid_started=_process_started(os.getpid()))

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["started_utc"] = _when(self.started)
        data["heartbeat_utc"] = _when(self.heartbeat)
        return (json.dumps(data, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Holder:
        data = json.loads(raw.decode())
        return cls(run_id=str(data["run_id"]), host=str(data["host"]), pid=int(data["pid"]),
                   started=float(data["started"]), heartbeat=float(data["heartbeat"]),
                   command=str(data.get("command", "")), user=str(data.get("user", "")),
                   pid_started=None if data.get("pid_started") is None else float(data["pid_started"]))

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or _now()) - self.heartbeat)
        who = f"pid {self.pid} on host {self.host}" + (f", user {self.user}" if self.user else "")
        return (f"run {self.run_id} ({who}, started {_when(self.started)}, last heartbeat {age:.0f} s ago)"
                + (f": {self.command}" if self.command else ""))

    def stale_reason(self, stale_after: float, now: float | None = None) -> str | None:
        """Why this lock no longer protects anything, or None while its holder may still be writing."""
        if self.host == socket.gethostname() and not _alive(self.pid, self.pid_started):
            return f"its process (pid {self.pid} on this host) is gone"
        age = (now or _now()) - self.heartbeat
        if age > stale_after:
            return f"its last heartbeat was {age:.0f} s ago (limit {stale_after:.0f} s, {STALE_ENV})"
        return None


# --------------------------------------------------------------------------------- file operations
class _Store:
    """The four operations a lock needs, on a local disk or an fsspec back-end (see the module docstring)."""

    def __init__(self, root: str):
        self.proto, self.root = resolved_root(root)
        self.local = self.proto == "file"
        if self.local:
            self.fs = None
        else:
            self.fs, _ = fs_and_path(root)
            self.root = self.fs._strip_protocol(root).rstrip("/")
        self._warned = False

    def path(self, folder: str, name: str) -> str:
        return os.path.join(folder, name) if self.local else posixpath.join(folder, name)

    def uri(self, path: str) -> str:
        return path if self.local else f"{self.proto}://{path}"

    def ensure_folder(self) -> bool:
        """Make the root if needed; True if this call made it."""
        if self.local:
            made = not os.path.isdir(self.root)
            os.makedirs(self.root, exist_ok=True)
            return made
        self.fs.makedirs(self.root, exist_ok=True)
        return False

    def remove_if_empty(self) -> None:
        if self.local:
            with contextlib.suppress(OSError):  # not empty (the run wrote something), or gone
                os.rmdir(self.root)

    def create(self, path: str, data: bytes) -> bool:
        """Write `data` under `path` only if nothing is there; False if something is."""
        if self.local:
            tmp = f"{path}.new-{uuid.uuid4().hex[:8]}"  # not ".tmp-": a stage's `recover` owns those
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                    return True
                except FileExistsError:
                    return False
                except OSError:  # no hard links here (some FUSE and SMB mounts): O_EXCL, a torn file possible
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    return True
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):  # no exclusive mode on this back-end
            if not self._warned:
                self._warned = True
                sys.stderr.write(f"warning: {self.proto}:// has no exclusive create here; the lock on "
                                 f"{self.uri(self.root)} is checked, then written (two runs starting at the same "
                                 "moment could both proceed)\n")
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def read(self, path: str) -> bytes | None:
        try:
            if self.local:
                with open(path, "rb") as f:
                    return f.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def mtime(self, path: str) -> float | None:
        try:
            if self.local:
                return os.stat(path).st_mtime
            from raypdm.data.uri import entry_mtime

            return entry_mtime(self.fs.info(path))
        except FileNotFoundError:
            return None

    def replace(self, path: str, data: bytes) -> None:
        if self.local:
            tmp = f"{path}.new-{uuid.uuid4().hex[:8]}"  # not ".tmp-": a stage's `recover` owns those
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)

    def ancestors(self) -> list[str]:
        """The folders above the root, nearest first (up to the file system root or the bucket)."""
        out, path = [], self.root
        while True:
            parent = os.path.dirname(path) if self.local else posixpath.dirname(path)
            if not parent or parent == path or (not self.local and "/" not in path):
                return out
            out.append(parent)
            path = parent


def read_holder(store: _Store, path: str, stale_after: float) -> Holder | None:
    """The lock at `path`, or None if there is none. An unreadable lock (not JSON: written by something else,
    or torn on a file system without hard links) counts as held until its file is older than the limit."""
    raw = store.read(path)
    if raw is None:
        return None
    try:
        return Holder.from_bytes(raw)
    except (ValueError, KeyError, TypeError):
        mtime = store.mtime(path) or _now()
        return Holder(run_id="(unreadable lock file)", host="?", pid=-1, started=mtime, heartbeat=mtime,
                      command="")


def live_writer(root: str) -> Holder | None:
    """The run writing `root` right now, if any (for read-only commands: they note it, take no lock)."""
    store = _Store(root)
    seen = read_holder(store, store.path(store.root, LOCK_NAME), stale_after_seconds())
    return seen if seen is not None and seen.stale_reason(stale_after_seconds()) is None else None


# ------------------------------------------------------------------------------------------- the lock
class OutputLock:
    """The lock on one output root. `acquire()` or raise OutputLockedError; `release()` when done."""

    def __init__(self, root: str, *, run_id: str | None = None, command: str | None = None,
                 stale_after: float | None = None, heartbeat_every: float | None = None,
                 log: Callable[[str], None] | None = None):
        self.root = str(root)
        self.store = _Store(self.root)
        self.path = self.store.path(self.store.root, LOCK_NAME)
        self.takeover_path = self.store.path(self.store.root, TAKEOVER_NAME)
        self.stale_after = stale_after if stale_after is not None else stale_after_seconds()
        self.heartbeat_every = heartbeat_every or min(30.0, max(0.5, self.stale_after / 10))
        self.holder = Holder.here(run_id or uuid.uuid4().hex, command if command is not None else _command())
        self.log = log or (lambda msg: sys.stderr.write(msg + "\n"))
        self.lost_to: Holder | None = None  # set by the heartbeat if another run took the lock over
        self.took_over: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._held = False
        self._made_root = False

    # -- acquire ---------------------------------------------------------------------------------
    def acquire(self) -> OutputLock:
        self._check_ancestors()
        self._made_root = self.store.ensure_folder()
        for _ in range(20):
            if self.store.create(self.path, self.holder.to_bytes()):
                break
            seen = read_holder(self.store, self.path, self.stale_after)
            if seen is None:
                continue  # released between our create and our read: try again
            reason = seen.stale_reason(self.stale_after)
            if reason is None:
                raise OutputLockedError(
                    f"{self.store.uri(self.store.root)} is being written by another run: {seen.describe()}. "
                    "Wait for it to end or choose another output folder (a lock whose process is gone, or "
                    f"whose heartbeat is older than {self.stale_after:.0f} s, is taken over; {STALE_ENV})")
            if self._take_over(seen):
                self.took_over = seen
                self.log(f"taking over the lock on {self.store.uri(self.store.root)} from {seen.describe()}: "
                         f"{reason}")
                break
            time.sleep(0.05)  # another run is taking it over right now: look again
        else:
            raise OutputLockedError(f"could not lock {self.store.uri(self.store.root)}: it kept changing hands")
        self._held = True
        self._beat = threading.Thread(target=self._heartbeat, name=f"raypdm-lock-{self.holder.run_id}",
                                      daemon=True)
        self._beat.start()
        return self

    def _check_ancestors(self) -> None:
        for folder in self.store.ancestors():
            path = self.store.path(folder, LOCK_NAME)
            seen = read_holder(self.store, path, self.stale_after)
            if seen is None or seen.run_id == self.holder.run_id or seen.stale_reason(self.stale_after):
                continue
            raise OutputLockedError(
                f"{self.store.uri(self.store.root)} lies inside {self.store.uri(folder)}, which is being written "
                f"by another run: {seen.describe()}. Wait for it to end or choose an output folder outside it")

    def _take_over(self, seen: Holder) -> bool:
        """Replace the stale lock `seen` with ours, under the takeover file; False if another run got there."""
        if not self.store.create(self.takeover_path, self.holder.to_bytes()):
            other = read_holder(self.store, self.takeover_path, self.stale_after)
            if other is not None and _now() - other.started > TAKEOVER_GRACE_S:
                self.store.remove(self.takeover_path)  # left by a run killed mid-takeover
            return False
        try:
            current = read_holder(self.store, self.path, self.stale_after)
            if current is None:
                return self.store.create(self.path, self.holder.to_bytes())
            if current.run_id != seen.run_id or current.heartbeat != seen.heartbeat:
                return False  # it changed hands (or beat) since we looked
            self.store.replace(self.path, self.holder.to_bytes())
            return True
        finally:
            self.store.remove(self.takeover_path)

    # -- hold ------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                current = read_holder(self.store, self.path, self.stale_after)
                if current is None or current.run_id != self.holder.run_id:
                    self.lost_to = current
                    self.log(f"warning: the lock on {self.store.uri(self.store.root)} is no longer this run's ("
                             + (f"taken over by {current.describe()}" if current else "its file was removed")
                             + "); outputs written from now on may mix with another run's")
                    return
                self.holder.heartbeat = _now()
                self.store.replace(self.path, self.holder.to_bytes())
            except OSError as exc:  # a transient store error: the next beat tries again
                self.log(f"warning: could not refresh the lock on {self.store.uri(self.store.root)}: {exc}")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        current = read_holder(self.store, self.path, self.stale_after)
        if current is not None and current.run_id == self.holder.run_id:
            self.store.remove(self.path)
            if self._made_root:
                self.store.remove_if_empty()  # a run that failed before writing leaves no empty folder behind

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    argv[0] = os.path.basename(argv[0])
    return " ".join(shlex.quote(a) for a in argv)[:500]


# ------------------------------------------------------------------------ process-wide: nested roots
_HELD: dict[tuple[str, str], OutputLock] = {}
_HELD_LOCK = threading.RLock()


def _inside(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


@contextlib.contextmanager
def hold_output(root: str, *, run_id: str | None = None, command: str | None = None) -> Iterator[OutputLock | None]:
    """Hold the lock on `root` for the block; a root inside one this process already holds needs none (the
    red-team matrix's stages, the demo's). Yields the lock, or None when nested."""
    from raypdm.data.manifest import current_run_id

    key = resolved_root(root)
    with _HELD_LOCK:
        if any(_inside(key, held) for held in _HELD):
            nested = True
        else:
            nested = False
            lock = OutputLock(root, run_id=run_id or current_run_id(), command=command).acquire()
            _HELD[key] = lock
    if nested:
        yield None
        return
    try:
        yield lock
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lock.release()


def _lexical(uri: str) -> tuple[str, str]:
    """(scheme, path) without resolving symlinks: a path written through a planted link still names the root."""
    from fsspec.core import split_protocol

    proto, path = split_protocol(str(uri))
    if proto in (None, "file", "local"):
        return "file", os.path.abspath(path)
    return proto, posixpath.normpath(path).rstrip("/")


def held_root_of(uri: str) -> str | None:
    """The output root this process holds that `uri` is written under (by its spelled path or its resolved
    one), or None. `raypdm.data.uri.write_bytes` checks such writes with `check_inside`."""
    with _HELD_LOCK:
        if not _HELD:
            return None
        spelled = _lexical(uri)
        for lock in _HELD.values():
            if _inside(spelled, _lexical(lock.root)) or _inside(spelled, resolved_root(lock.root)):
                return lock.root
    return None


def outputs_of(obj) -> list[str]:
    """The output roots a pipeline entry point will write: `cfg.output`, or each config's in a list."""
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    roots = []
    for item in items:
        out = getattr(item, "output", None)
        if isinstance(out, str) and out and out not in roots:
            roots.append(out)
    return roots


@contextlib.contextmanager
def hold_outputs(roots: Iterable[str]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(hold_output(root))
        yield

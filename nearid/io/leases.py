"""One writer per table: leases under `<root>/_leases/`, held by a stage while it writes.

A lease is one small JSON file, `<root>/_leases/<table>.json`:

    {"format": "nearid-lease/1", "table": "mtg", "stage": "synth", "token": "<uuid hex>",
     "root": "<storage root>", "owner": {"host": ..., "pid": ..., "pidns": ..., "ray_job_id": ...},
     "started": "<UTC ISO>", "started_ts": <epoch s>, "heartbeat": "<UTC ISO>", "heartbeat_ts": <epoch s>,
     "expiry_s": 120.0}

- Created atomically: local roots link a fully written temp file to the lease name (`os.link`
  fails when the name exists; `O_EXCL` where hard links are not supported); S3 roots PUT with
  `If-None-Match: *` (honoured by AWS S3 and by moto 5.2.5, whose server answers 412).
- Refreshed by a daemon thread every `expiry_s / 4` as a compare-and-swap: S3 PUT with
  `If-Match: <ETag of our last write>`; local roots compare the content under an `flock` on
  `<lease>.lock` and `os.replace` a temp file. A refresh that finds another token means the lease
  was taken over: the holder marks itself lost and its next commit fails (`LeaseLost`).
- A lease whose `heartbeat_ts` is older than its `expiry_s` (the holder's `storage.lease_expiry_s`)
  is taken over with a warning, by the same compare-and-swap (one taker wins). A lease of a
  process on this host (same host name and pid namespace) whose pid is gone is taken over at once.
  Expiry compares wall clocks of two hosts: keep them NTP-synchronised (skew << expiry).
- Released (compare-and-delete) on success, on failure and on SIGTERM (a handler releases every
  lease of the process, then runs the previous handler / exits 143); a SIGKILLed holder's lease
  expires.

`stage_leases()` is what the stage runners use; `commit_lock()` is a short lease
(`<table>.commit.json`) that `Storage.commit_staging` holds while it checks keys, moves parts and
updates the table manifest, so commits to one table (leased or not, e.g. `rejects`) never interleave.
The atomic file operations underneath (local and S3): nearid/io/atomic_files.py.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Iterator, Sequence

from .atomic_files import files_for
from .errors import StorageError

log = logging.getLogger("nearid.io.leases")
LEASE_DIR = "_leases"
FORMAT = "nearid-lease/1"
DEFAULT_EXPIRY_S = 120.0
COMMIT_EXPIRY_S = 60.0
COMMIT_WAIT_S = 900.0


class LeaseHeld(StorageError):
    """Another run holds the lease of a table this run would write."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class LeaseLost(StorageError):
    """This run's lease was taken over (its heartbeat stalled past the expiry): stop writing."""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _ray_job_id() -> str | None:
    if os.environ.get("RAY_JOB_ID"):
        return os.environ["RAY_JOB_ID"]
    ray = sys.modules.get("ray")   # never import Ray just for this
    try:
        if ray is not None and ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - the job id is informative only
        pass
    return os.environ.get("RAY_SUBMISSION_ID")


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pidns(),
            "ray_job_id": _ray_job_id(), "submission_id": os.environ.get("RAY_SUBMISSION_ID")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) holds nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _ident(storage) -> tuple[str, str]:
    return ("s3" if storage.is_s3 else "local", storage.base)


# ---- the process's leases and the SIGTERM handler that releases them -----------------------------
_HELD: dict[tuple, "Lease"] = {}
_OWN_TOKENS: set[str] = set()        # tokens of this process's leases, held or being acquired
_HELD_LOCK = threading.RLock()
_SIGNAL = {"installed": False, "previous": None}


def _on_sigterm(signum, frame):
    with _HELD_LOCK:
        held = list(_HELD.values())
    for lease in held:
        lease.release(reason=f"signal {signum}")
    previous = _SIGNAL["previous"]
    _uninstall_handler()
    if callable(previous):
        previous(signum, frame)
    raise SystemExit(128 + signum)


def _install_handler() -> None:
    if _SIGNAL["installed"] or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return
    _SIGNAL.update(installed=True, previous=previous)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _uninstall_handler() -> None:
    if not _SIGNAL["installed"] or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGTERM, _SIGNAL["previous"] if _SIGNAL["previous"] is not None
                      else signal.SIG_DFL)
    _SIGNAL.update(installed=False, previous=None)


def held(storage, name: str) -> "Lease | None":
    """The lease this process holds on `name` under this storage root, if any."""
    with _HELD_LOCK:
        return _HELD.get((*_ident(storage), name))


class Lease:
    """A lease on one table (or `<table>.commit`), acquired with `acquire()` or as a context manager."""

    def __init__(self, storage, name: str, stage: str, expiry_s: float = DEFAULT_EXPIRY_S,
                 key: Sequence[str] | None = None, quiet: bool = False):
        self.storage, self.name, self.stage = storage, name, stage
        self.expiry_s = float(expiry_s)
        self.key = tuple(key) if key else None
        self.rel = f"{LEASE_DIR}/{name}.json"
        self.files = files_for(storage)
        self.token = uuid.uuid4().hex
        self.quiet = quiet
        self.version = None
        self.started_ts: float | None = None
        self.lost: str | None = None
        self._lock = threading.RLock()    # re-entrant: the SIGTERM handler may release mid-refresh
        self._taken_from = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.storage.uri(self.rel)

    @property
    def interval(self) -> float:
        return max(0.05, self.expiry_s / 4)

    def _record(self, now: float) -> bytes:
        return json.dumps({
            "format": FORMAT, "table": self.name, "stage": self.stage, "token": self.token,
            "root": self.storage.root, "owner": owner(), "started": _iso(self.started_ts or now),
            "started_ts": self.started_ts or now, "heartbeat": _iso(now), "heartbeat_ts": now,
            "expiry_s": self.expiry_s}, indent=1).encode()

    # -- what another run's lease looks like --------------------------------------------------
    @staticmethod
    def _parse(cur) -> dict:
        data, _, mtime = cur
        try:
            rec = json.loads(data)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:   # not ours to read: treat its file time as its heartbeat
            rec = {"owner": {"host": "?", "pid": "?"}, "stage": "?", "heartbeat_ts": mtime}
        rec.setdefault("heartbeat_ts", mtime)
        return rec

    def _stale(self, rec: dict) -> str | None:
        o = rec.get("owner") or {}
        if o.get("host") == socket.gethostname() and o.get("pidns") == _pidns() and isinstance(o.get("pid"), int):
            if o["pid"] != os.getpid() and not _pid_alive(o["pid"]):
                return f"its owner (pid {o['pid']} on this host) is gone"
            if o["pid"] == os.getpid():
                with _HELD_LOCK:
                    ours = rec.get("token") in _OWN_TOKENS
                if not ours:
                    return "this process left it behind (its release failed)"
        expiry = float(rec.get("expiry_s") or self.expiry_s)
        age = time.time() - float(rec.get("heartbeat_ts") or 0)
        if age > expiry:
            return f"its last heartbeat was {age:.0f} s ago (expiry {expiry:g} s)"
        return None

    @staticmethod
    def describe(rec: dict) -> str:
        o = rec.get("owner") or {}
        job = f", Ray job {o['ray_job_id']}" if o.get("ray_job_id") else ""
        age = time.time() - float(rec.get("heartbeat_ts") or 0)
        return (f"stage {rec.get('stage', '?')} on host {o.get('host', '?')} pid {o.get('pid', '?')}{job}, "
                f"started {rec.get('started', '?')}, last heartbeat {age:.0f} s ago")

    def _refusal(self, rec: dict) -> LeaseHeld:
        expiry = float(rec.get("expiry_s") or self.expiry_s)
        return LeaseHeld(
            f"table '{self.name}' under {self.storage.root} is being written by another run "
            f"({self.describe(rec)}; lease {self.uri}). Rerun with --wait to start when it is "
            f"released; a dead run's lease is taken over by itself {expiry:g} s after its last "
            f"heartbeat (storage.lease_expiry_s), or delete {self.uri} if you are sure that run is gone",
            rec)

    # -- acquire / refresh / release --------------------------------------------------------------
    def acquire(self, wait_s: float | None = 0.0) -> "Lease":
        """Take the lease; wait up to `wait_s` seconds for a live holder (None: no limit, 0: refuse)."""
        deadline = None if wait_s is None else time.monotonic() + max(0.0, wait_s)
        last_note = float("-inf")
        with _HELD_LOCK:
            _OWN_TOKENS.add(self.token)
        try:
            self._take(deadline, last_note)
        except BaseException:
            with _HELD_LOCK:
                _OWN_TOKENS.discard(self.token)
            raise
        return self._held()

    def _take(self, deadline, last_note: float) -> None:
        while True:
            now = time.time()
            self.started_ts = now
            data = self._record(now)
            version = self.files.create(self.rel, data)
            taken_from = None
            if version is None:
                cur = self.files.read(self.rel)
                if cur is None:
                    continue                       # released between our create and read
                rec = self._parse(cur)
                why = self._stale(rec)
                if why is not None:
                    version = self.files.replace(self.rel, data, cur[1])
                    if version is None:
                        continue                   # another run took it over first: look again
                    taken_from = (rec, why)
                elif deadline is not None and time.monotonic() >= deadline:
                    raise self._refusal(rec)
                else:
                    if time.monotonic() - last_note > 60 and not self.quiet:
                        log.info("waiting for the lease on table '%s' held by %s (%s)", self.name,
                                 self.describe(rec), self.uri)
                        last_note = time.monotonic()
                    pause = min(self.interval, 1.0, float(rec.get("expiry_s") or self.expiry_s) / 4)
                    if deadline is not None:
                        pause = min(pause, max(0.01, deadline - time.monotonic()))
                    time.sleep(max(0.05, pause))
                    continue
            # read back: on a server that ignored the condition, another create may have landed
            back = self.files.read(self.rel)
            if back is None or self._parse(back).get("token") != self.token:
                continue
            self.version = back[1]
            break
        self._taken_from = taken_from

    def _held(self) -> "Lease":
        taken_from = self._taken_from
        if taken_from is not None:
            rec, why = taken_from
            log.warning("took over the lease on table '%s' (%s) from %s: %s", self.name, self.uri,
                        self.describe(rec), why)
        elif not self.quiet:
            log.info("lease on table '%s' acquired (%s)", self.name, self.uri)
        with _HELD_LOCK:
            _HELD[(*_ident(self.storage), self.name)] = self
        _install_handler()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except LeaseLost:
                return
            except Exception as e:  # noqa: BLE001 - a transient outage: try again next beat
                log.warning("lease on '%s': heartbeat failed (%s: %s); retrying", self.name,
                            type(e).__name__, e)

    def refresh(self) -> None:
        with self._lock:
            if self.version is None or self.lost:
                return
            version = self.files.replace(self.rel, self._record(time.time()), self.version)
            if version is None:
                cur = self.files.read(self.rel)
                rec = self._parse(cur) if cur else {}
                self.lost = (f"the lease on table '{self.name}' ({self.uri}) was taken over by "
                             f"{self.describe(rec) if rec else 'nobody (it was deleted)'}")
                log.error("%s: this run stops writing to it", self.lost)
                raise LeaseLost(self.lost)
            self.version = version

    def check(self) -> None:
        """Raise `LeaseLost` when another run took this lease over (call before each commit)."""
        if self.lost:
            raise LeaseLost(f"{self.lost}; nothing more was committed by this run")

    def release(self, reason: str = "done") -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            version, self.version = self.version, None
            with _HELD_LOCK:
                key = (*_ident(self.storage), self.name)
                if _HELD.get(key) is self:
                    del _HELD[key]
                _OWN_TOKENS.discard(self.token)
                empty = not _HELD
            if version is not None:
                try:
                    if self.files.delete(self.rel, version):
                        if not self.quiet:
                            log.info("lease on table '%s' released (%s)", self.name, reason)
                    elif not self.lost:
                        log.warning("lease on table '%s' was no longer ours at release", self.name)
                except Exception as e:  # noqa: BLE001 - it will expire by itself
                    log.warning("could not release the lease %s (%s: %s); it expires in %g s",
                                self.uri, type(e).__name__, e, self.expiry_s)
        if empty:
            _uninstall_handler()

    def __enter__(self) -> "Lease":
        return self if self.version is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release("failed" if exc[0] is not None else "done")


@contextlib.contextmanager
def commit_lock(storage, table: str, wait_s: float | None = COMMIT_WAIT_S) -> Iterator[Lease]:
    """Serialise commits (key check, moves, manifest update) into one table across processes."""
    lease = Lease(storage, f"{table}.commit", "commit", COMMIT_EXPIRY_S, quiet=True)
    lease.acquire(wait_s)
    try:
        yield lease
    finally:
        lease.release()

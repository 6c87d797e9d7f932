"""One writer per workdir: a lease file ``WORKDIR/lock.json`` held while a run writes there.

The lease names its holder (host, pid, the process's start time, when it was taken) and carries a
heartbeat that a background thread refreshes every ``heartbeat_s`` seconds. A run takes the lease
before it writes anything into the workdir (checkpoints, metrics, pictures) and only the holder
removes leftover temporary checkpoint directories. A second run on the same workdir is refused with
an error naming the holder. A lease is *stale*, and is taken over with a logged note, when

  - its holder ran on this host and its process is gone (or the pid now belongs to another process,
    told apart by the process start time), or
  - its heartbeat is older than ``timeout_s`` (the only test possible for a holder on another host:
    the clocks of the hosts must agree to well within ``timeout_s``).

The file is only ever replaced whole (written to a temporary file first), so a reader never sees half
a lease. Taking a free lease is one atomic, exclusive step (a hard link of a complete file, which
fails when the lease exists). These few file operations are the methods of ``_LocalStore``; for a
``gs://`` workdir ``_GcsStore`` implements them with GCS's generation preconditions (a create that
fails when the object exists, ``ifGenerationMatch=0``; a heartbeat or a delete that fails when the
object changed since it was read).

In a multi-process run only process 0 holds the lease (``experiment.py`` tells the others whether
it got it).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from consistency_jax import fs

LEASE_NAME = "lock.json"
HEARTBEAT_S = 10.0
TIMEOUT_S = 60.0

# The leases held (or being taken) by this process: path -> token of the WorkdirLock object. A lease
# naming this host and this pid whose token is not in here is a leftover of an earlier process that
# had the same pid (a restarted container). A path is reserved here before the lease is created, so
# that two WorkdirLock objects of one process cannot both take it.
_HELD: dict[str, str] = {}
_HELD_LOCK = threading.Lock()


class WorkdirLockedError(RuntimeError):
    """The workdir is in use by a live run (or its lease cannot be read)."""


class WorkdirLockLostError(RuntimeError):
    """The lease of this run was taken over by another run: this run must stop writing."""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _LocalStore:
    """The file operations of the lease on a local or shared POSIX file system."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> str | None:
        try:
            with open(self.path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write_tmp(self, text: str) -> str:
        """A temporary file holding ``text``, fsynced; removed again when writing it fails (a full
        disk leaves no ``lock.json.<hex>.tmp`` behind)."""
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def create(self, text: str) -> bool:
        """Writes the lease if none exists (atomically); False if one does."""
        tmp = self._write_tmp(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace(self, text: str) -> None:
        tmp = self._write_tmp(text)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def remove_if(self, text: str) -> bool:
        """Removes the lease if it still holds ``text`` (atomically: it is renamed aside first and
        put back if it changed); False if it changed or is gone."""
        aside = f"{self.path}.{uuid.uuid4().hex}.aside"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside) as f:
            moved = f.read()
        if moved != text:  # another starter replaced it meanwhile: put its lease back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.unlink(aside)
        return moved == text


class _GcsStore:
    """The same operations on a ``gs://`` object, made atomic by GCS's generation preconditions:
    a create succeeds only if no object exists (``ifGenerationMatch=0``), a heartbeat only if the
    object is still the one this run last read or wrote, a takeover deletes only the generation that
    was judged stale."""

    def __init__(self, url: str):
        from google.api_core import exceptions
        from google.cloud import storage

        self._exc = exceptions
        bucket, name = url.split("://", 1)[1].split("/", 1)
        self._bucket = storage.Client().bucket(bucket)
        self._name = name
        self._gen: int | None = None  # the generation last read or written

    def read(self) -> str | None:
        blob = self._bucket.blob(self._name)
        try:
            text = blob.download_as_text()
        except self._exc.NotFound:
            return None
        self._gen = blob.generation
        return text

    def create(self, text: str) -> bool:
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(text, if_generation_match=0)
        except self._exc.PreconditionFailed:
            return False
        self._gen = blob.generation
        return True

    def replace(self, text: str) -> None:
        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(text, if_generation_match=self._gen)
        except self._exc.PreconditionFailed:
            raise RuntimeError("the lease object changed since it was read (taken over?)") from None
        self._gen = blob.generation

    def remove_if(self, text: str) -> bool:
        if self.read() != text:
            return False
        try:
            self._bucket.blob(self._name).delete(if_generation_match=self._gen)
        except (self._exc.NotFound, self._exc.PreconditionFailed):
            return False
        return True


def describe(lease: dict) -> str:
    """'host H, pid P (started at ..., heartbeat Ns ago)' of a lease dict."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started", 0)))
    age = time.time() - float(lease.get("heartbeat", 0))
    return (
        f"host {lease.get('host', '?')}, pid {lease.get('pid', '?')} (running since {started}, "
        f"last heartbeat {age:.0f}s ago)"
    )


class WorkdirLock:
    """The lease of one workdir. ``acquire()`` takes it or raises ``WorkdirLockedError``; ``release()``
    (idempotent) gives it back; ``check()`` raises ``WorkdirLockLostError`` once another run took it.

    Args:
      workdir: the run's directory (created if missing).
      heartbeat_s: seconds between heartbeats.
      timeout_s: a lease whose heartbeat is older than this is stale.
    """

    def __init__(
        self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S, timeout_s: float = TIMEOUT_S
    ):
        if not timeout_s > heartbeat_s > 0:
            raise ValueError(
                f"Need timeout_s > heartbeat_s > 0, got {timeout_s} and {heartbeat_s}."
            )
        self.workdir = fs.resolve(workdir)
        self.path = fs.join(self.workdir, LEASE_NAME)
        self.heartbeat_s, self.timeout_s = float(heartbeat_s), float(timeout_s)
        self._store = _GcsStore(self.path) if fs.is_url(self.path) else _LocalStore(self.path)
        self._token = uuid.uuid4().hex
        self._lease: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    @property
    def held(self) -> bool:
        return self._lease is not None

    # -- reading and judging a lease

    def _parse(self, text: str) -> dict:
        try:
            lease = json.loads(text)
            if not isinstance(lease, dict) or "pid" not in lease or "host" not in lease:
                raise ValueError("not a lease")
            return lease
        except ValueError:
            raise WorkdirLockedError(
                f"The lease {self.path} of the workdir is unreadable ({text[:80]!r}). If no run uses "
                f"{self.workdir}, delete the file and start again."
            ) from None

    def _stale(self, lease: dict) -> str | None:
        """Why ``lease`` is stale, or None when its holder may be alive."""
        age = time.time() - float(lease.get("heartbeat", 0))
        if lease.get("host") == socket.gethostname():
            pid = int(lease.get("pid", -1))
            if pid == os.getpid():
                with _HELD_LOCK:
                    if lease.get("token") != _HELD.get(self.path):
                        return "it was left by an earlier process with this pid"
                return None  # held by this process
            if not _pid_alive(pid):
                return f"its process {pid} on this host is gone"
            start = lease.get("pid_start")
            if start is not None and _process_start(pid) not in (None, start):
                return f"pid {pid} on this host now belongs to another process"
        if age > self.timeout_s:
            return f"its last heartbeat is {age:.0f}s old (> {self.timeout_s:.0f}s)"
        return None

    def _new_lease(self) -> dict:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": now,
            "heartbeat": now,
            "token": self._token,
        }

    # -- taking and giving back

    def acquire(self) -> WorkdirLock:
        """Takes the lease, taking over a stale one with a logged note.

        Raises:
          WorkdirLockedError: a live run holds the lease (its host and pid are named), or the lease
            file is unreadable.
        """
        if self.held:
            return self
        with _HELD_LOCK:
            if self.path in _HELD:
                raise WorkdirLockedError(
                    f"The workdir {self.workdir} is in use by another run of this process (pid "
                    f"{os.getpid()}); lease {self.path}."
                )
            _HELD[self.path] = self._token
        try:
            return self._acquire()
        except BaseException:
            self._unreserve()
            raise

    def _unreserve(self) -> None:
        with _HELD_LOCK:
            if _HELD.get(self.path) == self._token:
                del _HELD[self.path]

    def _acquire(self) -> WorkdirLock:
        fs.makedirs(self.workdir)
        for _ in range(5):  # a takeover races only with another starting run; retry a few times
            lease = self._new_lease()
            if self._store.create(json.dumps(lease)):
                self._hold(lease)
                return self
            text = self._store.read()
            if text is None:
                continue  # released meanwhile
            other = self._parse(text)
            why = self._stale(other)
            if why is None:
                raise WorkdirLockedError(
                    f"The workdir {self.workdir} is in use by another run: {describe(other)}; lease "
                    f"{self.path}. Wait for it to finish or stop it; if that process is gone and the "
                    f"lease remains, it is taken over {self.timeout_s:.0f}s after its last heartbeat."
                )
            if not self._store.remove_if(text):
                continue  # another starter replaced or removed it meanwhile: look again
            logging.warning(
                "Taking over the stale lease %s of %s: %s.", self.path, describe(other), why
            )
        raise WorkdirLockedError(
            f"Could not take the lease {self.path}: other runs keep taking it."
        )

    def _hold(self, lease: dict) -> None:
        self._lease = lease
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name="workdir_lease_heartbeat", daemon=True
        )
        self._thread.start()
        logging.info(
            "Holding the lease %s (host %s, pid %d).", self.path, lease["host"], lease["pid"]
        )

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                text = self._store.read()
                current = json.loads(text) if text else None
                if not isinstance(current, dict) or current.get("token") != self._token:
                    self.lost = (
                        f"the lease {self.path} now holds "
                        f"{describe(current) if isinstance(current, dict) else 'nothing'}"
                    )
                    logging.error("This run lost its workdir lease: %s.", self.lost)
                    return
                self._lease = {**self._lease, "heartbeat": time.time()}
                self._store.replace(json.dumps(self._lease))
                warned = False
            except Exception as e:  # noqa: BLE001 -- a heartbeat must never kill the run
                if not warned:
                    logging.warning("Could not refresh the lease %s: %s", self.path, e)
                    warned = True

    def check(self) -> None:
        """Raises WorkdirLockLostError when another run has taken this run's lease."""
        if self.lost is not None:
            raise WorkdirLockLostError(
                f"Stopping: this run lost its workdir lease ({self.lost}); "
                "another run writes into the workdir now."
            )

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still this run's (idempotent)."""
        if self._lease is None:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._lease = None
        self._unreserve()
        try:
            text = self._store.read()
            if text and json.loads(text).get("token") == self._token:
                self._store.remove_if(text)
        except Exception as e:  # noqa: BLE001
            logging.warning("Could not remove the lease %s: %s", self.path, e)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

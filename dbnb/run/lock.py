"""train.lock: one training per run folder at a time.

A plain file created with O_EXCL, because Drive and network folders keep no OS locks; its
mtime is the holder's heartbeat, so a lock left by a session that is gone is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from dbnb.core.disk import why_not_made
from dbnb.core.errors import DbnbError

# The lock's holder touches it this often; a lock not touched for STALE_AFTER_S belongs to a
# session that is gone (a Colab VM that was recycled has another host name and no pid to ask).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class RunFolderError(DbnbError, RuntimeError):
    """The run folder is not in the state an action needs; the message says what to do."""


class RunInUseError(RunFolderError):
    """Another training holds the run folder's lock."""


class RunLock:
    """train.lock: {pid, host, started}; its mtime is the holder's heartbeat."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._made_root = False

    def acquire(self) -> None:
        self._made_root = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = why_not_made(self.path.parent, e)
            raise RunFolderError(f"Cannot write the run folder {self.path.parent}: {why}. "
                                 "Choose another output_dir (on Colab: is Drive still mounted?).") from None
        for _ in range(2):  # the second try follows taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self._beat = threading.Thread(target=self._heartbeat, name="dbnb-run-lock", daemon=True)
            self._beat.start()
            return
        raise RunInUseError(f"{self.path.parent} was just taken by another training ({self.path}); "
                            "wait for it to finish or choose another run_name.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # Drive briefly unavailable: the next beat tries again
                pass

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError):  # being written right now, or garbage
            holder, age = {}, time.time() - self.path.stat().st_mtime
        gone = _stale_reason(holder, age)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}")
        if gone is None:
            raise RunInUseError(
                f"{self.path.parent} is in use by another training ({who}; lock file {self.path}). Two "
                "trainings in one run folder would mix their logs and checkpoints: wait for that one to "
                "finish or stop it, or choose another run_name. If that training is surely gone (its "
                f"session ended), delete {self.path}; it is taken over by itself "
                f"{STALE_AFTER_S / 60:.0f} minutes after its last heartbeat.")
        print(f"[dbnb] taking over the stale lock {self.path} ({who}): {gone}.", flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
            if self._made_root:  # a run refused before it wrote anything leaves no empty folder
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass


def _stale_reason(holder: dict, age: float) -> str | None:
    """Why a lock no longer guards anything, or None while its holder may still be training."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} is no longer running"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age / 60:.0f} minutes"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

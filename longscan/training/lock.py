"""One run per checkpoint directory: a lock file naming its holder (host, pid), created atomically.

The lock is ``<checkpoint.dir>/LOCK``, created with O_CREAT|O_EXCL so two runs cannot both take it. A
lock whose holder is on this host and no longer alive is stale (the run was killed) and is taken over;
a lock held from another host cannot be checked from here and is always respected.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

LOCK_NAME = "LOCK"


class LockError(RuntimeError):
    """The checkpoint directory is in use by another run (the message names it)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: str

    def alive(self) -> bool | None:
        """True/False on this host; None when the holder is on another host (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.since})"


def read_holder(ckpt_dir: str) -> Holder | None:
    """The holder named by the lock file, or None when there is no lock file. Raises LockError when the
    file exists but is not a lock this code wrote."""
    path = os.path.join(ckpt_dir, LOCK_NAME)
    try:
        with open(path) as f:
            d = json.load(f)
        return Holder(host=str(d["host"]), pid=int(d["pid"]), since=str(d["since"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise LockError(f"checkpoint.dir {ckpt_dir!r} holds an unreadable lock file {path} ({e}); if no run uses "
                        "this directory, delete the file") from e


def _refusal(ckpt_dir: str, h: Holder) -> LockError:
    where = "" if h.alive() else " (on another host: cannot tell whether it is still running)"
    return LockError(f"checkpoint.dir {ckpt_dir!r} is in use by another run: {h.describe()}{where}; stop that run "
                     f"or use another checkpoint.dir (lock file: {os.path.join(ckpt_dir, LOCK_NAME)})")


def check_free(ckpt_dir: str) -> None:
    """Raise LockError when a live (or unverifiable) run holds ``ckpt_dir``; a stale lock passes."""
    h = read_holder(ckpt_dir)
    if h is not None and h.alive() is not False:
        raise _refusal(ckpt_dir, h)


class DirectoryLock:
    """``acquire()`` takes ``<ckpt_dir>/LOCK`` or raises LockError naming the holder; ``release()`` removes
    it if it is still ours."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.path = os.path.join(ckpt_dir, LOCK_NAME)
        self.held = False

    def acquire(self) -> "DirectoryLock":
        os.makedirs(self.dir, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = read_holder(self.dir)
                if h is None:  # released between our open and our read
                    continue
                if h.alive() is not False:
                    raise _refusal(self.dir, h) from None
                # Stale: rename first so that of two runs taking it over only one removes it.
                stale = f"{self.path}.stale.{os.getpid()}"
                try:
                    os.replace(self.path, stale)
                    os.remove(stale)
                except FileNotFoundError:
                    pass
                print(f"longscan train: removed the stale lock of {h.describe()}, which is no longer running",
                      flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise LockError(f"could not take the lock {self.path}: another run keeps creating it")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            h = read_holder(self.dir)
        except LockError:
            return
        if h is not None and h.pid == os.getpid() and h.host == socket.gethostname():
            os.remove(self.path)

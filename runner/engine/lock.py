"""The workspace lock: one `runner apply` at a time per project.

An ``fcntl.flock`` on ``.runner/lock`` is the lock itself and the only source of truth: the
kernel drops it when the holder dies, even on kill -9, and nothing else can take it from a live
holder. The file's content only names the holder (pid, host, since, command) so a second apply
can say who is in the way. The file is never deleted: a process that opened the old file would
keep its flock while a newcomer locked a new file, and two applies would run at once. So
``runner unlock`` clears the holder record of a lock nobody holds, and refuses, with or without
--force, while someone holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runner.core.errors import UserError

# A reader (`runner status`, `runner runs`) holds the lock for a few milliseconds while it marks
# dead runs; an apply without --wait still waits this long before it says the workspace is busy.
MIN_WAIT_S = 1.0


class LockHeld(UserError):
    """Another process holds the workspace (exit 3)."""

    exit_code = 3

    def __init__(self, holder: dict, lock_file: Path, advice: str = "") -> None:
        self.holder = holder
        self.lock_file = lock_file
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "unknown time"
        super().__init__(
            f"the workspace {lock_file.parent} is locked by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {when} ({holder.get('command', '?')}). "
            + (advice or "Wait for it to finish, or pass --wait SECONDS to wait. A holder that dies "
               "(even by kill -9) releases the lock by itself.")
        )


@dataclass
class LockInfo:
    held: bool
    holder: dict


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(lock_file: Path) -> dict:
    try:
        return json.loads(lock_file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def workspace_lock(ws_dir: Path, *, command: str, wait_s: float = 0.0) -> Iterator[dict]:
    ws_dir.mkdir(parents=True, exist_ok=True)
    lock_file = ws_dir / "lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(MIN_WAIT_S, wait_s)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(read_holder(lock_file), lock_file) from None
                time.sleep(0.2)
        previous = read_holder(lock_file)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        holder["previous"] = previous  # a dead holder's info, for the log
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_status(ws_dir: Path) -> LockInfo:
    with probe_lock(ws_dir) as holder:
        if holder is None:
            return LockInfo(False, read_holder(ws_dir / "lock"))
        return LockInfo(True, holder)


@contextlib.contextmanager
def probe_lock(ws_dir: Path) -> Iterator[dict | None]:
    """Take the lock for a moment if nobody holds it: yields None while this process holds it
    (or when there is no workspace folder at all), else the holder's record."""
    lock_file = ws_dir / "lock"
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # no .runner folder: nothing was ever applied here
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield read_holder(lock_file)
            return
        try:
            yield None
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def unlock(ws_dir: Path, *, force: bool = False) -> str:
    """Clear the holder record of a lock that nobody holds.

    A held lock is never taken, ``force`` or not: its holder is alive (the kernel releases the
    lock of a dead process), and taking it would let two applies run at once.
    """
    lock_file = ws_dir / "lock"
    if not lock_file.exists():
        return "no lock to clear"
    fd = os.open(lock_file, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(lock_file)
            raise LockHeld(holder, lock_file, _held_advice(holder, lock_file, force)) from None
        holder = read_holder(lock_file)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if not holder:
        return "lock is free: nothing to clear"
    return (f"lock cleared (it was free; the record named pid {holder.get('pid')} on {holder.get('host')}, "
            "which is gone)")


def _held_advice(holder: dict, lock_file: Path, force: bool) -> str:
    pid = int(holder.get("pid") or 0)
    here = holder.get("host") == socket.gethostname()
    refused = ("`runner unlock --force` does not take a lock that a live process holds: two applies "
               "would run at once. " if force else "`runner unlock` does not take a lock that a live process holds. ")
    if here and pid and not pid_alive(pid):
        return (refused + f"pid {pid} is gone, but a process it started still has {lock_file} open "
                f"(find it with `fuser -v {lock_file}` and stop it); the lock is released when it exits.")
    where = f"on {holder.get('host')}" if not here else "here"
    return refused + f"Wait for pid {pid or '?'} ({where}) to finish, or stop it (e.g. `kill {pid or 'PID'}`); " \
        "the lock is released the moment it exits."

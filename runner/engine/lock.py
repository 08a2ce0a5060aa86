"""The workspace lock: one `runner apply` at a time per project.

An ``fcntl.flock`` on ``.runner/lock`` is the lock itself (the kernel drops it when the holder
dies, even on kill -9); the file's content names the holder (pid, host, since, command) so a second
apply can say who is in the way. ``runner unlock`` clears a lock left behind where flock does not
protect us (a holder on another host sharing the folder, a hung process).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class LockHeld(Exception):
    exit_code = 3

    def __init__(self, holder: dict, lock_file: Path) -> None:
        self.holder = holder
        self.lock_file = lock_file
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "unknown time"
        super().__init__(
            f"the workspace {lock_file.parent} is locked by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} since {when} ({holder.get('command', '?')}). "
            "Wait for it to finish, pass --wait SECONDS to wait, or, if that process is gone, "
            "run `runner unlock`."
        )


@dataclass
class LockInfo:
    held: bool
    holder: dict


def _pid_alive(pid: int) -> bool:
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
    deadline = time.monotonic() + max(0.0, wait_s)
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
    lock_file = ws_dir / "lock"
    if not lock_file.exists():
        return LockInfo(False, {})
    fd = os.open(lock_file, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return LockInfo(True, read_holder(lock_file))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return LockInfo(False, read_holder(lock_file))
    finally:
        os.close(fd)


def unlock(ws_dir: Path, *, force: bool = False) -> str:
    """Clear the lock. Refuses while a live process on this host holds it, unless forced."""
    lock_file = ws_dir / "lock"
    info = lock_status(ws_dir)
    holder = info.holder
    if not lock_file.exists():
        return "no lock to clear"
    if info.held:
        same_host = holder.get("host") == socket.gethostname()
        pid = int(holder.get("pid") or 0)
        if same_host and pid and _pid_alive(pid) and not force:
            raise LockHeld(holder, lock_file)
        if not force:
            raise LockHeld(holder, lock_file)
        print(f"warning: removing a lock still held by pid {pid} on {holder.get('host')}", file=sys.stderr)
    lock_file.unlink(missing_ok=True)
    return "lock cleared" + (f" (was pid {holder.get('pid')} on {holder.get('host')})" if holder else "")

"""One run per output_dir: `output_dir/run.lock`, held by the training run's process 0.

The lock is a small JSON file: host, boot id, pid, start time and a heartbeat time that a
background thread of the running process rewrites every HEARTBEAT_SECONDS. A second run that finds
a live lock is refused before it writes anything, whatever its flags (--overwrite_output_dir
included), so the run in progress loses nothing. A lock left by a run that died (SIGKILL, a
preempted VM) is stale and taken over, so rerunning the command resumes the run:
- on the same host: its process is gone, or the host rebooted since (another boot id), or it names
  this very process (a container restarted with the same pid);
- on any host (the only test for another host, e.g. a gs:// output_dir): its heartbeat is older
  than STALE_AFTER_SECONDS.
The lock is removed when the run ends, however it ends, except when the process is killed.

On a local or shared filesystem the lock file is created with O_EXCL (atomic). Cloud storage has
no such create here: the lock is written, then read back after CLAIM_SETTLE_SECONDS, and a run
whose lock was replaced by another's gives way.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from etils import epath

from flax_lm.errors import UserError
from flax_lm.storage import is_cloud, write_bytes_atomically

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0  # ten missed heartbeats
CLAIM_SETTLE_SECONDS = 2.0  # cloud paths: wait this long before reading the claim back
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of this host (Linux); a pid from an earlier boot names no live process."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


def this_process() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
            "started": now, "heartbeat": now}  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_reason(holder: dict[str, Any], now: float) -> str | None:
    """Why the run that wrote `holder` is not running any more (None: it may be)."""
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_SECONDS:
        return f"its heartbeat stopped {age:.0f} s ago"
    me = this_process()
    if holder.get("host") == me["host"]:
        if holder.get("boot_id") != me["boot_id"]:
            return "the host rebooted since"
        if holder.get("pid") == me["pid"] or not pid_alive(int(holder.get("pid", 0))):
            return "its process is gone"
    return None


def read_holder(lock: epath.Path) -> dict[str, Any] | None:
    """The lock's contents; {} when it cannot be read as a lock (left half-written: stale)."""
    try:
        holder = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def describe(holder: dict[str, Any], now: float) -> str:
    started = datetime.fromtimestamp(float(holder["started"]), UTC)
    return (f"pid {holder['pid']} on {holder['host']}, started {started:%Y-%m-%d %H:%M:%S} UTC, "
            f"heartbeat {now - float(holder['heartbeat']):.0f} s ago")


def check_not_locked(output_dir: epath.Path) -> dict[str, Any] | None:
    """Refuse (UserError) an output_dir that a live run holds; reads only. Returns the stale
    lock's contents, if there is one."""
    lock = output_dir / LOCK_FILE
    holder = read_holder(lock)
    now = time.time()
    if holder and stale_reason(holder, now) is None:
        raise UserError(
            f"--output_dir {output_dir} is in use by another run ({describe(holder, now)}): "
            f"wait for it to end or stop it, or use another --output_dir (a killed run's "
            f"{LOCK_FILE} is ignored after {STALE_AFTER_SECONDS:.0f} s, at once on its own host)"
        )
    return holder


class RunLock:
    """The lock of one output_dir while this process trains in it."""

    def __init__(self, output_dir: epath.Path):
        self.output_dir, self.path = output_dir, output_dir / LOCK_FILE
        self.holder = this_process()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock (a stale one is replaced) and start the heartbeat; UserError if a
        live run holds it."""
        stale = check_not_locked(self.output_dir)
        if stale is not None and read_holder(self.path) == stale:  # not replaced meanwhile
            self.path.unlink(missing_ok=True)
        try:
            self.claim()
        except FileExistsError:  # another run claimed it between the check and now
            check_not_locked(self.output_dir)
            raise UserError(f"--output_dir {self.output_dir} was just taken by another run") from None
        self.thread = threading.Thread(target=self.beat, name="run-lock-heartbeat", daemon=True)
        self.thread.start()

    def claim(self) -> None:
        text = json.dumps(self.holder)
        if not is_cloud(self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return
        if self.path.exists():
            raise FileExistsError(self.path)
        self.path.write_text(text)
        time.sleep(CLAIM_SETTLE_SECONDS)
        if read_holder(self.path) != self.holder:
            raise FileExistsError(self.path)

    def beat(self) -> None:
        """Refresh the heartbeat until released (a failed write is retried next time)."""
        while not self.stop.wait(HEARTBEAT_SECONDS):
            self.holder["heartbeat"] = time.time()
            try:
                self.write(json.dumps(self.holder))
            except OSError as err:
                print(f"warning: cannot refresh {self.path}: {err}", file=sys.stderr)

    def write(self, text: str) -> None:
        """Replace the lock's contents in one step (a reader never sees half of it)."""
        write_bytes_atomically(self.path, text.encode())

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if read_holder(self.path) == self.holder:
                self.path.unlink(missing_ok=True)

"""When a run.lock blocks a run: held by a live process here or a fresh heartbeat elsewhere;
stale once its process is gone, its host rebooted, or its heartbeat stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from flax_lm.errors import UserError
from flax_lm.train import runlock
from flax_lm.train.runlock import LOCK_FILE, RunLock, check_not_locked


def write_lock(out: epath.Path, heartbeat_age: float = 0.0, **changes) -> dict:
    """A lock as `changes` alter this process's own, its heartbeat `heartbeat_age` s old (counted
    from now: parameters are made at collection, long before a test of a full suite runs)."""
    holder = {**runlock.this_process(), "heartbeat": time.time() - heartbeat_age, **changes}
    (out / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.fixture
def out(tmp_path) -> epath.Path:
    return epath.Path(tmp_path)


@pytest.mark.parametrize(
    "changes",
    [
        {"pid": os.getppid()},  # a live process on this host
        {"host": "tpu-vm-7", "pid": 1234, "heartbeat_age": 60},  # beating elsewhere
    ],
)
def test_a_live_run_blocks(out, changes):
    write_lock(out, **changes)
    with pytest.raises(UserError) as refused:
        check_not_locked(out)
    message = str(refused.value)
    assert f"--output_dir {out} is in use by another run (pid {changes['pid']} on " in message
    assert "\n" not in message
    with pytest.raises(UserError):
        RunLock(out).acquire()


@pytest.mark.parametrize(
    "changes",
    [
        {"pid": "dead"},  # SIGKILLed, on this host
        {"boot_id": "an-earlier-boot"},  # a live pid, but from before a reboot
        {"pid": "me"},  # a container restarted with the same pid
        {"host": "tpu-vm-7", "heartbeat_age": runlock.STALE_AFTER_SECONDS + 1},
    ],
)
def test_a_dead_runs_lock_is_taken_over(out, changes):
    pids = {"dead": dead_pid(), "me": os.getpid()}
    changes = {k: pids.get(v, v) if k == "pid" else v for k, v in changes.items()}
    stale = write_lock(out, **{"pid": os.getppid(), **changes})
    assert check_not_locked(out) == stale
    lock = RunLock(out)
    lock.acquire()
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_a_half_written_lock_is_stale(out):
    (out / LOCK_FILE).write_text('{"host": "tpu-vm-7", "pi')
    assert check_not_locked(out) == {}


def test_the_heartbeat_is_refreshed(out, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_SECONDS", 0.05)
    lock = RunLock(out)
    lock.acquire()
    first = json.loads((out / LOCK_FILE).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((out / LOCK_FILE).read_text())["heartbeat"] > first
    lock.release()

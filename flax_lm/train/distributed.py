"""Joining the other processes of a multi-host run, and stopping training cleanly on a signal.

Kept apart from the training loop because both depend on where the run is launched (by hand,
SLURM, Open MPI, a TPU pod) rather than on what it trains.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from flax_lm.backend import tpu_chips_here
from flax_lm.errors import UserError
from flax_lm.train.args import TrainConfig

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Launchers that start the processes of one run, by the variables they document: the one that
# marks a launch by it, and the number of processes. jax.distributed.initialize() reads the rest
# (coordinator, process id) from the same launchers itself.
LAUNCHERS = (
    ("slurm", "SLURM_JOB_ID", "SLURM_NTASKS"),
    ("open mpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
)


def setup_jax(cfg: TrainConfig) -> None:
    """Join the other processes of a multi-host run; cache compiled steps across runs."""
    if several_processes() and not jax.distributed.is_initialized():
        jax.distributed.initialize(**process_env())
    if cfg.compilation_cache_dir.lower() != "none":
        cache = Path(cfg.compilation_cache_dir).expanduser()
        jax.config.update("jax_compilation_cache_dir", str(cache))


def process_env() -> dict[str, int]:
    """num_processes and process_id from JAX_NUM_PROCESSES and JAX_PROCESS_ID, for a launch by
    hand (jax reads only JAX_COORDINATOR_ADDRESS itself; the launchers it detects need neither)."""
    found = {}
    names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
    for argument, name in names.items():
        value = os.environ.get(name, "")
        if value:
            if not value.isdigit():
                raise UserError(f"{name} must be a non-negative integer, got {value!r}")
            found[argument] = int(value)
    return found


def several_processes() -> bool:
    """Whether this process may be one of several of one run, to be joined by
    jax.distributed: started by hand (JAX_COORDINATOR_ADDRESS or JAX_NUM_PROCESSES > 1), by a
    launcher of more than one process, or on a Cloud TPU VM (whose slice may span hosts)."""
    by_hand = os.environ.get("JAX_NUM_PROCESSES", "")
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or (by_hand.isdigit() and int(by_hand) > 1):
        return True
    cluster = detected_cluster()
    return cluster is not None and (cluster[1] is None or cluster[1] > 1)


def detected_cluster() -> tuple[str, int | None] | None:
    """(launcher, process count) of a launch by SLURM or Open MPI, or ("cloud tpu", None) on a
    host with TPU chips, where the slice's hosts are known to JAX (jax.distributed.initialize()
    asks the TPU metadata server; one host joins itself alone); None otherwise. A one-task job
    is a launch of one process: it runs alone, without jax.distributed."""
    for name, marker, count in LAUNCHERS:
        value = os.environ.get(count, "")
        if marker in os.environ and value.isdigit():
            return name, int(value)
    if "tpu" in (os.environ.get("JAX_PLATFORMS") or "tpu") and tpu_chips_here():
        return "cloud tpu", None
    return None


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; exit status 128 + signal."""

    def __init__(self, signum: int, step: int, saved: Path):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} at step {step}: saved checkpoint {saved}; rerun the same "
            "command to continue"
        )
        self.exit_status = 128 + signum


class StopSignals:
    """While training, SIGTERM (a preemption notice) and SIGINT (Ctrl-C) ask the loop to save a
    checkpoint at a step boundary and stop; a second signal stops at once.

    With several processes, every process must stop at the same step (a checkpoint save is
    collective: one host saving alone waits forever for the others). There JAX's preemption
    service owns SIGTERM: a notice on any host reaches all of them, and `should_stop` turns true
    on every host at the same step (the first after the highest step any host had reached). SIGINT
    is passed on as a SIGTERM of this process, so Ctrl-C on one host stops the run the same way.
    """

    def __init__(self, several_processes: bool = False):
        self.several_processes = several_processes
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            handled = (signal.SIGINT,) if self.several_processes else STOP_SIGNALS
            self.previous = {s: signal.signal(s, self.handle) for s in handled}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self.several_processes:  # to JAX's preemption notifier, which tells every host
            print(f"received {signal.Signals(signum).name}: passing it on to all processes as a "
                  "preemption notice (send it again to stop at once)", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(
            f"received {signal.Signals(signum).name}: saving a checkpoint after this step, "
            "then stopping (send it again to stop at once)",
            file=sys.stderr,
        )

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`: called once at every step, on every process."""
        if not self.several_processes:
            return self.received is not None
        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        self.received = self.received or signal.SIGTERM
        print(f"preemption notice: all processes save a checkpoint at step {step}, then stop",
              file=sys.stderr)
        return True

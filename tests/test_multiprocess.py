"""Several processes (one per host on a pod), here two on this machine joined by
jax.distributed: the same run as one process with as many devices, and a preemption notice on
one process stops every process at the same step with one checkpoint that resumes exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE_EVERY_COMPILE, Background, host_devices
from test_fsdp import assert_close_runs
from test_resume import TINY_MODELS, assert_same_run

pytestmark = pytest.mark.slow  # several whole runs of two processes: about 2 minutes

STEPS = 12
SIGNAL_AFTER = 3  # process 1 receives the signal when it has run this step

DRIVER = """
import os, signal, sys, time
from flax_lm.train import distributed
from flax_lm.commands.train import main

signal_after = int(os.environ.get("SIGNAL_AFTER", "0"))
signum = int(os.environ.get("SIGNAL", signal.SIGTERM))
STEP_SECONDS = 0.5
should_stop = distributed.StopSignals.should_stop


def notice_then_check(self, step):
    if step == signal_after:  # a preemption notice reaching this process only
        os.kill(os.getpid(), signum)
    if signal_after and step >= signal_after:
        time.sleep(STEP_SECONDS)  # steps of a real model's length: the notice travels meanwhile
    return should_stop(self, step)


distributed.StopSignals.should_stop = notice_then_check
sys.exit(main(sys.argv[1:], objective="clm"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_argv(code_corpus, tokenizer_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--output_dir", str(out), *TINY_MODELS["clm"], "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "32",
        "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--logging_steps", "1", "--eval_steps", str(STEPS), "--save_steps", "100",
        "--report_to", "none", "--seed", "5", "--compilation_cache_dir", str(cache),
    ]  # fmt: skip


def start(argv: list[str], processes: int, folder: Path,
          envs: list[dict[str, str]] | None = None) -> list[Background]:
    """Start the CLM command as `processes` processes of one jax.distributed run (each with one
    CPU device; `envs`: extra environment per process), their output kept in `folder`."""
    port = free_port()
    running = []
    for index in range(processes):
        process_env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_EVERY_COMPILE,
                       **(envs or [{}] * processes)[index]}
        if processes > 1:
            process_env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index))
        command = [sys.executable, "-c", DRIVER, *argv]
        running.append(Background(command, folder / f"process{index}", env=process_env))
    return running


def finish(running: list[Background]) -> list[subprocess.CompletedProcess]:
    """The results of `start`ed processes in their order; a hang (the failure this file looks
    for) fails the test and ends every process."""
    try:
        return [process.result(timeout=300) for process in running]
    finally:
        for process in running:
            process.kill()


def launch(argv: list[str], processes: int, folder: Path,
           envs: list[dict[str, str]] | None = None) -> list[subprocess.CompletedProcess]:
    """`start`, then `finish`."""
    return finish(start(argv, processes, folder, envs))


TWO_DEVICES = host_devices(2)


@pytest.fixture(scope="module")
def two_process_run(code_corpus, tiny_tokenizer_dir, tmp_path_factory):
    """(argv, output_dir) of an uninterrupted run of two processes, and the output_dir of the
    same run as one process with two devices and both data shards, made side by side."""
    root = tmp_path_factory.mktemp("two_processes")
    argv = train_argv(code_corpus, tiny_tokenizer_dir, root / "run", root / "jax_cache")
    single = root / "single"
    both = [*start(argv, 2, root / "logs_two"),
            *start([*with_output_dir(argv, single), "--data_shards", "2"], 1, root / "logs_one",
                   [TWO_DEVICES])]  # fmt: skip
    for done in finish(both):
        assert done.returncode == 0, done.stderr[-3000:]
    return argv, root / "run", single


def with_output_dir(argv: list[str], out: Path) -> list[str]:
    position = argv.index("--output_dir") + 1
    return [*argv[:position], str(out), *argv[position + 1:]]


def test_two_processes_train_like_one_process_with_two_devices(two_process_run):
    """Each process reads, tokenizes and feeds only its own data shard (of 2, the default with
    two processes): the run is the one process with two devices and both shards makes, bit for
    bit (parameters, losses, eval), and only process 0 writes."""
    _, out, single = two_process_run
    assert_same_run(single, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_one_process_stops_every_process_at_one_step(two_process_run, tmp_path,
                                                                   signum):
    """SIGTERM (a preemption notice) or SIGINT reaches process 1 only, after its step 3: both
    processes save one checkpoint at the same step and exit with 128 + the signal that stopped
    them, and resuming (both processes again) ends in exactly the uninterrupted run. (Before
    JAX's preemption service decided the step, the signalled process waited forever in its
    checkpoint save for a process that kept training.)"""
    argv, reference, _ = two_process_run
    out = tmp_path / "run"
    argv = with_output_dir(argv, out)
    signalled = {"SIGNAL_AFTER": str(SIGNAL_AFTER), "SIGNAL": str(int(signum))}
    interrupted = launch(argv, 2, tmp_path / "logs_interrupted", [{}, signalled])
    stopped_at = set()
    for done, received in zip(interrupted, (signal.SIGTERM, signum), strict=True):
        assert done.returncode == 128 + received, done.stderr[-3000:]
        stopped = re.search(rf"interrupted by {received.name} at step (\d+)", done.stderr)
        stopped_at.add(int(stopped[1]))
    (step,) = stopped_at
    assert SIGNAL_AFTER < step < STEPS
    saved = [path.name for path in (out / "checkpoints").iterdir() if path.name.isdigit()]
    assert saved == [str(step)]
    meta = json.loads((out / "checkpoints" / saved[0] / "meta" / "metadata").read_text())
    assert meta["data_shards"] == 2
    # SIGINT's run resumes on one process with both data shards: the checkpoint's count is kept
    processes, devices = (2, {}) if signum == signal.SIGTERM else (1, TWO_DEVICES)
    resumed = launch([*argv, "--resume_from_checkpoint"], processes, tmp_path / "logs_resumed",
                     [devices] * processes)
    for done in resumed:
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint" in resumed[0].stdout + resumed[0].stderr
    assert_same_run(reference, out)


def test_two_processes_of_four_devices_shard_like_one_process_of_eight(tmp_path, code_corpus,
                                                                        tiny_tokenizer_dir):
    """FSDP over both processes (--mesh fsdp=8: every array split across the two hosts): the
    run equals one process with 8 devices and both data shards on the same mesh, and process 0
    writes the whole model although it holds half of every parameter."""
    argv = [*train_argv(code_corpus, tiny_tokenizer_dir, tmp_path / "two", tmp_path / "cache"),
            "--per_device_train_batch_size", "1", "--mesh", "fsdp=8"]  # fmt: skip
    four, eight = host_devices(4), host_devices(8)
    both = [*start(argv, 2, tmp_path / "logs_two", [four, four]),  # started together
            *start([*with_output_dir(argv, tmp_path / "one"), "--data_shards", "2"], 1,
                   tmp_path / "logs_one", [eight])]  # fmt: skip
    for done in finish(both):
        assert done.returncode == 0, done.stderr[-3000:]
    assert_close_runs(tmp_path / "one", tmp_path / "two")

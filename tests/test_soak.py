"""A long run of a tiny model as a real subprocess: checkpoints rotate (bounded disk), host memory
stays flat after warm-up, and the run resumes cleanly past its end."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CACHE_EVERY_COMPILE

from flax_lm.commands.train import main

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_STEPS, KEEP = 2000, 100, 2
MORE_STEPS = 2100
LOG_STEPS = 100
WARM_STEPS = (400, 600)  # RSS baseline: after compilation, the first saves and the prefetch
LATE_STEP = 1500  # RSS from here on is compared with the baseline
MAX_RSS_GROWTH = 0.10
MAX_STEP_DIRS = KEEP + 1  # the kept checkpoints, plus one being written
POLL_SECONDS = 0.1


@dataclass
class Samples:
    """What polling the running process saw: (step, RSS bytes), checkpoint dirs and bytes."""

    rss: list[tuple[int, int]] = field(default_factory=list)
    most_step_dirs: int = 0
    most_checkpoint_bytes: int = 0


def rss_bytes(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has just ended
        return None
    rss = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")]
    return rss[0] if rss else None  # none once it has exited


def last_logged_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root`; os.walk skips dirs that a running save renames away."""
    total = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(folder, name)).st_size
    return total


def soak_argv(code_corpus, tokenizer_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--output_dir", str(out), "--config_name", "gpt2", "--config_overrides",
        "n_embd=32,n_layer=1,n_head=2,n_positions=32,vocab_size=512,bos_token_id=0,eos_token_id=2",
        "--tokenizer_name", str(tokenizer_dir), "--train_file", str(code_corpus.train),
        "--block_size", "32", "--per_device_train_batch_size", "4", "--do_train",
        "--max_steps", str(STEPS), "--learning_rate", "1e-3", "--warmup_steps", "100",
        "--logging_steps", str(LOG_STEPS), "--save_steps", str(SAVE_STEPS),
        "--save_total_limit", str(KEEP), "--report_to", "none",
        "--compilation_cache_dir", str(cache),
    ]  # fmt: skip


def run_and_sample(argv: list[str], out: Path) -> tuple[subprocess.CompletedProcess, Samples]:
    """run_clm_flax.py in a subprocess, sampled every POLL_SECONDS until it ends (its compiled
    programs all cached, for the resume that follows in this process)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_EVERY_COMPILE}
    samples = Samples()
    with subprocess.Popen(
        [sys.executable, str(REPO / "run_clm_flax.py"), *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            rss = rss_bytes(process.pid)
            if rss is not None:
                samples.rss.append((last_logged_step(out / "metrics.jsonl"), rss))
            checkpoints = out / "checkpoints"
            if checkpoints.is_dir():
                step_dirs = [p for p in checkpoints.iterdir() if p.name[:1].isdigit()]
                samples.most_step_dirs = max(samples.most_step_dirs, len(step_dirs))
                samples.most_checkpoint_bytes = max(
                    samples.most_checkpoint_bytes, tree_bytes(checkpoints)
                )
            time.sleep(POLL_SECONDS)
        process.kill()  # no-op unless the deadline passed
        stdout, stderr = process.communicate()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done, samples


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS is read from /proc")
def test_two_thousand_steps_keep_disk_and_memory_bounded_then_resume(
    code_corpus, tiny_tokenizer_dir, tmp_path
):
    out = tmp_path / "soak"
    argv = soak_argv(code_corpus, tiny_tokenizer_dir, out, tmp_path / "jax_cache")
    done, samples = run_and_sample(argv, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"train: {STEPS} steps" in done.stdout

    checkpoints = out / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [STEPS - SAVE_STEPS, STEPS]
    one_checkpoint = max(tree_bytes(step_dir) for step_dir in checkpoints.iterdir())
    assert samples.most_step_dirs <= MAX_STEP_DIRS
    # Compressed checkpoints of this model vary from step to step (measured 398-431 KB): 15%.
    assert samples.most_checkpoint_bytes <= MAX_STEP_DIRS * one_checkpoint * 1.15

    baseline = [rss for step, rss in samples.rss if WARM_STEPS[0] <= step < WARM_STEPS[1]]
    late = [rss for step, rss in samples.rss if step >= LATE_STEP]
    assert baseline and late, samples.rss
    growth = max(late) / sorted(baseline)[len(baseline) // 2] - 1
    assert growth < MAX_RSS_GROWTH, (growth, samples.rss[:: max(1, len(samples.rss) // 40)])

    more = [*argv, "--max_steps", str(MORE_STEPS), "--resume_from_checkpoint"]
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        assert main(more, objective="clm") == 0, log.getvalue()[-3000:]
    assert f"resumed from checkpoint {checkpoints / str(STEPS)} at step {STEPS}" in log.getvalue()
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [STEPS, MORE_STEPS]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "header" not in record]
    assert steps == list(range(LOG_STEPS, MORE_STEPS + 1, LOG_STEPS))
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_steps"] == MORE_STEPS

"""Exact resume after SIGKILL, SIGTERM or SIGINT (dropout on); atomic, complete, pickle-free
checkpoints; runs that stop on a non-finite loss instead of saving it.

Killed runs are real subprocesses: a small driver wraps the training CLI so that the process
signals itself right after step KILL_AFTER is logged, which makes the kill point deterministic.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CACHE_EVERY_COMPILE, Background, assert_one_line_error, small_filesystem
from safetensors.numpy import load_file

from flax_lm.commands.train import main
from flax_lm.train.runlock import LOCK_FILE

TINY_MODELS = {  # dropout stays at gpt2's / roberta-base's 0.1
    "clm": ["--config_name", "gpt2", "--config_overrides",
            "n_embd=32,n_layer=2,n_head=2,n_positions=32,vocab_size=512,bos_token_id=0,"
            "eos_token_id=2", "--block_size", "32"],
    "mlm": ["--config_name", "roberta-base", "--config_overrides",
            "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
            "vocab_size=512,max_position_embeddings=34,pad_token_id=1,bos_token_id=0,"
            "eos_token_id=2", "--max_seq_length", "32"],
}  # fmt: skip
STEPS, SAVE_STEPS, EVAL_STEPS = 10, 3, 5  # checkpoints at 3, 6, 9 and 10
KILL_AFTER = 7  # not a save step: the newest complete checkpoint is 6 (or 3)
SKIP_COUNTERS = ("last_finite", "notfinite_count", "total_notfinite")  # optax.apply_if_finite's
PICKLE_PROTOCOL_OPCODE = b"\x80"
# Every file orbax writes starts like one of these: JSON, its commit marker, OCDBT, zstd.
CHECKPOINT_FILE_MAGIC = (b"{", b"Checkpoint commit", b"\x0c\xdb", b"\x28\xb5\x2f\xfd")

DRIVER = """
import os, sys
from flax_lm.train import metrics
from flax_lm.train import runlock
from flax_lm.commands.train import main
from flax_lm.train.runlock import LOCK_FILE

signal_after, signum, objective = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
write = metrics.RunLog.train


def train_then_signal(self, record):
    # after step signal_after: send signum, or with signum 0 wait until GO_FILE exists
    write(self, record)
    if record["step"] == signal_after:
        with open(os.environ["SIGNAL_TIME_FILE"], "w") as f:
            f.write(repr(__import__("time").time()))
        if signum:
            os.kill(os.getpid(), signum)
        else:
            while not os.path.exists(os.environ["GO_FILE"]):
                __import__("time").sleep(0.05)


metrics.RunLog.train = train_then_signal
sys.exit(main(sys.argv[4:], objective=objective))
"""


def run_argv(objective, code_corpus, tokenizer_dir: Path, out: Path, cache: Path) -> list[str]:
    return [
        "--output_dir", str(out), *TINY_MODELS[objective], "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "64",
        "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--warmup_steps", "2",
        "--weight_decay", "0.01", "--logging_steps", "1", "--eval_steps", str(EVAL_STEPS),
        "--save_steps", str(SAVE_STEPS), "--report_to", "none", "--seed", "11",
        "--compilation_cache_dir", str(cache),
    ]  # fmt: skip


def run_in_process(argv: list[str], objective: str, status: int = 0) -> tuple[str, str]:
    """(stdout, stderr) of main(argv) in this process, which must exit with `status`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        got = main(argv, objective=objective)
    assert got == status, err.getvalue()[-3000:]
    return out.getvalue(), err.getvalue()


class Signalled:
    """The training CLI in a background subprocess that sends itself `signum` once step
    KILL_AFTER is logged, writing into `out`."""

    def __init__(self, argv: list[str], objective: str, signum: int, out: Path) -> None:
        self.argv, self.out = argv, out
        self.time_file = out.parent / f"{out.name}_signal_time"
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_EVERY_COMPILE,
               "SIGNAL_TIME_FILE": str(self.time_file)}  # fmt: skip
        command = [sys.executable, "-c", DRIVER, str(KILL_AFTER), str(int(signum)), objective,
                   *self.argv]  # fmt: skip
        self.process = Background(command, out.parent / f"{out.name}_logs", env=env)

    def result(self) -> tuple[subprocess.CompletedProcess, float]:
        """(CompletedProcess, seconds from the signal to the process's exit)."""
        done = self.process.result()
        assert self.time_file.exists(), done.stderr[-3000:]
        return done, self.process.exit_time - float(self.time_file.read_text())


def metrics_records(out: Path) -> list[dict]:
    """metrics.jsonl without the fields that depend on timing, and without the run's headers
    (a run resumed into another output_dir starts its file with its own)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    timing = ("time", "tokens_per_second")
    records = [json.loads(line) for line in lines]
    return [{k: v for k, v in r.items() if k not in timing} for r in records if "header" not in r]


def assert_same_run(expected: Path, actual: Path) -> None:
    """Bit-identical parameters, eval results, train loss and metrics (timing aside)."""
    want, got = (load_file(str(d / "model.safetensors")) for d in (expected, actual))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    eval_results = [json.loads((d / "eval_results.json").read_text()) for d in (expected, actual)]
    assert eval_results[1] == eval_results[0]
    train_results = [json.loads((d / "train_results.json").read_text()) for d in (expected, actual)]
    assert train_results[1]["train_loss"] == train_results[0]["train_loss"]
    assert metrics_records(actual) == metrics_records(expected)


def with_output_dir(argv: list[str], out: Path) -> list[str]:
    return with_flag(argv, "--output_dir", out)


def with_flag(argv: list[str], flag: str, value) -> list[str]:
    position = argv.index(flag) + 1
    return [*argv[:position], str(value), *argv[position + 1 :]]


def in_readme_layout(argv: list[str], objective: str, code_corpus, out: Path) -> list[str]:
    """The run of `argv` as README "3. Training" lays it out: the tokenizer and the config made
    into `out` by the pipeline's own commands (the same tokenizer and model as the reference
    run's), then trained with `out` as --config_name, --tokenizer_name and --output_dir."""
    from flax_lm.commands.cli import main as flax_lm

    overrides = TINY_MODELS[objective][TINY_MODELS[objective].index("--config_overrides") + 1]
    model_type = {"clm": "gpt2", "mlm": "roberta"}[objective]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert flax_lm(["train-tokenizer", "--train_file", str(code_corpus.train),
                        "--vocab_size", "512", "--output_dir", str(out)]) == 0  # fmt: skip
        assert flax_lm(["create-config", "--model_type", model_type, "--tokenizer_name", str(out),
                        "--config_overrides", overrides, "--output_dir", str(out)]) == 0  # fmt: skip
    argv = [arg for arg in argv if arg != overrides and arg != "--config_overrides"]
    for flag in ("--config_name", "--tokenizer_name", "--output_dir"):
        argv = with_flag(argv, flag, out)
    return argv


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume_jax_cache")


@contextlib.contextmanager
def caching_every_compile() -> Iterator[None]:
    """CACHE_EVERY_COMPILE for the runs in this process meanwhile."""
    import jax

    name = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, name)
    jax.config.update(name, float(CACHE_EVERY_COMPILE[name.upper()]))
    try:
        yield
    finally:
        jax.config.update(name, before)


def reference_run(objective: str, code_corpus, tokenizer_dir, cache, root) -> tuple[list, Path]:
    """(argv, output_dir) of an uninterrupted run; its compilations all cached, for the
    signalled subprocesses that run it again."""
    out = root / "run"
    argv = run_argv(objective, code_corpus, tokenizer_dir, out, cache)
    with caching_every_compile():
        run_in_process(argv, objective)
    return argv, out


@pytest.fixture(scope="session")
def clm_reference(code_corpus, tiny_tokenizer_dir, jax_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_clm")
    return reference_run("clm", code_corpus, tiny_tokenizer_dir, jax_cache, root)


@pytest.fixture(scope="session")
def mlm_reference(code_corpus, tiny_tokenizer_dir, jax_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_mlm")
    return reference_run("mlm", code_corpus, tiny_tokenizer_dir, jax_cache, root)


SIGNALLED_RUNS = {  # test -> (objective, signal) of its signalled subprocess
    "test_sigkill_then_resume_matches_the_uninterrupted_run[clm]": ("clm", signal.SIGKILL),
    "test_sigkill_then_resume_matches_the_uninterrupted_run[mlm]": ("mlm", signal.SIGKILL),
    "test_sigterm_saves_a_checkpoint_and_the_resume_matches": ("clm", signal.SIGTERM),
}


@pytest.fixture(scope="module")
def signalled_runs(request, tmp_path_factory) -> dict[str, Signalled]:
    """The signalled subprocesses of this module's selected tests, started together (see
    conftest.Background) once the reference runs have filled the compilation cache."""
    selected = [item.name for item in request.session.items if item.name in SIGNALLED_RUNS]
    selected.sort(key=lambda test: SIGNALLED_RUNS[test][0])  # CLM's start before MLM's reference
    started = {}
    for test in selected:
        objective, signum = SIGNALLED_RUNS[test]
        argv, _ = request.getfixturevalue(f"{objective}_reference")
        out = tmp_path_factory.mktemp("signalled") / "run"
        argv = in_readme_layout(argv, objective, request.getfixturevalue("code_corpus"), out)
        started[test] = Signalled(argv, objective, signum, out)
    yield started
    for run in started.values():
        run.process.kill()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_sigkill_then_resume_matches_the_uninterrupted_run(objective, request, signalled_runs):
    _, expected = request.getfixturevalue(f"{objective}_reference")
    run = signalled_runs[request.node.name]
    argv, out = run.argv, run.out
    done, _ = run.result()
    assert done.returncode == -signal.SIGKILL
    assert metrics_records(out)[-1]["step"] == KILL_AFTER
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved in ([3], [3, 6])  # 6 may be unfinished: then it is a temporary dir, skipped
    if saved[-1] == 6:  # the model exported at step 6 is that checkpoint's
        assert_exported_model_is_checkpoint(out, 6)

    assert (out / LOCK_FILE).is_file()  # left by the killed run: it must not block the rerun

    stdout, _ = run_in_process(argv, objective)  # the same command, rerun
    first_line = stdout.splitlines()[0]  # (6 may be named as an interrupted save)
    assert first_line.startswith(
        f"resumed from checkpoint {out / 'checkpoints' / str(saved[-1])} at step {saved[-1]} ("
    )
    assert first_line.endswith(
        "the newest in --output_dir; --overwrite_output_dir starts over instead)"
    )
    assert_same_run(expected, out)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3, 6, 9, 10]
    assert not (out / LOCK_FILE).exists()  # released at the end
    assert_a_longer_rerun_continues(argv, objective, out)


def assert_a_longer_rerun_continues(argv: list[str], objective: str, out: Path) -> None:
    """The finished run's command rerun with more steps (CLM: --max_steps; MLM:
    --num_train_epochs, 12 steps' worth) continues it from its last step to the new end."""
    before = metrics_records(out)
    if objective == "clm":
        longer = with_flag(argv, "--max_steps", STEPS + 2)
    else:
        last = [record for record in before if "loss" in record][-1]  # train step STEPS's
        steps_per_epoch = STEPS / last["epoch"]  # the epoch is rounded: about that many
        position = argv.index("--max_steps")
        longer = [*argv[:position], *argv[position + 2 :],
                  "--num_train_epochs", str((STEPS + 2.5) / steps_per_epoch)]  # fmt: skip
    stdout, _ = run_in_process(longer, objective)
    resumed = f"resumed from checkpoint {out / 'checkpoints' / str(STEPS)} at step {STEPS}"
    assert stdout.splitlines()[0].startswith(resumed)
    after = metrics_records(out)
    assert after[: len(before)] == before
    assert [r["step"] for r in after[len(before) :] if "loss" in r] == [STEPS + 1, STEPS + 2]
    assert max(int(p.name) for p in (out / "checkpoints").iterdir()) == STEPS + 2


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resume_matches(clm_reference, request,
                                                          signalled_runs):
    """A preemption notice: checkpoint at the next step boundary, exit 143 with a message
    saying how to resume, well within 60 s."""
    objective, (_, expected) = "clm", clm_reference
    run = signalled_runs[request.node.name]
    argv, out = run.argv, run.out
    done, seconds_to_exit = run.result()
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert seconds_to_exit < 60
    assert "received SIGTERM: saving a checkpoint after this step" in done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"interrupted by SIGTERM at step {KILL_AFTER}: saved checkpoint "
        f"{out.absolute() / 'checkpoints' / str(KILL_AFTER)}; rerun the same command to continue"
    )
    assert "Traceback" not in done.stderr
    assert_exported_model_is_checkpoint(out, KILL_AFTER)  # as after every checkpoint

    stdout, _ = run_in_process(argv, objective)  # the same command, rerun
    assert f"at step {KILL_AFTER}" in stdout.splitlines()[0]
    assert_same_run(expected, out)


@pytest.mark.slow
def test_a_second_run_in_the_same_output_dir_is_refused(clm_reference, tmp_path, capsys):
    """While a run trains, the same command (and one with --overwrite_output_dir) is refused
    with one line naming the running process, and the first run loses nothing."""
    objective, (argv, expected) = "clm", clm_reference
    out, go, paused = tmp_path / "busy", tmp_path / "go", tmp_path / "paused"
    argv = with_output_dir(argv, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SIGNAL_TIME_FILE": str(paused),
           "GO_FILE": str(go)}  # fmt: skip
    command = [sys.executable, "-c", DRIVER, str(KILL_AFTER), "0", objective, *argv]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not paused.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert paused.exists(), first.communicate()[1][-3000:]  # paused after step KILL_AFTER
        for flags in ([], ["--overwrite_output_dir"]):
            status = main([*argv, *flags], objective=objective)
            captured = capsys.readouterr()
            assert_one_line_error((status, captured.err), f"--output_dir {out}", str(first.pid))
            assert captured.out == ""
    finally:
        go.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]  # nothing deleted under it: all its
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [3, 6, 9, 10]
    assert_same_run(expected, out)  # checkpoints, every metrics line, the same final model


def run_interrupted(argv: list[str], objective: str, monkeypatch) -> tuple[str, str]:
    """The run in this process, Ctrl-C'd once step KILL_AFTER is logged (exit 130)."""
    from flax_lm.train import metrics

    write = metrics.RunLog.train

    def train_then_interrupt(self, record):
        write(self, record)
        if record["step"] == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(metrics.RunLog, "train", train_then_interrupt)
    try:
        return run_in_process(argv, objective, status=128 + signal.SIGINT)
    finally:
        monkeypatch.setattr(metrics.RunLog, "train", write)


def test_sigint_saves_a_checkpoint_and_the_resume_matches(mlm_reference, tmp_path, monkeypatch):
    """Ctrl-C in this very process: exit 130 after a checkpoint, then an exact resume."""
    objective, (argv, expected) = "mlm", mlm_reference
    out = tmp_path / "interrupted"
    argv = with_output_dir(argv, out)
    handler = signal.getsignal(signal.SIGINT)
    _, stderr = run_interrupted(argv, objective, monkeypatch)
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted by SIGINT at step {KILL_AFTER}")
    assert signal.getsignal(signal.SIGINT) is handler  # restored after training

    run_in_process([*argv, "--resume_from_checkpoint"], objective)
    assert_same_run(expected, out)


def test_a_gs_output_dir_saves_resumes_and_exports(clm_reference, fake_gcs, monkeypatch):
    """Checkpoints, metrics, results and the exported model go to gs://; a run stopped by a
    signal there is continued by its rerun exactly; nothing local is named after the URL."""
    objective, (argv, expected) = "clm", clm_reference
    argv = with_output_dir(argv, "gs://bucket/run")
    run_interrupted(argv, objective, monkeypatch)
    run = fake_gcs / "bucket" / "run"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [3, 6, KILL_AFTER]
    assert metrics_records(run)[-1]["step"] == KILL_AFTER  # copied there at the checkpoint

    stdout, _ = run_in_process(argv, objective)  # the same command, rerun
    assert stdout.splitlines()[0].startswith(
        f"resumed from checkpoint gs://bucket/run/checkpoints/{KILL_AFTER} at step {KILL_AFTER}"
    )
    assert_same_run(expected, run)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [3, 6, 7, 9, 10]
    assert {"config.json", "tokenizer.json", "all_results.json"} <= {p.name for p in run.iterdir()}
    assert not (run / LOCK_FILE).exists()
    assert [p.name for p in Path.cwd().iterdir()] == ["gcs"]  # no local "gs:" folder


def test_export_writes_a_checkpoint_to_gs(clm_reference, fake_gcs):
    """`flax-lm export CHECKPOINT --output_dir gs://...`: the run's own final model, there."""
    from flax_lm.commands.cli import main as flax_lm

    _, expected = clm_reference
    checkpoint = expected / "checkpoints" / str(STEPS)
    assert flax_lm(["export", str(checkpoint), "--output_dir", "gs://bucket/step-10"]) == 0
    exported = fake_gcs / "bucket" / "step-10"
    want, got = (load_file(str(d / "model.safetensors")) for d in (expected, exported))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (exported / "tokenizer.json").read_bytes() == (expected / "tokenizer.json").read_bytes()


def test_an_export_to_a_full_disk_ends_in_one_line(clm_reference, tmp_path, monkeypatch, capsys):
    from flax_lm.commands.cli import main as flax_lm
    from flax_lm.models import hf_io

    _, expected = clm_reference
    disk = tmp_path / "disk"
    with small_filesystem(disk, "64k") as mounted:  # less than the model
        if not mounted:
            def full(path, data):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            monkeypatch.setattr(hf_io, "write_bytes_atomically", full)
        argv = ["export", str(expected / "checkpoints" / str(STEPS)), "--output_dir", str(disk / "m")]
        status = flax_lm(argv)
        assert_one_line_error((status, capsys.readouterr().err), str(disk / "m"),
                              "No space left on device", "--overwrite_output_dir")  # fmt: skip
        assert not [p.name for p in (disk / "m").iterdir() if "partial" in p.name]


def test_resume_skips_interrupted_saves(clm_reference, tmp_path):
    """The newest step dirs are saves still in orbax's temporary dirs: the resume takes the
    newest complete checkpoint, says so, and still matches."""
    objective, (argv, expected) = "clm", clm_reference
    out = tmp_path / "crashed"
    source, target = expected / "checkpoints", out / "checkpoints"
    for step in (3, 6):
        shutil.copytree(source / str(step), target / str(step))
    shutil.copytree(source / "9", target / "9.orbax-checkpoint-tmp-1700000000000")
    shutil.copytree(source / "10", target / "10.orbax-checkpoint-tmp-1700000000001")

    stdout, _ = run_in_process([*with_output_dir(argv, out), "--resume_from_checkpoint"], objective)
    assert f"resumed from checkpoint {target / '6'} at step 6" in stdout
    assert (
        "skipped incomplete checkpoints ['9.orbax-checkpoint-tmp-1700000000000', "
        "'10.orbax-checkpoint-tmp-1700000000001']"
    ) in stdout
    assert sorted(p.name for p in target.iterdir()) == ["10", "3", "6", "9"]
    later = [r for r in metrics_records(expected) if r["step"] > 6]
    assert metrics_records(out) == later
    for name, array in load_file(str(expected / "model.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))[name], array)


def test_a_streamed_run_resumes_exactly_from_its_saved_position(clm_reference, tmp_path):
    """--streaming: a run resumed from its step-6 checkpoint (the stream's position, shuffle
    buffer included) ends exactly as the uninterrupted streamed run."""
    argv, _ = clm_reference
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_in_process([*with_output_dir(argv, straight), "--streaming"], "clm")
    meta = json.loads((straight / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["data"]["shards"]["0"]["batch_in_epoch"] == 6
    shutil.copytree(straight / "checkpoints" / "6", resumed / "checkpoints" / "6")
    run_in_process([*with_output_dir(argv, resumed), "--streaming", "--resume_from_checkpoint"],
                   "clm")  # fmt: skip
    later = [r for r in metrics_records(straight) if r["step"] > 6]
    assert metrics_records(resumed) == later
    for name, array in load_file(str(straight / "model.safetensors")).items():
        np.testing.assert_array_equal(load_file(str(resumed / "model.safetensors"))[name], array)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_checkpoints_hold_the_whole_run_and_no_pickle(objective, request):
    _, expected = request.getfixturevalue(f"{objective}_reference")
    step_dir = expected / "checkpoints" / str(SAVE_STEPS)
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    assert meta["step"] == SAVE_STEPS and meta["objective"] == objective and meta["seed"] == 11
    assert meta["data"] == {"epoch": 0, "batch_in_epoch": SAVE_STEPS}
    assert meta["global_batch_size"] == 4 and meta["seq_len"] == 32
    assert meta["model"]["vocab_size"] == 512 and meta["train_config"]["learning_rate"] == 3e-3
    assert meta["progress"]["num_targets"] > 0 and meta["progress"]["skipped_steps"] == []
    stored = json.loads((step_dir / "state" / "_METADATA").read_text())["tree_metadata"]
    assert {key.split("'")[1] for key in stored} == {"step", "params", "opt_state", "rng"}
    files = [p for p in (expected / "checkpoints").rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in (".pkl", ".pickle", ".pt", ".bin"), path
        head = path.read_bytes()[:32]
        assert not head.startswith(PICKLE_PROTOCOL_OPCODE), path
        assert head.startswith(CHECKPOINT_FILE_MAGIC), (path, head)
        if head.startswith(b"{"):
            json.loads(path.read_text())


# ------------------------------------------------------------------------- non-finite steps


class PoisonedObjective:
    """The run's objective with its loss multiplied by (1 + the batch's "poison" sum), so a
    batch poisoned with NaN gives a NaN loss and NaN gradients."""

    def __init__(self, objective):
        self.objective, self.name = objective, objective.name

    def terms(self, model, batch, dropout_rng=None):
        terms = self.objective.terms(model, batch, dropout_rng)
        return {**terms, "loss_sum": terms["loss_sum"] * (1.0 + batch["poison"].sum())}


@pytest.fixture
def poisoned_steps(monkeypatch) -> set[int]:
    """The steps (1-based) whose training batch makes the loss NaN; the test fills the set."""
    from flax_lm.train import build
    from flax_lm.train.data import feed

    steps: set[int] = set()
    batches, make_train_step = feed.TrainStream.__iter__, build.make_train_step

    def poisoned_batches(stream):
        for step, batch in enumerate(batches(stream), start=stream.start_step + 1):
            poison = np.full(batch["input_ids"].shape[:2], np.nan if step in steps else 0.0)
            yield {**batch, "poison": poison.astype(np.float32)}

    def poisoned_train_step(graphdef, objective, *args):
        return make_train_step(graphdef, PoisonedObjective(objective), *args)

    monkeypatch.setattr(feed.TrainStream, "__iter__", poisoned_batches)
    monkeypatch.setattr(build, "make_train_step", poisoned_train_step)
    return steps


def checkpoint_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's state by its path, as stored."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(step_dir.absolute() / "state")
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_exported_model_is_checkpoint(out: Path, step: int) -> None:
    """output_dir's model.safetensors holds the parameters of checkpoint `step` (GPT-2's wte)."""
    exported = load_file(str(out / "model.safetensors"))["transformer.wte.weight"]
    saved = checkpoint_arrays(out / "checkpoints" / str(step))
    (wte,) = [array for path, array in saved.items() if "params" in path and "wte" in path]
    np.testing.assert_array_equal(exported, wte)
    assert np.isfinite(exported).all()


def reference_flags_and(clm_reference, out: Path, *flags: str) -> list[str]:
    """The CLM reference run's flags (so its compiled steps are reused), evaluating only at the
    end, with `flags` added."""
    argv, _ = clm_reference
    return [*with_output_dir(argv, out), "--eval_steps", str(STEPS), *flags]


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    clm_reference, poisoned_steps, tmp_path
):
    poisoned_steps.add(3)
    out = tmp_path / "diverged"
    argv = reference_flags_and(clm_reference, out, "--save_steps", "2")
    _, stderr = run_in_process(argv, "clm", status=1)
    last = stderr.strip().splitlines()[-1]  # after the run's own lines: what stopped it, and how
    assert last.startswith("error: "), stderr[-3000:]  # to go on (the last good checkpoint)
    for name in ("non-finite", "step 3", str(out / "checkpoints" / "2"), "--learning_rate",
                 "--skip_nonfinite_steps"):  # fmt: skip
        assert name in last, (name, last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    arrays = checkpoint_arrays(out / "checkpoints" / "2")
    assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
    assert [r["step"] for r in metrics_records(out)] == [1, 2]
    assert_exported_model_is_checkpoint(out, 2)  # the last good model, never a NaN one


def test_a_learning_rate_of_1e30_stops_the_run_before_saving_nan(clm_reference, tmp_path):
    """A real divergence: step 1 moves the weights by about 1e30, step 2's loss is NaN."""
    out = tmp_path / "diverged"
    argv = reference_flags_and(clm_reference, out, "--save_steps", "1",
                               "--learning_rate", "1e30", "--warmup_steps", "0")  # fmt: skip
    _, stderr = run_in_process(argv, "clm", status=1)
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-3000:]
    for name in ("non-finite", "step 2", str(out / "checkpoints" / "1")):
        assert name in last, (name, last)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]


def test_skipped_nonfinite_steps_apply_no_update(clm_reference, poisoned_steps, tmp_path):
    """--skip_nonfinite_steps 1: the poisoned step 3 changes neither the parameters nor the
    optimizer state, is left out of train_loss, and the run finishes."""
    poisoned_steps.add(3)
    out = tmp_path / "skipped"
    argv = reference_flags_and(clm_reference, out, "--save_steps", "1",
                               "--skip_nonfinite_steps", "1")  # fmt: skip
    _, stderr = run_in_process(argv, "clm")
    assert (
        "warning: non-finite loss (nan) or gradient norm (nan) at step 3: its update was skipped "
        "(1 of --skip_nonfinite_steps 1)"
    ) in stderr
    before, after = (checkpoint_arrays(out / "checkpoints" / str(s)) for s in (2, 3))
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    skip_counters = {f"['opt_state']['{name}']" for name in SKIP_COUNTERS}
    assert changed == {"['step']"} | skip_counters  # params and AdamW moments as they were
    assert int(after["['step']"]) == 3
    records = metrics_records(out)
    assert [r["loss"] is None for r in records if "loss" in r] == [s == 3 for s in range(1, 11)]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    train_loss = json.loads((out / "train_results.json").read_text())["train_loss"]
    assert train_loss == pytest.approx(np.mean(losses), rel=1e-9)  # equal targets per step
    meta = json.loads((out / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert meta["progress"]["skipped_steps"] == [3]


# -------------------------------------------------------------------------- storage faults


def damage(step_dir: Path, how: str) -> None:
    """Damage a complete checkpoint as storage can after its save: `truncate` its largest array
    file, `delete` it, or cut short the JSON of `meta` (the run's position) or of `state`."""
    arrays = sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
                    key=lambda path: path.stat().st_size)  # fmt: skip
    if how == "truncate":
        arrays[-1].write_bytes(arrays[-1].read_bytes()[: arrays[-1].stat().st_size // 2])
    elif how == "delete":
        arrays[-1].unlink()
    else:
        path = step_dir / how / ("metadata" if how == "meta" else "_METADATA")
        path.write_text(path.read_text()[:-40])


def copy_checkpoints(expected: Path, target: Path, steps=(3, 6, 9, 10)) -> None:
    for step in steps:
        shutil.copytree(expected / "checkpoints" / str(step), target / str(step))


def assert_continues(expected: Path, out: Path, step: int) -> None:
    """`out` holds what the uninterrupted run `expected` did after checkpoint `step`, bit for bit:
    its metrics records, its final model, its eval results and train loss."""
    assert metrics_records(out) == [r for r in metrics_records(expected) if r["step"] > step]
    want, got = (load_file(str(d / "model.safetensors")) for d in (expected, out))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("eval_results.json", "train_results.json"):
        want, got = (json.loads((d / name).read_text()) for d in (expected, out))
        assert got.get("eval_loss") == want.get("eval_loss")
        assert got.get("train_loss") == want.get("train_loss")


def set_aside(checkpoints: Path) -> dict[str, Path]:
    """The damaged checkpoints set aside in `checkpoints`, by the step they were."""
    found = [p for p in checkpoints.iterdir() if ".damaged-" in p.name]
    return {p.name.split(".")[0]: p for p in found}


def test_a_rerun_skips_damaged_checkpoints_keeps_them_and_continues_exactly(
    clm_reference, tmp_path, monkeypatch
):
    """The newest checkpoint's array file is cut short, the one before has broken JSON: the
    rerun warns about each, continues from 6 exactly, and keeps both, renamed, where no later
    run takes them for checkpoints. Its saves never overlap."""
    import orbax.checkpoint as ocp

    from flax_lm.train import checkpoint

    objective, (argv, expected) = "clm", clm_reference
    out = tmp_path / "damaged"
    target = out / "checkpoints"
    copy_checkpoints(expected, target)
    damage(target / "10", "truncate")
    damage(target / "9", "meta")
    damaged_files = {step: snapshot_files(target / step) for step in ("9", "10")}
    overlapping = []
    save = ocp.CheckpointManager.save

    def save_unless_saving(manager, step, *args, **kwargs):
        overlapping.extend([step] if manager.is_saving_in_progress() else [])
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_unless_saving)

    stdout, stderr = run_in_process(with_output_dir(argv, out), objective)  # the command, rerun
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 2 and str(target / "10") in warnings[0], stderr[-3000:]
    assert str(target / "9") in warnings[1]
    assert stdout.splitlines()[0].startswith(f"resumed from checkpoint {target / '6'} at step 6")
    assert_continues(expected, out, 6)
    assert overlapping == []
    aside = set_aside(target)
    assert sorted(aside) == ["10", "9"]
    for step, files in damaged_files.items():  # kept as they were
        assert snapshot_files(aside[step]) == files
        assert aside[step].name in next(w for w in warnings if f"/{step} " in w)
    assert checkpoint.saved_steps(target) == [3, 6, 9, 10]  # what the next rerun chooses from


def snapshot_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


def test_a_gs_rerun_skips_damaged_and_uncommitted_checkpoints(mlm_reference, fake_gcs):
    """In a bucket: 10 lacks its commit marker (orbax's temporary there: skipped as an
    interrupted save), 9 lost an array file: the rerun continues from 6 exactly."""
    objective, (argv, expected) = "mlm", mlm_reference
    argv = with_output_dir(argv, "gs://bucket/run")
    run = fake_gcs / "bucket" / "run"
    target = run / "checkpoints"
    copy_checkpoints(expected, target)
    (target / "10" / "commit_success.txt").unlink()
    damage(target / "9", "delete")

    stdout, stderr = run_in_process(argv, objective)
    (warning,) = [line for line in stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert "gs://bucket/run/checkpoints/9 " in warning, stderr[-3000:]
    first = stdout.splitlines()[0]
    assert first.startswith("resumed from checkpoint gs://bucket/run/checkpoints/6 at step 6")
    assert "skipped incomplete checkpoints ['10']" in first
    assert_continues(expected, run, 6)
    assert sorted(set_aside(target)) == ["9"]
    assert sorted(p.name for p in target.iterdir() if p.name.isdigit()) == ["10", "3", "6", "9"]


def test_gs_checkpoints_are_complete_by_their_commit_marker(clm_reference, fake_gcs):
    """orbax's rule in a bucket: a step without commit_success.txt is a save that never finished;
    a run's folder or its checkpoints folder (no marker of their own) are no such thing."""
    from flax_lm.errors import UserError
    from flax_lm.train.checkpoint import find_checkpoint, interrupted_saves

    _, expected = clm_reference
    copy_checkpoints(expected, fake_gcs / "bucket" / "run" / "checkpoints", steps=(6, 10))
    (fake_gcs / "bucket" / "run" / "checkpoints" / "10" / "commit_success.txt").unlink()
    for spec in ("gs://bucket/run", "gs://bucket/run/checkpoints", "gs://bucket/run/checkpoints/6"):
        directory, steps, _ = find_checkpoint(spec, Path("elsewhere"))
        assert (str(directory), steps) == ("gs://bucket/run/checkpoints", [6]), spec
    assert [p.name for p in interrupted_saves(directory)] == ["10"]
    with pytest.raises(UserError, match="incomplete"):
        find_checkpoint("gs://bucket/run/checkpoints/10", Path("elsewhere"))


def test_resuming_from_a_named_damaged_checkpoint_is_an_error(clm_reference, tmp_path, capsys):
    """--resume_from_checkpoint naming one step: no fallback, one line, nothing changed."""
    from conftest import training_fails_cleanly

    argv, expected = clm_reference
    out = tmp_path / "named"
    copy_checkpoints(expected, out / "checkpoints", steps=(6, 10))
    damage(out / "checkpoints" / "10", "state")
    named = out / "checkpoints" / "10"
    argv = [*with_output_dir(argv, out), "--resume_from_checkpoint", str(named)]
    training_fails_cleanly(argv, "clm", capsys, out, str(named), "cannot be restored")


def test_when_no_checkpoint_restores_one_line_names_each(clm_reference, tmp_path, capsys):
    from conftest import training_fails_cleanly

    argv, expected = clm_reference
    out = tmp_path / "none"
    copy_checkpoints(expected, out / "checkpoints", steps=(3, 6))
    for step in ("3", "6"):
        damage(out / "checkpoints" / step, "meta")
    line = training_fails_cleanly(with_output_dir(argv, out), "clm", capsys, out,
                                  str(out / "checkpoints"), "tried 6: ", "; 3: ")  # fmt: skip
    assert "--overwrite_output_dir" in line


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])  # full; permission lost
def test_a_failed_metrics_write_ends_in_one_line(error, clm_reference, tmp_path, monkeypatch):
    """metrics.jsonl cannot be appended to after step 8: one line naming it, the error and
    checkpoint 6 to continue from; exit 2."""
    from flax_lm.train import metrics

    argv, _ = clm_reference
    out = tmp_path / "full"
    write = metrics.RunLog.write

    def write_until_refused(log, group, record):
        if record["step"] > 8:
            raise OSError(error, os.strerror(error), str(out / "metrics.jsonl"))
        write(log, group, record)

    monkeypatch.setattr(metrics.RunLog, "write", write_until_refused)
    _, stderr = run_in_process(with_output_dir(argv, out), "clm", status=2)
    line = assert_one_line_error((2, stderr.splitlines()[-1]), "metrics.jsonl",
                                 os.strerror(error), "step 6")  # fmt: skip
    assert str(out / "checkpoints" / "6") in line and "rerun the same command" in line


FAULT_DRIVER = """
import sys
import orbax.checkpoint as ocp
from flax_lm.commands.train import main

if sys.argv[1] == "inject":  # no small filesystem to fill: the storage refuses step 9's save
    save = ocp.CheckpointManager.save

    def refused(manager, step, *args, **kwargs):
        if step >= 9:
            raise ValueError("RESOURCE_EXHAUSTED: Error writing: No space left on device")
        return save(manager, step, *args, **kwargs)

    ocp.CheckpointManager.save = refused
sys.exit(main(sys.argv[2:], objective="clm"))
"""


@pytest.fixture
def small_disk(tmp_path) -> Iterator[tuple[Path, bool]]:
    """(a folder, whether it is a filesystem of its own) with room for the reference run's first
    two checkpoints and its model, not a third."""
    with small_filesystem(tmp_path / "disk", "1800k") as mounted:
        yield tmp_path / "disk", mounted


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_the_rerun_continues(clm_reference, small_disk):
    """The disk fills during the save of checkpoint 9: exit 2 and one last line naming the
    path, the error and checkpoint 6 (no traceback, nothing after it); its half-written save is
    orbax's temporary. Once there is space, the same command continues and ends as the
    uninterrupted run, bit for bit."""
    argv, expected = clm_reference
    disk, mounted = small_disk
    out = disk / "run"
    argv = with_output_dir(argv, out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_EVERY_COMPILE}
    command = [sys.executable, "-c", FAULT_DRIVER, "fill" if mounted else "inject", *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last, done.stderr[-3000:]
    assert str(out) in last and "step 6" in last and "rerun the same command" in last
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    from flax_lm.train import checkpoint

    assert checkpoint.saved_steps(out / "checkpoints") == [3, 6]
    if mounted:  # free space
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    stdout, _ = run_in_process(argv, "clm")  # the same command, rerun
    assert stdout.splitlines()[0].startswith(f"resumed from checkpoint {out / 'checkpoints' / '6'}")
    assert_same_run(expected, out)


def flax_lm_output(*argv: str) -> str:
    """stdout of `flax-lm ARGV` run in this process, which must succeed."""
    from flax_lm.commands.cli import main as flax_lm

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = flax_lm(list(argv))
    assert status == 0, err.getvalue()[-3000:]
    return out.getvalue()


def test_the_commands_read_a_gs_run_folder_or_checkpoint(clm_reference, mlm_reference,
                                                         code_corpus, fake_gcs):
    """evaluate, generate, fill-mask, export and plot take a gs:// run (or checkpoint) and
    answer as they do for the same run in a local folder."""
    (_, clm_run), (_, mlm_run) = clm_reference, mlm_reference
    for name, run in (("clm", clm_run), ("mlm", mlm_run)):
        shutil.copytree(run, fake_gcs / "bucket" / name)
    clm, mlm = "gs://bucket/clm", "gs://bucket/mlm"
    validation = ["--validation_file", str(code_corpus.validation), "--block_size", "32"]
    remote = json.loads(flax_lm_output("evaluate", "--model", f"{clm}/checkpoints/6", *validation))
    local = json.loads(flax_lm_output("evaluate", "--model", str(clm_run / "checkpoints" / "6"),
                                      *validation))  # fmt: skip
    assert remote["model"] == f"{clm}/checkpoints/6"
    assert remote["eval_loss"] == local["eval_loss"] and remote["eval_samples"] > 0

    prompt = ["--prompt", "def ", "--max_new_tokens", "5", "--temperature", "0"]
    assert flax_lm_output("generate", "--model", clm, *prompt) == flax_lm_output(
        "generate", "--model", str(clm_run), *prompt)
    text = ["x = <mask>", "--json"]
    assert json.loads(flax_lm_output("fill-mask", *text, "--model", mlm)) == json.loads(
        flax_lm_output("fill-mask", *text, "--model", str(mlm_run)))

    flax_lm_output("export", clm, "--output_dir", "gs://bucket/exported")
    exported = load_file(str(fake_gcs / "bucket" / "exported" / "model.safetensors"))
    for name, array in load_file(str(clm_run / "model.safetensors")).items():
        np.testing.assert_array_equal(exported[name], array)  # the newest checkpoint is the end

    flax_lm_output("plot", clm)
    assert (fake_gcs / "bucket" / "clm" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in Path.cwd().iterdir()] == ["gcs"]  # nothing local named after a URL

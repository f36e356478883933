"""The training loop shared by run_clm_flax.py and run_mlm_flax.py.

prepare() checks everything first and the checkpoint to resume from is read before anything is
written; then the loop feeds prefetched, device-placed batches to a train step compiled once,
keeps metrics on device until a logging or saving step, evaluates every eval_steps, checkpoints
every save_steps, and at the end exports a model PyTorch transformers loads.

A resumed run continues exactly: the checkpoint holds the state (params, optimizer, step, RNG),
the data position and the sums behind train_loss; batches, MLM masks, dropout and the learning
rate all derive from (seed, step). SIGTERM or SIGINT saves a checkpoint at the next step
boundary and stops (`Interrupted`). A step whose loss or gradient is not finite is never applied
and never saved; the run stops (`NonFiniteLoss`) unless --skip_nonfinite_steps allows skipping it.

This module is the run's order of events only. What it calls lives where it can be read on its
own: joining several processes and the stop signals in distributed.py, the model-ready batches in
data/feed.py, the evaluation loop in evaluation.py, the throughput and metrics counting in
progress.py.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from flax_lm.errors import UserError, is_write_fault, one_line, os_reason
from flax_lm.models.hf_io import save_model
from flax_lm.perf import achieved_flops_per_second, model_flops_per_token, published_bf16_peak
from flax_lm.storage import save_pretrained
from flax_lm.train import checkpoint
from flax_lm.train.args import AUTO, TrainConfig, recorded_config
from flax_lm.train.build import StepParts, build_params, settle_attention, step_parts
from flax_lm.train.data.batches import eval_batch_count, run_position
from flax_lm.train.data.feed import (
    PREFETCH_BATCHES,
    TRAIN_BATCH_AXIS,
    TrainStream,
    eval_host_batches,
    stream_epoch,
)
from flax_lm.train.data.prefetch import Prefetcher
from flax_lm.train.data.shards import every_process
from flax_lm.train.distributed import Interrupted, StopSignals, setup_jax
from flax_lm.train.evaluation import Evaluation, eval_metrics
from flax_lm.train.hub import CHECKPOINTS_UPLOADED, HubPusher, prepare_hub_repo
from flax_lm.train.metrics import (
    METRICS_FILE,
    RunLog,
    keep_records_up_to,
    run_header,
    start_wandb,
    write_json,
)
from flax_lm.train.optim import warn_about_warmup
from flax_lm.train.prepare import Prepared, prepare
from flax_lm.train.profile import StepHook, StepProfiler, closing_all
from flax_lm.train.progress import (
    Progress,
    RecentMetrics,
    Throughput,
    train_record,
)
from flax_lm.train.run_dir import next_to_try, run_dirs, skip_damaged
from flax_lm.train.runlock import LOCK_FILE, RunLock
from flax_lm.train.step import (
    TrainState,
    compile_train_step,
    init_state,
    make_mesh,
    make_put,
)


def run(cfg: TrainConfig, objective_name: str) -> dict[str, Any]:
    """Train and/or evaluate as `cfg` says; returns all_results."""
    setup_jax(cfg)
    mesh = make_mesh(spec=cfg.mesh)
    prepared = prepare(cfg, objective_name, num_devices=mesh.size)
    if prepared.cfg.do_train:
        remat = resolve_remat(prepared.cfg, objective_name, mesh)
        prepared = dataclasses.replace(prepared, cfg=remat)
    return Trainer(prepared, mesh, objective_name).run()


def resolve_remat(cfg: TrainConfig, objective_name: str, mesh: jax.sharding.Mesh) -> TrainConfig:
    """--remat auto for the mesh's devices (flax_lm.plan.choose_remat), said in one line."""
    if cfg.remat != AUTO:
        return cfg
    from flax_lm.plan import Target, choose_remat

    device = jax.local_devices()[0]
    stats = (device.memory_stats() or {}) if device.platform != "cpu" else {}
    target = Target("local", list(mesh.devices.flat), stats.get("bytes_limit"), "device memory")
    cfg, chosen = choose_remat(cfg, objective_name, target)
    if chosen and jax.process_index() == 0:
        print(chosen, flush=True)
    return cfg


def cannot_write(output_dir: epath.Path, err: Exception) -> UserError:
    return UserError(f"--output_dir {output_dir} cannot be written: {one_line(err)}")


@dataclass
class Training:
    """Where the training loop starts: the state (restored when resuming) and how it steps."""

    state: TrainState
    parts: StepParts  # the optimizer, schedule and train step
    progress: Progress


class Trainer:
    """One run of `prepare`d flags on a mesh: train, evaluate, checkpoint and export as they say."""

    def __init__(self, prepared: Prepared, mesh: jax.sharding.Mesh, objective_name: str):
        self.prepared, self.cfg, self.mesh = prepared, prepared.cfg, mesh
        self.objective_name = objective_name
        self.is_main = jax.process_index() == 0
        self.compile_seconds: dict[str, float] = {}
        self.evaluation: Evaluation | None = None  # its eval step compiled at the first one
        self.eval_samples = 0  # this process's
        self.eval_batches: int | None = None  # eval batches of the run, with several data shards
        self.last_checkpoint: epath.Path | None = None  # the newest saved (or resumed from)
        self.hub: HubPusher | None = None  # with --push_to_hub, on process 0
        self.locks: list[RunLock] = []  # of output_dir (and checkpoint_dir), on process 0

    def run(self) -> dict[str, Any]:
        self.prepared, self.attention = settle_attention(self.prepared, self.mesh)
        self.cfg = self.prepared.cfg
        self.graphdef, params = build_params(self.prepared, self.mesh)
        training = self.start_training(params) if self.cfg.do_train else None
        if self.is_main:  # after a resumed run's first line, which names its checkpoint
            print(f"attention: {self.attention.implementation} ({self.attention.reason})")
        if self.cfg.do_train:
            warn_about_warmup(self.cfg, self.prepared.total_steps)
        if self.cfg.push_to_hub and self.is_main:  # fails now, not after training
            token = self.cfg.hub_token or self.cfg.token
            repo_id = prepare_hub_repo(
                self.cfg.hub_model_id, self.cfg.output_dir, token, self.cfg.hub_private_repo
            )
            self.hub = HubPusher(repo_id, self.prepared.output_dir, token, self.cfg.hub_strategy)
        try:
            self.start_output_dir()  # the first write: everything above only reads
            return self.run_holding_the_lock(params, training)
        except (checkpoint.WriteFailed, OSError) as err:
            raise self.cannot_continue(err) from None
        finally:
            for lock in self.locks:
                lock.release()

    def run_holding_the_lock(self, params, training: Training | None) -> dict[str, Any]:
        wandb_run = None
        if self.is_main and "wandb" in self.cfg.report_to:
            wandb_run = start_wandb(
                self.prepared.output_dir, self.cfg.run_name, recorded_config(self.cfg)
            )
        log = RunLog(
            self.prepared.output_dir,
            total_steps=self.prepared.total_steps,
            initial_step=self.prepared.resume.step if self.prepared.resume else 0,
            tensorboard="tensorboard" in self.cfg.report_to,
            tensorboard_dir=self.cfg.logging_dir,
            wandb_run=wandb_run,
            enabled=self.is_main,
        )
        results: dict[str, Any] = {}
        try:
            log.header({"attention": self.attention.implementation,
                        "attention_reason": self.attention.reason})
            step = 0
            if training is not None:
                state, train_results, last_eval = self.train(training, log)
                params, step = state.params, int(state.step)
                results.update(train_results)
                self.write_results("train_results.json", train_results)
                self.save_outputs(params)
            if self.cfg.do_eval:
                eval_results = last_eval if self.cfg.do_train else self.evaluate(params, step, log)
                eval_results = {**eval_results, "eval_samples": self.eval_samples}
                results.update(eval_results)
                self.write_results("eval_results.json", eval_results)
        finally:
            log.close()
        self.write_results("all_results.json", results)
        self.print_summary(results)
        if self.hub is not None:
            print(f"pushed to the Hub: {self.hub.push(step, self.last_checkpoint)}")
        return results

    def cannot_continue(self, err: checkpoint.WriteFailed | OSError) -> Exception:
        """A storage fault while the run writes (no space, no permission, a refusing bucket) as
        one line: what failed to be written, and how to go on from the newest complete
        checkpoint; any other OSError as it is."""
        if isinstance(err, OSError) and not is_write_fault(err):
            return err
        directory = self.prepared.checkpoint_dir
        if isinstance(err, OSError):
            path, reason = err.filename or self.prepared.output_dir, os_reason(err)
        else:  # a save refused at once, or else the one in flight when orbax raised its error
            path, reason = err.path or self.last_checkpoint or directory, err.reason
        step = checkpoint.newest_step(directory)
        if step is None:
            then = "no checkpoint is complete yet: free space and rerun the same command"
        else:
            then = (
                f"the newest complete checkpoint is {directory / str(step)}: free space and "
                f"rerun the same command to continue from step {step}"
            )
        return UserError(f"cannot write {path}: {reason}; {then}")

    # ------------------------------------------------------------------------------ setup

    def start_output_dir(self) -> None:
        """Create output_dir and take its lock (every process fails if another run holds it);
        then a fresh training run replaces an earlier run's checkpoints and metrics, a resumed
        one drops the metrics logged after its checkpoint."""
        out, refused = self.prepared.output_dir, None
        if self.is_main:
            try:
                for directory in run_dirs(self.cfg):
                    directory.mkdir(parents=True, exist_ok=True)
                    lock = RunLock(directory)
                    lock.acquire()
                    self.locks.append(lock)
            except (UserError, OSError) as err:
                refused = err if isinstance(err, UserError) else cannot_write(out, err)
        if jax.process_count() > 1:
            held = multihost_utils.broadcast_one_to_all(np.int32(refused is None))
            refused = refused or (None if held else UserError(f"--output_dir {out} is in use"))
        if refused is not None:
            raise refused
        if not self.is_main:
            return
        if self.prepared.resume is not None:
            for step_dir, aside in self.prepared.resume.aside.items():
                step_dir.rename(aside)  # damaged: kept, where no later run tries it again
            keep_records_up_to(out / METRICS_FILE, self.prepared.resume.step)
        elif self.cfg.do_train:
            checkpoints = self.prepared.checkpoint_dir
            for entry in checkpoints.iterdir() if checkpoints.is_dir() else ():
                if entry.name != LOCK_FILE:  # (a --checkpoint_dir's lock stays)
                    entry.rmtree() if entry.is_dir() else entry.unlink()
            (out / METRICS_FILE).unlink(missing_ok=True)

    def start_training(self, params) -> Training:
        """The optimizer and the state to start from: fresh, or read from the checkpoint to
        resume (a damaged or mismatched one is a UserError, raised before anything is written).

        The optimizer applies an update only when the whole gradient is finite, so a
        non-finite step leaves params and optimizer state as they were."""
        cfg, prepared = self.cfg, self.prepared
        parts = step_parts(prepared, self.graphdef, params)
        state = init_state(params, parts.optimizer, cfg.seed, self.mesh)
        progress = Progress()
        if prepared.resume is None:  # a resumed run's data held a batch: read none of it again
            prepared.train_batches.require_one_batch()
        else:
            state, meta = self.restore_resumed(like=state)
            prepared.train_batches.load_state(meta["data"])
            progress = Progress(**meta.get("progress", {}))
        return Training(state, parts, progress)

    def restore_resumed(self, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """The state and JSON part of the checkpoint to resume, laid out like `like`. One whose
        arrays cannot be read is skipped for the newest before it that restores (unless a flag
        named it: see run_dir.next_to_try), which must be of the same run setup."""
        while True:
            resume = self.prepared.resume
            source = checkpoint.open_manager(resume.directory, create=False)
            try:
                state, meta = checkpoint.restore(source, resume.step, like=like)
                break
            except checkpoint.Unreadable as err:
                skip_damaged(resume, err)
                own_steps = checkpoint.saved_steps(self.prepared.checkpoint_dir)
                resume = next_to_try(resume, own_steps)
                self.prepared.check_resume_matches(resume)
                self.prepared = dataclasses.replace(self.prepared, resume=resume)
            finally:
                source.close()
        if self.is_main:
            print(self.prepared.resume.describe(), flush=True)  # the run's first line
        return state, meta

    # ------------------------------------------------------------------------------ train

    def train(
        self, training: Training, log: RunLog
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Train to total_steps; returns the final state, train results and the last eval."""
        cfg, prepared = self.cfg, self.prepared
        started = time.perf_counter()
        with checkpoint.save_errors_left_to_the_caller():
            manager = checkpoint.open_manager(
                prepared.checkpoint_dir,
                max_to_keep=cfg.save_total_limit,
                remove_interrupted_saves=True,
            )
            try:
                if prepared.resume is not None:
                    self.continue_from_checkpoint(manager)
                state, tokens_per_second, last_eval = self.loop(training, manager, log)
                checkpoint.finish(manager)
            finally:
                manager.close()
        results = {
            "train_loss": training.progress.loss if training.progress.num_targets else None,
            "train_runtime": round(time.perf_counter() - started, 3),
            "train_samples": self.train_samples(int(state.step)),
            "train_steps": int(state.step),
            "train_tokens_per_second": tokens_per_second,
            "compile_seconds": round(sum(self.compile_seconds.values()), 3),
        }
        return state, results, last_eval

    def train_samples(self, steps: int) -> int:
        """Examples in the training set (a stream: examples read in all)."""
        return self.prepared.train_batches.num_examples or steps * self.prepared.global_batch_size

    def continue_from_checkpoint(self, manager) -> None:
        """The resumed run replaces what came after its checkpoint (prepare said so)."""
        resume = self.prepared.resume
        self.last_checkpoint = resume.directory / str(resume.step)
        for step in resume.later:  # (never a damaged one: they are set aside, not deleted)
            manager.delete(step)

    def loop(self, training: Training, manager, log: RunLog):
        """Steps from the state's step to total_steps; returns (state, steady tokens/s, last
        eval). Metrics are fetched from the device only at logging and saving steps."""
        state, progress = training.state, training.progress
        start, total = int(state.step), self.prepared.total_steps
        if start >= total:
            log.message(f"the checkpoint is at step {start}: training already reached {total}")
            last_eval = self.evaluate(state.params, start, log) if self.cfg.do_eval else {}
            return state, None, last_eval
        log.message(self.header())
        last_eval: dict[str, Any] = {}
        tokens_per_step = self.prepared.global_batch_size * self.prepared.seq_len
        recent = RecentMetrics(
            progress, self.cfg.skip_nonfinite_steps, last_checkpoint=lambda: self.last_checkpoint
        )
        signals = StopSignals(several_processes=jax.process_count() > 1)
        hooks = self.step_hooks(log)
        with signals, self.train_batches(start) as batches, closing_all(hooks):
            batch = next(batches)
            train_step = self.compiled_train_step(training, state, batch, log)
            throughput = Throughput()
            for step in range(start + 1, total + 1):
                for hook in hooks:
                    hook.before_step(step, state)
                state, metrics = train_step(state, batch)
                for hook in hooks:
                    hook.after_step(step, state)
                recent.add(step, metrics)
                throughput.add(tokens_per_step)
                log.advance()
                if step == start + 1:  # the first step's time is not steady state
                    jax.block_until_ready(state)
                    throughput.lap(steady=False)
                if self.is_logging_step(step):
                    log.train(self.train_record(step, recent, throughput, batches))
                if self.is_eval_step(step):
                    with throughput.paused(state):
                        last_eval = self.evaluate(state.params, step, log)
                stopping = signals.should_stop(step)
                if stopping or self.is_save_step(step):
                    with throughput.paused(state):
                        recent.fetch()  # a non-finite step stops the run here: it is never saved
                        self.save(manager, state, step, batches, progress, log, stopping)
                if stopping:
                    checkpoint.finish(manager)
                    raise Interrupted(signals.received, step, self.last_checkpoint)
                if step < total:
                    batch = next(batches)
        return state, throughput.steady_rate, last_eval

    def step_hooks(self, log: RunLog) -> list[StepHook]:
        """What runs around every step: --profile_steps' profiler."""
        if self.cfg.profile_steps is None:
            return []
        return [StepProfiler(self.cfg.profile_steps, self.prepared.output_dir, say=log.message)]

    def header(self) -> str:
        """The run header: documents, examples, devices and mesh, global batch, steps."""
        cfg, prepared = self.cfg, self.prepared
        accumulation = cfg.gradient_accumulation_steps
        tokens = prepared.global_batch_size * prepared.seq_len
        return run_header(
            documents=prepared.documents,
            examples=prepared.train_batches.num_examples,
            seq_len=prepared.seq_len,
            devices=f"{self.mesh.size} x {self.mesh.devices.flat[0].device_kind}",
            mesh=dict(self.mesh.shape),
            global_batch=(
                f"{prepared.global_batch_size:,} sequences ({cfg.per_device_train_batch_size} "
                f"per device x {self.mesh.size} devices x {accumulation} accumulation), "
                f"{tokens:,} tokens a step"
            ),
            steps=prepared.total_steps,
            steps_per_epoch=prepared.train_batches.steps_per_epoch,
        )

    def train_record(
        self, step: int, recent: RecentMetrics, throughput: Throughput, batches: Prefetcher
    ) -> dict[str, Any]:
        """The train line of the steps since the last one, with MFU against the devices'
        published peak where it is known."""
        record = train_record(step, recent.take(), throughput, self.epoch(step, batches))
        peak = published_bf16_peak(self.mesh.devices.flat[0].device_kind)
        if peak:
            flops = model_flops_per_token(self.prepared.model_config, self.prepared.seq_len)
            achieved = achieved_flops_per_second(record["tokens_per_second"], flops)
            record["mfu"] = round(achieved / (peak * self.mesh.size), 4)
        return record

    def train_batches(self, start: int) -> Prefetcher:
        """The model-ready batches from step `start` on, made and placed on the devices ahead."""
        cfg, prepared = self.cfg, self.prepared
        stream = TrainStream(
            prepared.train_batches, prepared.objective, cfg.seed, start,
            cfg.gradient_accumulation_steps,
        )  # fmt: skip
        return Prefetcher(stream, PREFETCH_BATCHES, make_put(self.mesh, TRAIN_BATCH_AXIS))

    def compiled_train_step(self, training: Training, state: TrainState, batch, log: RunLog):
        try:
            train_step, seconds = compile_train_step(
                training.parts.train_step, state, batch, self.mesh
            )
        except Exception as err:  # noqa: BLE001 - XLA's error types differ between versions
            from flax_lm.plan import does_not_fit

            error = does_not_fit(self.cfg, self.objective_name, err)
            if error is None:
                raise
            raise error from None
        self.compile_seconds["train_step"] = seconds
        log.message(f"compiled the train step in {seconds:.2f} s")
        return train_step

    def is_logging_step(self, step: int) -> bool:
        cfg = self.cfg
        first = cfg.logging_first_step and step == 1
        return first or step % cfg.logging_steps == 0 or step == self.prepared.total_steps

    def is_eval_step(self, step: int) -> bool:
        """With --do_eval, whether --eval_strategy evaluates after `step` (also with `no` after
        the last step)."""
        cfg = self.cfg
        return cfg.do_eval and self.is_strategy_step(step, cfg.eval_strategy, cfg.eval_steps)

    def is_save_step(self, step: int) -> bool:
        """Whether --save_strategy checkpoints after `step` (never with `no`)."""
        cfg = self.cfg
        return cfg.save_strategy != "no" and self.is_strategy_step(
            step, cfg.save_strategy, cfg.save_steps
        )

    def is_strategy_step(self, step: int, strategy: str, every: int) -> bool:
        """After the last step, at the end of each epoch (`epoch`), or every `every` steps
        (`steps`), as --eval_strategy and --save_strategy say."""
        if step == self.prepared.total_steps:
            return True
        if strategy == "epoch":
            return step % self.prepared.train_batches.steps_per_epoch == 0
        return strategy == "steps" and step % every == 0

    def save(
        self, manager, state: TrainState, step: int, batches: Prefetcher, progress: Progress,
        log: RunLog, stopping: bool,
    ) -> None:
        """A checkpoint after `step`; before the last step also output_dir's model (the final one
        is written after training) and, unless stopping, its push to the Hub."""
        started = time.perf_counter()
        self.save_checkpoint(manager, state, step, batches, progress)
        log.checkpoint(step, time.perf_counter() - started, self.last_checkpoint)
        log.sync()
        if step < self.prepared.total_steps:
            self.save_outputs(state.params)
            if self.hub is not None and not stopping:
                self.push_checkpoint(manager, step)

    def push_checkpoint(self, manager, step: int) -> None:
        """--push_to_hub at a checkpoint; strategies that upload the checkpoint itself wait for
        its save to finish first."""
        if self.cfg.hub_strategy in CHECKPOINTS_UPLOADED:
            checkpoint.finish(manager)
        self.hub.push_in_background(step, self.last_checkpoint)

    def save_checkpoint(
        self, manager, state: TrainState, step: int, batches: Prefetcher, progress: Progress
    ) -> None:
        meta = {
            "step": step,
            "data": run_position(batches.state()),
            "progress": dataclasses.asdict(progress),  # a copy: later steps change progress
            **self.prepared.identity(),
            "train_config": recorded_config(self.cfg),
        }
        checkpoint.save(manager, state, meta)
        self.last_checkpoint = epath.Path(manager.directory) / str(step)

    def epoch(self, step: int, batches: Prefetcher) -> float:
        """The epoch reached after `step` (of a stream: its least advanced data shard's)."""
        steps_per_epoch = self.prepared.train_batches.steps_per_epoch
        return step / steps_per_epoch if steps_per_epoch else stream_epoch(batches.state())

    # ------------------------------------------------------------------------------- eval

    def eval_stream(self):
        cfg, prepared = self.cfg, self.prepared
        shards = prepared.splits["validation"]
        batch_size = cfg.per_device_eval_batch_size * self.mesh.size
        self.eval_samples = 0
        for batch in eval_host_batches(
            shards, prepared.objective, batch_size, cfg.seed, shard_ids=prepared.shard_ids,
            num_shards=cfg.data_shards, num_batches=self.eval_batches,
        ):
            self.eval_samples += int(batch["example_weight"].sum())
            yield batch

    def evaluate(self, params, step: int, log: RunLog) -> dict[str, Any]:
        """Loss, accuracy and perplexity over the whole validation split."""
        cfg = self.cfg
        if cfg.data_shards > 1 and self.eval_batches is None:  # as many from every shard
            rows = cfg.per_device_eval_batch_size * self.mesh.size // cfg.data_shards
            self.eval_batches = eval_batch_count(self.prepared.splits["validation"], rows)
        if self.evaluation is None:
            self.evaluation = Evaluation(self.graphdef, self.prepared.objective, self.mesh)
        sums = self.evaluation.sums(params, self.eval_stream())
        self.compile_seconds["eval_step"] = self.evaluation.compile_seconds
        self.eval_samples = sum(every_process(self.eval_samples))
        record = {"step": step, **eval_metrics(sums)}
        log.eval(record)
        return {k: v for k, v in record.items() if k != "step"}

    # ---------------------------------------------------------------------------- outputs

    def save_outputs(self, params) -> None:
        """config.json, model.safetensors (PyTorch layout) and the tokenizer in output_dir: at
        every checkpoint, as Hugging Face's scripts do, so output_dir always holds the newest
        saved model, and at the end. With several processes each parameter is first gathered
        (by all of them, one array at a time): process 0 may hold only some of its shards."""
        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params, tiled=True)
        if self.is_main:
            save_model(nnx.merge(self.graphdef, params), self.prepared.output_dir)
            save_pretrained(self.prepared.tokenizer, self.prepared.output_dir)

    def write_results(self, name: str, results: dict[str, Any]) -> None:
        if self.is_main:
            write_json(self.prepared.output_dir / name, results)

    def print_summary(self, results: dict[str, Any]) -> None:
        if not self.is_main:
            return
        lines = [f"output: {self.prepared.output_dir}"]
        if results.get("train_tokens_per_second") is not None:
            compiled = ", ".join(f"{k} {v:.2f} s" for k, v in self.compile_seconds.items())
            lines.append(
                f"train: {results['train_steps']} steps, loss {results['train_loss']:.4f}, "
                f"{results['train_tokens_per_second']:,.0f} tokens/s (steady state), "
                f"compile {compiled}, {results['train_runtime']:.1f} s in all"
            )
            flops = model_flops_per_token(self.prepared.model_config, self.prepared.seq_len)
            achieved = achieved_flops_per_second(results["train_tokens_per_second"], flops)
            lines.append(
                f"model FLOPs: {flops:.4g} per token, {achieved / 1e12:.4g} TFLOP/s achieved "
                "(MFU: divide by the peak that bench/peak.py measures)"
            )
        if "eval_loss" in results:
            lines.append(
                f"eval: loss {results['eval_loss']:.4f}, accuracy {results['eval_accuracy']:.4f}, "
                f"perplexity {results['perplexity']:.3f} on {results['eval_samples']} examples"
            )
        print("\n".join(lines))

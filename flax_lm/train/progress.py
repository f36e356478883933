"""What the training loop counts as it steps: tokens per second (leaving out evaluation and
checkpointing), the sums behind train_loss that a checkpoint carries, and the steps' metrics,
which stay on the device until a logging or saving step fetches them (and the train record made
of them).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from flax_lm.train.metrics import perplexity
from flax_lm.train.step import TrainState


class Throughput:
    """Training tokens per second, timed between points where the device is known to be idle:
    evaluation and checkpointing run `paused()`, and the first step (compilation finishing, caches
    warming) is a lap that is not steady state."""

    def __init__(self):
        self.total_tokens, self.total_seconds, self.last_rate = 0, 0.0, 0.0
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def lap(self, steady: bool = True) -> None:
        """The rate since the last lap; a steady one counts towards `steady_rate`."""
        seconds = time.perf_counter() - self.start
        if self.tokens:
            self.last_rate = self.tokens / seconds
            if steady:
                self.total_tokens += self.tokens
                self.total_seconds += seconds
        self.restart()

    @contextlib.contextmanager
    def paused(self, state: TrainState) -> Iterator[None]:
        """Time spent inside, once the step that made `state` has finished, is not training."""
        jax.block_until_ready(state)
        self.lap()
        yield
        self.restart()

    @property
    def steady_rate(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else self.last_rate


class NonFiniteLoss(Exception):
    """A step's loss or gradient was not finite, more often than --skip_nonfinite_steps allows."""


@dataclass
class Progress:
    """What a checkpoint carries besides the state, so a resumed run reports the same numbers:
    the sums behind train_loss and the steps skipped as non-finite."""

    loss_sum: float = 0.0
    num_targets: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.num_targets, 1.0)


def is_finite_step(metrics: dict[str, Any]) -> bool:
    return math.isfinite(float(metrics["loss_sum"])) and math.isfinite(float(metrics["grad_norm"]))


class RecentMetrics:
    """The metrics of the steps since the last train line. They stay on the device until a
    logging or saving step fetches them (which waits for the device); fetched, each finite step
    is added to `progress`, and each non-finite one (its update was not applied) is skipped, up
    to `skip_limit` steps in the run, or stops it."""

    def __init__(
        self, progress: Progress, skip_limit: int, last_checkpoint: Callable[[], Any]
    ):
        self.progress, self.skip_limit, self.last_checkpoint = progress, skip_limit, last_checkpoint
        self.pending: list[tuple[int, Any]] = []  # on the device
        self.fetched: list[tuple[int, dict]] = []  # on the host

    def add(self, step: int, metrics: Any) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> None:
        fetched = jax.device_get(self.pending)
        self.pending = []
        for step, metrics in fetched:
            if is_finite_step(metrics):
                self.progress.loss_sum += float(metrics["loss_sum"])
                self.progress.num_targets += float(metrics["num_targets"])
            else:
                self.skip_nonfinite(step, metrics)
        self.fetched += fetched

    def take(self) -> list[tuple[int, dict]]:
        """Every step's metrics since the last take, fetched."""
        self.fetch()
        taken, self.fetched = self.fetched, []
        return taken

    def skip_nonfinite(self, step: int, metrics: dict) -> None:
        """Count a step whose update was not applied; stop once more than allowed."""
        progress = self.progress
        progress.skipped_steps.append(step)
        limit = self.skip_limit
        what = (
            f"non-finite loss ({float(metrics['loss_sum'])}) or gradient norm "
            f"({float(metrics['grad_norm'])}) at step {step}"
        )
        if len(progress.skipped_steps) <= limit:
            print(
                f"warning: {what}: its update was skipped "
                f"({len(progress.skipped_steps)} of --skip_nonfinite_steps {limit})",
                file=sys.stderr,
            )
            return
        if limit:
            steps = ", ".join(map(str, progress.skipped_steps))
            what += f", more than --skip_nonfinite_steps {limit} (steps {steps})"
        last_checkpoint = self.last_checkpoint()
        saved = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was saved before it"
        )
        raise NonFiniteLoss(
            f"{what}: stopped; {saved} (resume from it with a lower --learning_rate or more "
            "warmup, or let --skip_nonfinite_steps skip such steps)"
        )


def train_record(
    step: int, fetched: list[tuple[int, dict]], throughput: Throughput, epoch: float
) -> dict[str, Any]:
    """The train line of the steps fetched since the last one (skipped steps left out); the
    throughput's lap ends here."""
    throughput.lap()
    good = [metrics for _, metrics in fetched if is_finite_step(metrics)]
    loss_sum = sum(float(m["loss_sum"]) for m in good)
    num_targets = max(sum(float(m["num_targets"]) for m in good), 1.0)
    loss = loss_sum / num_targets if good else math.nan
    return {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": loss,
        "accuracy": sum(float(m["num_correct"]) for m in good) / num_targets if good else math.nan,
        "perplexity": perplexity(loss) if good else math.nan,
        "learning_rate": float(fetched[-1][1]["learning_rate"]),
        "grad_norm": float(np.mean([m["grad_norm"] for m in good])) if good else math.nan,
        "tokens_per_second": round(throughput.last_rate, 1),
    }


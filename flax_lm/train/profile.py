"""--profile_steps START:END: a JAX profiler trace of those steps of the real run, for
TensorBoard's profile plugin or XProf (`tensorboard --logdir output_dir/profile`, or
`xprof --logdir output_dir/profile`), on every backend.

It is a step hook of the training loop (`StepHook`): called before and after every step, it
starts the trace before step START (once the previous step has finished, so the trace holds
those steps alone), marks each step for the profiler's step view (`StepTraceAnnotation`), and
stops after step END has finished on the device. Each process writes its own host's trace
(plugins/profile/RUN/HOST.xplane.pb and HOST.trace.json.gz); a gs:// output_dir gets
it copied there when the trace ends.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
from etils import epath

from flax_lm.storage import copy_into, is_cloud
from flax_lm.train.args import parse_step_range

PROFILE_SUBDIR = "profile"
TRACE_NAME = "train"  # the step annotation's name in the trace


class StepHook(Protocol):
    """Something the training loop calls around every step (after the state is made: `state`
    is the step's output, possibly still being computed)."""

    def before_step(self, step: int, state: Any) -> None: ...

    def after_step(self, step: int, state: Any) -> None: ...

    def close(self) -> None: ...


@contextlib.contextmanager
def closing_all(hooks: list[StepHook]) -> Iterator[list[StepHook]]:
    """The hooks, each closed when the loop ends, however it ends."""
    with contextlib.ExitStack() as stack:
        for hook in hooks:
            stack.callback(hook.close)
        yield hooks


class StepProfiler:
    """The StepHook that traces steps `start` to `end` into output_dir/profile/."""

    def __init__(self, steps: str, output_dir: epath.Path, say=print):
        self.start, self.end = parse_step_range(steps)
        self.target = output_dir / PROFILE_SUBDIR
        self.say = say
        self.staging = Path(tempfile.mkdtemp(prefix="flax-lm-profile-")) if is_cloud(
            output_dir) else None
        self.tracing = False
        self.annotation: contextlib.AbstractContextManager | None = None

    def before_step(self, step: int, state: Any) -> None:
        if step == self.start:
            jax.block_until_ready(state)  # the steps before it stay out of the trace
            directory = self.staging or Path(self.target)
            directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(directory))
            self.tracing = True
        if self.tracing:
            self.annotation = jax.profiler.StepTraceAnnotation(TRACE_NAME, step_num=step)
            self.annotation.__enter__()

    def after_step(self, step: int, state: Any) -> None:
        if not self.tracing:
            return
        if step == self.end:
            jax.block_until_ready(state)  # the trace holds the step's device work whole
        self.annotation.__exit__(None, None, None)
        self.annotation = None
        if step == self.end:
            self.stop()
            self.say(f"step {step}: profile of steps {self.start}-{self.end} written to "
                     f"{self.target}")

    def stop(self) -> None:
        if not self.tracing:
            return
        self.tracing = False
        if self.annotation is not None:
            self.annotation.__exit__(None, None, None)
            self.annotation = None
        jax.profiler.stop_trace()
        if self.staging is not None:
            copy_into(self.staging, self.target)

    def close(self) -> None:
        """Ends a trace the run stopped inside (training ended or was interrupted first)."""
        self.stop()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

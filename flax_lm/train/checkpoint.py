"""Training checkpoints with orbax: the TrainState (params, optimizer state, step, RNG key) as
arrays, and the run's position (data order, step, sums) and setup as JSON. Nothing is pickled.

Saving is asynchronous but donation-safe: orbax copies every array to host memory before `save`
returns (its default synchronous device-to-host transfer), so the next train step may donate
the state buffers while the files are still being written.

A save is atomic: orbax writes `STEP.orbax-checkpoint-tmp-*` and renames it to `STEP` once it
holds everything, with its commit marker. A crash during a save leaves such a temporary (or
unmarked) directory behind and never touches the checkpoints before it; resuming skips it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from flax_lm.errors import UserError, one_line
from flax_lm.storage import absolute, location
from flax_lm.train.args import LATEST_CHECKPOINT
from flax_lm.train.step import TrainState, abstract

CHECKPOINTS_SUBDIR = "checkpoints"
ITEMS = ("state", "meta")
COMMIT_MARKER = "commit_success.txt"  # orbax writes it last, into a finished step directory
RESTORE_ERRORS = (ValueError, OSError, KeyError)  # what orbax raises for damaged files
STEP_PREFIX = re.compile(r"^(\d+)(\D|$)")


def open_manager(
    directory: epath.Path,
    *,
    max_to_keep: int | None = None,
    create: bool = True,
    remove_interrupted_saves: bool = False,
) -> ocp.CheckpointManager:
    """A CheckpointManager; `remove_interrupted_saves` deletes temporary dirs left by a crash."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=remove_interrupted_saves
    )
    return ocp.CheckpointManager(absolute(directory), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Start saving `state` and `meta` (JSON) as checkpoint `meta["step"]`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(meta["step"], args=args)


def restore(
    manager: ocp.CheckpointManager, step: int, like: Any, *, params_only: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Checkpoint `step` and its JSON part, laid out (structure, dtypes, shardings) like `like`.

    `like` is a TrainState (arrays, or shapes with shardings), restored whole; with `params_only`
    it is the parameters alone and only they are read, not the optimizer state (what evaluating
    or exporting a model needs)."""
    if params_only:
        target = {"params": abstract(like)}
        state = ocp.args.PyTreeRestore(
            item=target,
            partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        )
    else:
        state = ocp.args.StandardRestore(abstract(like))
    args = ocp.args.Composite(state=state, meta=ocp.args.JsonRestore())
    with quiet_abandoned_reads():
        try:
            restored = manager.restore(step, args=args)
        except RESTORE_ERRORS as err:
            step_dir = epath.Path(manager.directory) / str(step)
            advice = ADVICE_PARAMS_ONLY if params_only else ADVICE_RESUME
            raise cannot_restore(step_dir, err, advice) from None
    return (restored.state["params"] if params_only else restored.state), restored.meta


ABANDONED_READS_QUIET_S = 0.5  # after a failed restore: this long without a late report
ABANDONED_READS_MAX_WAIT_S = 5.0


@contextlib.contextmanager
def quiet_abandoned_reads() -> Iterator[None]:
    """Keep the reads a failed restore abandons from printing tracebacks under its error line.

    When one array of a damaged checkpoint fails to read, orbax closes its event loop while the
    reads of the other arrays are still in flight: each then reports "Event loop is closed" as
    an unraisable exception, and asyncio logs the tasks left pending. Inside this context those
    exceptions are dropped and asyncio's log is silenced. On a failure it waits until the
    abandoned reads have been quiet for ABANDONED_READS_QUIET_S (at most
    ABANDONED_READS_MAX_WAIT_S); then, failed or not, the previous hook and log level are back.
    A read slower than that wait can still end later (on a loaded machine, at exit): after a
    failure asyncio's log keeps a filter that drops only records about orbax's own tasks."""
    previous_hook = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    previous_level = asyncio_log.level
    dropped: list[float] = []
    sys.unraisablehook = without_closed_loop_errors(previous_hook, dropped)
    asyncio_log.setLevel(logging.CRITICAL)
    try:
        yield
    except BaseException:
        wait_until_quiet(dropped)
        asyncio_log.addFilter(drop_orbax_task_reports)
        raise
    finally:
        sys.unraisablehook = previous_hook
        asyncio_log.setLevel(previous_level)


def without_closed_loop_errors(hook: Callable, dropped: list[float]) -> Callable:
    """`hook` for unraisable exceptions, minus "Event loop is closed" (the time of each one
    dropped is appended to `dropped`)."""

    def filtered(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            dropped.append(time.monotonic())
        else:
            hook(unraisable)

    return filtered


def drop_orbax_task_reports(record: logging.LogRecord) -> bool:
    """A filter for asyncio's log: False for its reports of orbax's tasks ("Task exception was
    never retrieved", "Task was destroyed but it is pending"), whose repr or traceback runs
    through orbax's code; every other record passes."""
    if "/orbax/" in record.getMessage():
        return False
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not any("/orbax/" in frame.filename for frame in frames)


def wait_until_quiet(dropped: list[float]) -> None:
    """Wait until no abandoned read has reported for ABANDONED_READS_QUIET_S, collecting the
    tasks they leave pending meanwhile (asyncio logs those when they are collected)."""
    start = time.monotonic()
    while time.monotonic() - start < ABANDONED_READS_MAX_WAIT_S:
        gc.collect()
        if time.monotonic() - max(dropped, default=start) >= ABANDONED_READS_QUIET_S:
            return
        time.sleep(0.05)


def read_meta(directory: epath.Path, step: int) -> dict[str, Any]:
    """The JSON part of a checkpoint, without loading its arrays."""
    manager = open_manager(directory, create=False)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except RESTORE_ERRORS as err:
        raise cannot_restore(directory / str(step), err) from None
    finally:
        manager.close()


ADVICE_RESUME = "resume from an earlier checkpoint of the run"
ADVICE_PARAMS_ONLY = "give the config of the run that saved it"  # evaluating, exporting


def cannot_restore(step_dir: epath.Path, err: Exception, advice: str = ADVICE_RESUME) -> UserError:
    reason = one_line(err, None).split(" [tensorstore_spec")[0][:300]
    return UserError(
        f"checkpoint {step_dir} cannot be restored (damaged, or saved by another model): "
        f"{reason}; {advice}"
    )


def find_checkpoint(spec: str, own_checkpoints: epath.Path) -> tuple[epath.Path, int]:
    """(checkpoints dir, step) named by --resume_from_checkpoint: `latest` (the newest complete one
    of the run's own checkpoints), a checkpoints dir (its newest complete one), or one step's dir
    inside it (local or gs://)."""
    if spec == LATEST_CHECKPOINT:
        path = own_checkpoints
    else:
        path = location(spec, "--resume_from_checkpoint")
    if not path.is_dir():
        raise UserError(f"no checkpoint to resume from: {path} is not a directory")
    if STEP_PREFIX.match(path.name) and (path / ITEMS[0]).is_dir():
        if not is_complete(path):
            raise UserError(
                f"checkpoint {path} is incomplete (its save was interrupted): resume from "
                f"an earlier one in {path.parent}"
            )
        return path.parent, int(path.name)
    for root in (path, path / CHECKPOINTS_SUBDIR):
        steps = checkpoint_steps(root)
        if steps:
            return root, steps[-1]
    raise UserError(f"no checkpoint to resume from: {path} holds no complete saved step")


def is_complete(step_dir: epath.Path) -> bool:
    """A finished save: named by its step alone, with its commit marker and every item."""
    return (
        step_dir.name.isdigit()
        and (step_dir / COMMIT_MARKER).is_file()
        and all((step_dir / item).is_dir() for item in ITEMS)
    )


def checkpoint_steps(root: epath.Path) -> list[int]:
    """Steps saved completely under `root`, in increasing order."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and is_complete(p))


def interrupted_saves(root: epath.Path, after: int = -1) -> list[epath.Path]:
    """Step directories under `root` (of steps after `after`) whose save never finished."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_PREFIX.match(path.name)
        if path.is_dir() and match and int(match.group(1)) > after and not is_complete(path):
            found.append(path)
    return sorted(found, key=lambda p: (int(STEP_PREFIX.match(p.name).group(1)), p.name))

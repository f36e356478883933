"""Training checkpoints with orbax: the TrainState (params, optimizer state, step, RNG key) as
arrays, and the run's position (data order, step, sums) and setup as JSON. Nothing is pickled.

Saving is asynchronous but donation-safe: orbax copies every array to host memory before `save`
returns (its default synchronous device-to-host transfer), so the next train step may donate
the state buffers while the files are still being written. A save never overlaps the one before
it: `save` first waits for that one to finish (and raises its error, if it failed).

A save is atomic: orbax writes `STEP.orbax-checkpoint-tmp-*` and renames it to `STEP` once it
holds everything (on gs://, where nothing renames atomically, it writes its commit marker last).
A crash or a storage fault during a save leaves such a temporary behind and never touches the
checkpoints before it; which steps are complete is orbax's to say (`saved_steps`).

A complete checkpoint whose files were damaged later (a bad disk, a copy cut short) fails to
restore with `Unreadable`; a resumed run sets it aside under a new name (`set_aside`), never
deleting it, and continues from the newest checkpoint that restores.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from flax_lm.errors import UserError, one_line
from flax_lm.storage import absolute, location
from flax_lm.train import orbax_fix  # noqa: F401  (orbax's restore loops end cleanly)
from flax_lm.train.args import LATEST_CHECKPOINT
from flax_lm.train.step import TrainState, abstract

CHECKPOINTS_SUBDIR = "checkpoints"
ITEMS = ("state", "meta")
DAMAGED_SUFFIX = ".damaged-"  # STEP.damaged-TIME: set aside, no longer a step orbax lists


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
    """Start saving `state` and `meta` (JSON) as checkpoint `meta["step"]`, once the previous
    save has finished: saves slower than training never pile up."""
    finish(manager)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
        manager.save(meta["step"], args=args)
    except Exception as err:  # what the storage or orbax raised, as WriteFailed
        raise WriteFailed(epath.Path(manager.directory) / str(meta["step"]), err) from None


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight to finish; WriteFailed if it failed (orbax raises a failed
    save's error once, here; its temporary stays behind, which no run takes for a checkpoint)."""
    try:
        manager.wait_until_finished()
    except Exception as err:
        raise WriteFailed(None, err) from None


@contextlib.contextmanager
def save_errors_left_to_the_caller() -> Iterator[None]:
    """Meanwhile orbax's own log records of errors are dropped: it logs a failed save's error
    (with a traceback, from each of its threads that saw it) before `finish` raises it, which the
    run then reports in its one error line."""
    log = logging.getLogger("absl")
    log.addFilter(not_an_orbax_error)
    try:
        yield
    finally:
        log.removeFilter(not_an_orbax_error)


def not_an_orbax_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or "/orbax/" not in record.pathname


class WriteFailed(Exception):
    """A checkpoint that could not be written: its path (None: the save in flight) and the
    storage's error, on one line."""

    def __init__(self, path: epath.Path | None, err: Exception):
        self.path, self.reason = path, storage_reason(err)
        super().__init__(f"{path}: {self.reason}")


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
    try:
        restored = manager.restore(step, args=args)
    except Exception as err:  # whatever a damaged file makes orbax or TensorStore raise
        step_dir = epath.Path(manager.directory) / str(step)
        advice = ADVICE_PARAMS_ONLY if params_only else ADVICE_RESUME
        raise Unreadable(step_dir, err, advice) from None
    return (restored.state["params"] if params_only else restored.state), restored.meta


def read_meta(directory: epath.Path, step: int) -> dict[str, Any]:
    """The JSON part of a checkpoint, without loading its arrays."""
    manager = open_manager(directory, create=False)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:  # a damaged or missing JSON file
        raise Unreadable(directory / str(step), err) from None
    finally:
        manager.close()


ADVICE_RESUME = "resume from an earlier checkpoint of the run"
ADVICE_PARAMS_ONLY = "give the config of the run that saved it"  # evaluating, exporting


class Unreadable(UserError):
    """A checkpoint that cannot be restored: `step_dir` and, on one line, `reason`."""

    def __init__(self, step_dir: epath.Path, err: Exception, advice: str = ADVICE_RESUME):
        self.step_dir, self.reason = step_dir, storage_reason(err)
        super().__init__(
            f"checkpoint {step_dir} cannot be restored (damaged, or saved by another model): "
            f"{self.reason}; {advice}"
        )


def storage_reason(err: BaseException, limit: int = 300) -> str:
    """What orbax or TensorStore said went wrong, on one line: the innermost error that says more
    than "see the details", without TensorStore's JSON spec. Longer than `limit`, its status
    (`RESOURCE_EXHAUSTED`, ...) and its last clause, which holds the system's own words ("No
    space left on device")."""
    reasons = []
    while err is not None:
        reasons.append(one_line(err, None).split(" [tensorstore_spec")[0])
        err = err.__cause__ or err.__context__
    useful = [r for r in reasons if "See full TensorStore details" not in r] or reasons
    reason = useful[-1]
    if len(reason) <= limit:
        return reason
    status, last = reason.split(":", 1)[0], reason.rsplit('": ', 1)[-1]
    return f"{status}: ... {last}"[:limit]


def find_checkpoint(
    spec: str, own_checkpoints: epath.Path
) -> tuple[epath.Path, list[int], bool]:
    """(checkpoints dir, its steps to try, newest first, whether `spec` named one step) for
    --resume_from_checkpoint: `latest` (the run's own checkpoints) or a checkpoints dir (each of
    its complete steps), or one step's dir inside it (that step alone); local or gs://."""
    if spec == LATEST_CHECKPOINT:
        path = own_checkpoints
    else:
        path = location(spec, "--resume_from_checkpoint")
    if not path.is_dir():
        raise UserError(f"no checkpoint to resume from: {path} is not a directory")
    if is_step_name(path.name) and ocp.path.step.is_path_temporary(path):
        raise UserError(
            f"checkpoint {path} is incomplete (its save was interrupted): resume from "
            f"an earlier one in {path.parent}"
        )
    if path.name.isdigit() and int(path.name) in saved_steps(path.parent):
        return path.parent, [int(path.name)], True
    for root in (path, path / CHECKPOINTS_SUBDIR):
        steps = saved_steps(root)
        if steps:
            return root, steps[::-1], False
    raise UserError(f"no checkpoint to resume from: {path} holds no complete saved step")


def saved_steps(root: epath.Path) -> list[int]:
    """The steps orbax finds complete under `root`, in increasing order (its temporaries, and
    checkpoints set aside as damaged, are not steps)."""
    if not root.is_dir():
        return []
    with open_manager(root, create=False) as manager:
        return sorted(manager.all_steps())


def interrupted_saves(root: epath.Path, after: int = -1) -> list[epath.Path]:
    """orbax's temporaries under `root` (saves that never finished) of steps after `after`."""
    if not root.is_dir():
        return []
    found = [path.get() for path in ocp.path.step.all_temporary_paths(root)]
    stepped = [(step_of(path), path.name, path) for path in found]
    return [path for step, _, path in sorted(stepped) if step > after]


def is_step_name(name: str) -> bool:
    """Whether `name` is a step's (STEP, or orbax's temporary for it): on gs://, where any folder
    without a commit marker counts as a temporary, only such names are asked about."""
    return name.isdigit() or ocp.path.step.TMP_DIR_SUFFIX in name


def step_of(path: epath.Path) -> int:
    """The step a checkpoint's directory (or its temporary) is named after; -1 for none."""
    try:
        return ocp.path.step.step_from_checkpoint_name(path.name)
    except ValueError:
        return -1


def aside_path(step_dir: epath.Path) -> epath.Path:
    """Where a damaged checkpoint STEP is set aside: STEP.damaged-TIME (now, UTC), a name orbax
    lists as no step and deletes as no temporary."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return step_dir.parent / f"{step_dir.name}{DAMAGED_SUFFIX}{stamp}"


def newest_step(root: epath.Path) -> int | None:
    """The newest complete checkpoint under `root`, or None (also when `root` cannot be read)."""
    try:
        steps = saved_steps(root)
    except Exception:  # a failing storage: the error being reported already says so
        return None
    return steps[-1] if steps else None

"""Training checkpoints with orbax: the TrainState (params, optimizer state, step, RNG key) as
arrays, and the run's position (data order, step) as JSON. Nothing is pickled.

Saving is asynchronous but donation-safe: orbax copies every array to host memory before `save`
returns (its default synchronous device-to-host transfer), so the next train step may donate
the state buffers while the files are still being written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from flax_lm.errors import UserError
from flax_lm.train.args import LATEST_CHECKPOINT
from flax_lm.train.step import TrainState, abstract

CHECKPOINTS_SUBDIR = "checkpoints"
ITEMS = ("state", "meta")


def open_manager(
    directory: Path, *, max_to_keep: int | None = None, create: bool = True
) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Start saving `state` and `meta` (JSON) as checkpoint `meta["step"]`."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(meta["step"], args=args)


def restore(
    manager: ocp.CheckpointManager, step: int, like: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """Checkpoint `step`, laid out (structure, dtypes, shardings) like the state `like`."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(like)), meta=ocp.args.JsonRestore()
    )
    restored = manager.restore(step, args=args)
    return restored.state, restored.meta


def read_meta(directory: Path, step: int) -> dict[str, Any]:
    """The JSON part of a checkpoint, without loading its arrays."""
    manager = open_manager(directory, create=False)
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    finally:
        manager.close()


def find_checkpoint(spec: str, output_dir: Path) -> tuple[Path, int]:
    """(checkpoints dir, step) named by --resume_from_checkpoint: `latest` (the newest under
    output_dir), a checkpoints dir (its newest), or one step's dir inside it."""
    path = output_dir / CHECKPOINTS_SUBDIR if spec == LATEST_CHECKPOINT else Path(spec)
    if not path.is_dir():
        raise UserError(f"no checkpoint to resume from: {path} is not a directory")
    if path.name.isdigit() and (path / ITEMS[0]).is_dir():
        return path.parent, int(path.name)
    for root in (path, path / CHECKPOINTS_SUBDIR):
        steps = checkpoint_steps(root)
        if steps:
            return root, steps[-1]
    raise UserError(f"no checkpoint to resume from: {path} holds no saved steps")


def checkpoint_steps(root: Path) -> list[int]:
    """Steps saved completely under `root`, in increasing order."""
    if not root.is_dir():
        return []
    steps = ocp.path.step.checkpoint_steps(root.absolute())
    return sorted(step for step in steps if (root / str(step) / ITEMS[0]).is_dir())

"""A run's folders: where it writes and locks, the checkpoint it continues from (a damaged one
skipped for the one before it), and what must not change between a run and its resumption.

Nothing here writes: a run that cannot start leaves its output_dir as it was.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Any

import jax
from etils import epath
from transformers import PretrainedConfig

from flax_lm import storage
from flax_lm.errors import UserError
from flax_lm.storage import is_inside, location, same_place
from flax_lm.train import checkpoint
from flax_lm.train.args import TrainConfig
from flax_lm.train.metrics import METRICS_FILE, TENSORBOARD_SUBDIR
from flax_lm.train.runlock import LOCK_FILE, check_not_locked


@dataclass
class Resume:
    """The checkpoint a run continues from and what it recorded about its run."""

    directory: epath.Path  # the checkpoints dir holding it
    step: int
    meta: dict[str, Any]
    interrupted: list[epath.Path]  # newer step dirs whose save never finished (skipped)
    later: list[int] = dataclasses.field(default_factory=list)  # newer complete ones (dropped)
    rerun: bool = False  # found in output_dir by rerunning the command, not named by a flag
    older: list[int] = dataclasses.field(default_factory=list)  # to try if `step` is damaged
    pinned: bool = False  # --resume_from_checkpoint named this step: no other is tried
    damaged: dict[epath.Path, str] = dataclasses.field(default_factory=dict)  # skipped: why
    aside: dict[epath.Path, epath.Path] = dataclasses.field(default_factory=dict)  # warned
    # about: the name each damaged step dir is set aside under, once the run holds its lock

    def describe(self) -> str:
        """The line a resumed run starts with."""
        notes = [f"dropped later checkpoints {self.later}"] if self.later else []
        if self.damaged:
            notes.append(f"skipped damaged checkpoints {[p.name for p in self.damaged]}")
        if self.interrupted:
            skipped = [path.name for path in self.interrupted]
            notes.append(f"skipped incomplete checkpoints {skipped}: their saves were interrupted")
        if self.rerun:
            notes.append("the newest in --output_dir; --overwrite_output_dir starts over instead")
        details = f" ({'; '.join(notes)})" if notes else ""
        return f"resumed from checkpoint {self.directory / str(self.step)} at step {self.step}{details}"



def open_run(cfg: TrainConfig) -> Resume | None:
    """Check the run's folders (valid locations, not locked by a live run, output_dir new or
    holding what this run may continue or start in); returns the checkpoint to resume, if any."""
    output_dir = location(cfg.output_dir, "--output_dir")
    if cfg.checkpoint_dir:
        location(cfg.checkpoint_dir, "--checkpoint_dir")
    for directory in run_dirs(cfg):
        check_not_locked(directory)
    resume = find_resume(cfg, output_dir)
    check_output_dir(cfg, output_dir, resuming=resume is not None)
    return resume


def checkpoints_of(cfg: TrainConfig) -> epath.Path:
    """The run's checkpoints folder: --checkpoint_dir, or output_dir/checkpoints."""
    if cfg.checkpoint_dir:
        return epath.Path(cfg.checkpoint_dir)
    return epath.Path(cfg.output_dir) / checkpoint.CHECKPOINTS_SUBDIR


def run_dirs(cfg: TrainConfig) -> list[epath.Path]:
    """Where the run holds a lock: output_dir, and --checkpoint_dir when it lies elsewhere."""
    output_dir, checkpoints = epath.Path(cfg.output_dir), checkpoints_of(cfg)
    return [output_dir] + ([] if is_inside(checkpoints, output_dir) else [checkpoints])


def find_resume(cfg: TrainConfig, output_dir: epath.Path) -> Resume | None:
    """The checkpoint named by --resume_from_checkpoint or, when the command is rerun on an
    output_dir holding complete checkpoints (without --overwrite_output_dir), its newest. Unless a
    flag names one step, a checkpoint whose JSON part cannot be read is skipped for the one
    before it (with a warning); one whose arrays cannot, when the trainer restores it."""
    own_checkpoints = checkpoints_of(cfg)
    own_steps = checkpoint.saved_steps(own_checkpoints)
    if cfg.resume_from_checkpoint:
        if not cfg.do_train:
            raise UserError("--resume_from_checkpoint continues training: it needs --do_train")
        directory, steps, pinned = checkpoint.find_checkpoint(
            cfg.resume_from_checkpoint, own_checkpoints
        )
        rerun = False
    else:
        if not (own_steps and cfg.do_train and not cfg.overwrite_output_dir):
            return None
        directory, steps, pinned, rerun = own_checkpoints, own_steps[::-1], False, True
    resume = Resume(directory, -1, {}, [], rerun=rerun, older=steps, pinned=pinned)
    return next_to_try(resume, own_steps)


def next_to_try(resume: Resume, own_steps: list[int]) -> Resume:
    """`resume` moved to the newest of its `older` steps whose JSON part reads; a UserError
    naming each checkpoint tried when none is left. A checkpoint that cannot be restored is an
    error when a flag named it; otherwise it is skipped, with one warning line once another one
    is found, and set aside (Resume.aside) once the run holds its lock."""
    while resume.older:
        step, *resume.older = resume.older
        try:
            meta = checkpoint.read_meta(resume.directory, step)
        except checkpoint.Unreadable as err:
            skip_damaged(resume, err)
            continue
        warn_damaged(resume)
        damaged = {checkpoint.step_of(path) for path in resume.damaged}
        later = [s for s in own_steps if s > step and s not in damaged]
        interrupted = checkpoint.interrupted_saves(resume.directory, after=step)
        return dataclasses.replace(
            resume, step=step, meta=meta, later=later, interrupted=interrupted
        )
    tried = "; ".join(f"{path.name}: {reason}" for path, reason in resume.damaged.items())
    raise UserError(
        f"no checkpoint in {resume.directory} can be restored (tried {tried}); they are left as "
        "they are: add --overwrite_output_dir to start over, or resume from a copy of the run"
    )


def skip_damaged(resume: Resume, err: checkpoint.Unreadable) -> None:
    """Note a checkpoint that cannot be restored; its error when a flag named it."""
    if resume.pinned:
        raise err
    resume.damaged[err.step_dir] = err.reason


def warn_damaged(resume: Resume) -> None:
    """One warning line for each damaged checkpoint skipped since the last, naming where it will
    be kept."""
    for step_dir, reason in resume.damaged.items():
        if step_dir in resume.aside:
            continue
        resume.aside[step_dir] = checkpoint.aside_path(step_dir)
        if jax.process_index() == 0:
            print(
                f"warning: checkpoint {step_dir} cannot be restored ({reason}): skipped, and "
                f"kept as {resume.aside[step_dir].name}",
                file=sys.stderr, flush=True,
            )  # fmt: skip


# What a run writes into output_dir before its first checkpoint: a run killed then holds nothing
# worth keeping, and rerunning its command starts it again.
FIRST_WRITES = (METRICS_FILE, TENSORBOARD_SUBDIR, "wandb", checkpoint.CHECKPOINTS_SUBDIR, LOCK_FILE)
# The model dir of the pipeline (tokenizer, then config, then training into it): the run reads
# these and writes them back with its model.
MODEL_DIR_INPUTS = ("config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt")  # fmt: skip


def may_start_in(cfg: TrainConfig, output_dir: epath.Path) -> set[str]:
    """Names a fresh run may find in output_dir without --overwrite_output_dir."""
    allowed = set(FIRST_WRITES)
    sources = (cfg.config_name, cfg.tokenizer_name)
    if any(name and same_place(name, output_dir) for name in sources):
        allowed.update(MODEL_DIR_INPUTS)
    return allowed


def check_output_dir(cfg: TrainConfig, output_dir: epath.Path, *, resuming: bool) -> None:
    """A run writes into output_dir when it is new, resumed, overwritten, or holds only what a
    fresh run may find there (see may_start_in)."""
    storage.check_output_dir(
        output_dir,
        overwrite=cfg.overwrite_output_dir or resuming,
        may_hold=may_start_in(cfg, output_dir),
        advice=" and no checkpoint to continue: add --overwrite_output_dir to write into it, "
        "or use another --output_dir",
        cloud=True,
    )


def check_resume_matches(resume: Resume, identity: dict[str, Any], output_dir: str) -> None:
    """The checkpoint must come from a run with the same data order, batch layout and model
    (`identity`, see run_identity; what a checkpoint did not record is not compared)."""
    now = dict(identity)
    if not resume.rerun:  # a checkpoint named by a flag may continue on moved or renamed data
        now.pop("dataset")
    recorded = dict(resume.meta)
    if isinstance(recorded.get("model"), dict):  # checkpoints may predate RUN_WRITTEN
        recorded["model"] = without_run_written(recorded["model"])
    changed = [
        change
        for key, value in now.items()
        if key in recorded
        for change in differences(key, recorded[key], value)
    ]
    if changed:
        if resume.rerun:
            raise UserError(
                f"--output_dir {output_dir} holds checkpoints of a different run "
                f"({'; '.join(changed)}): rerun it with its own flags to continue it, add "
                "--overwrite_output_dir to replace it, or use another --output_dir"
            )
        raise UserError(
            f"checkpoint {resume.directory / str(resume.step)} is from a different run setup "
            f"({'; '.join(changed)}): resume with the same flags"
        )


def differences(name: str, before: Any, after: Any) -> list[str]:
    """Each setting that changed, as "name before -> after" (dicts: key by key)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(before.keys() | after.keys())
        return [c for key in keys for c in differences(key, before.get(key), after.get(key))]
    return [] if before == after else [f"{name} {before} -> {after}"]


DATA_IDENTITY = ("dataset_name", "dataset_config_name", "dataset_revision", "train_file",
                 "max_train_samples", "filter_keywords")  # fmt: skip


def run_identity(
    cfg: TrainConfig, objective_name: str, *, global_batch_size: int, seq_len: int,
    model_config: PretrainedConfig,
) -> dict[str, Any]:
    """What must not change between a run and its resumption (stored in each checkpoint; the
    data only when a rerun finds the checkpoint in output_dir)."""
    return {
        "objective": objective_name,
        "seed": cfg.seed,
        "global_batch_size": global_batch_size,
        "seq_len": seq_len,
        "data_shards": cfg.data_shards,
        "model": model_identity(model_config),
        "dataset": {name: getattr(cfg, name) for name in DATA_IDENTITY},
    }


# config.json keys that describe a file, not the model: the export writes them (with the model's
# dtype as stored, whatever --dtype computes in) into output_dir, which may be the folder the run
# read its config from, so a rerun reading them back is the same run.
RUN_WRITTEN = ("transformers_version", "architectures", "dtype", "torch_dtype")


def model_identity(config: PretrainedConfig) -> dict[str, Any]:
    """The model config's settings (as JSON) that a resumed run must share with its checkpoint."""
    return without_run_written(json.loads(config.to_json_string(use_diff=True)))


def without_run_written(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key not in RUN_WRITTEN}

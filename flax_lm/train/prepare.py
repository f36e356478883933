"""Everything a run needs, loaded and checked before anything is written to output_dir.

A mistake in the flags (wrong model type for the script, a tokenizer larger than the model's
vocabulary, blocks longer than the model's positions, an output_dir holding another run) becomes
one UserError here, so a failed start leaves the output directory as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from etils import epath
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from flax_lm import storage
from flax_lm.config import (
    apply_config_overrides,
    base_config_names,
    load_base_config,
    load_tokenizer,
)
from flax_lm.corpus import progress_bars_on_terminal_only
from flax_lm.errors import UserError
from flax_lm.hub_models import download_config, download_model, is_hub_id
from flax_lm.models.hf_io import check_weight_files
from flax_lm.storage import is_cloud, is_inside, location, same_place
from flax_lm.train import checkpoint
from flax_lm.train.args import SCRIPT_NAMES, TrainConfig
from flax_lm.train.data.batches import TrainBatches
from flax_lm.train.data.shards import shard_lengths, shards_of_process, tokenize_shards
from flax_lm.train.data.splits import load_raw_splits
from flax_lm.train.metrics import METRICS_FILE, TENSORBOARD_SUBDIR
from flax_lm.train.objectives import Objective, make_objective
from flax_lm.train.runlock import LOCK_FILE, check_not_locked

MODEL_TYPES = {"clm": "gpt2", "mlm": "roberta"}
BASE_CONFIGS = {"gpt2": "gpt2", "roberta": "roberta-base"}
MAX_DEFAULT_LENGTH = 1024  # default block_size / max_seq_length cap, as in HF's scripts


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


@dataclass
class Prepared:
    """A validated run: config with lengths resolved, model config, tokenizer, data."""

    cfg: TrainConfig
    objective: Objective
    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, list[Any]]  # this process's data shards of each split
    seq_len: int
    num_devices: int
    train_batches: TrainBatches | None
    total_steps: int
    resume: Resume | None
    model_dir: Path | None = None  # --model_name_or_path as a local dir (a Hub id: its cache)

    @property
    def output_dir(self) -> epath.Path:
        return epath.Path(self.cfg.output_dir)

    @property
    def checkpoint_dir(self) -> epath.Path:
        return checkpoints_of(self.cfg)

    @property
    def shard_ids(self) -> range:
        return shards_of_process(self.cfg.data_shards)

    @property
    def global_batch_size(self) -> int:
        cfg = self.cfg
        return cfg.per_device_train_batch_size * self.num_devices * cfg.gradient_accumulation_steps


def prepare(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    """Load and check the model config, tokenizer, data and resume point; write nothing."""
    with progress_bars_on_terminal_only():  # a failing start prints its one error line only
        return load_and_check(cfg, objective_name, num_devices)


def load_and_check(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    output_dir = location(cfg.output_dir, "--output_dir")
    if cfg.checkpoint_dir:
        location(cfg.checkpoint_dir, "--checkpoint_dir")
    if cfg.push_to_hub and is_cloud(output_dir):
        raise UserError(
            f"--push_to_hub uploads a local output_dir, not {output_dir}: give a local "
            "--output_dir and --checkpoint_dir gs://... for the checkpoints"
        )
    for directory in run_dirs(cfg):
        check_not_locked(directory)
    resume = find_resume(cfg, output_dir)
    check_output_dir(cfg, output_dir, resuming=resume is not None)
    prepared = prepare_model(cfg, objective_name, num_devices)
    if prepared.model_dir is not None:
        check_weight_files(prepared.model_dir)  # before the data is loaded, which may take long
    prepared.resume = resume
    cfg = prepared.cfg = resolve_data_shards(prepared.cfg, resume, num_devices)
    if resume is not None:
        check_resume_matches(resume, prepared, objective_name)
    shards = prepared.shard_ids
    raw = load_raw_splits(cfg)
    prepared.splits = tokenize_shards(
        raw, prepared.tokenizer, cfg, objective_name, shards, cfg.data_shards
    )
    if cfg.do_train:
        train = prepared.splits["train"]
        prepared.train_batches = TrainBatches(
            train,
            prepared.global_batch_size,
            cfg.seed,
            shard_ids=shards,
            num_shards=cfg.data_shards,
            all_lengths=None if cfg.streaming else shard_lengths(train),
        )
        prepared.total_steps = total_train_steps(cfg, prepared.train_batches)
    return prepared


def resolve_data_shards(cfg: TrainConfig, resume: Resume | None, num_devices: int) -> TrainConfig:
    """--data_shards, by default the resumed checkpoint's or the number of processes; every
    microbatch and eval batch must take equal rows from each shard."""
    recorded = resume.meta.get("data_shards") if resume is not None else None
    shards = cfg.data_shards or recorded or jax.process_count()
    used = {"per_device_train_batch_size": cfg.do_train, "per_device_eval_batch_size": cfg.do_eval}
    for flag in (flag for flag, needed in used.items() if needed):
        rows = getattr(cfg, flag) * num_devices
        if rows % shards:
            raise UserError(
                f"--data_shards {shards} must divide the {rows} rows of a batch "
                f"(--{flag} {getattr(cfg, flag)} x {num_devices} devices)"
            )
    shards_of_process(shards)  # a count the processes can share
    return dataclasses.replace(cfg, data_shards=shards)


def checkpoints_of(cfg: TrainConfig) -> epath.Path:
    """The run's checkpoints folder: --checkpoint_dir, or output_dir/checkpoints."""
    if cfg.checkpoint_dir:
        return epath.Path(cfg.checkpoint_dir)
    return epath.Path(cfg.output_dir) / checkpoint.CHECKPOINTS_SUBDIR


def run_dirs(cfg: TrainConfig) -> list[epath.Path]:
    """Where the run holds a lock: output_dir, and --checkpoint_dir when it lies elsewhere."""
    output_dir, checkpoints = epath.Path(cfg.output_dir), checkpoints_of(cfg)
    return [output_dir] + ([] if is_inside(checkpoints, output_dir) else [checkpoints])


def prepare_model(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    """The run without its data: model config, tokenizer, sequence length and objective, which
    are all the train step's shapes depend on (the corpus is not read; no splits, no steps)."""
    model_dir = pretrained_model_dir(cfg)
    model_config = load_model_config(cfg, objective_name, model_dir)
    tokenizer = tokenizer_of(cfg)
    check_vocab(tokenizer, model_config)
    cfg = resolve_sequence_length(cfg, objective_name, model_config, tokenizer)
    seq_len = cfg.block_size if objective_name == "clm" else cfg.max_seq_length
    objective = make_objective(objective_name, tokenizer, cfg)
    return Prepared(
        cfg, objective, model_config, tokenizer, {}, seq_len, num_devices, None, 0, None, model_dir
    )


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


def pretrained_model_dir(cfg: TrainConfig) -> Path | None:
    """--model_name_or_path as a local directory: itself, or a Hub model's cached download."""
    name = cfg.model_name_or_path
    if not name or not is_hub_id(name):
        return Path(name) if name else None
    return download_model(name, "--model_name_or_path", cfg.cache_dir, cfg.token)


def config_source(cfg: TrainConfig, model_dir: Path | None, objective_name: str) -> str:
    """Where the config comes from: the pretrained model, --config_name (a path, a name in
    configs/, or a Hub model's config.json) or the script's base config."""
    if model_dir is not None:
        return str(model_dir)
    name = cfg.config_name
    if name and name not in base_config_names() and is_hub_id(name):
        return str(download_config(name, "--config_name", cfg.cache_dir, cfg.token))
    return name or BASE_CONFIGS[MODEL_TYPES[objective_name]]


def load_model_config(
    cfg: TrainConfig, objective_name: str, model_dir: Path | None = None
) -> PretrainedConfig:
    """The model's config: from --model_name_or_path, --config_name or --model_type, then
    --config_overrides; its type must be the one this script trains."""
    expected = MODEL_TYPES[objective_name]
    if cfg.model_type and cfg.model_type != expected:
        raise wrong_model_type(objective_name, cfg.model_type)
    config = load_base_config(config_source(cfg, model_dir, objective_name))
    if config.model_type != expected:
        raise wrong_model_type(objective_name, config.model_type)
    if cfg.config_overrides:
        config = apply_config_overrides(config, cfg.config_overrides)
    return config


def wrong_model_type(objective_name: str, found: str) -> UserError:
    other = next(name for name in MODEL_TYPES if name != objective_name)
    return UserError(
        f"{SCRIPT_NAMES[objective_name]} trains {MODEL_TYPES[objective_name]} models, "
        f"but the model is {found}: use {SCRIPT_NAMES[other]} for {MODEL_TYPES[other]}"
    )


def tokenizer_of(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """--tokenizer_name's tokenizer (default: the pretrained model's, or the config's dir)."""
    name = cfg.tokenizer_name or cfg.model_name_or_path or cfg.config_name
    if not name:
        raise UserError(
            "no tokenizer: give --tokenizer_name (a directory saved by train-tokenizer)"
        )
    return load_tokenizer(name, cache_dir=cfg.cache_dir, token=cfg.token)


def check_vocab(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}: make the config with --tokenizer_name or pass "
            f"--config_overrides vocab_size={len(tokenizer)}"
        )


def position_limit(objective_name: str, config: PretrainedConfig) -> tuple[int, str]:
    """(the longest sequence the model has positions for, how that was computed)."""
    if objective_name == "clm":
        return config.n_positions, "n_positions"
    pad = config.pad_token_id or 0  # RoBERTa positions start after the padding index
    limit = config.max_position_embeddings - pad - 1
    return limit, f"max_position_embeddings - pad_token_id - 1 = {limit}"


def resolve_sequence_length(
    cfg: TrainConfig,
    objective_name: str,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> TrainConfig:
    """block_size (CLM) or max_seq_length (MLM): checked against the model's positions; by default
    min(1024, the tokenizer's model_max_length, the model's limit) like HF's scripts."""
    flag = "block_size" if objective_name == "clm" else "max_seq_length"
    limit, limit_text = position_limit(objective_name, config)
    length = getattr(cfg, flag)
    if length is None:
        length = min(MAX_DEFAULT_LENGTH, tokenizer.model_max_length, limit)
    elif length > limit:
        raise UserError(f"--{flag} {length} is longer than the model allows ({limit_text})")
    return dataclasses.replace(cfg, **{flag: length})


def total_train_steps(cfg: TrainConfig, batches: TrainBatches) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    total = math.floor(batches.steps_per_epoch * cfg.num_train_epochs)
    if total == 0:
        raise UserError(
            f"{cfg.num_train_epochs} epochs of {batches.steps_per_epoch} steps is no step: "
            "raise --num_train_epochs or give --max_steps"
        )
    return total


def check_resume_matches(resume: Resume, prepared: Prepared, objective_name: str) -> None:
    """The checkpoint must come from a run with the same data order, batch layout and model
    (what a checkpoint did not record is not compared)."""
    now = run_identity(prepared, objective_name)
    if not resume.rerun:  # a checkpoint named by a flag may continue on moved or renamed data
        now.pop("dataset")
    changed = [
        change
        for key, value in now.items()
        if key in resume.meta
        for change in differences(key, resume.meta[key], value)
    ]
    if changed:
        if resume.rerun:
            raise UserError(
                f"--output_dir {prepared.cfg.output_dir} holds checkpoints of a different run "
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


def run_identity(prepared: Prepared, objective_name: str) -> dict[str, Any]:
    """What must not change between a run and its resumption (stored in each checkpoint; the
    data only when a rerun finds the checkpoint in output_dir)."""
    return {
        "objective": objective_name,
        "seed": prepared.cfg.seed,
        "global_batch_size": prepared.global_batch_size,
        "seq_len": prepared.seq_len,
        "data_shards": prepared.cfg.data_shards,
        "model": model_identity(prepared.model_config),
        "dataset": {name: getattr(prepared.cfg, name) for name in DATA_IDENTITY},
    }


def model_identity(config: PretrainedConfig) -> dict[str, Any]:
    """The model config's settings (as JSON) that a resumed run must share with its checkpoint."""
    settings = json.loads(config.to_json_string(use_diff=True))
    settings.pop("transformers_version", None)
    return settings

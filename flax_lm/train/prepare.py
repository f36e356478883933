"""Everything a run needs, loaded and checked before anything is written to output_dir.

A mistake in the flags (wrong model type for the script, a tokenizer larger than the model's
vocabulary, blocks longer than the model's positions, an output_dir holding another run) becomes
one UserError here, so a failed start leaves the output directory as it was. The checks live
beside what they check: the run's folders and resume point in run_dir, the model config and
tokenizer in flax_lm.model_source, lengths, shards and step counts in the data package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from etils import epath
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from flax_lm.console import data_progress
from flax_lm.model_source import (
    check_vocab,
    load_model_config,
    pretrained_model_dir,
    tokenizer_of,
)
from flax_lm.models.hf_io import check_weight_files
from flax_lm.train.args import TrainConfig
from flax_lm.train.data.batches import TrainBatches, total_train_steps
from flax_lm.train.data.shards import (
    resolve_data_shards,
    shard_lengths,
    shards_of_process,
    tokenize_shards,
)
from flax_lm.train.data.splits import load_raw_splits
from flax_lm.train.data.tokenize import resolve_sequence_length
from flax_lm.train.objectives import Objective, make_objective
from flax_lm.train.run_dir import (
    Resume,
    check_resume_matches,
    checkpoints_of,
    open_run,
    run_identity,
)


@dataclass(frozen=True)
class Prepared:
    """A validated run: config with lengths resolved, model config, tokenizer, data. Built once
    (a change is a dataclasses.replace)."""

    cfg: TrainConfig
    objective: Objective
    model_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    seq_len: int
    num_devices: int
    splits: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # this process's
    # data shards of each split
    train_batches: TrainBatches | None = None
    total_steps: int = 0
    resume: Resume | None = None
    model_dir: Path | None = None  # --model_name_or_path as a local dir (a Hub id: its cache)
    documents: dict[str, int | None] = dataclasses.field(default_factory=dict)  # None: a stream

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

    def identity(self) -> dict[str, Any]:
        """What must not change between this run and its resumption (run_dir.run_identity)."""
        return run_identity(
            self.cfg, self.objective.name, global_batch_size=self.global_batch_size,
            seq_len=self.seq_len, model_config=self.model_config,
        )  # fmt: skip

    def check_resume_matches(self, resume: Resume) -> None:
        """`resume` must be a checkpoint of this run's setup (run_dir.check_resume_matches)."""
        check_resume_matches(resume, self.identity(), self.cfg.output_dir)


def prepare(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    """Load and check the model config, tokenizer, data and resume point; write nothing."""
    with data_progress(lines=jax.process_index() == 0):  # a log gets one process's lines
        return load_and_check(cfg, objective_name, num_devices)


def load_and_check(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    resume = open_run(cfg)
    model = prepare_model(cfg, objective_name, num_devices)
    if model.model_dir is not None:
        check_weight_files(model.model_dir)  # before the data is loaded, which may take long
    recorded = resume.meta.get("data_shards") if resume is not None else None
    cfg = resolve_data_shards(model.cfg, recorded, num_devices)
    model = dataclasses.replace(model, cfg=cfg)
    if resume is not None:
        model.check_resume_matches(resume)
    raw = load_raw_splits(cfg)
    splits = tokenize_shards(
        raw, model.tokenizer, cfg, objective_name, model.shard_ids, cfg.data_shards
    )
    train_batches = None
    if cfg.do_train:
        train = splits["train"]
        train_batches = TrainBatches(
            train,
            model.global_batch_size,
            cfg.seed,
            shard_ids=model.shard_ids,
            num_shards=cfg.data_shards,
            all_lengths=None if cfg.streaming else shard_lengths(train),
        )
    return dataclasses.replace(
        model,
        splits=splits,
        train_batches=train_batches,
        total_steps=total_train_steps(cfg, train_batches) if train_batches is not None else 0,
        resume=resume,
        documents={name: getattr(split, "num_rows", None) for name, split in raw.items()},
    )


def prepare_model(cfg: TrainConfig, objective_name: str, num_devices: int) -> Prepared:
    """The run without its data: model config, tokenizer, sequence length and objective, which
    are all the train step's shapes depend on (the corpus is not read; no splits, no steps)."""
    model_dir = pretrained_model_dir(cfg)
    model_config = load_model_config(cfg, objective_name, model_dir)
    tokenizer = tokenizer_of(cfg)
    check_vocab(tokenizer, model_config)
    cfg = resolve_sequence_length(cfg, objective_name, model_config, tokenizer)
    return Prepared(
        cfg=cfg,
        objective=make_objective(objective_name, tokenizer, cfg),
        model_config=model_config,
        tokenizer=tokenizer,
        seq_len=cfg.block_size if objective_name == "clm" else cfg.max_seq_length,
        num_devices=num_devices,
        model_dir=model_dir,
    )

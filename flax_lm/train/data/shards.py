"""Data shards: which documents each process reads and tokenizes, and what every process knows."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from jax.experimental import multihost_utils

from flax_lm.errors import UserError
from flax_lm.train.data.splits import Split
from flax_lm.train.data.tokenize import tokenize_splits

if TYPE_CHECKING:  # the data package follows the training flags; it never imports training
    from flax_lm.train.args import TrainConfig


def shards_of_process(num_shards: int) -> range:
    """The data shards this process reads: its contiguous 1/process_count of them, the shards
    whose rows its devices hold in every global batch."""
    count, index = jax.process_count(), jax.process_index()
    if num_shards % count:
        raise UserError(
            f"--data_shards {num_shards} cannot be split over {count} processes: give a "
            f"multiple of {count}"
        )
    per_process = num_shards // count
    return range(index * per_process, (index + 1) * per_process)


def shard_documents(split: Split, num_shards: int, index: int) -> Split:
    """Data shard `index` of `num_shards`: a contiguous run of documents; a stream keeps whole
    files (when their number divides evenly) or every num_shards-th document."""
    if num_shards == 1:
        return split
    if isinstance(split, IterableDataset):
        return split_dataset_by_node(split, rank=index, world_size=num_shards)
    return split.shard(num_shards, index, contiguous=True)


def tokenize_shards(
    raw: dict[str, Split], tokenizer, cfg, objective: str, shards: range, num_shards: int
) -> dict[str, list[Split]]:
    """`tokenize_splits` of each of `shards` (of `num_shards`) of every split, on its own."""
    return {
        name: [
            tokenize_splits(
                {name: shard_documents(split, num_shards, index)}, tokenizer, cfg, objective,
                num_shards=num_shards,
            )[name]
            for index in shards
        ]
        for name, split in raw.items()
    }


def every_process(value: Any) -> list[Any]:
    """A JSON-able `value` of every process, in process order (this process's alone on one)."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(encoded)]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), dtype=np.uint8)
    padded[: len(encoded)] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes, strict=True)]


def shard_lengths(shards: list[Dataset]) -> list[int]:
    """The number of examples in every data shard of the run (every process's), in shard order."""
    return [n for lengths in every_process([len(shard) for shard in shards]) for n in lengths]


def resolve_data_shards(cfg: TrainConfig, recorded: int | None, num_devices: int) -> TrainConfig:
    """--data_shards, by default the resumed checkpoint's (`recorded`) or the number of processes;
    every microbatch and eval batch must take equal rows from each shard."""
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

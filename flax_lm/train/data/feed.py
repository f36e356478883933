"""What the train and eval steps are fed: the model-ready batches of this process, made from the
data pipeline's batches by the objective (MLM masks drawn from the seed), laid out as each step
takes them.

Kept with the data pipeline because it is where a batch's content is decided; the loop only
places these batches on the devices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flax_lm.train.data.batches import TrainBatches, concatenated, eval_batches

TRAIN_BATCH_AXIS = 1  # train batches are [accumulation, rows, seq]: rows go over the devices
PREFETCH_BATCHES = 2  # model-ready batches made and placed on the devices while a step runs
EVAL_MASK_STREAM = 2**32  # eval masks come from (seed, this): the same masks at every evaluation


def split_microbatches(batch: dict[str, np.ndarray], accumulation: int) -> dict[str, np.ndarray]:
    """A global batch [rows, ...] as [accumulation, rows / accumulation, ...]: the train step's
    layout."""
    return {k: v.reshape(accumulation, -1, *v.shape[1:]) for k, v in batch.items()}


class TrainStream:
    """This process's rows of the model-ready global batches [accumulation, microbatch, seq] from
    `start_step` on. Each data shard's rows are laid out as its own slice of every microbatch;
    MLM masks come from np.random.default_rng([seed, step, shard]), so a resumed run, and a run
    on any number of processes, sees the same ones."""

    def __init__(self, batches: TrainBatches, objective, seed: int, start_step: int, accum: int):
        self.batches, self.objective, self.seed = batches, objective, seed
        self.start_step, self.accum = start_step, accum

    def state(self) -> dict[str, Any]:
        return self.batches.state()

    def __iter__(self):
        shard_ids = self.batches.shard_ids
        for step, examples in enumerate(self.batches, start=self.start_step):
            pieces = [
                self.objective.make_batch(piece, np.random.default_rng([self.seed, step, shard]))
                for piece, shard in zip(split_rows(examples, len(shard_ids)), shard_ids,
                                        strict=True)
            ]
            micro = [split_microbatches(piece, self.accum) for piece in pieces]
            if len(micro) == 1:  # one data shard: nothing to join
                yield micro[0]
                continue
            yield {
                key: np.concatenate([m[key] for m in micro], axis=TRAIN_BATCH_AXIS)
                for key in micro[0]
            }


def stream_epoch(state: dict[str, Any]) -> int:
    """The epoch a streamed run is in: that of its least advanced data shard."""
    return min(position["epoch"] for position in state["shards"].values())


def split_rows(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """`batch` cut into `parts` equal runs of rows."""
    cut = {key: np.split(value, parts) for key, value in batch.items()}
    return [{key: cut[key][i] for key in batch} for i in range(parts)]


def eval_host_batches(
    shards, objective, batch_size: int, seed: int, *, shard_ids=(0,), num_shards: int = 1,
    num_batches: int | None = None,
):
    """This process's rows of the model-ready eval batches: batch_size / num_shards rows of each
    of its data shards (`shards`, or one split holding everything). MLM masks come from
    (seed, EVAL_MASK_STREAM, shard), so every evaluation of a run (and a re-evaluation in
    PyTorch) sees the same ones."""
    shards = shards if isinstance(shards, list) else [shards]
    rows = batch_size // num_shards
    rngs = [np.random.default_rng([seed, EVAL_MASK_STREAM, shard]) for shard in shard_ids]
    streams = [eval_batches(shard, rows, num_batches) for shard in shards]
    for pieces in zip(*streams, strict=True):
        yield concatenated(
            [objective.make_batch(p, rng) for p, rng in zip(pieces, rngs, strict=True)]
        )

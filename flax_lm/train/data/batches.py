"""Batches: shuffled, resumable training batches, eval batches and the run's data position."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset

from flax_lm.errors import UserError
from flax_lm.train.data.shards import every_process
from flax_lm.train.data.splits import Split
from flax_lm.train.data.stream import Batch, StreamExamples, decode_examples, encode_examples

if TYPE_CHECKING:  # the data package follows the training flags; it never imports training
    from flax_lm.train.args import TrainConfig

SHUFFLE_BUFFER = 10_000  # streaming: examples in the shuffle buffers (of all data shards)


def _int32(batch: dict[str, Any]) -> Batch:
    return {key: np.asarray(value, dtype=np.int32) for key, value in batch.items()}


def _num_rows(batch: dict[str, Any]) -> int:
    return len(next(iter(batch.values())))


class TrainBatches:
    """This process's rows of every global batch, shuffled each epoch from the seed;
    checkpointable position.

    Every global batch of `batch_size` rows takes batch_size / num_shards rows from each data
    shard, shard after shard; this process holds `shards` (its ones, numbered `shard_ids`) and
    produces their rows, the whole batch when it holds every shard. A map-style shard is permuted
    with np.random.default_rng([seed, epoch, shard]) and its rows fetched in bulk; an epoch ends
    for all shards together after as many batches as the smallest shard holds (`all_lengths`:
    every process's shards). A stream shard (`StreamExamples`) is shuffled through a buffer
    seeded by (seed, shard, epoch) and starts its next epoch when it runs out, on its own; its
    position (`state()`) holds its reader's position, the buffer and the buffer's RNG, so a
    resumed run reads nothing twice.
    Only full batches are produced; `steps_per_epoch` is None for streams.
    """

    def __init__(
        self,
        shards: Split | list[Split],
        batch_size: int,
        seed: int,
        *,
        shard_ids: range | None = None,
        num_shards: int = 1,
        all_lengths: list[int] | None = None,
        shuffle_buffer: int = SHUFFLE_BUFFER,
    ):
        shards = [shards] if isinstance(shards, Dataset | StreamExamples) else list(shards)
        if batch_size % num_shards:
            raise UserError(
                f"the global batch of {batch_size} rows cannot take equal rows from "
                f"--data_shards {num_shards}: give a data_shards that divides it"
            )
        self.batch_size = batch_size
        self.rows_per_shard = batch_size // num_shards
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_shards = num_shards
        self.streaming = isinstance(shards[0], StreamExamples)
        self.shards = shards if self.streaming else [s.with_format("numpy") for s in shards]
        self.shard_ids = list(shard_ids if shard_ids is not None else range(len(shards)))
        self.steps_per_epoch: int | None = None
        self.num_examples: int | None = None  # of every shard (streams: unknown)
        if not self.streaming:
            lengths = all_lengths if all_lengths is not None else [len(s) for s in shards]
            self.num_examples = sum(lengths)
            self.steps_per_epoch = min(lengths) // self.rows_per_shard
            if self.steps_per_epoch == 0:
                raise UserError(
                    f"the training set has {sum(lengths)} examples, fewer than one batch of "
                    f"{batch_size}{self._shard_note(min(lengths))}: add text or lower the "
                    "batch size or sequence length"
                )
        self._epoch = 0
        self._batch = 0
        self._positions = [_stream_start(0) for _ in self.shards]  # streams: each shard's

    def require_one_batch(self) -> None:
        """Fail now, before a run writes anything, if a stream shard holds less than one batch
        (a map-style dataset was checked on construction): reads each one's first batch."""
        if self.streaming:
            for stream in self.shards:
                first = list(itertools.islice(stream.reader(), self.rows_per_shard))
                if len(first) < self.rows_per_shard:
                    raise self._too_small()

    def _too_small(self) -> UserError:
        return UserError(
            f"the training stream holds fewer examples than one batch of {self.batch_size}"
            f"{self._shard_note()}: add text or lower the batch size or sequence length"
        )

    def _shard_note(self, smallest: int | None = None) -> str:
        if self.num_shards == 1:
            return ""
        held = "" if smallest is None else f"; the smallest holds {smallest}"
        return f" ({self.rows_per_shard} rows from each of {self.num_shards} data shards{held})"

    def state(self) -> dict[str, Any]:
        """The NEXT batch to produce (streams: each of this process's shards' position, shuffle
        buffer included, its examples as arrays until `run_position` encodes them)."""
        if self.streaming:
            return {
                "shards": {
                    str(shard): dict(position)
                    for shard, position in zip(self.shard_ids, self._positions, strict=True)
                }
            }
        if self._batch >= self.steps_per_epoch:
            return {"epoch": self._epoch + 1, "batch_in_epoch": 0}
        return {"epoch": self._epoch, "batch_in_epoch": self._batch}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.streaming:
            for shard, position in zip(self.shard_ids, self._positions, strict=True):
                position.update(state["shards"][str(shard)])
            return
        self._epoch = int(state["epoch"])
        self._batch = int(state["batch_in_epoch"])

    def __iter__(self) -> Iterator[Batch]:
        """Endless: epoch after epoch, from the current position."""
        if self.streaming:
            streams = [self._streamed_shard(i) for i in range(len(self.shards))]
            while True:
                yield concatenated([next(stream) for stream in streams])
        while True:
            for batch in self._permuted_epoch(self._epoch, self._batch):
                self._batch += 1
                yield batch
            self._epoch, self._batch = self._epoch + 1, 0

    def _permuted_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        orders = [
            np.random.default_rng([self.seed, epoch, shard]).permutation(len(dataset))
            for shard, dataset in zip(self.shard_ids, self.shards, strict=True)
        ]
        rows = self.rows_per_shard
        for step in range(start, self.steps_per_epoch):
            yield concatenated(
                [
                    _int32(dataset[order[step * rows : (step + 1) * rows]])
                    for dataset, order in zip(self.shards, orders, strict=True)
                ]
            )

    def _streamed_shard(self, index: int) -> Iterator[Batch]:
        """Endless batches of one stream shard, epoch after epoch, from its position."""
        stream, position = self.shards[index], self._positions[index]
        while True:
            reader = stream.reader(position["stream"])
            buffer = decode_examples(position["buffer"])
            rng = np.random.default_rng([self.seed, self.shard_ids[index], position["epoch"]])
            if position["rng"] is not None:
                rng.bit_generator.state = position["rng"]
            examples = self._shuffled(reader, buffer, rng, position)
            for batch in _stacked_runs(examples, self.rows_per_shard):
                if _num_rows(batch) < self.rows_per_shard:
                    break
                position.update(
                    batch_in_epoch=position["batch_in_epoch"] + 1, stream=reader.position(),
                    buffer=list(buffer), rng=rng.bit_generator.state,
                )
                yield _int32(batch)
            if position["batch_in_epoch"] == 0:
                raise self._too_small()
            position.update(_stream_start(position["epoch"] + 1))

    def _shuffled(self, reader, buffer: list, rng: np.random.Generator, position: dict):
        """The reader's examples through a seeded shuffle buffer (a reservoir: each example read
        replaces a random one, which is handed out), emptied in a seeded order at the end."""
        size = max(1, self.shuffle_buffer // self.num_shards)
        if not position["draining"]:
            for example in reader:
                if len(buffer) < size:
                    buffer.append(example)
                    continue
                slot = int(rng.integers(size))
                handed, buffer[slot] = buffer[slot], example
                yield handed
            buffer[:] = [buffer[i] for i in rng.permutation(len(buffer))]
            position["draining"] = True
        while buffer:
            yield buffer.pop()


def _stream_start(epoch: int) -> dict[str, Any]:
    """The position of a stream shard at the start of `epoch`."""
    return {"epoch": epoch, "batch_in_epoch": 0, "stream": None, "buffer": None, "rng": None,
            "draining": False}


def concatenated(pieces: list[Batch]) -> Batch:
    """Batches with the same keys, one after the other."""
    if len(pieces) == 1:
        return pieces[0]
    return {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}


def eval_batches(dataset: Split, batch_size: int, num_batches: int | None = None
                 ) -> Iterator[Batch]:
    """Every example exactly once, in order; the last batch is padded up to batch_size, and
    batches of padding follow up to `num_batches` (so that every data shard gives as many).

    Each batch has "example_weight" [batch] float32: 1 for real rows, 0 for padding rows.
    """
    if isinstance(dataset, StreamExamples):
        batches = _stacked_runs(dataset.reader(), batch_size)
    else:
        dataset = dataset.with_format("numpy")
        batches = (
            dataset[start : start + batch_size] for start in range(0, len(dataset), batch_size)
        )
    produced, last = 0, None
    for batch in batches:
        produced += 1
        last = _padded(_int32(batch), batch_size)
        yield last
    if last is None:
        raise UserError("the validation split holds no example")
    for _ in range(produced, num_batches or 0):
        yield {key: np.zeros_like(value) for key, value in last.items()}


def eval_batch_count(shards: list[Split], rows_per_shard: int) -> int:
    """Eval batches in the run: those of its largest data shard (every process's shards)."""
    lengths = every_process([_length(shard) for shard in shards])
    return max(-(-n // rows_per_shard) for process in lengths for n in process)


def _length(split: Dataset | StreamExamples) -> int:
    if isinstance(split, Dataset):
        return len(split)
    return sum(1 for _ in split.reader())


def _stacked_runs(examples: Iterator[Batch], size: int) -> Iterator[Batch]:
    """Batches of `size` examples (the last one shorter)."""
    while rows := list(itertools.islice(examples, size)):
        yield {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def run_position(state: dict[str, Any]) -> dict[str, Any]:
    """The data position of the whole run from this process's `TrainBatches.state()`: a
    map-style position is every process's; stream shards' positions come from their processes."""
    if "shards" not in state:
        return state
    encoded = {
        shard: {
            **position,
            "buffer": encode_examples(position["buffer"]),
            "stream": position["stream"] and {
                **position["stream"], "pending": encode_examples(position["stream"]["pending"])
            },
        }
        for shard, position in state["shards"].items()
    }
    return {"shards": {k: v for each in every_process(encoded) for k, v in each.items()}}


def _padded(batch: Batch, batch_size: int) -> Batch:
    rows = _num_rows(batch)
    padding = batch_size - rows
    padded = {
        key: np.pad(value, [(0, padding)] + [(0, 0)] * (value.ndim - 1))
        for key, value in batch.items()
    }
    padded["example_weight"] = (np.arange(batch_size) < rows).astype(np.float32)
    return padded


def total_train_steps(cfg: TrainConfig, batches: TrainBatches) -> int:
    """--max_steps, or the steps of --num_train_epochs over `batches`."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    total = math.floor(batches.steps_per_epoch * cfg.num_train_epochs)
    if total == 0:
        raise UserError(
            f"{cfg.num_train_epochs} epochs of {batches.steps_per_epoch} steps is no step: "
            "raise --num_train_epochs or give --max_steps"
        )
    return total

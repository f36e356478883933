"""Streamed splits, tokenized and cut into examples as they are read, and their exact, small
positions."""

from __future__ import annotations

import base64
import collections
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import IterableDataset

from flax_lm.train.data.packing import cut_into_blocks

Batch = dict[str, np.ndarray]

STREAM_CHUNK_DOCUMENTS = 64  # streaming: documents tokenized at a time


class StreamExamples:
    """A streamed split, tokenized and cut into examples as it is read, whose position is exact
    and small: the document stream's own (datasets' `state_dict()`), the tokens read but not yet
    cut into a block (fewer than one block) and the examples made but not yet handed out (those
    of at most STREAM_CHUNK_DOCUMENTS documents). Resuming from it tokenizes no document twice.

    Documents are cut into blocks as one token stream (no remainder dropped but the last).
    """

    def __init__(
        self,
        documents: IterableDataset,
        tokenize: Callable,
        fn_kwargs: dict[str, Any],
        block_size: int | None,  # None: the tokenizer makes whole examples (line_by_line)
        special_ids: list[int] | None,
        limit: int | None = None,  # examples a pass stops after (max_*_samples)
    ):
        self.documents = documents
        self.tokenize, self.fn_kwargs = tokenize, fn_kwargs
        self.block_size, self.special_ids = block_size, special_ids
        self.limit = limit

    def reader(self, position: dict[str, Any] | None = None) -> StreamReader:
        """Examples from `position` (a StreamReader.position()), or from the start."""
        return StreamReader(self, position)

    def examples_of(self, texts: list[str], carry: np.ndarray) -> tuple[list[Batch], np.ndarray]:
        """(the examples of `texts`, the tokens left over) after the tokens `carry`."""
        tokens = self.tokenize({"text": texts}, **self.fn_kwargs)
        if self.block_size is None:
            return _rows({key: np.asarray(value, np.int32) for key, value in tokens.items()}), carry
        blocks, carry = cut_into_blocks(
            tokens["input_ids"], carry, self.block_size, self.special_ids
        )
        return _rows(blocks), carry


class StreamReader:
    """One pass over a StreamExamples from a position; `position()` is valid between examples."""

    def __init__(self, stream: StreamExamples, position: dict[str, Any] | None):
        self.stream = stream
        position = position or {"documents": None, "carry": [], "pending": None, "handed": 0}
        stream.documents.load_state_dict(position["documents"])  # None: from the start
        self._documents = iter(stream.documents)
        self._state = position["documents"]
        self._carry = np.asarray(position["carry"], np.int32)
        self._pending = collections.deque(decode_examples(position["pending"]))
        self._handed = position["handed"]

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> Batch:
        if self._handed == self.stream.limit:
            raise StopIteration
        while not self._pending:
            texts = [doc["text"] for doc in itertools.islice(self._documents, STREAM_CHUNK_DOCUMENTS)]
            if not texts:
                raise StopIteration
            self._state = self.stream.documents.state_dict()
            examples, self._carry = self.stream.examples_of(texts, self._carry)
            self._pending.extend(examples)
        self._handed += 1
        return self._pending.popleft()

    def position(self) -> dict[str, Any]:
        """Where the next example comes from (its "pending" examples still as arrays)."""
        return {"documents": self._state, "carry": self._carry.tolist(),
                "pending": list(self._pending), "handed": self._handed}


def _rows(columns: dict[str, np.ndarray]) -> list[Batch]:
    n = len(next(iter(columns.values())))
    return [{key: value[i] for key, value in columns.items()} for i in range(n)]


def encode_examples(examples: list[Batch] | dict | None) -> dict[str, Any] | None:
    """Examples (dicts of equal-length int32 rows) as JSON: each column's rows stacked, in base64."""
    if not isinstance(examples, list):
        return examples  # already encoded, or nothing
    if not examples:
        return {"rows": 0}
    encoded = {"rows": len(examples)}
    for key in examples[0]:
        stacked = np.stack([example[key] for example in examples]).astype("<i4")
        encoded[key] = {"shape": list(stacked.shape),
                        "int32": base64.b64encode(stacked.tobytes()).decode("ascii")}
    return encoded


def decode_examples(encoded: dict[str, Any] | list | None) -> list[Batch]:
    if encoded is None:
        return []
    if isinstance(encoded, list):
        return encoded
    columns = {
        key: np.frombuffer(base64.b64decode(value["int32"]), "<i4").reshape(value["shape"])
        for key, value in encoded.items() if key != "rows"
    }
    return _rows(columns) if columns else []

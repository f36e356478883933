"""Training data: raw text splits -> token blocks -> shuffled, resumable global batches.

Map-style datasets are tokenized with `datasets.map` (in parallel, cached next to the data, so a
second run starts at once); streaming datasets are tokenized lazily while they are read. Every
array of a batch is int32 [batch, seq].

With several processes each one reads only its share: the documents are split into
`num_shards` data shards (a number fixed by the run, not by the process count), each shard is
tokenized and cut into blocks on its own, and every global batch takes an equal slice of rows from
each shard, shard after shard. A process owning shards S tokenizes, shuffles and batches only
them, and one process owning every shard makes the very same global batches.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from datasets import Dataset, Features, IterableDataset, List, Value
from datasets.distributed import split_dataset_by_node
from jax.experimental import multihost_utils

from flax_lm.corpus import hub_dataset_options, hub_split_names, load_text_dataset
from flax_lm.errors import UserError

Split = Dataset | IterableDataset
Batch = dict[str, np.ndarray]

KEYWORD_SAMPLE_DOCUMENTS = 1_000  # streaming: documents read to report what filter_keywords keeps
PACK_DOCUMENTS = 1_000  # map-style: documents tokenized and cut into blocks together
STREAM_CHUNK_DOCUMENTS = 64  # streaming: documents tokenized at a time
SHUFFLE_BUFFER = 10_000  # streaming: examples in the shuffle buffers (of all data shards)


# ---------------------------------------------------------------------------- raw text splits


def load_raw_splits(cfg) -> dict[str, Split]:
    """{"train", "validation"} documents with one "text" column, split as HF's run_*_flax do.

    Train comes from `train_file` or `dataset_name`. Validation comes from `validation_file`, else
    the hub dataset's "validation" split, else the first `validation_split_percentage` % of train
    (streaming: the first `max_eval_samples` documents). `filter_keywords` applies before that
    split. A split the run does not use (cfg.do_train / cfg.do_eval false) is left out.
    (`max_*_samples` count examples, as in HF's run_clm.py: `tokenize_splits` applies them.)
    """
    if cfg.dataset_name and cfg.train_file:
        raise UserError("give --dataset_name or --train_file, not both")
    train = _load_train(cfg)
    validation = _load_validation(cfg)
    if validation is None:
        if train is None:
            raise UserError("no data: give --dataset_name or --train_file")
        train, validation = _hold_out_validation(train, cfg)
    splits = {}
    if getattr(cfg, "do_train", True):
        if train is None:
            raise UserError("training needs --train_file or --dataset_name")
        splits["train"] = train
    if getattr(cfg, "do_eval", True):
        splits["validation"] = validation
        if isinstance(splits["validation"], Dataset) and len(splits["validation"]) == 0:
            raise UserError(
                "the validation split is empty: give --validation_file, more text or a larger "
                f"--validation_split_percentage (now {cfg.validation_split_percentage})"
            )
    return splits


def _load(cfg, split: str, data_files: list[str] | None, name: str) -> Split:
    """A split from local files or the hub, filtered by cfg.filter_keywords."""
    documents = load_text_dataset(
        dataset_name=None if data_files else cfg.dataset_name,
        dataset_config_name=None if data_files else cfg.dataset_config_name,
        split=split,
        data_files=data_files or None,
        text_column=cfg.text_column,
        streaming=cfg.streaming,
        cache_dir=cfg.cache_dir,
        keep_linebreaks=cfg.keep_linebreaks,
        token=cfg.token,
        revision=cfg.dataset_revision,
        num_proc=cfg.preprocessing_num_workers,
    )
    return _keep_documents_with_keywords(documents, cfg, name)


def _load_train(cfg) -> Split | None:
    if not (cfg.train_file or cfg.dataset_name):
        return None
    return _load(cfg, "train", cfg.train_file, "train")


def _load_validation(cfg) -> Split | None:
    if cfg.validation_file:
        return _load(cfg, "train", cfg.validation_file, "validation")
    if cfg.dataset_name and _hub_has_validation_split(cfg):
        return _load(cfg, "validation", None, "validation")
    return None


def _hub_has_validation_split(cfg) -> bool:
    options = hub_dataset_options(cfg.dataset_config_name, cfg.dataset_revision)
    return "validation" in hub_split_names(cfg.dataset_name, options, cfg.token)


def _hold_out_validation(train: Split, cfg) -> tuple[Split, Split]:
    """(rest, validation): validation is the head of train, like HF's train[:p%] / train[p%:]."""
    if isinstance(train, IterableDataset):
        if not cfg.max_eval_samples:
            raise UserError(
                "a streamed dataset without a validation split needs --validation_file or "
                "--max_eval_samples (that many leading documents are held out for evaluation)"
            )
        return train.skip(cfg.max_eval_samples), train.take(cfg.max_eval_samples)
    held_out = round(cfg.validation_split_percentage * len(train) / 100)  # HF's "closest" rounding
    return train.select(range(held_out, len(train))), train.select(range(held_out))


def _first(split: Dataset, n: int | None) -> Dataset:
    if n is None:
        return split
    return split.select(range(min(n, len(split))))


def _contains_any_keyword(batch: dict[str, list], keywords: tuple[str, ...]) -> list[bool]:
    return [any(keyword in text for keyword in keywords) for text in batch["text"]]


def _keep_documents_with_keywords(split: Split, cfg, name: str) -> Split:
    """Only the documents containing any of `cfg.filter_keywords`; prints the fraction kept."""
    if not cfg.filter_keywords:
        return split
    keywords = tuple(cfg.filter_keywords)
    kept = _map(split, cfg, _contains_any_keyword, fn_kwargs={"keywords": keywords}, keep_rows=True)
    if isinstance(split, Dataset):
        seen, matched = len(split), len(kept)
        scope = f"{seen} {name} documents"
    else:  # a stream has no length: report the head of it
        head = list(
            itertools.chain.from_iterable(
                _contains_any_keyword(batch, keywords)
                for batch in split.take(KEYWORD_SAMPLE_DOCUMENTS).iter(batch_size=256)
            )
        )
        seen, matched = len(head), sum(head)
        scope = f"the first {seen} {name} documents"
    print(f"filter_keywords: kept {matched} of {scope} ({100 * matched / max(seen, 1):.1f}%)")
    return kept


def _map(split: Split, cfg, function: Callable, *, keep_rows: bool = False, **kwargs) -> Split:
    """Batched `map` (`filter` with keep_rows): parallel and cached for a Dataset, lazy for a
    stream."""
    if isinstance(split, Dataset):
        kwargs.update(
            num_proc=cfg.preprocessing_num_workers,
            load_from_cache_file=not cfg.overwrite_cache,
        )
    else:
        kwargs.pop("desc", None)
    apply = split.filter if keep_rows else split.map
    return apply(function, batched=True, **kwargs)


# -------------------------------------------------------------------------------- data shards


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


# ------------------------------------------------------------------------------- tokenization


def tokenize_splits(
    raw: dict[str, Split], tokenizer, cfg, objective: str, *, num_shards: int = 1
) -> dict[str, Split]:
    """Token examples per split, fixed length (block_size for CLM, max_seq_length for MLM).

    The pipeline, not the tokenizer, places the special tokens. CLM: "input_ids" blocks cut from
    the concatenated documents (with add_eos_between_documents, each followed by eos). MLM:
    "input_ids" and "special_tokens_mask" blocks of documents encoded as `<s> ... </s>`, or with
    line_by_line one `<s> line </s>` example per non-empty line, truncated and always padded to
    max_seq_length, so shapes stay static ("input_ids", "attention_mask", "special_tokens_mask").
    A map-style split is tokenized and cut in runs of PACK_DOCUMENTS documents, each by one of
    `preprocessing_num_workers` processes and written to the cache as it goes (memory does not
    grow with the corpus), each run dropping its remainder as HF's group_texts does; a stream is
    tokenized as it is read and cut as one token stream (`StreamExamples`).
    Then train keeps its first `max_train_samples` examples and validation its first
    `max_eval_samples`, as HF's run_clm.py / run_mlm.py cut them after grouping (each of
    `num_shards` data shards its first 1/num_shards of them).
    """
    if objective not in ("clm", "mlm"):
        raise ValueError(f"unknown objective {objective!r}")
    line_by_line = objective == "mlm" and bool(cfg.line_by_line)
    length, flag = (
        (cfg.block_size, "block_size")
        if objective == "clm"
        else (cfg.max_seq_length, "max_seq_length")
    )
    if line_by_line:
        tokenize, fn_kwargs = _tokenize_lines, _line_kwargs(tokenizer, length)
        columns = ["input_ids", "attention_mask", "special_tokens_mask"]
    else:
        tokenize, fn_kwargs = _tokenize_documents, _document_kwargs(tokenizer, cfg, objective)
        columns = ["input_ids"]
    special_ids = list(tokenizer.all_special_ids) if objective == "mlm" else None
    splits = {}
    for name, split in raw.items():
        limit = cfg.max_train_samples if name == "train" else cfg.max_eval_samples
        limit = limit and max(1, limit // num_shards)
        if isinstance(split, IterableDataset):
            block_size = None if line_by_line else length
            splits[name] = StreamExamples(
                split, tokenize, fn_kwargs, block_size, special_ids, limit=limit
            )
            continue
        if line_by_line:
            function, kwargs = tokenize, fn_kwargs
        else:
            function = _document_blocks
            kwargs = {"tokenize": tokenize, "fn_kwargs": fn_kwargs, "block_size": length,
                      "special_ids": special_ids}  # fmt: skip
        examples = _map(
            split,
            cfg,
            function,
            fn_kwargs=kwargs,
            remove_columns=["text"],
            features=_example_features(columns, length, special_ids),
            batch_size=PACK_DOCUMENTS,
            desc=f"tokenizing {name}" + ("" if line_by_line else f" into blocks of {length}"),
        )
        if len(examples) == 0:
            raise UserError(_too_small_message(name, split, length, flag, line_by_line, kwargs))
        splits[name] = _first(examples, limit)
    return splits


def _document_markers(tokenizer) -> tuple[int, int]:
    """The ids that open and close an MLM document: <s> and </s> (bos/eos, else cls/sep)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if start is None or end is None:
        raise UserError("MLM needs a tokenizer with <s> and </s> (bos/eos or cls/sep) tokens")
    return start, end


def _document_kwargs(tokenizer, cfg, objective: str) -> dict[str, Any]:
    if objective == "mlm":
        start, end = _document_markers(tokenizer)
        return {"tokenizer": tokenizer, "prefix": [start], "suffix": [end]}
    if not cfg.add_eos_between_documents:
        return {"tokenizer": tokenizer, "prefix": [], "suffix": []}
    if tokenizer.eos_token_id is None:
        raise UserError("add_eos_between_documents needs a tokenizer with an eos token")
    return {"tokenizer": tokenizer, "prefix": [], "suffix": [tokenizer.eos_token_id]}


def _line_kwargs(tokenizer, max_length: int) -> dict[str, Any]:
    start, end = _document_markers(tokenizer)
    if tokenizer.pad_token_id is None:
        raise UserError("line_by_line needs a tokenizer with a pad token")
    if max_length < 3:
        raise UserError(
            f"line_by_line needs max_seq_length >= 3 (<s>, a token, </s>), got {max_length}"
        )
    return {
        "tokenizer": tokenizer,
        "start": start,
        "end": end,
        "pad": tokenizer.pad_token_id,
        "special_ids": list(tokenizer.all_special_ids),
        "max_length": max_length,
    }


def _encode(tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's own special tokens."""
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, verbose=False, **kwargs
    )["input_ids"]


def _tokenize_documents(
    batch: dict[str, list], tokenizer, prefix: list[int], suffix: list[int]
) -> dict[str, list]:
    return {"input_ids": [prefix + ids + suffix for ids in _encode(tokenizer, batch["text"])]}


def _tokenize_lines(
    batch: dict[str, list],
    tokenizer,
    start: int,
    end: int,
    pad: int,
    special_ids: list[int],
    max_length: int,
) -> dict[str, np.ndarray]:
    """Every non-empty line as `<s> line </s>`, truncated and padded to max_length: static
    shapes, so the train step compiles once."""
    lines = [line for text in batch["text"] for line in text.splitlines() if line.strip()]
    encoded = _encode(tokenizer, lines, truncation=True, max_length=max_length - 2)
    input_ids = np.full((len(lines), max_length), pad, dtype=np.int32)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids) + 2] = [start, *ids, end]
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int32).reshape(-1, 1)
    return {
        "input_ids": input_ids,
        "attention_mask": (np.arange(max_length) < lengths).astype(np.int32),
        "special_tokens_mask": np.isin(input_ids, special_ids).astype(np.int32),
    }


def _cut_into_blocks(
    token_lists: list[list[int]], carry: np.ndarray, block_size: int, special_ids: list[int] | None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(blocks, tokens left over): `carry` and the token lists, concatenated and cut into rows of
    block_size, with their "special_tokens_mask" when special_ids are given."""
    ids = np.concatenate([carry, *(np.asarray(row, np.int32) for row in token_lists)])
    usable = len(ids) // block_size * block_size
    blocks = {"input_ids": ids[:usable].reshape(-1, block_size)}
    if special_ids is not None:
        blocks["special_tokens_mask"] = np.isin(blocks["input_ids"], special_ids).astype(np.int32)
    return blocks, ids[usable:]


def _document_blocks(
    batch: dict[str, list], tokenize: Callable, fn_kwargs: dict[str, Any], block_size: int,
    special_ids: list[int] | None,
) -> dict[str, np.ndarray]:
    """The batch's documents tokenized and cut into blocks (remainder dropped)."""
    token_lists = tokenize(batch, **fn_kwargs)["input_ids"]
    return _cut_into_blocks(token_lists, np.zeros(0, np.int32), block_size, special_ids)[0]


def _example_features(columns: list[str], length: int, special_ids: list[int] | None) -> Features:
    if special_ids is not None and "special_tokens_mask" not in columns:
        columns = [*columns, "special_tokens_mask"]
    return Features({column: List(Value("int32"), length=length) for column in columns})


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
        blocks, carry = _cut_into_blocks(
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


def _too_small_message(
    name: str, raw: Dataset, length: int, flag: str, line_by_line: bool, kwargs: dict[str, Any]
) -> str:
    characters = sum(len(text) for text in raw["text"])
    if line_by_line:
        return f"the {name} split has no non-empty line ({characters} characters of text)"
    tokens = kwargs["tokenize"]({"text": list(raw["text"])}, **kwargs["fn_kwargs"])["input_ids"]
    return (
        f"the {name} split is too small: {characters} characters of text make "
        f"{sum(map(len, tokens))} tokens, and one block of {flag}={length} needs {length}; add "
        f"text or lower --{flag}"
    )


# ------------------------------------------------------------------------------------ batches


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


# --------------------------------------------------------------------------------- prefetching

_ITEM, _END, _ERROR = "item", "end", "error"


class Prefetcher:
    """Runs an iterator in a background thread, `size` items ahead, applying `put` (e.g. a
    jax.device_put with a NamedSharding) there, so batch making and host->device copies overlap
    the step. Exceptions in the thread are re-raised in the consumer; close() stops it.

    `wait_seconds` is the time the consumer spent waiting in __next__ (the input stall). When the
    source has a `state()` (TrainBatches), `state()` here is the source's position after the last
    item handed out, which is what a checkpoint must store (the source itself runs ahead).
    """

    def __init__(self, iterator: Iterable, size: int = 2, put: Callable | None = None):
        self._source_state = getattr(iterator, "state", None)
        self._state = self._source_state() if self._source_state else None
        self._source = iter(iterator)
        self._put = put
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="prefetcher", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                state = self._source_state() if self._source_state else None
                if self._put is not None:
                    item = self._put(item)
                if not self._offer((_ITEM, item, state)):
                    return
        except BaseException as err:  # re-raised in the consumer
            self._offer((_ERROR, err, None))
            return
        self._offer((_END, None, None))

    def _offer(self, entry: tuple) -> bool:
        """Queue `entry` unless close() is called meanwhile; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def state(self) -> dict[str, int] | None:
        return self._state

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        started = time.perf_counter()
        kind, value, state = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if kind == _ITEM:
            self._state = state
            return value
        self._finished = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread; items already made are dropped."""
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

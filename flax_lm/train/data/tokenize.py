"""Tokenization: raw documents -> fixed-length token examples (blocks or padded lines)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets

from flax_lm.corpus import first_examples
from flax_lm.errors import UserError
from flax_lm.train.data.packing import document_blocks
from flax_lm.train.data.splits import Split, batched_map
from flax_lm.train.data.stream import StreamExamples

if TYPE_CHECKING:  # the data package follows the training flags; it never imports training
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from flax_lm.train.args import TrainConfig

PACK_DOCUMENTS = 1_000  # map-style: documents tokenized and cut into blocks together
# map-style: runs of PACK_DOCUMENTS in one `map` batch, whose blocks go to the cache as one
# Arrow record batch of about a megabyte: opening the cache then reads one message header per
# megabyte, not one every few kilobytes (each maps the pages around it into the process)
RUNS_PER_BATCH = 16
# map-style with workers: text each worker reads in one `map` of a piece of the split. A worker
# reads its rows through a memory map of the text cache, and every page it reads stays in that
# map until the worker ends; ending the workers after each piece keeps those pages bounded
TEXT_BYTES_PER_WORKER = 32 << 20


def tokenize_splits(
    raw: dict[str, Split], tokenizer, cfg, objective: str, *, num_shards: int = 1
) -> dict[str, Split]:
    """Token examples per split, fixed length (block_size for CLM, max_seq_length for MLM).

    The pipeline, not the tokenizer, places the special tokens. CLM: "input_ids" blocks cut from
    the concatenated documents (with add_eos_between_documents, each followed by eos). MLM:
    "input_ids" and "special_tokens_mask" blocks of documents encoded as `<s> ... </s>`, or with
    line_by_line one `<s> line </s>` example per non-empty line, truncated and always padded to
    max_seq_length, so shapes stay static ("input_ids", "attention_mask", "special_tokens_mask").
    A map-style split is tokenized and cut in runs of PACK_DOCUMENTS documents from its first
    one (RUNS_PER_BATCH runs at a time), each run dropping its remainder as HF's group_texts does,
    the same runs with any number of `preprocessing_num_workers`; the workers take a piece of the
    split at a time (`_pieces`) and write their blocks to the cache as they go, so memory does
    not grow with the corpus. A stream is tokenized as it is read and cut as one token stream
    (`StreamExamples`).
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
            function, kwargs, batch_size = tokenize, fn_kwargs, PACK_DOCUMENTS
        else:
            function, batch_size = document_blocks, PACK_DOCUMENTS * RUNS_PER_BATCH
            kwargs = {"tokenize": tokenize, "fn_kwargs": fn_kwargs, "block_size": length,
                      "special_ids": special_ids, "run_documents": PACK_DOCUMENTS}  # fmt: skip
        desc = f"tokenizing {name}" + ("" if line_by_line else f" into blocks of {length}")
        run = 1 if line_by_line else PACK_DOCUMENTS
        pieces = _pieces(split, cfg.preprocessing_num_workers, run)
        examples = concatenate_datasets([
            batched_map(
                split.select(rows) if len(pieces) > 1 else split,
                cfg,
                function,
                num_proc=workers,
                fn_kwargs=kwargs,
                remove_columns=["text"],
                features=_example_features(columns, length, special_ids),
                batch_size=batch_size,
                desc=desc + (f" ({index + 1}/{len(pieces)})" if len(pieces) > 1 else ""),
            )
            for index, (rows, workers) in enumerate(pieces)
        ])  # fmt: skip
        if len(examples) == 0:
            raise UserError(_too_small_message(name, split, length, flag, line_by_line, kwargs))
        splits[name] = first_examples(examples, limit)
    return splits


def _pieces(split: Dataset, workers: int | None, run: int) -> list[tuple[range, int | None]]:
    """(rows, workers) of each `map` that tokenizes the split, one after another.

    Without workers: the whole split in this process. With them: pieces of about
    TEXT_BYTES_PER_WORKER of text per worker, each a multiple of workers * `run` rows so that
    every worker's contiguous share starts on a run boundary, and the last few rows (fewer than
    workers * run) in one worker: the split is cut into runs from its first document whatever
    the number of workers.
    """
    if not workers:
        return [(range(len(split)), None)]
    table = split.data
    row_bytes = max(1.0, table.nbytes / max(1, table.num_rows))
    unit = workers * run
    step = max(1, round(TEXT_BYTES_PER_WORKER * workers / row_bytes / unit)) * unit
    aligned = len(split) // unit * unit
    pieces = [(range(at, min(at + step, aligned)), workers) for at in range(0, aligned, step)]
    if aligned < len(split):
        pieces.append((range(aligned, len(split)), 1))
    return pieces


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


def _example_features(columns: list[str], length: int, special_ids: list[int] | None) -> Features:
    if special_ids is not None and "special_tokens_mask" not in columns:
        columns = [*columns, "special_tokens_mask"]
    return Features({column: List(Value("int32"), length=length) for column in columns})


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


MAX_DEFAULT_LENGTH = 1024  # default block_size / max_seq_length cap, as in HF's scripts


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

"""Cutting token lists into fixed-length blocks (HF's group_texts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def cut_into_blocks(
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


def document_blocks(
    batch: dict[str, list], tokenize: Callable, fn_kwargs: dict[str, Any], block_size: int,
    special_ids: list[int] | None, run_documents: int,
) -> dict[str, np.ndarray]:
    """The batch's documents tokenized and cut into blocks, each run of `run_documents` documents
    on its own (its remainder dropped)."""
    token_lists = tokenize(batch, **fn_kwargs)["input_ids"]
    runs = [
        cut_into_blocks(token_lists[start : start + run_documents], np.zeros(0, np.int32),
                         block_size, special_ids)[0]  # fmt: skip
        for start in range(0, len(token_lists), run_documents)
    ]
    return {key: np.concatenate([run[key] for run in runs]) for key in runs[0]}

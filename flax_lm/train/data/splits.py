"""Raw text splits: train and validation documents from files or the hub, the validation
hold-out, the keyword filter and the sample caps."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from datasets import Dataset, IterableDataset

from flax_lm.corpus import hub_dataset_options, hub_split_names, text_dataset_from_flags
from flax_lm.errors import UserError

Split = Dataset | IterableDataset

KEYWORD_SAMPLE_DOCUMENTS = 1_000  # streaming: documents read to report what filter_keywords keeps


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
    documents = text_dataset_from_flags(
        cfg, split=split, data_files=data_files, keep_linebreaks=cfg.keep_linebreaks,
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


def _contains_any_keyword(batch: dict[str, list], keywords: tuple[str, ...]) -> list[bool]:
    return [any(keyword in text for keyword in keywords) for text in batch["text"]]


def _keep_documents_with_keywords(split: Split, cfg, name: str) -> Split:
    """Only the documents containing any of `cfg.filter_keywords`; prints the fraction kept."""
    if not cfg.filter_keywords:
        return split
    keywords = tuple(cfg.filter_keywords)
    kept = batched_map(
        split, cfg, _contains_any_keyword, fn_kwargs={"keywords": keywords}, keep_rows=True
    )
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


def batched_map(
    split: Split, cfg, function: Callable, *, keep_rows: bool = False, **kwargs
) -> Split:
    """Batched `map` (`filter` with keep_rows): parallel (in `num_proc` processes, by default
    preprocessing_num_workers) and cached for a Dataset, lazy for a stream."""
    if isinstance(split, Dataset):
        kwargs.setdefault("num_proc", cfg.preprocessing_num_workers)
        kwargs.update(load_from_cache_file=not cfg.overwrite_cache)
    else:
        kwargs.pop("desc", None)
        kwargs.pop("num_proc", None)
    apply = split.filter if keep_rows else split.map
    return apply(function, batched=True, **kwargs)

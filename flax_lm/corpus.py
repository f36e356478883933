"""Read a text corpus (local files, directories, globs or a hub dataset) as one "text" column.

Shared by tokenizer training and the training scripts, so every step sees the same documents.
A bad local file is reported by name as a UserError instead of surfacing as a traceback halfway
through a run: the head of each file is checked before `datasets` reads it (empty, binary), and
only when `datasets` fails are the files decoded to name the one that is not UTF-8, so a good
corpus is read once. A stream, read lazily during training, is checked whole beforehand.

Hub datasets that are loading scripts (the original `oscar` among them) no longer load with
`datasets` 4 and later, and flax-lm never runs code from the Hub. They still load from the Hub's
Parquet conversion (`revision="refs/convert/parquet"`, where each config is a folder), or a
Parquet-native corpus replaces them (FineWeb-2's `nob_Latn` for Norwegian); asking for a script
(or for --trust_remote_code) gets one error line naming these routes.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets

from flax_lm.errors import UserError, one_line

# Extension -> loader. Any other extension (source code, .md, ...) is read as one document per file.
LOADER_BY_EXTENSION = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
DOCUMENT_LOADER = "document"
TEXT_LOADERS = ("text", DOCUMENT_LOADER, "json", "csv")  # loaders whose files must be UTF-8 text
READ_CHUNK_BYTES = 1 << 20
# Rows per Arrow record batch in the cache of local files: each chunk a loader reads (datasets'
# text loader's chunk size at most) is written as one record batch instead of one per 1,000 rows, so opening the
# cache reads a message header every chunk, not every few kilobytes (each such read maps the
# pages around it into the process: the whole cache for short lines)
CACHE_BATCH_ROWS = 1_000_000
PARQUET_CONVERSION = "refs/convert/parquet"  # the Hub's Parquet copy of a dataset
SCRIPT_ROUTES = (
    f"its Hub Parquet conversion (--dataset_revision {PARQUET_CONVERSION}), a Parquet corpus "
    "(e.g. --dataset_name HuggingFaceFW/fineweb-2 --dataset_config_name nob_Latn for "
    "Norwegian), or Parquet files made from it with datasets<4 and trust_remote_code, "
    "given as --train_file"
)

Corpus = datasets.Dataset | datasets.IterableDataset


def resolve_data_files(specs: str | Sequence[str]) -> list[str]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list.

    Directories skip hidden entries and __pycache__; empty files found by expanding a directory or
    glob are skipped (they hold no document), while an empty file named explicitly is kept so that
    validation can report it.
    """
    specs = [specs] if isinstance(specs, str | os.PathLike) else list(specs)
    if not specs:
        raise UserError("no data files given")
    files: set[str] = set()
    for spec in specs:
        files.update(_expand_spec(str(spec)))
    return sorted(files)


def _expand_spec(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [str(path.resolve())]
    if path.is_dir():
        found = _files_under(path)
        if not found:
            raise UserError(f"directory {spec!r} holds no non-empty files")
        return found
    if not glob.has_magic(spec):
        raise UserError(f"data file {spec!r} does not exist")
    found = []
    for match in map(Path, glob.glob(os.path.expanduser(spec), recursive=True)):
        if "__pycache__" in match.parts:
            continue
        if match.is_dir():
            found += _files_under(match)
        elif match.is_file() and match.stat().st_size > 0:
            found.append(str(match.resolve()))
    if not found:
        raise UserError(f"{spec!r} matches no non-empty files")
    return found


def _files_under(directory: Path) -> list[str]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            path = Path(root, name)
            if not name.startswith(".") and path.is_file() and path.stat().st_size > 0:
                found.append(str(path.resolve()))
    return found


def loader_for(files: Sequence[str]) -> str:
    """The one loader that reads all `files`; mixing loaders in one corpus is an error."""
    example_by_loader = {_loader(f): Path(f).name for f in files}
    if len(example_by_loader) > 1:
        listed = ", ".join(
            f"{loader} ({name})" for loader, name in sorted(example_by_loader.items())
        )
        raise UserError(f"data files need different loaders, use one kind per corpus: {listed}")
    return next(iter(example_by_loader))


def _loader(path: str) -> str:
    return LOADER_BY_EXTENSION.get(Path(path).suffix.lower(), DOCUMENT_LOADER)


def check_text_file(path: str, whole: bool = True) -> None:
    """UserError unless `path` is a non-empty UTF-8 text file; reads it in chunks (only the
    first one unless `whole`)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                if b"\0" in chunk:
                    raise UserError(f"{path} looks binary (it contains NUL bytes), not text")
                decoder.decode(chunk)
                offset += len(chunk)
                if not whole:
                    break
            decoder.decode(b"", final=whole)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte near offset {offset + err.start})"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    if offset == 0:
        raise UserError(f"{path} is empty")


def load_text_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    data_files: Sequence[str] | None = None,
    text_column: str = "text",
    streaming: bool = False,
    cache_dir: str | None = None,
    keep_linebreaks: bool = True,
    max_samples: int | None = None,
    token: str | None = None,
    revision: str | None = None,
    num_proc: int | None = None,
) -> Corpus:
    """A corpus with exactly one column, "text", from a hub dataset or local files/dirs/globs.

    `split` selects a hub dataset's split; local files form a single split.
    `keep_linebreaks` applies to .txt files, read one line per example as in HF's run_clm_flax.
    With `streaming` nothing is materialised: examples are read lazily as they are iterated.
    `token`: for a gated or private hub dataset (default: HF_TOKEN or `hf auth login`'s).
    `revision`: a hub dataset's branch, tag or commit (`refs/convert/parquet`: its Parquet
    conversion).
    `num_proc`: processes that read local files into `datasets`' cache (one file each at a time).
    """
    if (dataset_name is None) == (data_files is None):
        raise UserError("give either a dataset name or data files, not both or neither")
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"max_samples must be positive, got {max_samples}")
    if dataset_name is not None:
        options = hub_dataset_options(dataset_config_name, revision)
        dataset = _load_hub_dataset(dataset_name, split, streaming, cache_dir, token, options)
    else:
        dataset = _load_local_files(data_files, streaming, cache_dir, keep_linebreaks, num_proc)
    dataset = _only_text_column(dataset, text_column)
    dataset = first_examples(dataset, max_samples)
    _check_has_text(dataset)
    return dataset


def text_dataset_from_flags(
    flags, *, split: str = "train", data_files: Sequence[str] | None = None, **options
) -> Corpus:
    """`load_text_dataset` of the data flags that tokenizer training and the training scripts
    share (dataset_name, dataset_config_name, text_column, streaming, cache_dir, token,
    dataset_revision): the local `data_files` when given, else the flags' hub dataset.
    `options`: load_text_dataset's other arguments."""
    return load_text_dataset(
        dataset_name=None if data_files else flags.dataset_name,
        dataset_config_name=None if data_files else flags.dataset_config_name,
        split=split,
        data_files=data_files or None,
        text_column=flags.text_column,
        streaming=flags.streaming,
        cache_dir=flags.cache_dir,
        token=flags.token,
        revision=flags.dataset_revision,
        **options,
    )


@contextlib.contextmanager
def progress_bars_on_terminal_only():
    """Show datasets' download/caching progress bars only on a terminal.

    Captured or logged stderr stays clean: a failing command prints exactly its one error line.
    """
    hide = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def hub_retry_warnings_silenced():
    """Hide huggingface_hub's warning per retry of an unreachable hub: a failure ends in one
    error line that names the dataset."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def refuse_remote_code(trust_remote_code: bool) -> None:
    """--trust_remote_code (Hugging Face's flag) is refused: a loading script is code from the
    Hub, which flax-lm never runs; the error names what to use instead."""
    if trust_remote_code:
        raise UserError(
            f"--trust_remote_code: flax-lm never runs a dataset's loading script; use {SCRIPT_ROUTES}"
        )


def hub_dataset_options(config_name: str | None, revision: str | None) -> dict:
    """load_dataset's arguments for a hub dataset's config and revision. On the Parquet
    conversion branch a config is a folder (`data_dir`), elsewhere a builder config name."""
    options = {"revision": revision}
    if revision == PARQUET_CONVERSION and config_name:
        return {**options, "name": None, "data_dir": config_name}
    return {**options, "name": config_name}


def hub_dataset_error(name: str, err: Exception) -> UserError:
    """One line for a hub dataset that cannot be read; a loading script names the routes."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Dataset scripts are no longer supported" in reason:
        return UserError(
            f"dataset {name!r} is a loading script, which datasets {datasets.__version__} no "
            f"longer runs: use {SCRIPT_ROUTES}"
        )
    return UserError(f"cannot load dataset {name!r}: {reason}")


def hub_split_names(name: str, options: dict, token: str | None = None) -> list[str]:
    """The split names of a hub dataset's config (UserError as when loading it)."""
    options = dict(options)
    options["config_name"] = options.pop("name")
    try:
        with hub_retry_warnings_silenced():
            return datasets.get_dataset_split_names(name, token=token, **options)
    except Exception as err:  # network or hub trouble, reported like corpus loading errors
        raise hub_dataset_error(name, err) from None


def _load_hub_dataset(name, split, streaming, cache_dir, token, options) -> Corpus:
    try:
        with progress_bars_on_terminal_only(), hub_retry_warnings_silenced():
            return datasets.load_dataset(
                name, split=split, streaming=streaming, cache_dir=cache_dir, token=token,
                **options,
            )
    except Exception as err:  # network, auth, unknown name or config: all user-facing
        raise hub_dataset_error(name, err) from None


def _load_local_files(specs, streaming, cache_dir, keep_linebreaks, num_proc=None) -> Corpus:
    files = resolve_data_files(specs)
    loader = loader_for(files)
    if loader in TEXT_LOADERS:
        for path in files:
            check_text_file(path, whole=streaming)
    elif empty := [f for f in files if os.path.getsize(f) == 0]:
        raise UserError(f"{empty[0]} is empty")
    builder, options = {
        "text": ("text", {"keep_linebreaks": keep_linebreaks}),
        DOCUMENT_LOADER: ("text", {"sample_by": "document"}),
    }.get(loader, (loader, {}))
    try:
        with progress_bars_on_terminal_only():
            return datasets.load_dataset(
                builder,
                data_files=files,
                split="train",
                streaming=streaming,
                cache_dir=cache_dir,
                num_proc=None if streaming or len(files) == 1 else num_proc,
                writer_batch_size=CACHE_BATCH_ROWS,
                **options,
            )
    except datasets.exceptions.DatasetGenerationError as err:
        if loader in TEXT_LOADERS:  # name the file that is not UTF-8 text, if one is not
            for path in files:
                check_text_file(path)
        cause = one_line(err.__cause__ or err)
        raise UserError(f"cannot read the {loader} files ({files[0]}, ...): {cause}") from None


def _column_names(dataset: Corpus) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # streaming without known features: peek one example
    if first is None:
        raise UserError("the corpus holds no documents")
    return list(first)


def _only_text_column(dataset: Corpus, column: str) -> Corpus:
    names = _column_names(dataset)
    if column not in names:
        raise UserError(
            f"text column {column!r} not found; the dataset has columns: {', '.join(names)} "
            "(choose one with --text_column)"
        )
    feature = (dataset.features or {}).get(column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"text column {column!r} holds {feature}, not strings")
    dataset = dataset.select_columns([column])
    return dataset if column == "text" else dataset.rename_column(column, "text")


def first_examples(dataset: Corpus, n: int | None) -> Corpus:
    """The first `n` examples of a dataset or a stream (all of them when n is None)."""
    if n is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(n)
    return dataset.select(range(min(n, len(dataset))))


def _check_has_text(dataset: Corpus) -> None:
    """UserError when no document has any non-whitespace text; stops at the first that does."""
    for batch in iter_text_batches(dataset, batch_size=256):
        if any(text and not text.isspace() for text in batch):
            return
    raise UserError("the corpus holds no non-empty documents")


def iter_text_batches(dataset: Corpus, batch_size: int = 1000) -> Iterator[list[str]]:
    """Lists of up to `batch_size` texts, in order, for a Dataset or a streaming IterableDataset."""
    for batch in dataset.iter(batch_size=batch_size):
        yield batch["text"]

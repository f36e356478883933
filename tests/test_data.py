"""The training data pipeline on real text: Python standard library sources."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from flax_lm.errors import UserError
from flax_lm.train.data import batches
from flax_lm.train.data import tokenize as tokenization
from flax_lm.train.data.batches import TrainBatches, eval_batches
from flax_lm.train.data.prefetch import Prefetcher
from flax_lm.train.data.shards import shards_of_process, tokenize_shards
from flax_lm.train.data.splits import load_raw_splits
from flax_lm.train.data.tokenize import tokenize_splits


def make_cfg(**overrides) -> SimpleNamespace:
    """A run config with HF's defaults for every data flag."""
    cfg = dict(
        dataset_name=None,
        dataset_config_name=None,
        train_file=None,
        validation_file=None,
        validation_split_percentage=5,
        max_train_samples=None,
        max_eval_samples=None,
        preprocessing_num_workers=None,
        overwrite_cache=False,
        cache_dir=None,
        keep_linebreaks=True,
        block_size=64,
        max_seq_length=64,
        mlm_probability=0.15,
        pad_to_max_length=False,
        line_by_line=False,
        streaming=False,
        seed=0,
        text_column="text",
        add_eos_between_documents=False,
        filter_keywords=None,
        token=None,
        dataset_revision=None,
        trust_remote_code=False,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="session")
def lines_file(stdlib_dir, tmp_path_factory):
    """A .txt file: one document per line (blank lines included, as HF's text loader reads them)."""
    path = tmp_path_factory.mktemp("lines") / "textwrap.txt"
    path.write_text((stdlib_dir / "textwrap.py").read_text())
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def code_splits(code_corpus):
    """Eight training modules and the validation modules, one document per file."""
    splits = load_raw_splits(
        make_cfg(train_file=[str(code_corpus.train)], validation_file=[str(code_corpus.validation)])
    )
    return {**splits, "train": splits["train"].select(range(8))}


@pytest.fixture(scope="session")
def clm_blocks(code_splits, tokenizer):
    return tokenize_splits(code_splits, tokenizer, make_cfg(block_size=32), "clm")


def encode(tokenizer, texts) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def flat(rows) -> list[int]:
    return [token for row in rows for token in row]


# ------------------------------------------------------------------------------ raw splits


def test_validation_is_the_head_of_train(lines_file):
    texts = lines_file.read_text().splitlines(keepends=True)
    splits = load_raw_splits(make_cfg(train_file=[str(lines_file)], validation_split_percentage=10))
    held_out = round(len(texts) / 10)
    assert list(splits["validation"]["text"]) == texts[:held_out]
    assert list(splits["train"]["text"]) == texts[held_out:]


def test_max_samples_count_blocks_as_hf_run_clm_does(code_corpus, lines_file, tokenizer):
    """--max_train_samples / --max_eval_samples keep the first N blocks, not N documents."""
    files = {"train_file": [str(code_corpus.train)], "validation_file": [str(lines_file)]}
    raw = load_raw_splits(make_cfg(**files))
    assert len(raw["train"]) == len(list(code_corpus.train.iterdir()))  # no document dropped
    everything = tokenize_splits(raw, tokenizer, make_cfg(block_size=32), "clm")
    limited = tokenize_splits(
        raw, tokenizer, make_cfg(block_size=32, max_train_samples=3, max_eval_samples=7), "clm"
    )
    assert len(everything["train"]) > 100 and len(everything["validation"]) > 7
    for name, n in (("train", 3), ("validation", 7)):
        assert list(limited[name]["input_ids"]) == list(everything[name]["input_ids"][:n])


def test_filter_keywords_keeps_matching_documents(code_corpus, capsys):
    texts = [path.read_text() for path in sorted(code_corpus.train.iterdir())]
    expected = [t for t in texts if "socket" in t or "heapq" in t]
    assert 0 < len(expected) < len(texts)
    splits = load_raw_splits(
        make_cfg(
            train_file=[str(code_corpus.train)],
            filter_keywords=["socket", "heapq"],
            validation_split_percentage=20,
        )
    )
    assert list(splits["validation"]["text"]) == expected[:1]  # 20% of what the filter kept
    assert list(splits["train"]["text"]) == expected[1:]
    assert f"kept {len(expected)} of {len(texts)} train documents" in capsys.readouterr().out


def test_filter_keywords_on_a_stream(lines_file, capsys):
    lines = lines_file.read_text().splitlines(keepends=True)
    splits = load_raw_splits(
        make_cfg(
            train_file=[str(lines_file)],
            streaming=True,
            filter_keywords=["def "],
            max_eval_samples=5,
        )
    )
    expected = [line for line in lines if "def " in line]
    assert [row["text"] for row in splits["train"]] == expected[5:]
    assert [row["text"] for row in splits["validation"]] == expected[:5]
    assert (
        f"kept {len(expected)} of the first {len(lines)} train documents" in capsys.readouterr().out
    )


def test_a_named_dataset_with_a_validation_split_uses_it(tmp_path, stdlib_dir):
    (tmp_path / "train.txt").write_text((stdlib_dir / "textwrap.py").read_text())
    (tmp_path / "validation.txt").write_text((stdlib_dir / "shlex.py").read_text())
    splits = load_raw_splits(make_cfg(dataset_name=str(tmp_path)))
    assert list(splits["validation"]["text"]) == (stdlib_dir / "shlex.py").read_text().splitlines()
    assert list(splits["train"]["text"]) == (stdlib_dir / "textwrap.py").read_text().splitlines()


def test_empty_validation_split_is_an_error(code_corpus):
    files = len(list(code_corpus.train.iterdir()))
    assert round(files / 100) == 0  # 1% of the documents rounds to none
    with pytest.raises(UserError, match="validation split is empty"):
        load_raw_splits(
            make_cfg(train_file=[str(code_corpus.train)], validation_split_percentage=1)
        )


def test_evaluation_only_needs_only_a_validation_file(code_corpus):
    cfg = make_cfg(validation_file=[str(code_corpus.validation)], do_train=False)
    splits = load_raw_splits(cfg)
    assert list(splits) == ["validation"]
    assert len(splits["validation"]) == len(list(code_corpus.validation.iterdir()))
    with pytest.raises(UserError, match="training needs --train_file"):
        load_raw_splits(make_cfg(validation_file=[str(code_corpus.validation)]))
    with pytest.raises(UserError, match="not both"):
        load_raw_splits(make_cfg(train_file=[str(code_corpus.train)], dataset_name="wikitext"))


def test_stream_without_validation_needs_max_eval_samples(code_corpus):
    with pytest.raises(UserError, match="max_eval_samples"):
        load_raw_splits(make_cfg(train_file=[str(code_corpus.train)], streaming=True))


# ----------------------------------------------------------------------------- tokenization


def test_clm_blocks_are_the_token_stream_cut_into_blocks(code_splits, clm_blocks, tokenizer):
    for name in ("train", "validation"):
        stream = flat(encode(tokenizer, code_splits[name]["text"]))
        blocks = clm_blocks[name]["input_ids"]
        assert clm_blocks[name].column_names == ["input_ids"]
        assert {len(block) for block in blocks} == {32}
        assert len(blocks) == len(stream) // 32
        assert flat(blocks) == stream[: len(blocks) * 32]


def test_blocks_are_cut_per_run_of_documents_by_any_number_of_workers(
    lines_file, tokenizer, monkeypatch
):
    """A map-style split is tokenized and cut in one pass, in runs of PACK_DOCUMENTS documents
    from its first one (each run's remainder dropped, as HF's group_texts does), whatever the
    number of preprocessing_num_workers: workers take a piece of the split at a time, each a
    multiple of workers * PACK_DOCUMENTS documents, and the last few documents in one worker."""
    monkeypatch.setattr(tokenization, "PACK_DOCUMENTS", 50)
    monkeypatch.setattr(tokenization, "TEXT_BYTES_PER_WORKER", 4_000)
    raw = load_raw_splits(make_cfg(train_file=[str(lines_file)], do_eval=False))
    documents = list(raw["train"]["text"])
    assert len(documents) > 4 * 50 and len(documents) % 100
    pieces = tokenization._pieces(raw["train"], 2, 50)
    assert [row for rows, _ in pieces for row in rows] == list(range(len(documents)))
    assert len(pieces) > 2 and all(len(rows) % 100 == 0 for rows, _ in pieces[:-1])
    assert pieces[-1][1] == 1 and len(pieces[-1][0]) < 100
    expected = []
    for start in range(0, len(documents), 50):
        tokens = flat(encode(tokenizer, documents[start : start + 50]))
        expected += [tokens[i : i + 16] for i in range(0, len(tokens) // 16 * 16, 16)]
    for workers in (2, 3, None):
        cfg = make_cfg(block_size=16, preprocessing_num_workers=workers, overwrite_cache=True)
        blocks = tokenize_splits(raw, tokenizer, cfg, "clm")["train"]
        assert list(blocks["input_ids"]) == expected
        assert len(blocks.cache_files) > (2 if workers else 0)  # several pieces, each cached


def test_packing_is_handed_bounded_batches_and_blocks_stay_on_disk(
    lines_file, tokenizer, monkeypatch
):
    """Preparation memory does not grow with the corpus: packing is handed one batch of
    RUNS_PER_BATCH runs of PACK_DOCUMENTS documents at a time, never the whole split, and the
    blocks are written to the datasets cache (memory-mapped), not kept in memory."""
    monkeypatch.setattr(tokenization, "PACK_DOCUMENTS", 10)
    monkeypatch.setattr(tokenization, "RUNS_PER_BATCH", 3)
    pack, handed = tokenization.document_blocks, []

    def recording(batch, **kwargs):
        handed.append(len(batch["text"]))
        return pack(batch, **kwargs)

    monkeypatch.setattr(tokenization, "document_blocks", recording)
    raw = load_raw_splits(make_cfg(train_file=[str(lines_file)], do_eval=False))
    cfg = make_cfg(block_size=16, overwrite_cache=True)
    blocks = tokenize_splits(raw, tokenizer, cfg, "clm")["train"]
    documents = len(raw["train"])
    assert documents > 10 * 30
    assert max(handed) == 30 and sum(handed) == documents
    assert len(blocks) > 0 and blocks.cache_files
    assert all(Path(cached["filename"]).is_file() for cached in blocks.cache_files)


def test_eos_between_documents(code_splits, tokenizer):
    cfg = make_cfg(block_size=32, add_eos_between_documents=True)
    blocks = tokenize_splits(code_splits, tokenizer, cfg, "clm")["train"]["input_ids"]
    documents = encode(tokenizer, code_splits["train"]["text"])
    stream = flat(document + [tokenizer.eos_token_id] for document in documents)
    assert flat(blocks) == stream[: len(blocks) * 32]
    assert flat(blocks).count(tokenizer.eos_token_id) >= len(documents) - 1


def test_mlm_blocks_are_documents_between_s_and_end_s(code_splits, tokenizer):
    blocks = tokenize_splits(code_splits, tokenizer, make_cfg(max_seq_length=48), "mlm")["train"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = flat([bos] + ids + [eos] for ids in encode(tokenizer, code_splits["train"]["text"]))
    usable = len(blocks) * 48
    assert blocks.column_names == ["input_ids", "special_tokens_mask"]
    assert flat(blocks["input_ids"]) == stream[:usable]
    special = np.isin(stream[:usable], tokenizer.all_special_ids).astype(int).tolist()
    assert flat(blocks["special_tokens_mask"]) == special
    assert sum(special) >= 2 * len(code_splits["train"]) - 1  # every <s> and </s> but the cut one


def test_line_by_line_pads_every_line(lines_file, tokenizer):
    raw = load_raw_splits(make_cfg(train_file=[str(lines_file)], validation_split_percentage=10))
    cfg = make_cfg(max_seq_length=16, line_by_line=True, pad_to_max_length=True)
    dataset = tokenize_splits(raw, tokenizer, cfg, "mlm")["train"]
    assert {str(feature) for feature in dataset.features.values()} == {
        "List(Value('int32'), length=16)"
    }
    examples = dataset.with_format("numpy")[:]
    lines = [line for text in raw["train"]["text"] for line in text.splitlines() if line.strip()]
    assert list(examples) == ["input_ids", "attention_mask", "special_tokens_mask"]
    assert examples["input_ids"].shape == (len(lines), 16)
    pad = tokenizer.pad_token_id
    for row, ids in zip(examples["input_ids"], encode(tokenizer, lines), strict=True):
        line = [tokenizer.bos_token_id] + ids[:14] + [tokenizer.eos_token_id]
        assert row.tolist() == line + [pad] * (16 - len(line))
    assert (examples["input_ids"][examples["attention_mask"] == 0] == pad).all()
    assert (examples["input_ids"][examples["attention_mask"] == 1] != pad).all()
    np.testing.assert_array_equal(
        examples["special_tokens_mask"], np.isin(examples["input_ids"], tokenizer.all_special_ids)
    )


def test_a_stream_is_cut_into_the_same_blocks(lines_file, tokenizer):
    cfg = make_cfg(
        train_file=[str(lines_file)],
        validation_file=[str(lines_file)],
        max_train_samples=400,
        max_eval_samples=40,
        block_size=32,
    )
    expected = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")
    cfg.streaming = True
    streamed = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")
    for name in ("train", "validation"):  # a stream is one token stream too
        streamed_blocks = [row["input_ids"].tolist() for row in streamed[name].reader()]
        assert streamed_blocks == list(expected[name]["input_ids"])


def test_too_small_corpus_says_how_much_text_there_is(tmp_path, tokenizer):
    (tmp_path / "tiny.py").write_text("x = 1\n")
    raw = load_raw_splits(make_cfg(train_file=[str(tmp_path)], validation_file=[str(tmp_path)]))
    with pytest.raises(UserError, match=r"6 characters of text make \d+ tokens.*block_size=64"):
        tokenize_splits(raw, tokenizer, make_cfg(block_size=64), "clm")


def test_tokenized_splits_are_cached(code_splits, tokenizer, clm_blocks):
    again = tokenize_splits(code_splits, tokenizer, make_cfg(block_size=32), "clm")
    assert again["train"].cache_files == clm_blocks["train"].cache_files
    assert again["train"].cache_files


# ----------------------------------------------------------------------------------- batches


def with_row_numbers(dataset):
    """The dataset with a "row" column: its index, so batches can be traced back to rows."""
    return dataset.add_column("row", np.arange(len(dataset)))


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, n))


def test_each_epoch_is_a_fresh_permutation(clm_blocks):
    dataset = with_row_numbers(clm_blocks["train"].select(range(8 * 20 + 5)))
    blocks = dataset.with_format("numpy")[:]["input_ids"]
    batches = TrainBatches(dataset, batch_size=8, seed=3)
    assert batches.steps_per_epoch == 20  # the partial batch is dropped
    epochs = []
    for _ in range(2):
        epoch = take(iter(batches), 20)
        rows = np.concatenate([batch["row"] for batch in epoch])
        assert len(set(rows.tolist())) == len(rows) == 20 * 8
        np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in epoch]), blocks[rows])
        assert all(
            b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (8, 32) for b in epoch
        )
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    assert batches.state() == {"epoch": 2, "batch_in_epoch": 0}


@pytest.mark.parametrize("consumed", [7, 20])  # mid-epoch, end of the first epoch
def test_resume_continues_exactly(clm_blocks, consumed):
    dataset = clm_blocks["train"].select(range(8 * 20 + 5))
    expected = take(iter(TrainBatches(dataset, batch_size=8, seed=1)), 2 * 20 + 3)
    first = TrainBatches(dataset, batch_size=8, seed=1)
    before = take(iter(first), consumed)
    resumed = TrainBatches(dataset, batch_size=8, seed=1)
    resumed.load_state(first.state())
    after = take(iter(resumed), len(expected) - consumed)
    for got, want in zip(before + after, expected, strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def counting_tokenized_documents(monkeypatch) -> dict[str, int]:
    """{"documents": how many documents the pipeline has tokenized} from now on."""
    tokenize, counted = tokenization._tokenize_documents, {"documents": 0}

    def counting(batch, **kwargs):
        counted["documents"] += len(batch["text"])
        return tokenize(batch, **kwargs)

    monkeypatch.setattr(tokenization, "_tokenize_documents", counting)
    return counted


def streamed_lines(lines_file, tokenizer, shards: range) -> TrainBatches:
    """Batches of 8 of the lines of lines_file, streamed, in 2 data shards (`shards` here)."""
    cfg = make_cfg(train_file=[str(lines_file)], streaming=True, max_eval_samples=10,
                   block_size=64, do_eval=False)  # fmt: skip
    streams = tokenize_shards(load_raw_splits(cfg), tokenizer, cfg, "clm", shards, 2)["train"]
    return TrainBatches(streams, 8, seed=4, shard_ids=shards, num_shards=2, shuffle_buffer=40)


@pytest.mark.parametrize("where", ["mid-epoch", "emptying the buffer", "end of epoch"])
def test_a_stream_resumes_from_its_position_without_reading_again(
    lines_file, tokenizer, monkeypatch, where
):
    """A stream in two data shards (every other line each) is checkpointed after some batches
    and resumed with each shard in its own process: the batches go on exactly as without the
    interruption, into later epochs, and no document is tokenized twice (the position holds
    the shuffle buffer, the tokens not yet cut and the blocks not yet handed out)."""
    counted = counting_tokenized_documents(monkeypatch)
    straight = streamed_lines(lines_file, tokenizer, range(2))
    expected, epochs = [], []
    for batch in itertools.islice(iter(straight), 60):
        expected.append(batch)
        epochs.append(straight.state()["shards"]["0"]["epoch"])
    read_straight = counted["documents"]
    epoch_length = epochs.index(1)  # shard 0's batches in its first epoch
    assert 10 < epoch_length < 30
    consumed = {"mid-epoch": 4, "emptying the buffer": epoch_length - 2,
                "end of epoch": epoch_length}[where]  # fmt: skip

    counted["documents"] = 0
    first = streamed_lines(lines_file, tokenizer, range(2))
    before = take(iter(first), consumed)
    saved = json.loads(json.dumps(batches.run_position(first.state())))  # as checkpoints hold it
    assert saved["shards"]["0"]["draining"] == (where != "mid-epoch")
    halves = [streamed_lines(lines_file, tokenizer, range(i, i + 1)) for i in range(2)]
    for half in halves:
        half.load_state(saved)
    pieces = [take(iter(half), len(expected) - consumed) for half in halves]
    after = [batches.concatenated(pair) for pair in zip(*pieces, strict=True)]
    for got, want in zip(before + after, expected, strict=True):
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert counted["documents"] == read_straight


def test_a_streamed_epoch_hands_out_each_block_once_in_a_new_order(lines_file, tokenizer):
    """One shard of a stream over two epochs: every block once per epoch, the same blocks in
    both epochs, shuffled differently."""
    stream = streamed_lines(lines_file, tokenizer, range(1))
    epochs: dict[int, list[tuple]] = {}
    for batch in stream:
        epoch = stream.state()["shards"]["0"]["epoch"]
        if epoch > 1:
            break
        epochs.setdefault(epoch, []).extend(map(tuple, batch["input_ids"].tolist()))
    first, second = epochs[0], epochs[1][: len(epochs[0])]
    assert len(first) > 40 and len(set(first)) == len(first)
    assert len(set(epochs[1])) == len(epochs[1]) and set(epochs[1]) <= set(first)
    assert first != second


def test_each_process_tokenizes_its_half_and_the_batches_are_one_processs(
    code_corpus, tokenizer, monkeypatch
):
    """Two data shards: the process holding shard 0 and the one holding shard 1 each tokenize
    half of the documents (and about half of the tokens), and their rows, side by side, are the
    global batches of one process holding both shards, epoch after epoch."""
    raw = load_raw_splits(make_cfg(train_file=[str(code_corpus.train)], do_eval=False))
    cfg = make_cfg(block_size=32, overwrite_cache=True)  # tokenize again: count the work
    work = {"documents": 0, "tokens": 0}
    tokenize = tokenization._tokenize_documents

    def counting(batch, **kwargs):
        out = tokenize(batch, **kwargs)
        work["documents"] += len(batch["text"])
        work["tokens"] += sum(len(ids) for ids in out["input_ids"])
        return out

    monkeypatch.setattr(tokenization, "_tokenize_documents", counting)
    layouts = (range(0, 2), range(0, 1), range(1, 2))  # one process; two processes
    by_process = []
    for shards in layouts:
        work.update(documents=0, tokens=0)
        train = tokenize_shards(raw, tokenizer, cfg, "clm", shards, num_shards=2)["train"]
        by_process.append((train, dict(work)))
    (_, alone), (_, first), (_, second) = by_process
    documents = len(raw["train"])
    assert alone["documents"] == documents
    assert {first["documents"], second["documents"]} == {documents // 2, documents - documents // 2}
    assert 0.3 < first["tokens"] / alone["tokens"] < 0.7
    assert first["tokens"] + second["tokens"] == alone["tokens"]

    lengths = [len(shard) for shard in by_process[0][0]]
    batches = [
        TrainBatches(train, 8, seed=2, shard_ids=shards, num_shards=2, all_lengths=lengths)
        for (train, _), shards in zip(by_process, layouts, strict=True)
    ]
    steps = 2 * batches[0].steps_per_epoch + 1  # into a third epoch
    assert batches[1].steps_per_epoch == batches[2].steps_per_epoch == batches[0].steps_per_epoch
    for whole, *halves in zip(*(take(iter(b), steps) for b in batches), strict=True):
        assert [half["input_ids"].shape for half in halves] == [(4, 32)] * 2
        np.testing.assert_array_equal(
            np.concatenate([half["input_ids"] for half in halves]), whole["input_ids"]
        )


def test_data_shards_the_processes_cannot_share_are_refused(monkeypatch):
    monkeypatch.setattr("jax.process_count", lambda: 3)
    monkeypatch.setattr("jax.process_index", lambda: 1)
    assert shards_of_process(6) == range(2, 4)
    with pytest.raises(UserError, match=r"--data_shards 4 cannot be split over 3 processes"):
        shards_of_process(4)


def test_fewer_examples_than_one_batch_is_an_error(clm_blocks):
    with pytest.raises(UserError, match="fewer than one batch"):
        TrainBatches(clm_blocks["validation"], batch_size=10_000, seed=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_eval_batches_cover_every_example_once(lines_file, tokenizer, streaming):
    cfg = make_cfg(train_file=[str(lines_file)], validation_file=[str(lines_file)],
                   max_eval_samples=64, block_size=32)  # fmt: skip
    expected = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")["validation"]
    expected = expected.with_format("numpy")[:]["input_ids"]
    cfg.streaming = streaming
    source = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")["validation"]
    assert len(expected) % 10  # a partial last batch to pad
    batches = list(eval_batches(source, batch_size=10, num_batches=len(expected) // 10 + 2))
    assert all(batch["input_ids"].shape == (10, 32) for batch in batches)
    weights = np.concatenate([batch["example_weight"] for batch in batches])
    rows = np.concatenate([batch["input_ids"] for batch in batches])
    assert weights.dtype == np.float32
    assert weights.sum() == len(expected) and (weights[: len(expected)] == 1).all()
    np.testing.assert_array_equal(rows[: len(expected)], expected)
    assert (rows[len(expected) :] == 0).all()


# -------------------------------------------------------------------------------- prefetcher


def test_prefetcher_keeps_order_and_applies_put():
    with Prefetcher(iter(range(20)), size=3, put=lambda x: x * 10) as items:
        assert list(items) == [x * 10 for x in range(20)]


def test_prefetcher_reraises_the_producers_exception():
    def failing():
        yield 1
        yield 2
        raise ValueError("broken shard")

    items = Prefetcher(failing())
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(ValueError, match="broken shard"):
        next(items)
    with pytest.raises(StopIteration):
        next(items)


def test_prefetcher_close_stops_an_endless_producer():
    made = itertools.count()
    items = Prefetcher(made, size=2)
    assert next(items) == 0
    items.close()
    stopped_at = next(made)
    time.sleep(0.2)
    assert next(made) == stopped_at + 1  # nothing advanced it after close()
    assert not any(t.name == "prefetcher" and t.is_alive() for t in threading.enumerate())


def test_prefetcher_counts_the_consumers_wait():
    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    items = Prefetcher(slow(), size=1)
    assert list(items) == [0, 1, 2]
    assert items.wait_seconds >= 0.1


def test_prefetcher_state_is_the_consumers_position(clm_blocks):
    batches = TrainBatches(clm_blocks["train"], batch_size=8, seed=0)
    with Prefetcher(batches, size=4) as items:
        take(items, 3)
        time.sleep(0.1)  # the producer runs ahead meanwhile
        assert batches.state()["batch_in_epoch"] > 3
        assert items.state() == {"epoch": 0, "batch_in_epoch": 3}

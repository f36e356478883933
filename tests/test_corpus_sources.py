"""Corpora as they are published: OSCAR's compressed JSON Lines (text under "content", nested
metadata), gzip'd text, and the same files behind a gs:// URL (the fake bucket), read normally
and streamed, must give the documents, and the token blocks, of the uncompressed local files."""

from __future__ import annotations

import bz2
import gzip
import json
import shutil
from pathlib import Path

import pytest
import zstandard
from conftest import raises_user_error, stdlib_modules, training_fails_cleanly
from test_data import make_cfg

from flax_lm.corpus import load_text_dataset, resolve_data_files
from flax_lm.train.data.splits import load_raw_splits
from flax_lm.train.data.tokenize import tokenize_splits

COMPRESSORS = {
    ".zst": zstandard.ZstdCompressor().compress,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
}


def oscar_record(number: int, text: str) -> dict:
    """A document as OSCAR 23.01 publishes it: the text under "content", WARC headers and
    nested metadata (with nulls where OSCAR has them)."""
    return {
        "content": text,
        "warc_headers": {
            "warc-record-id": f"<urn:uuid:{number:08d}>",
            "warc-date": "2022-11-26T09:45:47Z",
            "content-length": str(len(text.encode())),
            "warc-type": "conversion",
        },
        "metadata": {
            "identification": {"label": "en", "prob": 0.9},
            "harmful_pp": 4.2 + number,
            "tlsh": "tlsh:T1A0",
            "quality_warnings": None if number % 2 else ["short_sentences"],
            "categories": None if number % 3 else ["news"],
            "sentence_identifications": [{"label": "en", "prob": 0.8}, None],
        },
    }


@pytest.fixture(scope="module")
def oscar(tmp_path_factory) -> Path:
    """Two OSCAR-layout shards of stdlib modules, as plain .jsonl in plain/ and compressed in
    zst/, gz/ and bz2/; one module's lines as text.txt and text.txt.gz in lines/."""
    root = tmp_path_factory.mktemp("oscar")
    modules = stdlib_modules()[:12]
    for number, shard in enumerate((modules[:6], modules[6:]), start=1):
        records = [oscar_record(i, module.read_text()) for i, module in enumerate(shard)]
        raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        (root / "plain").mkdir(exist_ok=True)
        (root / "plain" / f"en_meta_part_{number}.jsonl").write_bytes(raw)
        for suffix, compress in COMPRESSORS.items():
            folder = root / suffix.lstrip(".")
            folder.mkdir(exist_ok=True)
            (folder / f"en_meta_part_{number}.jsonl{suffix}").write_bytes(compress(raw))
    (root / "lines").mkdir()
    text = modules[0].read_bytes()
    (root / "lines" / "text.txt").write_bytes(text)
    (root / "lines" / "text.txt.gz").write_bytes(gzip.compress(text))
    return root


def texts(dataset) -> list[str]:
    return [row["text"] for row in dataset]


def load(files, **options):
    return load_text_dataset(data_files=files, **options)


@pytest.mark.parametrize("streaming", [False, True], ids=["normal", "streaming"])
@pytest.mark.parametrize("compression", ["zst", "gz", "bz2"])
def test_oscar_files_read_as_their_uncompressed_documents(oscar, compression, streaming, capsys):
    """The "content" column is taken (the only column of strings; the output says so) and the
    documents are those of the plain JSON Lines, in order."""
    want = texts(load([str(oscar / "plain")]))
    assert len(want) == 12 and all(want)
    capsys.readouterr()
    got = load([str(oscar / compression / "*.jsonl.*")], streaming=streaming)
    assert "'content'" in capsys.readouterr().out
    assert texts(got) == want


def test_gzipped_text_reads_as_its_lines(oscar):
    want = texts(load([str(oscar / "lines" / "text.txt")]))
    assert texts(load([str(oscar / "lines" / "text.txt.gz")])) == want
    assert texts(load([str(oscar / "lines" / "text.txt.gz")], streaming=True)) == want


def test_workers_read_compressed_shards_as_one_process_does(oscar, tmp_path):
    want = texts(load([str(oscar / "plain")]))
    got = load([str(oscar / "zst")], num_proc=2, cache_dir=str(tmp_path / "cache"))
    assert texts(got) == want


@pytest.mark.parametrize("streaming", [False, True], ids=["normal", "streaming"])
def test_a_gs_glob_tokenizes_as_the_local_files_do(oscar, fake_gcs, tokenizer, streaming):
    """gs://bucket/oscar/*.jsonl.zst (the fake bucket), through the training data pipeline:
    the same blocks as the uncompressed local files."""
    shutil.copytree(oscar / "zst", fake_gcs / "bucket" / "oscar")
    assert resolve_data_files(["gs://bucket/oscar/*.jsonl.zst"]) == [
        f"gs://bucket/oscar/en_meta_part_{n}.jsonl.zst" for n in (1, 2)
    ]
    plain = make_cfg(train_file=[str(oscar / "plain")], validation_file=[str(oscar / "plain")],
                     text_column="content", block_size=32)
    want = tokenize_splits(load_raw_splits(plain), tokenizer, plain, "clm")["train"]
    remote = make_cfg(train_file=["gs://bucket/oscar/*.jsonl.zst"],
                      validation_file=["gs://bucket/oscar/"], block_size=32, streaming=streaming,
                      max_train_samples=None if not streaming else len(want))
    got = tokenize_splits(load_raw_splits(remote), tokenizer, remote, "clm")["train"]
    blocks = [list(map(int, row["input_ids"])) for row in (got.reader() if streaming else got)]
    assert len(blocks) > 20
    if streaming:  # one token stream, not cut per run of documents: compare the tokens
        flat_want = [t for row in want["input_ids"] for t in row]
        assert [t for row in blocks for t in row] == flat_want[: len(blocks) * 32]
    else:
        assert blocks == [list(row) for row in want["input_ids"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_remote_paths_that_cannot_be_read_are_one_error(fake_gcs):
    (fake_gcs / "bucket").mkdir()
    with raises_user_error("gs://bucket/none/*.jsonl.zst"):
        resolve_data_files(["gs://bucket/none/*.jsonl.zst"])
    with raises_user_error("gs://bucket/missing.jsonl"):
        resolve_data_files(["gs://bucket/missing.jsonl"])
    with raises_user_error("s3fs"):  # a protocol whose client is not installed here
        resolve_data_files(["s3://bucket/oscar/*.jsonl.zst"])


def test_a_damaged_compressed_file_is_named(tmp_path):
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:30])
    with raises_user_error("cut.jsonl.gz"):
        load([str(tmp_path / "cut.jsonl.gz")])


def test_a_missing_client_stops_training_with_one_line(tmp_path, capsys, tiny_tokenizer_dir):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--config_name", "gpt2",
            "--tokenizer_name", str(tiny_tokenizer_dir),
            "--train_file", "s3://bucket/oscar/*.jsonl.zst", "--do_train"]
    training_fails_cleanly(argv, "clm", capsys, out, "s3://bucket/oscar/*.jsonl.zst")


@pytest.mark.parametrize("streaming", [False, True], ids=["normal", "streaming"])
def test_the_only_column_of_strings_is_taken_and_named(tmp_path, capsys, streaming):
    rows = [{"body": f"import module_{i}", "size": i, "meta": {"lang": "py"}} for i in range(5)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load([str(tmp_path / "rows.jsonl")], streaming=streaming)
    assert texts(got) == [r["body"] for r in rows]
    assert "'body'" in capsys.readouterr().out


def test_workers_read_a_gs_glob_as_one_process_does(oscar, fake_gcs, tmp_path):
    shutil.copytree(oscar / "gz", fake_gcs / "bucket" / "oscar")
    want = texts(load([str(oscar / "plain")]))
    got = load(["gs://bucket/oscar/*.jsonl.gz"], num_proc=2, cache_dir=str(tmp_path / "cache"))
    assert texts(got) == want

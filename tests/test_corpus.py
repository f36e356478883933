"""Reading corpora: file/dir/glob resolution, loaders by extension, validation, streaming."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import datasets
import pytest

from flax_lm.corpus import (
    iter_text_batches,
    load_text_dataset,
    refuse_remote_code,
    resolve_data_files,
)
from flax_lm.errors import UserError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def texts(dataset) -> list[str]:
    return [text for batch in iter_text_batches(dataset, batch_size=64) for text in batch]


@pytest.fixture
def source_tree(tmp_path: Path, stdlib_dir: Path) -> Path:
    """Real modules in nested directories, plus entries that must be skipped."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    for name in ("abc.py", "bisect.py", "colorsys.py"):
        shutil.copyfile(stdlib_dir / name, root / name)
    shutil.copyfile(stdlib_dir / "json" / "decoder.py", root / "pkg" / "decoder.py")
    write(root / "pkg" / "__init__.py", "")  # empty: no document
    write(root / ".hidden" / "secret.py", "x = 1\n")
    write(root / "pkg" / ".notes.py", "y = 2\n")
    write(root / "pkg" / "__pycache__" / "decoder.cpython-311.pyc", b"\0\1binary")
    return root


def test_directory_is_recursive_and_skips_hidden_empty_and_pycache(source_tree: Path):
    found = [Path(f).relative_to(source_tree).as_posix() for f in resolve_data_files(source_tree)]
    assert found == ["abc.py", "bisect.py", "colorsys.py", "pkg/decoder.py"]


def test_files_dirs_and_globs_are_merged_sorted_and_deduplicated(source_tree: Path):
    specs = [str(source_tree / "pkg"), str(source_tree / "abc.py"), f"{source_tree}/**/*.py"]
    found = resolve_data_files(specs)
    assert found == sorted(set(found))
    assert [Path(f).name for f in found] == ["abc.py", "bisect.py", "colorsys.py", "decoder.py"]
    assert resolve_data_files(f"{source_tree}/b*.py") == [str(source_tree / "bisect.py")]
    assert resolve_data_files(f"{source_tree}/**") == resolve_data_files(source_tree)


@pytest.mark.parametrize("spec", ["missing.txt", "nowhere/*.py", "empty_dir"])
def test_spec_matching_nothing_is_named(tmp_path: Path, spec: str):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=spec.replace("*", r"\*")):
        resolve_data_files([str(tmp_path / spec)])


def test_txt_is_read_line_by_line_keeping_linebreaks(tmp_path: Path):
    content = "første linje\n\n  indented line\nlast line without newline"
    path = write(tmp_path / "lines.txt", content)
    kept = texts(load_text_dataset(data_files=[str(path)], cache_dir=str(tmp_path / "cache")))
    assert "".join(kept) == content
    assert kept[0] == "første linje\n"
    stripped = load_text_dataset(
        data_files=[str(path)], keep_linebreaks=False, cache_dir=str(tmp_path / "cache")
    )
    assert texts(stripped) == content.split("\n")


def test_source_files_are_one_document_each(code_corpus, tmp_path: Path):
    files = sorted(code_corpus.validation.iterdir())
    dataset = load_text_dataset(
        data_files=[str(code_corpus.validation)], cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(dataset, datasets.Dataset)
    assert dataset.column_names == ["text"]
    assert texts(dataset) == [f.read_text(encoding="utf-8") for f in files]


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        write(path, "".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        write(path, json.dumps(rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


TABLE_ROWS = [
    {"id": 1, "content": "def f(x):\n    return x + 1\n", "lang": "python"},
    {"id": 2, "content": "Blåbær, æøå: «sitat»", "lang": "no"},
    {"id": 3, "content": "tabs\there, emoji 🎉", "lang": "en"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_tables_keep_only_the_text_column_renamed(tmp_path: Path, suffix: str):
    path = write_table(tmp_path / f"rows{suffix}", TABLE_ROWS)
    dataset = load_text_dataset(
        data_files=[str(path)], text_column="content", cache_dir=str(tmp_path / "cache")
    )
    assert dataset.column_names == ["text"]
    assert texts(dataset) == [row["content"] for row in TABLE_ROWS]


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_column_lists_the_columns(tmp_path: Path, streaming: bool):
    path = write_table(tmp_path / "rows.jsonl", TABLE_ROWS)
    with pytest.raises(UserError, match=r"'body' not found.*columns: id, content, lang"):
        load_text_dataset(
            data_files=[str(path)],
            text_column="body",
            streaming=streaming,
            cache_dir=str(tmp_path / "cache"),
        )


def test_non_string_text_column_is_refused(tmp_path: Path):
    path = write_table(tmp_path / "rows.jsonl", TABLE_ROWS)
    with pytest.raises(UserError, match="'id' holds"):
        load_text_dataset(data_files=[str(path)], text_column="id", cache_dir=str(tmp_path))


def test_mixed_loaders_are_refused(tmp_path: Path):
    lines = write(tmp_path / "a.txt", "a line\n")
    source = write(tmp_path / "b.py", "x = 1\n")
    with pytest.raises(UserError, match=r"different loaders.*document \(b\.py\).*text \(a\.txt\)"):
        load_text_dataset(data_files=[str(lines), str(source)])


BAD_FILES = {
    "empty.txt": (b"", "is empty"),
    "binary.py": (b"import os\n\0\0\0\x01\x02", "NUL bytes"),
    "latin1.txt": ("blåbærsyltetøy\n".encode("latin-1"), "not UTF-8"),
    "utf16.md": ("hei på deg".encode("utf-16"), "not UTF-8|NUL bytes"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_text_files_are_named(tmp_path: Path, name: str):
    content, reason = BAD_FILES[name]
    path = write(tmp_path / name, content)
    good = write(tmp_path / ("good" + path.suffix), "fine text\n")
    with pytest.raises(UserError, match=f"{name}.*({reason})|({reason}).*{name}") as err:
        load_text_dataset(data_files=[str(good), str(path)], cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("loader", ["text", "document"])
def test_a_bad_byte_past_the_checked_head_is_named_after_datasets_fails(
    tmp_path: Path, monkeypatch, loader: str
):
    """Only each file's head is checked before `datasets` reads the corpus (so a good corpus is
    read once); a bad byte further on still ends in one line naming the file and the offset,
    with the workers of preprocessing_num_workers reading the files."""
    monkeypatch.setattr("flax_lm.corpus.READ_CHUNK_BYTES", 16)
    suffix = {"text": ".txt", "document": ".py"}[loader]
    good = write(tmp_path / f"good{suffix}", "fine text\n" * 10)
    bad = write(tmp_path / f"bad{suffix}", b"x = 1\n" * 20 + "bl\u00e5b\u00e6r\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_text_dataset(data_files=[str(good), str(bad)], cache_dir=str(tmp_path / "cache"),
                          num_proc=2)  # fmt: skip
    assert str(err.value) == f"{bad} is not UTF-8 text (bad byte near offset 122)"


@pytest.mark.parametrize("streaming", [False, True])
def test_corpus_without_any_text_is_refused(tmp_path: Path, streaming: bool):
    path = write(tmp_path / "blank.txt", "\n   \n\t\n")
    with pytest.raises(UserError, match="no non-empty documents"):
        load_text_dataset(data_files=[str(path)], streaming=streaming, cache_dir=str(tmp_path))


def test_streaming_reads_lazily_without_writing_arrow_files(code_corpus, tmp_path: Path):
    cache = tmp_path / "cache"
    streamed = load_text_dataset(
        data_files=[str(code_corpus.validation)], streaming=True, cache_dir=str(cache)
    )
    assert isinstance(streamed, datasets.IterableDataset)
    assert not list(cache.rglob("*.arrow"))
    eager = load_text_dataset(data_files=[str(code_corpus.validation)], cache_dir=str(cache))
    assert texts(streamed) == texts(eager)


@pytest.mark.parametrize("streaming", [False, True])
def test_max_samples_keeps_the_first_documents(tmp_path: Path, streaming: bool):
    path = write(tmp_path / "lines.txt", "".join(f"line {i}\n" for i in range(50)))
    dataset = load_text_dataset(
        data_files=[str(path)], streaming=streaming, max_samples=7, cache_dir=str(tmp_path)
    )
    assert texts(dataset) == [f"line {i}\n" for i in range(7)]
    with pytest.raises(UserError, match="max_samples"):
        load_text_dataset(data_files=[str(path)], max_samples=0)


@pytest.mark.parametrize("streaming", [False, True])
def test_iter_text_batches_sizes_and_order(tmp_path: Path, streaming: bool):
    path = write(tmp_path / "lines.txt", "".join(f"{i}\n" for i in range(7)))
    dataset = load_text_dataset(
        data_files=[str(path)], streaming=streaming, cache_dir=str(tmp_path)
    )
    batches = list(iter_text_batches(dataset, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [t for b in batches for t in b] == [f"{i}\n" for i in range(7)]


def test_unreachable_hub_dataset_is_one_line_user_error():
    with pytest.raises(UserError, match="cannot load dataset 'no-such-user/no-such-corpus'") as err:
        load_text_dataset(dataset_name="no-such-user/no-such-corpus")
    assert "\n" not in str(err.value)


def test_exactly_one_source_is_required(tmp_path: Path):
    path = write(tmp_path / "a.txt", "text\n")
    for kwargs in ({}, {"dataset_name": "x", "data_files": [str(path)]}):
        with pytest.raises(UserError, match="either a dataset name or data files"):
            load_text_dataset(**kwargs)


# ---------------------------------------- hub corpora that were loading scripts (OSCAR and kin)


def parquet_documents(path: Path, texts: list[str]) -> None:
    """A Parquet file of documents with OSCAR's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)


def module_paragraphs(stdlib_dir: Path, name: str) -> list[str]:
    return [p for p in (stdlib_dir / name).read_text().split("\n\n") if p.strip()]


def test_the_hubs_parquet_conversion_of_a_script_dataset(tmp_path, stdlib_dir):
    """A repo laid out as the Hub's refs/convert/parquet branch lays out a script dataset (a
    folder per config, partial-train when it was cut at 5 GB): --dataset_revision
    refs/convert/parquet reads the config's folder."""
    from test_data import make_cfg

    from flax_lm.train.data.splits import load_raw_splits

    norwegian, swedish = (module_paragraphs(stdlib_dir, n) for n in ("textwrap.py", "shlex.py"))
    repo = tmp_path / "oscar-corpus" / "oscar"
    parquet_documents(repo / "unshuffled_deduplicated_no" / "partial-train" / "0000.parquet",
                      norwegian[:40])
    parquet_documents(repo / "unshuffled_deduplicated_no" / "partial-train" / "0001.parquet",
                      norwegian[40:])
    parquet_documents(repo / "unshuffled_deduplicated_sv" / "partial-train" / "0000.parquet",
                      swedish)
    corpus = load_text_dataset(dataset_name=str(repo), revision="refs/convert/parquet",
                               dataset_config_name="unshuffled_deduplicated_no")
    assert texts(corpus) == norwegian
    splits = load_raw_splits(make_cfg(dataset_name=str(repo), validation_split_percentage=10,
                                      dataset_config_name="unshuffled_deduplicated_no",
                                      dataset_revision="refs/convert/parquet"))
    held_out = round(len(norwegian) / 10)  # no validation split: the head of train
    assert list(splits["validation"]["text"]) == norwegian[:held_out]
    assert list(splits["train"]["text"]) == norwegian[held_out:]


def test_a_parquet_native_corpus_config_such_as_fineweb2_nob_latn(tmp_path, stdlib_dir):
    """A repo laid out as FineWeb-2 is (README configs naming data/CONFIG/SPLIT/ folders)."""
    norwegian, danish = (module_paragraphs(stdlib_dir, n) for n in ("textwrap.py", "shlex.py"))
    repo = tmp_path / "fineweb-2"
    parquet_documents(repo / "data" / "nob_Latn" / "train" / "000_00000.parquet", norwegian)
    parquet_documents(repo / "data" / "nob_Latn" / "test" / "000_00000.parquet", norwegian[:3])
    parquet_documents(repo / "data" / "dan_Latn" / "train" / "000_00000.parquet", danish)
    configs = "".join(
        f"- config_name: {name}\n  data_files:\n"
        f"  - split: train\n    path: data/{name}/train/*\n"
        f"  - split: test\n    path: data/{name}/test/*\n" for name in ("nob_Latn", "dan_Latn"))
    write(repo / "README.md", f"---\nconfigs:\n{configs}---\n# FineWeb-2 (a test copy)\n")
    assert texts(load_text_dataset(dataset_name=str(repo), dataset_config_name="nob_Latn")) == (
        norwegian)
    streamed = load_text_dataset(dataset_name=str(repo), dataset_config_name="nob_Latn",
                                 streaming=True)
    assert texts(streamed) == norwegian


def test_a_loading_script_dataset_is_one_line_naming_the_routes(tmp_path):
    repo = tmp_path / "oscar"
    write(repo / "oscar.py", "import datasets\n")  # what the original OSCAR repo holds
    with pytest.raises(UserError) as raised:
        load_text_dataset(dataset_name=str(repo), dataset_config_name="unshuffled_deduplicated_no")
    with pytest.raises(UserError) as refused:  # flax-lm never runs code from the Hub
        refuse_remote_code(True)
    for message in (str(raised.value), str(refused.value)):
        assert "\n" not in message and "loading script" in message
        for route in ("--dataset_revision refs/convert/parquet",
                      "--dataset_name HuggingFaceFW/fineweb-2 --dataset_config_name nob_Latn",
                      "datasets<4", "--train_file"):
            assert route in message


def test_commands_asked_for_a_loading_script_print_one_line_and_write_nothing(
        tmp_path, tiny_tokenizer_dir, capsys):
    from flax_lm.commands.train import main as train
    from flax_lm.commands.train_tokenizer import main as train_tokenizer

    repo = tmp_path / "oscar"
    write(repo / "oscar.py", "import datasets\n")
    dataset = ["--dataset_name", str(repo), "--dataset_config_name", "unshuffled_deduplicated_no"]
    commands = [
        lambda out, *extra: train_tokenizer([*dataset, "--output_dir", str(out), *extra]),
        lambda out, *extra: train([*dataset, "--output_dir", str(out), "--config_name", "gpt2",
                                   "--config_overrides", "vocab_size=512", "--tokenizer_name",
                                   str(tiny_tokenizer_dir), *extra], objective="clm"),
    ]
    for number, command in enumerate(commands):
        for extra, expected in (((), f"error: dataset '{repo}' is a loading script"),
                                (("--trust_remote_code",), "error: --trust_remote_code: flax-lm")):
            out = tmp_path / f"out-{number}"
            assert command(out, *extra) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(expected), line
            assert "--dataset_revision refs/convert/parquet" in line and not out.exists()

"""Tokenizer training: special tokens, exact round trips, transformers loading, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from transformers import AutoTokenizer, GPT2Config, RobertaConfig

from flax_lm.commands.train_tokenizer import main
from flax_lm.tokenizer import SPECIAL_TOKENS, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

ROUND_TRIP_TEXTS = [
    "Blåbærsyltetøy på brødskiva. ÆØÅ æøå «sitat» – ferdig!",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇳🇴 end",
    "tabs\tbetween\t\tcolumns\t",
    "def f(x):\n    if x:\n        return x  # two spaces before\n\n\treturn None\n",
    "windows\r\nline\r\nendings\r\n and a lone \r carriage return",
    "  leading and trailing spaces  ",
    "spaces before punctuation , . ! ? and don ' t n't 's",
    "中文文本, العربية, ελληνικά, हिन्दी, e\u0301 combining, \u00a0nbsp, zero\u200bwidth",
    "\x0b\x0c\x1b[31m control characters \x7f",
    "",
    " ",
]


def load(directory: Path):
    return AutoTokenizer.from_pretrained(directory)


def test_special_tokens_have_roberta_ids_and_roles(tiny_tokenizer_dir: Path):
    tokenizer = load(tiny_tokenizer_dir)
    assert len(tokenizer) == 512
    for token_id, (role, token) in enumerate(SPECIAL_TOKENS.items()):
        assert getattr(tokenizer, role) == token
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.clean_up_tokenization_spaces is False


def test_encoding_adds_no_prefix_space_and_no_special_tokens(tiny_tokenizer_dir: Path):
    tokenizer = load(tiny_tokenizer_dir)
    ids = tokenizer("import os")["input_ids"]
    assert min(ids) >= len(SPECIAL_TOKENS)
    assert not tokenizer.convert_ids_to_tokens(ids)[0].startswith("Ġ")  # byte-level space
    assert tokenizer("x")["input_ids"] != tokenizer(" x")["input_ids"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_is_exact(tiny_tokenizer_dir: Path, text: str):
    tokenizer = load(tiny_tokenizer_dir)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    backend = tokenizer.backend_tokenizer
    assert backend.decode(backend.encode(text).ids) == text


def test_round_trip_of_real_source_files(tiny_tokenizer_dir: Path, code_corpus):
    tokenizer = load(tiny_tokenizer_dir)
    documents = [p.read_text(encoding="utf-8") for p in sorted(code_corpus.validation.iterdir())]
    decoded = tokenizer.batch_decode(tokenizer(documents)["input_ids"])
    assert decoded == documents
    tokens = sum(len(ids) for ids in tokenizer(documents)["input_ids"])
    assert tokens < 0.5 * sum(len(d.encode()) for d in documents)  # merges were learned


def test_mask_token_absorbs_the_space_before_it(tiny_tokenizer_dir: Path):
    tokenizer = load(tiny_tokenizer_dir)
    ids = tokenizer("x = <mask>.")["input_ids"]
    assert tokenizer.mask_token_id in ids
    assert (
        ids
        == tokenizer("x =")["input_ids"] + [tokenizer.mask_token_id] + tokenizer(".")["input_ids"]
    )


@pytest.mark.parametrize("config", [GPT2Config(), RobertaConfig()], ids=["gpt2", "roberta"])
def test_model_config_beside_the_tokenizer_changes_nothing(tiny_tokenizer_dir, tmp_path, config):
    beside = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, beside)
    config.save_pretrained(beside)
    plain, with_config = load(tiny_tokenizer_dir), load(beside)
    assert len(with_config) == len(plain) == 512
    assert with_config.all_special_tokens == plain.all_special_tokens
    assert [with_config.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()] == [
        0,
        1,
        2,
        3,
        4,
    ]
    for text in ROUND_TRIP_TEXTS:
        assert with_config(text)["input_ids"] == plain(text)["input_ids"]
        assert with_config.decode(with_config.encode(text)) == text


def test_training_is_deterministic(code_corpus, tmp_path: Path):
    def train(name: str) -> dict:
        texts = (p.read_text(encoding="utf-8") for p in sorted(code_corpus.train.iterdir()))
        return json.loads(
            (train_tokenizer(texts, 300, 2, tmp_path / name) / "tokenizer.json").read_text()
        )

    assert train("a") == train("b")


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_trains_on_a_directory(code_corpus, tmp_path: Path, capsys):
    output, cache = tmp_path / "tok", tmp_path / "cache"
    status, out, _ = run_main(
        capsys, "--train_file", code_corpus.train, "--vocab_size", 400, "--output_dir", output,
        "--cache_dir", cache,
    )  # fmt: skip
    assert status == 0
    documents = len(list(code_corpus.train.iterdir()))
    assert f"trained tokenizer on {documents} documents: vocab size 400" in out
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in output.iterdir()}
    assert len(load(output)) == 400
    assert list(cache.rglob("*.arrow"))  # the training scripts reuse this cache


def test_cli_streams_a_text_column_with_max_samples(tmp_path: Path, capsys):
    rows = [{"id": i, "body": f"def function_{i}(v):\n    return v * {i}\n"} for i in range(40)]
    corpus = tmp_path / "rows.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    status, out, _ = run_main(
        capsys, "--train_file", corpus, "--text_column", "body", "--max_samples", 25, "--streaming",
        "--vocab_size", 300, "--min_frequency", 1, "--output_dir", tmp_path / "tok",
        "--cache_dir", tmp_path / "cache",
    )  # fmt: skip
    assert status == 0
    assert "on 25 documents: vocab size 300" in out
    assert not list((tmp_path / "cache").rglob("*.arrow"))


def test_overwrite_output_dir_replaces_the_tokenizer(code_corpus, tmp_path: Path, capsys):
    output = tmp_path / "tok"
    common = ["--train_file", code_corpus.validation, "--output_dir", output]
    assert run_main(capsys, *common, "--vocab_size", 300)[0] == 0
    assert run_main(capsys, *common, "--vocab_size", 320, "--overwrite_output_dir")[0] == 0
    assert len(load(output)) == 320


def bad_corpora(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "data.py"
    binary.write_bytes(b"x = 1\n\0\0\x01")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("blåbær\n".encode("latin-1"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "text", "lang": "en"}\n')  # two string columns, neither "text"
    return {"empty": empty, "binary": binary, "latin1": latin1, "rows": rows}


ERROR_CASES = {  # flags -> what the one error line must name
    "missing corpus": (["--train_file", "{tmp}/missing.txt"], ("{tmp}/missing.txt", "not exist")),
    "empty file": (["--train_file", "{tmp}/empty.txt"], ("{tmp}/empty.txt", "empty")),
    "binary file": (["--train_file", "{tmp}/data.py"], ("{tmp}/data.py", "binary")),
    "not utf-8": (["--train_file", "{tmp}/latin1.txt"], ("{tmp}/latin1.txt", "UTF-8")),
    "missing column": (["--train_file", "{tmp}/rows.jsonl"], ("'text'", "body")),
    "vocab too small": (
        ["--train_file", "{tmp}/rows.jsonl", "--vocab_size", "260"],
        ("vocab_size 260", "261"),
    ),
    "no source": ([], ("--dataset_name", "--train_file")),
    "two sources": (
        ["--dataset_name", "x", "--train_file", "{tmp}/rows.jsonl"],
        ("--dataset_name", "--train_file"),
    ),
    "unknown flag": (["--vocab-size", "300"], ("'--vocab-size'", "--vocab_size")),
    "hub unreachable": (["--dataset_name", "no-such/corp"], ("dataset", "'no-such/corp'")),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys, case: str):
    bad_corpora(tmp_path)
    flags, names = ERROR_CASES[case]
    output = tmp_path / "out"
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    status, out, err = run_main(capsys, *flags, "--output_dir", str(output))
    assert_one_line_error((status, err), *(name.format(tmp=tmp_path) for name in names))
    assert not output.exists()


def test_non_empty_output_dir_is_left_untouched(tiny_tokenizer_dir: Path, code_corpus, capsys):
    before = {p.name: p.read_bytes() for p in tiny_tokenizer_dir.iterdir()}
    status, _, err = run_main(
        capsys, "--train_file", code_corpus.train, "--output_dir", tiny_tokenizer_dir
    )
    assert_one_line_error((status, err), str(tiny_tokenizer_dir), "--overwrite_output_dir")
    assert {p.name: p.read_bytes() for p in tiny_tokenizer_dir.iterdir()} == before


def test_a_url_output_dir_is_refused(code_corpus, tmp_path: Path, capsys, monkeypatch):
    """train-tokenizer writes a local directory: gs://... is one error line, not a 'gs:' folder."""
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(
        capsys, "--train_file", code_corpus.validation, "--output_dir", "gs://bucket/tok"
    )
    assert_one_line_error((status, err), "--output_dir", "gs://bucket/tok")
    assert list(tmp_path.iterdir()) == []


def test_script_runs_from_any_directory(code_corpus, tmp_path: Path):
    script = REPO / "tokenizer" / "train_tokenizer.py"
    assert os.access(script, os.X_OK)
    command = [script, "--train_file", code_corpus.validation, "--vocab_size", "300"]
    command += ["--output_dir", "tok"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vocab size 300" in done.stdout
    assert len(load(tmp_path / "tok")) == 300
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_line_error(again, "--output_dir tok", "--overwrite_output_dir")


def test_token_reaches_the_hub_dataset(tmp_path: Path, capsys, monkeypatch):
    """--token (a gated corpus such as OSCAR) is what datasets.load_dataset gets."""
    import datasets

    seen = []

    def record(*args, **kwargs):
        seen.append((args[0], kwargs.get("token")))
        raise ConnectionError("no network here")

    monkeypatch.setattr(datasets, "load_dataset", record)
    status, _, err = run_main(capsys, "--dataset_name", "someone/gated", "--token", "hf_abc",
                              "--output_dir", str(tmp_path / "out"))
    assert seen == [("someone/gated", "hf_abc")]
    warning, error = err.strip().splitlines()  # a token on the command line is visible to others
    assert "--token" in warning and "HF_TOKEN" in warning and "hf_abc" not in err
    assert_one_line_error((status, error), "'someone/gated'", "no network here")

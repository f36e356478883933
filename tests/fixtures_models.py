"""Tiny GPT-2 and RoBERTa trained once per session through the real training CLI.

Used by the evaluate, generate, fill-mask and plot tests with `pytest_plugins = ["fixtures_models"]`
(so every module shares the one session-scoped run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

TRAIN_STEPS = 30
SAVE_STEPS = 15  # checkpoints at steps 15 and 30
SEQ_LEN = 64


@dataclass(frozen=True)
class TinyRun:
    """A finished training run: output_dir (exported model, tokenizer, metrics, checkpoints)."""

    output_dir: Path
    validation: Path
    seq_len: int
    flags: tuple[str, ...]  # data flags the run used, for evaluating it the same way


def make_config(model_type: str, tokenizer_dir: Path, overrides: str, out: Path) -> Path:
    from flax_lm.commands.create_config import main as create_config

    argv = [
        "--model_type",
        model_type,
        "--tokenizer_name",
        str(tokenizer_dir),
        "--dropout",
        "0",
        "--config_overrides",
        overrides,
        "--output_dir",
        str(out),
    ]
    assert create_config(argv) == 0
    return out


def train(
    objective: str, config_dir: Path, tokenizer_dir: Path, corpus, out: Path, data_flags: list[str]
) -> Path:
    from flax_lm.commands.train import main as run

    argv = [
        "--output_dir",
        str(out),
        "--config_name",
        str(config_dir),
        "--tokenizer_name",
        str(tokenizer_dir),
        "--train_file",
        str(corpus.train),
        "--validation_file",
        str(corpus.validation),
        *data_flags,
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "5",
        "--max_steps",
        str(TRAIN_STEPS),
        "--logging_steps",
        "5",
        "--eval_steps",
        str(SAVE_STEPS),
        "--save_steps",
        str(SAVE_STEPS),
        "--report_to",
        "none",
        "--seed",
        "7",
    ]
    assert run(argv, objective=objective) == 0
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_run(code_corpus, tiny_tokenizer_dir, tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny_gpt2")
    config = make_config(
        "gpt2", tiny_tokenizer_dir, "n_embd=64,n_layer=2,n_head=4,n_positions=128", root / "config"
    )
    flags = ["--block_size", str(SEQ_LEN), "--add_eos_between_documents"]
    out = train("clm", config, tiny_tokenizer_dir, code_corpus, root / "run", flags)
    return TinyRun(out, code_corpus.validation, SEQ_LEN, tuple(flags))


@pytest.fixture(scope="session")
def tiny_roberta_run(code_corpus, tiny_tokenizer_dir, tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny_roberta")
    overrides = (
        "hidden_size=64,num_hidden_layers=2,num_attention_heads=4,intermediate_size=128,"
        f"max_position_embeddings={SEQ_LEN + 2}"
    )
    config = make_config("roberta", tiny_tokenizer_dir, overrides, root / "config")
    flags = ["--max_seq_length", str(SEQ_LEN)]
    out = train("mlm", config, tiny_tokenizer_dir, code_corpus, root / "run", flags)
    return TinyRun(out, code_corpus.validation, SEQ_LEN, tuple(flags))

"""Bad runs fail before writing: one `error:` line, exit status 2, output_dir untouched."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from conftest import training_fails_cleanly

TINY_GPT2 = "n_embd=32,n_layer=1,n_head=2,n_positions=64,vocab_size=512"
TINY_ROBERTA = (
    "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
    "vocab_size=512,max_position_embeddings=66,pad_token_id=1"
)


@pytest.fixture
def data_flags(code_corpus, tiny_tokenizer_dir) -> list[str]:
    return ["--tokenizer_name", str(tiny_tokenizer_dir), "--train_file", str(code_corpus.train),
            "--validation_file", str(code_corpus.validation), "--max_steps", "2"]  # fmt: skip


def test_output_dir_holding_files_needs_overwrite(tmp_path, data_flags, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run\n")
    argv = ["--output_dir", str(out), "--config_name", "gpt2", "--config_overrides", TINY_GPT2]
    training_fails_cleanly(
        [*argv, *data_flags], "clm", capsys, out, str(out), "--overwrite_output_dir"
    )


@pytest.mark.parametrize(
    ("objective", "flags", "names"),
    [
        ("mlm", ["--config_name", "gpt2"], ("run_mlm_flax.py", "roberta", "gpt2")),
        ("clm", ["--config_name", "roberta-base"], ("run_mlm_flax.py", "roberta")),
        ("clm", ["--model_type", "roberta"], ("run_clm_flax.py", "gpt2", "roberta")),
        ("clm", ["--config_name", "gpt2", "--config_overrides", "n_embd=32,vocab_size=300"],
         ("512", "vocab_size", "300")),
        ("clm", ["--config_name", "gpt2", "--config_overrides", TINY_GPT2, "--block_size", "65"],
         ("--block_size 65", "n_positions")),
        ("mlm", ["--config_name", "roberta-base", "--config_overrides", TINY_ROBERTA,
                 "--max_seq_length", "65"], ("--max_seq_length 65", "max_position_embeddings", "64")),
        ("clm", ["--config_name", "gpt2", "--config_overrides", "n_embdd=3"], ("'n_embdd'",)),
        ("clm", ["--model_name_or_path", "some/model", "--config_overrides", "n_layer=2"],
         ("--config_overrides", "pretrained")),
        ("clm", ["--config_name", "gpt2", "--tokenizer_name", "no/such/tokenizer"],
         ("tokenizer", "'no/such/tokenizer'")),
        ("clm", ["--config_name", "gpt2", "--config_overrides", TINY_GPT2,
                 "--resume_from_checkpoint"], ("checkpoint", "resume")),
    ],
)  # fmt: skip
def test_bad_model_tokenizer_and_lengths(objective, flags, names, tmp_path, data_flags, capsys):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), *data_flags, *flags]  # later flags win (tokenizer_name)
    training_fails_cleanly(argv, objective, capsys, out, *names)


def test_no_tokenizer(tmp_path, code_corpus, capsys):
    out = tmp_path / "out"
    argv = [
        "--output_dir",
        str(out),
        "--model_type",
        "gpt2",
        "--train_file",
        str(code_corpus.train),
    ]
    training_fails_cleanly(argv, "clm", capsys, out, "tokenizer")


def test_resume_refuses_a_checkpoint_of_another_setup(tmp_path, data_flags, capsys):
    """A checkpoint written with another global batch size cannot continue this run exactly."""
    from flax_lm.train import checkpoint
    from flax_lm.train.step import TrainState

    out = tmp_path / "out"
    manager = checkpoint.open_manager(out / "checkpoints")
    state = TrainState(jnp.array(1, jnp.int32), {"w": jnp.ones(3)}, (), jnp.zeros(2, jnp.uint32))
    meta = {"step": 1, "data": {"epoch": 0, "batch_in_epoch": 1}, "objective": "clm",
            "seed": 42, "global_batch_size": 16, "seq_len": 64}  # fmt: skip
    checkpoint.save(manager, state, meta)
    manager.wait_until_finished()
    manager.close()
    argv = ["--output_dir", str(out), "--config_name", "gpt2", "--config_overrides", TINY_GPT2,
            "--block_size", "64", "--per_device_train_batch_size", "8",
            "--resume_from_checkpoint", *data_flags]  # fmt: skip
    training_fails_cleanly(argv, "clm", capsys, out, "global_batch_size 16 -> 8")

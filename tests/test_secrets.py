"""Hub tokens given on the command line stay on the machine: no file a run writes (its output_dir,
TensorBoard, checkpoints, the W&B offline run and W&B's own folders) and nothing it prints holds
them, whether the run trains or fails on bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from test_resume import TINY_MODELS

from flax_lm.commands.train import main
from flax_lm.train.args import SCRIPT_NAMES, mask_secrets, parse_config, secret_flag

TOKENS = {"--hub_token": "hf_HubTokenOfTheSecretsTest0123", "--token": "hf_DataTokenOfTheTest4567"}
ENV_TOKEN = "hf_EnvironmentTokenOfTheTest89"  # HF_TOKEN: W&B must not record the environment
SECRETS = (*TOKENS.values(), ENV_TOKEN)


def token_argv(objective: str, code_corpus, tokenizer_dir: Path, out: Path, *extra: str) -> list:
    """A two-step run, checkpointed, logging to TensorBoard and W&B, given both tokens (one as
    --flag=value)."""
    return [
        "--output_dir", str(out), *TINY_MODELS[objective], "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--max_train_samples", "8", "--do_train",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--save_steps", "2", "--compilation_cache_dir", str(out.parent / "jax-cache"),
        "--hub_token", TOKENS["--hub_token"], f"--token={TOKENS['--token']}",
        "--report_to", "tensorboard", "wandb", *extra,
    ]  # fmt: skip


@pytest.fixture
def command_line(monkeypatch, tmp_path, capfd):
    """Runs the training script in this process as a user starts it (sys.argv is what W&B
    records; HF_TOKEN set too), W&B offline with its folders in tmp_path; returns (exit status,
    stdout, stderr), output written to the file descriptors included."""
    wandb_home = tmp_path / "wandb-home"
    for name, value in {"HF_TOKEN": ENV_TOKEN, "WANDB_MODE": "offline",
                        "WANDB_PROJECT": "flax-lm-tests", "WANDB_DIR": wandb_home / "dir",
                        "WANDB_CACHE_DIR": wandb_home / "cache",
                        "WANDB_CONFIG_DIR": wandb_home / "config",
                        "WANDB_DATA_DIR": wandb_home / "data"}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))

    def run(objective: str, argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", [SCRIPT_NAMES[objective], *argv])
        status = main(argv, objective=objective)
        out, err = capfd.readouterr()
        return status, out, err

    return run


def holding_a_token(root: Path, *outputs: str) -> list[str]:
    """Every file under `root` that holds a token's bytes (a flag's or HF_TOKEN's), and the
    numbers of the `outputs` that hold one."""
    secrets = [token.encode() for token in SECRETS]
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    found = [str(p) for p in files if any(s in p.read_bytes() for s in secrets)]
    return found + [f"output {i}" for i, text in enumerate(outputs)
                    if any(token in text for token in SECRETS)]  # fmt: skip


def command_line_warnings(stderr: str) -> list[str]:
    """The lines saying that a token on the command line is visible to others."""
    return [line for line in stderr.splitlines()
            if all(flag in line for flag in TOKENS) and "HF_TOKEN" in line]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tokens_reach_no_file_and_no_output(objective, command_line, code_corpus,
                                            tiny_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    status, stdout, stderr = command_line(
        objective, token_argv(objective, code_corpus, tiny_tokenizer_dir, out))
    assert status == 0, stderr[-3000:]
    assert holding_a_token(tmp_path, stdout, stderr) == []
    assert len(command_line_warnings(stderr)) == 1
    # the run wrote everywhere a token could have gone, W&B's copy of the command line included
    (wandb_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert b"--token=***" in wandb_file.read_bytes()
    assert any(out.glob("runs/*")) and any(out.glob("checkpoints/2/*"))

    missing = tmp_path / "no-such-file.txt"
    argv = token_argv(objective, code_corpus, tiny_tokenizer_dir, tmp_path / "failed",
                      "--train_file", str(missing))
    status, stdout, stderr = command_line(objective, argv)
    warnings = command_line_warnings(stderr)
    assert len(warnings) == 1
    errors = "\n".join(line for line in stderr.splitlines() if line not in warnings)
    assert_one_line_error((status, errors), str(missing))
    assert holding_a_token(tmp_path, stdout, stderr) == []


def test_mask_secrets_hides_the_value_of_every_token_flag():
    argv = ["--output_dir", "out", "--hub_token", "a", "--token=b", "--my_token", "c",
            "--push_to_hub", "--tokenizer_name", "tok"]  # fmt: skip
    assert mask_secrets(argv) == ["--output_dir", "out", "--hub_token", "***", "--token=***",
                                  "--my_token", "***", "--push_to_hub", "--tokenizer_name", "tok"]
    names = ("hub_token", "token", "tokenizer_name", "output_dir", "use_auth_token")
    assert [secret_flag(name) for name in names] == [True, True, False, False, False]
    # a switch named like a token takes no value: the flag after it is not masked
    assert mask_secrets(["--use_auth_token", "--do_train"]) == ["--use_auth_token", "--do_train"]


def test_a_mistyped_token_flag_and_the_config_show_no_token(capsys):
    token = TOKENS["--hub_token"]
    status = main(["--output_dir", "o", "--train_file", "a.txt", f"--hub_tokn={token}"])
    line = assert_one_line_error((status, capsys.readouterr().err), "'--hub_tokn'")
    assert token not in line
    cfg = parse_config(["--output_dir", "o", "--train_file", "a.txt", "--hub_token", token,
                        "--print_config"], "clm")
    assert cfg.hub_token == token and token not in repr(cfg)  # a traceback may show a repr

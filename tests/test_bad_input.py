"""Every bad input gets ONE line `error: ...` on stderr and exit status 2, no traceback, and an
existing output directory stays exactly as it was (names, times and contents of its files).
Also: nothing in the package can unpickle or execute what it reads."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flax_lm.errors import UserError
from flax_lm.train.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_MODELS = {
    "clm": {"--config_name": ["gpt2"], "--block_size": ["32"], "--config_overrides": [
        "n_embd=32,n_layer=1,n_head=2,n_positions=64,vocab_size=512,bos_token_id=0,eos_token_id=2"
    ]},
    "mlm": {"--config_name": ["roberta-base"], "--max_seq_length": ["32"], "--config_overrides": [
        "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
        "vocab_size=512,max_position_embeddings=34,pad_token_id=1,bos_token_id=0,eos_token_id=2"
    ]},
}  # fmt: skip
Flags = dict[str, list[str] | None]  # flag -> its values; None leaves the flag out


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `directory`: modification time and content hash (dirs: "dir")."""
    return {
        str(p.relative_to(directory)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
        )
        for p in sorted(directory.rglob("*"))
    }


def fails_cleanly(argv: list[str], objective: str, capsys, output_dir: Path) -> str:
    """Run the CLI in-process; it must fail with one `error:` line, leaving output_dir as it was
    (or absent). Returns that line."""
    before = snapshot(output_dir) if output_dir.exists() else None
    status = main(argv, objective=objective)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2, captured.err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err[-3000:]
    if before is None:
        assert not output_dir.exists(), "a failed run created output_dir"
    else:
        assert snapshot(output_dir) == before, "a failed run changed output_dir"
    return lines[0]


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory) -> dict[str, str]:
    """Paths of broken data files, by name."""
    root = tmp_path_factory.mktemp("bad_files")
    contents = {
        "empty.txt": b"",
        "binary.txt": b"def f():\n    return 1\n\x00\x01\x02",
        "latin1.txt": "caf\xe9 = 'cr\xe8me'\n".encode("latin-1"),
        "binary.json": b"\x80\x04\x95\x00\x00",
        "latin1.jsonl": '{"text": "caf\xe9"}\n'.encode("latin-1"),
        "body.jsonl": b'{"body": "import os"}\n{"body": "import sys"}\n',
        "body.csv": b"body\nimport os\nimport sys\n",
        "tiny.txt": b"x = 1\n",
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    paths = {name.replace(".", "_"): str(root / name) for name in contents}
    return {**paths, "missing": str(root / "no_such_file.txt"), "root": str(root)}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An output_dir holding an earlier run's files."""
    out = tmp_path / "out"
    (out / "checkpoints" / "4" / "meta").mkdir(parents=True)
    (out / "checkpoints" / "4" / "meta" / "metadata").write_text('{"step": 4}')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (out / "model.safetensors").write_bytes(b"earlier weights")
    return out


def valid_flags(objective: str, code_corpus, tokenizer_dir: Path, out: Path) -> Flags:
    """A run that would start: the cases below change what breaks it."""
    return {"--output_dir": [str(out)], "--overwrite_output_dir": [], **TINY_MODELS[objective],
            "--tokenizer_name": [str(tokenizer_dir)], "--train_file": [str(code_corpus.train)],
            "--validation_file": [str(code_corpus.validation)], "--max_steps": ["2"],
            "--report_to": ["none"]}  # fmt: skip


def as_argv(flags: Flags) -> list[str]:
    return [arg for flag, values in flags.items() if values is not None for arg in (flag, *values)]


@pytest.mark.parametrize(
    ("objective", "changes", "expected"),
    [
        ("clm", {"--train_file": ["{missing}"]}, "data file '{missing}' does not exist"),
        ("clm", {"--validation_file": ["{missing}"]}, "data file '{missing}' does not exist"),
        ("clm", {"--train_file": ["{empty_txt}"]}, "{empty_txt} is empty"),
        ("mlm", {"--validation_file": ["{empty_txt}"]}, "{empty_txt} is empty"),
        ("clm", {"--train_file": ["{binary_txt}"]}, "{binary_txt} looks binary (it contains NUL"),
        ("clm", {"--train_file": ["{latin1_txt}"]},
         "{latin1_txt} is not UTF-8 text (bad byte near offset 3)"),
        ("mlm", {"--validation_file": ["{latin1_txt}"]}, "{latin1_txt} is not UTF-8 text"),
        ("clm", {"--train_file": ["{binary_json}"]}, "{binary_json} looks binary"),
        ("clm", {"--validation_file": ["{latin1_jsonl}"]}, "{latin1_jsonl} is not UTF-8 text"),
        ("clm", {"--train_file": ["{body_jsonl}"]},
         "text column 'text' not found; the dataset has columns: body (choose one with"),
        ("mlm", {"--train_file": ["{body_csv}"]}, "text column 'text' not found"),
        ("clm", {"--train_file": ["{tiny_txt}"]},
         "the train split is too small: 6 characters of text make"),
        ("mlm", {"--validation_file": ["{tiny_txt}"]}, "the validation split is too small"),
        ("clm", {"--per_device_train_batch_size": ["100000"]}, "fewer than one batch of 100000"),
        ("clm", {"--streaming": [], "--per_device_train_batch_size": ["100000"]},
         "the training stream holds fewer examples than one batch of 100000"),
        ("clm", {"--validation_file": None, "--validation_split_percentage": ["0"]},
         "the validation split is empty"),
        ("clm", {"--block_size": ["65"]},
         "--block_size 65 is longer than the model allows (n_positions)"),
        ("mlm", {"--max_seq_length": ["33"]},
         "--max_seq_length 33 is longer than the model allows (max_position_embeddings - "
         "pad_token_id - 1 = 32)"),
        ("clm", {"--config_overrides": ["n_embd=32,n_layer=1,n_head=2,vocab_size=300"]},
         "the tokenizer has 512 tokens but the model's vocab_size is 300"),
        ("mlm", {"--config_name": ["gpt2"], "--config_overrides": None},
         "run_mlm_flax.py trains roberta models, but the model is gpt2: use run_clm_flax.py"),
        ("clm", {"--config_name": ["roberta-base"], "--config_overrides": None},
         "run_clm_flax.py trains gpt2 models"),
        ("clm", {"--config_name": ["{missing}"]}, "no config '{missing}'"),
        ("clm", {"--tokenizer_name": ["{root}"]}, "cannot load the tokenizer '{root}'"),
        ("clm", {"--output_dir": ["{tiny_txt}/run"]},
         "--output_dir {tiny_txt}/run cannot be written"),
        ("clm", {"--resume_from_checkpoint": ["{missing}"]}, "no checkpoint to resume from"),
        ("clm", {"--output_dir": ["s3://bucket/run"]},
         "--output_dir s3://bucket/run: s3:// paths cannot be written here"),
        ("clm", {"--output_dir": ["gs://bucket/run"]},
         "--output_dir gs://bucket/run needs Google Cloud Storage support, which is not "
         "installed: pip install 'flax-lm[gcs]'"),
        ("clm", {"--checkpoint_dir": ["gs:///run"]}, "--checkpoint_dir gs:///run names no bucket"),
        ("clm", {"--dataset_name": ["no_such_dataset"], "--train_file": None},
         "cannot load dataset 'no_such_dataset'"),
    ],
)  # fmt: skip
def test_bad_data_model_or_paths(
    objective, changes, expected, bad_files, code_corpus, tiny_tokenizer_dir, earlier_run, capsys
):
    """A valid run with one thing broken, into an output_dir that holds an earlier run."""
    flags = valid_flags(objective, code_corpus, tiny_tokenizer_dir, earlier_run)
    for flag, values in changes.items():
        flags[flag] = None if values is None else [v.format(**bad_files) for v in values]
    message = fails_cleanly(as_argv(flags), objective, capsys, earlier_run)
    assert expected.format(**bad_files) in message


def test_a_tokenizer_without_a_mask_token_cannot_train_mlm(
    code_corpus, tiny_tokenizer_dir, earlier_run, tmp_path, capsys
):
    tokenizer = tmp_path / "no_mask_tokenizer"
    shutil.copytree(tiny_tokenizer_dir, tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    del config["mask_token"]
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    flags = valid_flags("mlm", code_corpus, tiny_tokenizer_dir, earlier_run)
    flags["--tokenizer_name"] = [str(tokenizer)]
    message = fails_cleanly(as_argv(flags), "mlm", capsys, earlier_run)
    assert message == "error: the tokenizer has no mask token; MLM needs one"


def test_an_output_dir_with_files_needs_overwrite(
    code_corpus, tiny_tokenizer_dir, earlier_run, capsys
):
    flags = valid_flags("clm", code_corpus, tiny_tokenizer_dir, earlier_run)
    flags["--overwrite_output_dir"] = None
    message = fails_cleanly(as_argv(flags), "clm", capsys, earlier_run)
    assert "already holds files and no checkpoint to continue: add --overwrite_output_dir" in message


def test_the_pipelines_model_dir_needs_no_overwrite(tiny_tokenizer_dir, tmp_path):
    """Tokenizer and config made into output_dir, then training into it (the README's layout);
    an output_dir holding what a run killed before its first checkpoint wrote starts over."""
    from flax_lm.train.args import TrainConfig
    from flax_lm.train.prepare import check_output_dir

    out = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, out)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (out / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    cfg = TrainConfig(output_dir=str(out), config_name=str(out), tokenizer_name=str(out))
    check_output_dir(cfg, out, resuming=False)
    with pytest.raises(UserError, match="already holds files and no checkpoint to continue"):
        check_output_dir(TrainConfig(output_dir=str(out)), out, resuming=False)
    (out / "model.safetensors").write_bytes(b"an exported model")
    with pytest.raises(UserError, match="already holds files and no checkpoint to continue"):
        check_output_dir(cfg, out, resuming=False)


@pytest.mark.parametrize(
    ("objective", "flag", "value", "expected"),
    [
        ("clm", "--per_device_train_batch_size", "0", "must be positive, got 0"),
        ("clm", "--per_device_eval_batch_size", "-8", "must be positive, got -8"),
        ("clm", "--gradient_accumulation_steps", "0", "must be positive"),
        ("clm", "--learning_rate", "0", "must be positive, got 0.0"),
        ("clm", "--learning_rate", "-0.0001", "must be positive"),
        ("clm", "--learning_rate", "nan", "must be a finite number, got nan"),
        ("clm", "--num_train_epochs", "0", "must be positive"),
        ("clm", "--max_steps", "0", "must be positive"),
        ("clm", "--max_steps", "-3", "must be positive"),
        ("clm", "--logging_steps", "0", "must be positive"),
        ("clm", "--eval_steps", "0", "must be positive"),
        ("clm", "--save_steps", "0", "must be positive"),
        ("clm", "--save_total_limit", "0", "must be positive"),
        ("clm", "--block_size", "0", "must be positive"),
        ("mlm", "--max_seq_length", "-1", "must be positive"),
        ("clm", "--max_train_samples", "0", "must be positive"),
        ("clm", "--warmup_steps", "-1", "must not be negative"),
        ("clm", "--weight_decay", "-0.1", "must not be negative"),
        # scientific notation: argparse alone would take "-1e-4" for an option
        ("clm", "--learning_rate", "-1e-4", "--learning_rate must be positive, got -0.0001"),
        ("mlm", "--adam_epsilon", "-1.5E-8", "--adam_epsilon must be positive, got -1.5e-08"),
        ("clm", "--max_grad_norm", "-1", "must not be negative"),
        ("clm", "--max_grad_norm", "inf", "must be a finite number"),
        ("clm", "--skip_nonfinite_steps", "-1", "must not be negative"),
        ("clm", "--adam_beta2", "1.0", "must be in [0, 1)"),
        ("mlm", "--mlm_probability", "0", "must be in (0, 1)"),
        ("clm", "--validation_split_percentage", "100", "must be in [0, 100)"),
        ("clm", "--seed", "-1", "--seed must be in [0, 2**32), got -1"),
        ("clm", "--max_steps", "ten", "argument --max_steps: invalid int value: 'ten'"),
        ("clm", "--dtype", "float16", "--dtype must be one of float32, bfloat16, got 'float16'"),
    ],
)
def test_bad_numbers(objective, flag, value, expected, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--train_file", "corpus.txt", flag, value]
    assert expected in fails_cleanly(argv, objective, capsys, out)


def test_an_unknown_flag_lists_the_close_ones(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--train_file", "x.txt", "--learning_rat", "1e-3"]
    message = fails_cleanly(argv, "clm", capsys, out)
    assert (
        message == "error: unrecognized argument '--learning_rat' (did you mean --learning_rate?)"
    )
    message = fails_cleanly([*argv[:-2], "--mlm_probability", "0.2"], "clm", capsys, out)
    assert "unrecognized argument '--mlm_probability'" in message  # an MLM-only flag


def test_a_yaml_config_with_a_typo(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nlearnig_rate: 3.0e-4\nmax_steps: 10\n")
    message = fails_cleanly(["--config", str(recipe)], "clm", capsys, tmp_path / "out")
    assert message == (
        f"error: unknown key 'learnig_rate' in {recipe} for run_clm_flax.py "
        "(did you mean learning_rate?)"
    )


# ----------------------------------------------------------------------- runs and checkpoints


@pytest.fixture(scope="session")
def tiny_run(code_corpus, tiny_tokenizer_dir, tmp_path_factory) -> tuple[Flags, Path, str]:
    """(flags, output_dir, stderr) of a 2-step training run (warmup 5 steps), checkpointed at
    steps 1 and 2."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    flags = {**valid_flags("clm", code_corpus, tiny_tokenizer_dir, out), "--do_train": [],
             "--warmup_steps": ["5"], "--save_steps": ["1"], "--logging_steps": ["1"]}  # fmt: skip
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(as_argv(flags), objective="clm")
    assert status == 0, err.getvalue()[-3000:]
    return flags, out, err.getvalue()


def test_warmup_longer_than_training_warns_but_runs(tiny_run):
    _, out, stderr = tiny_run
    assert (
        "warning: --warmup_steps 5 is longer than training (2 steps): the learning rate never "
        "reaches its peak"
    ) in stderr
    assert (out / "model.safetensors").is_file()


@pytest.fixture
def copied_run(tiny_run, tmp_path) -> tuple[Flags, Path]:
    """A copy of the tiny run's output_dir to damage, and its flags pointing there."""
    flags, out, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return {**flags, "--output_dir": [str(copy)]}, copy


def damage(step_dir: Path, how: str) -> None:
    if how == "array data":
        for path in (step_dir / "state").rglob("manifest.ocdbt"):
            path.unlink()
    elif how == "metadata":
        (step_dir / "meta" / "metadata").write_text('{"step": 2, "data": ')
    elif how == "commit marker":
        (step_dir / "commit_success.txt").unlink()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("array data", "checkpoint {step} cannot be restored (damaged, or saved by another model)"),
        ("metadata", "checkpoint {step} cannot be restored (damaged, or saved by another model)"),
        ("commit marker", "checkpoint {step} is incomplete (its save was interrupted)"),
    ],
)
def test_a_damaged_checkpoint_is_refused(how, expected, copied_run, capsys):
    flags, out = copied_run
    step = out / "checkpoints" / "2"
    damage(step, how)
    argv = as_argv({**flags, "--resume_from_checkpoint": [str(step)]})
    message = fails_cleanly(argv, "clm", capsys, out)
    assert expected.format(step=step) in message


def test_a_checkpoint_of_another_model_is_refused(copied_run, capsys):
    flags, out = copied_run
    overrides = flags["--config_overrides"][0].replace("n_embd=32", "n_embd=64")
    argv = as_argv({**flags, "--config_overrides": [overrides], "--resume_from_checkpoint": []})
    message = fails_cleanly(argv, "clm", capsys, out)
    assert "is from a different run setup (n_embd 32 -> 64): resume with the same flags" in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"--config_overrides": ["n_embd=64,n_layer=1,n_head=2,n_positions=64,vocab_size=512,"
                                 "bos_token_id=0,eos_token_id=2"]}, "n_embd 32 -> 64"),
        ({"--train_file": ["{validation}"]}, "train_file ['{train}'] -> ['{validation}']"),
    ],
)  # fmt: skip
def test_a_rerun_never_continues_another_runs_checkpoints(
    changes, expected, copied_run, code_corpus, capsys
):
    """The command rerun (no --overwrite_output_dir) on the output_dir of a different run."""
    flags, out = copied_run
    paths = {"train": code_corpus.train, "validation": code_corpus.validation}
    changes = {flag: [v.format(**paths) for v in values] for flag, values in changes.items()}
    argv = as_argv({**flags, "--overwrite_output_dir": None, **changes})
    message = fails_cleanly(argv, "clm", capsys, out)
    expected = expected.format(**paths)
    assert f"--output_dir {out} holds checkpoints of a different run ({expected}" in message
    assert "--overwrite_output_dir to replace it" in message


# ---------------------------------------------------------------- damaged model and tokenizer


@pytest.fixture(scope="session")
def saved_models(tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained GPT-2 and RoBERTa model dirs (config, safetensors, tokenizer)."""
    from transformers import GPT2Config, RobertaConfig

    from flax_lm.models import create_model
    from flax_lm.models.hf_io import save_model

    configs = {
        "gpt2": GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, vocab_size=512,
                           bos_token_id=2, eos_token_id=2, pad_token_id=1),
        "roberta": RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=512, max_position_embeddings=66,
                                 pad_token_id=1, bos_token_id=0, eos_token_id=2),
    }  # fmt: skip
    root = tmp_path_factory.mktemp("saved_models")
    for name, config in configs.items():
        save_model(create_model(config, seed=0), root / name)
        for file in tiny_tokenizer_dir.iterdir():
            shutil.copy(file, root / name / file.name)
    return {name: root / name for name in configs}


def command_on(command: str, model: Path, data: Path, out: Path, tiny_run: Path) -> list[str]:
    """argv of `command` reading the damaged `model` dir (for export: the run dir, as a copy of
    tiny_run's output_dir, whose config and tokenizer export reads)."""
    train = ["run-clm", "--output_dir", str(out), "--train_file", str(data), "--validation_file",
             str(data), "--block_size", "32", "--max_steps", "1", "--report_to", "none"]  # fmt: skip
    return {
        "evaluate": ["evaluate", "--model", str(model), "--validation_file", str(data),
                     "--block_size", "32"],
        "generate": ["generate", "--model", str(model), "--prompt", "def", "--max_new_tokens", "2"],
        "fill-mask": ["fill-mask", "--model", str(model), "x = <mask>"],
        "train --model_name_or_path": [*train, "--model_name_or_path", str(model)],
        "train --config_name": [*train, "--config_name", str(model), "--tokenizer_name",
                                str(tiny_run)],
        "train --tokenizer_name": [*train, "--tokenizer_name", str(model), "--config_name",
                                   str(tiny_run)],
        "export": ["export", str(model / "checkpoints" / "2"), "--output_dir", str(out)],
    }[command]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "file"),
    [(command, file) for command in ("evaluate", "generate", "fill-mask",
                                     "train --model_name_or_path")
     for file in ("model.safetensors", "config.json", "tokenizer.json")]
    + [("train --config_name", "config.json"), ("train --tokenizer_name", "tokenizer.json"),
       ("export", "config.json"), ("export", "tokenizer.json")],
)  # fmt: skip
def test_a_file_cut_short_is_named_in_one_line(
    command, file, saved_models, tiny_run, code_corpus, tmp_path, capsys
):
    """Half of the file, as an interrupted copy or download leaves it: every command names it in
    one line, exit 2, and nothing is written."""
    from flax_lm.cli import main as flax_lm

    _, run, _ = tiny_run
    source = run if command == "export" else saved_models[
        "roberta" if command == "fill-mask" else "gpt2"]  # fmt: skip
    model = tmp_path / "model"
    shutil.copytree(source, model)
    data = (model / file).read_bytes()
    (model / file).write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    argv = command_on(command, model, code_corpus.validation, out, run)
    before = snapshot(model)
    assert flax_lm(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model / file} is damaged ("), lines
    assert not out.exists() and snapshot(model) == before


# ------------------------------------------------------------------------ real subprocesses


def run_command(command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=300, cwd=REPO
    )


def assert_one_error_line(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_script_and_console_command_print_exactly_one_line(
    bad_files, code_corpus, tiny_tokenizer_dir, tmp_path
):
    flags = valid_flags("clm", code_corpus, tiny_tokenizer_dir, tmp_path / "a")
    flags["--train_file"] = [bad_files["latin1_txt"]]
    script = run_command([sys.executable, "run_clm_flax.py", *as_argv(flags)])
    assert_one_error_line(script, f"{bad_files['latin1_txt']} is not UTF-8 text")
    console = [sys.executable, "-m", "flax_lm.cli", "run-mlm"]
    flag = run_command([*console, "--output_dir", str(tmp_path / "b"), "--block_size", "64"])
    assert_one_error_line(flag, "unrecognized argument '--block_size'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resuming_a_damaged_checkpoint_prints_exactly_one_line(copied_run):
    flags, out = copied_run
    damage(out / "checkpoints" / "2", "array data")
    before = snapshot(out)
    argv = as_argv({**flags, "--resume_from_checkpoint": []})
    done = run_command([sys.executable, "run_clm_flax.py", *argv])
    assert_one_error_line(done, f"checkpoint {out / 'checkpoints' / '2'} cannot be restored")
    assert snapshot(out) == before


@pytest.mark.slow  # huggingface_hub retries for about 25 s
def test_an_unreachable_hub_is_one_line(code_corpus, tiny_tokenizer_dir, tmp_path):
    """No network: the hub endpoint is a closed local port, so every request is refused (after
    huggingface_hub's retries, whose warnings stay hidden)."""
    env = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
    flags = valid_flags("clm", code_corpus, tiny_tokenizer_dir, tmp_path / "out")
    flags.update({"--dataset_name": ["wikitext"], "--train_file": None, "--validation_file": None})
    done = run_command([sys.executable, "run_clm_flax.py", *as_argv(flags)], **env)
    assert_one_error_line(done, "cannot load dataset 'wikitext': Couldn't reach 'wikitext'")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- security

UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_ATTRIBUTE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
                          ("yaml", "load"), ("yaml", "unsafe_load"), ("marshal", "loads")}  # fmt: skip
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_uses(path: Path) -> list[str]:
    """Calls and imports in a source file that could unpickle or execute data."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(f"{where} {func.id}()")
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and (func.value.id, func.attr) in UNSAFE_ATTRIBUTE_CALLS):  # fmt: skip
                found.append(f"{where} {func.value.id}.{func.attr}()")
            for keyword in node.keywords:
                if keyword.arg in ("trust_remote_code", "allow_pickle") and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{where} {keyword.arg}=")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names]
            found += [f"{where} import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    return found


def test_nothing_is_unpickled_or_executed():
    sources = sorted((REPO / "flax_lm").rglob("*.py")) + sorted(REPO.glob("run_*.py"))
    assert len(sources) > 20
    assert [use for path in sources for use in unsafe_uses(path)] == []


def test_the_unsafe_use_finder_finds_them(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle\nimport torch\nfrom transformers import AutoModel\n"
        "eval(open('cfg').read())\ntorch.load('w.bin')\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"
    )
    found = sorted(unsafe_uses(sample))
    assert found == ["sample.py:1 import pickle", "sample.py:4 eval()", "sample.py:5 torch.load()",
                     "sample.py:6 trust_remote_code="]  # fmt: skip

"""Every bad input gets ONE line `error: ...` on stderr and exit status 2, no traceback, and an
existing output directory stays exactly as it was (names, times and contents of its files).
Also: nothing in the package can unpickle or execute what it reads."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    Background,
    assert_one_line_error,
    raises_user_error,
    snapshot,
    training_fails_cleanly,
)

from flax_lm.commands.train import main

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
        # two columns of strings, neither "text" (with one, that one is taken)
        "body.jsonl": b'{"body": "import os", "lang": "py"}\n{"body": "import sys", "lang": "py"}\n',
        "body.csv": b"body,lang\nimport os,py\nimport sys,py\n",
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
    ("objective", "changes", "names"),
    [
        ("clm", {"--train_file": ["{missing}"]}, ("{missing}", "not exist")),
        ("clm", {"--validation_file": ["{missing}"]}, ("{missing}", "not exist")),
        ("clm", {"--train_file": ["{empty_txt}"]}, ("{empty_txt}", "empty")),
        ("mlm", {"--validation_file": ["{empty_txt}"]}, ("{empty_txt}", "empty")),
        ("clm", {"--train_file": ["{binary_txt}"]}, ("{binary_txt}", "binary", "NUL")),
        ("clm", {"--train_file": ["{latin1_txt}"]}, ("{latin1_txt}", "UTF-8", "offset 3")),
        ("mlm", {"--validation_file": ["{latin1_txt}"]}, ("{latin1_txt}", "UTF-8")),
        ("clm", {"--train_file": ["{binary_json}"]}, ("{binary_json}", "binary")),
        ("clm", {"--validation_file": ["{latin1_jsonl}"]}, ("{latin1_jsonl}", "UTF-8")),
        ("clm", {"--train_file": ["{body_jsonl}"]}, ("'text'", "body", "--text_column")),
        ("mlm", {"--train_file": ["{body_csv}"]}, ("'text'", "body", "lang")),
        ("clm", {"--train_file": ["{tiny_txt}"]}, ("train", "too small", "6 characters")),
        ("mlm", {"--validation_file": ["{tiny_txt}"]}, ("validation", "too small")),
        ("clm", {"--per_device_train_batch_size": ["100000"]}, ("100000", "batch")),
        ("clm", {"--streaming": [], "--per_device_train_batch_size": ["100000"]},
         ("stream", "100000", "batch")),
        ("clm", {"--validation_file": None, "--validation_split_percentage": ["0"]},
         ("validation", "empty")),
        ("clm", {"--block_size": ["65"]}, ("--block_size 65", "n_positions")),
        ("mlm", {"--max_seq_length": ["33"]},
         ("--max_seq_length 33", "max_position_embeddings", "32")),
        ("clm", {"--config_overrides": ["n_embd=32,n_layer=1,n_head=2,vocab_size=300"]},
         ("512", "vocab_size", "300")),
        ("mlm", {"--config_name": ["gpt2"], "--config_overrides": None},
         ("run_mlm_flax.py", "gpt2", "run_clm_flax.py")),
        ("clm", {"--config_name": ["roberta-base"], "--config_overrides": None},
         ("run_clm_flax.py", "roberta", "run_mlm_flax.py")),
        ("clm", {"--config_name": ["{missing}"]}, ("config", "'{missing}'")),
        ("clm", {"--tokenizer_name": ["{root}"]}, ("tokenizer", "'{root}'")),
        ("clm", {"--output_dir": ["{tiny_txt}/run"]}, ("--output_dir {tiny_txt}/run", "written")),
        ("clm", {"--resume_from_checkpoint": ["{missing}"]}, ("checkpoint", "resume")),
        ("clm", {"--output_dir": ["s3://bucket/run"]}, ("--output_dir s3://bucket/run", "s3://")),
        ("clm", {"--output_dir": ["gs://bucket/run"]},
         ("--output_dir gs://bucket/run", "pip install 'flax-lm[gcs]'")),
        ("clm", {"--checkpoint_dir": ["gs:///run"]}, ("--checkpoint_dir gs:///run", "bucket")),
        ("clm", {"--dataset_name": ["no_such_dataset"], "--train_file": None},
         ("dataset", "'no_such_dataset'")),
    ],
)  # fmt: skip
def test_bad_data_model_or_paths(
    objective, changes, names, bad_files, code_corpus, tiny_tokenizer_dir, earlier_run, capsys
):
    """A valid run with one thing broken, into an output_dir that holds an earlier run: one line
    naming what is broken (the file, flag or value), exit 2, the earlier run untouched."""
    flags = valid_flags(objective, code_corpus, tiny_tokenizer_dir, earlier_run)
    for flag, values in changes.items():
        flags[flag] = None if values is None else [v.format(**bad_files) for v in values]
    names = [name.format(**bad_files) for name in names]
    training_fails_cleanly(as_argv(flags), objective, capsys, earlier_run, *names)


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
    training_fails_cleanly(as_argv(flags), "mlm", capsys, earlier_run, "mask token", "MLM")


def test_an_output_dir_with_files_needs_overwrite(
    code_corpus, tiny_tokenizer_dir, earlier_run, capsys
):
    flags = valid_flags("clm", code_corpus, tiny_tokenizer_dir, earlier_run)
    flags["--overwrite_output_dir"] = None
    training_fails_cleanly(
        as_argv(flags), "clm", capsys, earlier_run, str(earlier_run), "--overwrite_output_dir"
    )


def test_the_pipelines_model_dir_needs_no_overwrite(tiny_tokenizer_dir, tmp_path):
    """Tokenizer and config made into output_dir, then training into it (the README's layout);
    an output_dir holding what a run killed before its first checkpoint wrote starts over."""
    from flax_lm.train.args import TrainConfig
    from flax_lm.train.run_dir import check_output_dir

    out = tmp_path / "model"
    shutil.copytree(tiny_tokenizer_dir, out)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 6.2}\n')
    (out / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    cfg = TrainConfig(output_dir=str(out), config_name=str(out), tokenizer_name=str(out))
    check_output_dir(cfg, out, resuming=False)
    with raises_user_error(str(out), "--overwrite_output_dir"):
        check_output_dir(TrainConfig(output_dir=str(out)), out, resuming=False)
    (out / "model.safetensors").write_bytes(b"an exported model")
    with raises_user_error(str(out), "--overwrite_output_dir"):
        check_output_dir(cfg, out, resuming=False)


@pytest.mark.parametrize(
    ("objective", "flag", "value", "names"),
    [
        ("clm", "--per_device_train_batch_size", "0", ("positive", "0")),
        ("clm", "--per_device_eval_batch_size", "-8", ("positive", "-8")),
        ("clm", "--gradient_accumulation_steps", "0", ("positive", "0")),
        ("clm", "--learning_rate", "0", ("positive", "0.0")),
        ("clm", "--learning_rate", "-0.0001", ("positive", "-0.0001")),
        ("clm", "--learning_rate", "nan", ("finite", "nan")),
        ("clm", "--num_train_epochs", "0", ("positive", "0")),
        ("clm", "--max_steps", "0", ("positive", "0")),
        ("clm", "--max_steps", "-3", ("positive", "-3")),
        ("clm", "--logging_steps", "0", ("positive", "0")),
        ("clm", "--eval_steps", "0", ("positive", "0")),
        ("clm", "--save_steps", "0", ("positive", "0")),
        ("clm", "--save_total_limit", "0", ("positive", "0")),
        ("clm", "--block_size", "0", ("positive", "0")),
        ("mlm", "--max_seq_length", "-1", ("positive", "-1")),
        ("clm", "--max_train_samples", "0", ("positive", "0")),
        ("clm", "--warmup_steps", "-1", ("negative", "-1")),
        ("clm", "--weight_decay", "-0.1", ("negative", "-0.1")),
        # scientific notation: argparse alone would take "-1e-4" for an option
        ("clm", "--learning_rate", "-1e-4", ("positive", "-0.0001")),
        ("mlm", "--adam_epsilon", "-1.5E-8", ("positive", "-1.5e-08")),
        ("clm", "--max_grad_norm", "-1", ("negative", "-1")),
        ("clm", "--max_grad_norm", "inf", ("finite", "inf")),
        ("clm", "--skip_nonfinite_steps", "-1", ("negative", "-1")),
        ("clm", "--adam_beta2", "1.0", ("[0, 1)", "1.0")),
        ("mlm", "--mlm_probability", "0", ("(0, 1)", "0")),
        ("clm", "--validation_split_percentage", "100", ("[0, 100)", "100")),
        ("clm", "--seed", "-1", ("[0, 2**32)", "-1")),
        ("clm", "--max_steps", "ten", ("int", "'ten'")),
        ("clm", "--dtype", "float16", ("float32, bfloat16", "'float16'")),
    ],
)
def test_bad_numbers(objective, flag, value, names, tmp_path, capsys):
    """Each flag out of its range is named with the value it got (as parsed) and the range."""
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--train_file", "corpus.txt", flag, value]
    training_fails_cleanly(argv, objective, capsys, out, flag, *names)


def test_an_unknown_flag_lists_the_close_ones(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--train_file", "x.txt", "--learning_rat", "1e-3"]
    training_fails_cleanly(argv, "clm", capsys, out, "'--learning_rat'", "--learning_rate?")
    mlm_only = [*argv[:-2], "--mlm_probability", "0.2"]
    training_fails_cleanly(mlm_only, "clm", capsys, out, "unrecognized", "'--mlm_probability'")


def test_a_yaml_config_with_a_typo(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("output_dir: out\nlearnig_rate: 3.0e-4\nmax_steps: 10\n")
    training_fails_cleanly(["--config", str(recipe)], "clm", capsys, tmp_path / "out",
                  "'learnig_rate'", str(recipe), "run_clm_flax.py", "learning_rate?")  # fmt: skip


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


def damage(step_dir: Path, how: str) -> Path:
    """`step_dir` damaged as `how` says; its path afterwards."""
    if how == "array data":
        for path in (step_dir / "state").rglob("manifest.ocdbt"):
            path.unlink()
    elif how == "metadata":
        (step_dir / "meta" / "metadata").write_text('{"step": 2, "data": ')
    elif how == "interrupted save":  # orbax's temporary, as a crash during the save leaves it
        return step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-1"))
    return step_dir


@pytest.mark.parametrize(
    ("how", "problem"),
    [("array data", "damaged"), ("metadata", "damaged"), ("interrupted save", "interrupted")],
)
def test_a_damaged_checkpoint_is_refused(how, problem, copied_run, capsys):
    flags, out = copied_run
    step = damage(out / "checkpoints" / "2", how)
    argv = as_argv({**flags, "--resume_from_checkpoint": [str(step)]})
    training_fails_cleanly(argv, "clm", capsys, out, f"checkpoint {step}", problem)


def test_a_checkpoint_of_another_model_is_refused(copied_run, capsys):
    flags, out = copied_run
    overrides = flags["--config_overrides"][0].replace("n_embd=32", "n_embd=64")
    argv = as_argv({**flags, "--config_overrides": [overrides], "--resume_from_checkpoint": []})
    training_fails_cleanly(argv, "clm", capsys, out, "n_embd 32 -> 64", "same flags")


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
    training_fails_cleanly(argv, "clm", capsys, out, f"--output_dir {out}", "different run",
                  expected.format(**paths), "--overwrite_output_dir")  # fmt: skip


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
    from flax_lm.commands.cli import main as flax_lm

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
    assert_one_line_error((flax_lm(argv), capsys.readouterr().err), str(model / file), "damaged")
    assert not out.exists() and snapshot(model) == before


# ------------------------------------------------------------------------ real subprocesses


def run_command(command: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=300, cwd=REPO
    )


# The script run with huggingface_hub's waits between retries cut to nothing: its requests and
# retries stay real (and so do the warnings they print), only the ~25 s of back-off is skipped.
WITHOUT_BACKOFF = """
import runpy, sys, time
import huggingface_hub.utils._http as http

class NoWait:
    sleep = staticmethod(lambda seconds: None)

    def __getattr__(self, name):
        return getattr(time, name)

http.time = NoWait()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


HUB_UNREACHABLE = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
                   "HF_ENDPOINT": "http://127.0.0.1:9"}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def in_background(request, tmp_path_factory) -> dict[str, tuple[Background, Path]]:
    """The commands of the one-line tests that need no earlier run, started with this module's
    first test so that they run while its in-process tests do (see conftest.Background).
    name -> (the command, the folder it may write into)."""
    selected = {getattr(item, "originalname", None) for item in request.session.items}
    wanted = {"script": "test_script_and_console_command_print_exactly_one_line",
              "console": "test_script_and_console_command_print_exactly_one_line",
              "hub": "test_an_unreachable_hub_is_one_line"}  # fmt: skip
    started = {}
    for name, test in wanted.items():
        if test not in selected:
            continue
        root = tmp_path_factory.mktemp(f"one_line_{name}")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        if name == "console":
            command = ["-m", "flax_lm.commands.cli", "run-mlm", "--output_dir", str(root / "out"),
                       "--block_size", "64"]  # fmt: skip
        else:
            code_corpus = request.getfixturevalue("code_corpus")
            tokenizer = request.getfixturevalue("tiny_tokenizer_dir")
            flags = valid_flags("clm", code_corpus, tokenizer, root / "out")
            if name == "script":
                flags["--train_file"] = [request.getfixturevalue("bad_files")["latin1_txt"]]
                command = ["run_clm_flax.py", *as_argv(flags)]
            else:
                flags.update({"--dataset_name": ["wikitext"], "--train_file": None,
                              "--validation_file": None})  # fmt: skip
                command = ["-c", WITHOUT_BACKOFF, "run_clm_flax.py", *as_argv(flags)]
                env.update(HUB_UNREACHABLE, HF_HOME=str(root / "hf_home"))
        process = Background([sys.executable, *command], root / "logs", env=env, cwd=REPO)
        started[name] = (process, root)
    yield started
    for process, _ in started.values():
        process.kill()


def test_script_and_console_command_print_exactly_one_line(in_background, bad_files):
    script, script_root = in_background["script"]
    console, console_root = in_background["console"]
    assert_one_line_error(script.result(), bad_files["latin1_txt"], "UTF-8")
    assert_one_line_error(console.result(), "unrecognized", "'--block_size'")
    assert not (script_root / "out").exists() and not (console_root / "out").exists()


def test_an_unreachable_hub_is_one_line(in_background):
    """No network: the hub endpoint is a closed local port, so every request is refused (after
    huggingface_hub's retries, whose warnings stay hidden)."""
    hub, root = in_background["hub"]
    assert_one_line_error(hub.result(), "dataset 'wikitext'", "Couldn't reach")
    assert not (root / "out").exists()


@pytest.mark.slow
def test_resuming_a_damaged_checkpoint_prints_exactly_one_line(copied_run):
    """Named by --resume_from_checkpoint, a damaged checkpoint is an error (a rerun would go on
    from the one before): one line, and nothing after it as the process exits."""
    flags, out = copied_run
    step = damage(out / "checkpoints" / "2", "array data")
    before = snapshot(out)
    argv = as_argv({**flags, "--resume_from_checkpoint": [str(step)]})
    done = run_command([sys.executable, "run_clm_flax.py", *argv])
    assert_one_line_error(done, f"checkpoint {step}", "damaged")
    assert snapshot(out) == before


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

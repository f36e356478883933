"""Command line and YAML config of run_clm_flax.py / run_mlm_flax.py (parsing only, no training)."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error, raises_user_error

from flax_lm.commands.train import main
from flax_lm.train.args import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[1]

# The seed commands of Hugging Face's examples/flax/language-modeling README, as written there.
HF_MLM_COMMAND = """
--output_dir="./runs" --model_type="roberta" --config_name="${MODEL_DIR}" --tokenizer_name="${MODEL_DIR}"
--dataset_name="oscar" --dataset_config_name="unshuffled_deduplicated_no" --max_seq_length="128"
--weight_decay="0.01" --per_device_train_batch_size="128" --per_device_eval_batch_size="128"
--learning_rate="3e-4" --warmup_steps="1000" --overwrite_output_dir --pad_to_max_length
--num_train_epochs="18" --adam_beta1="0.9" --adam_beta2="0.98" --push_to_hub
"""
HF_CLM_COMMAND = """
--output_dir="${MODEL_DIR}" --model_type="gpt2" --config_name="${MODEL_DIR}"
--tokenizer_name="${MODEL_DIR}" --dataset_name="oscar" --dataset_config_name="unshuffled_deduplicated_no"
--do_train --do_eval --block_size="512" --per_device_train_batch_size="64"
--per_device_eval_batch_size="64" --learning_rate="5e-3" --warmup_steps="1000" --adam_beta1="0.9"
--adam_beta2="0.98" --weight_decay="0.01" --overwrite_output_dir --num_train_epochs="20"
--logging_steps="500" --save_steps="2500" --eval_steps="2500" --push_to_hub
"""


def shell_words(command: str, model_dir: str = "./norwegian-model") -> list[str]:
    """The argv a shell passes for `command` with MODEL_DIR set."""
    return shlex.split(command.replace("${MODEL_DIR}", model_dir))


def printed_config(argv: list[str], objective: str, capsys) -> dict:
    assert main([*argv, "--print_config"], objective=objective) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return yaml.safe_load(out)


def test_hf_mlm_readme_command_is_accepted(capsys):
    config = printed_config(shell_words(HF_MLM_COMMAND), "mlm", capsys)
    assert config["output_dir"] == "./runs"
    assert config["config_name"] == config["tokenizer_name"] == "./norwegian-model"
    assert config["max_seq_length"] == 128 and config["pad_to_max_length"] is True
    assert config["learning_rate"] == pytest.approx(3e-4)
    assert (config["adam_beta1"], config["adam_beta2"]) == (0.9, 0.98)
    assert config["num_train_epochs"] == 18 and config["warmup_steps"] == 1000
    assert config["overwrite_output_dir"] is True and config["push_to_hub"] is True
    # neither --do_train nor --do_eval: both; eval_steps defaults to logging_steps (HF default 500)
    assert config["do_train"] is config["do_eval"] is True
    assert config["eval_steps"] == config["logging_steps"] == 500
    assert "block_size" not in config  # a CLM flag


def test_hf_clm_readme_command_is_accepted(capsys):
    config = printed_config(shell_words(HF_CLM_COMMAND), "clm", capsys)
    assert config["block_size"] == 512 and config["per_device_train_batch_size"] == 64
    assert config["learning_rate"] == pytest.approx(5e-3)
    assert config["save_steps"] == config["eval_steps"] == 2500
    assert config["logging_steps"] == 500
    assert "max_seq_length" not in config  # an MLM flag


def test_hf_defaults():
    cfg = parse_config(["--output_dir", "o", "--train_file", "a.txt"], "clm")
    assert (cfg.learning_rate, cfg.weight_decay, cfg.adam_epsilon) == (5e-5, 0.0, 1e-8)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.num_train_epochs) == (0.9, 0.999, 3.0)
    assert (cfg.per_device_train_batch_size, cfg.per_device_eval_batch_size) == (8, 8)
    assert (cfg.logging_steps, cfg.save_steps, cfg.eval_steps, cfg.seed) == (500, 500, 500, 42)
    assert (cfg.max_grad_norm, cfg.lr_scheduler_type, cfg.dtype) == (1.0, "linear", "float32")
    assert (cfg.validation_split_percentage, cfg.report_to) == (5, ["tensorboard"])
    assert (cfg.save_strategy, cfg.hub_private_repo) == ("steps", False)
    assert parse_config(["--output_dir", "o", "--train_file", "a"], "mlm").mlm_probability == 0.15


@pytest.mark.parametrize(
    ("flags", "do_train", "do_eval"),
    [
        (["--do_train"], True, False),
        (["--do_train", "True", "--do_eval", "false"], True, False),
        (["--do_eval"], False, True),
        (["--do_train", "False", "--do_eval"], False, True),
        ([], True, True),
    ],
)
def test_boolean_flags_bare_or_with_a_value(flags, do_train, do_eval):
    cfg = parse_config(["--output_dir", "o", "--train_file", "a", *flags], "clm")
    assert (cfg.do_train, cfg.do_eval) == (do_train, do_eval)


def test_list_and_special_flags():
    cfg = parse_config(
        ["--output_dir", "o", "--train_file", "a.py", "src/", "lib/**/*.py",
         "--validation_file", "v.py", "--filter_keywords", "def, class,,import",
         "--no_scan_layers", "--no_keep_linebreaks", "--resume_from_checkpoint", "--remat", "dots"],
        "clm",
    )  # fmt: skip
    assert cfg.train_file == ["a.py", "src/", "lib/**/*.py"] and cfg.validation_file == ["v.py"]
    assert cfg.filter_keywords == ["def", "class", "import"]
    assert cfg.scan_layers is False and cfg.keep_linebreaks is False and cfg.remat == "dots"
    assert cfg.resume_from_checkpoint == "latest"
    path = parse_config(["--output_dir", "o", "--train_file", "a", "--resume_from_checkpoint",
                         "o/checkpoints/40"], "clm").resume_from_checkpoint  # fmt: skip
    assert path == "o/checkpoints/40"


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_config_sets_flags_and_command_line_wins(tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        "output_dir: from-yaml\ntrain_file: data/\nlearning_rate: 3e-4\n"  # 3e-4: a YAML string
        "per_device_train_batch_size: 4\ndo_train: true\nfilter_keywords: [foo, bar]\n",
    )
    cfg = parse_config(["--config", config, "--per_device_train_batch_size", "16"], "clm")
    assert cfg.output_dir == "from-yaml" and cfg.train_file == ["data/"]
    assert cfg.learning_rate == pytest.approx(3e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.per_device_train_batch_size == 16  # the command line wins
    assert cfg.filter_keywords == ["foo", "bar"]
    assert (cfg.do_train, cfg.do_eval) == (True, False)


def test_print_config_round_trips_through_yaml(tmp_path, capsys):
    argv = shell_words(HF_CLM_COMMAND) + ["--train_file", "a.txt", "b.txt", "--max_steps", "7"]
    first = printed_config(argv, "clm", capsys)
    config = write_yaml(tmp_path / "printed.yaml", yaml.safe_dump(first))
    assert printed_config(["--config", config], "clm", capsys) == first
    from_yaml = parse_config(["--config", config], "clm")
    assert dataclasses.replace(from_yaml, config=None) == parse_config(argv, "clm")


@pytest.mark.parametrize("recipe", ["norwegian-roberta-base", "norwegian-gpt2"])
def test_recipes_load(recipe):
    objective = "mlm" if "roberta" in recipe else "clm"
    argv = ["--config", str(REPO / "configs" / f"{recipe}.yaml"), "--config_name", "m",
            "--tokenizer_name", "m", "--output_dir", "out"]  # fmt: skip
    cfg = parse_config(argv, objective)
    # a Parquet corpus that datasets>=4 loads (OSCAR is a loading script)
    assert (cfg.dataset_name, cfg.dataset_config_name) == ("HuggingFaceFW/fineweb-2", "nob_Latn")
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.warmup_steps) == (0.9, 0.98, 1000)
    assert cfg.weight_decay == 0.01
    if objective == "mlm":
        assert (cfg.max_seq_length, cfg.per_device_train_batch_size) == (128, 128)
        assert (cfg.learning_rate, cfg.num_train_epochs, cfg.pad_to_max_length) == (3e-4, 18, True)
        assert cfg.model_type == "roberta"
    else:
        assert (cfg.block_size, cfg.per_device_train_batch_size) == (512, 64)
        assert (cfg.learning_rate, cfg.num_train_epochs, cfg.model_type) == (5e-3, 20, "gpt2")
        assert "resid_pdrop=0.0" in cfg.config_overrides


def run_main_error(argv: list[str], capsys, *must_name: str, objective: str = "clm") -> str:
    """The CLI's one-line refusal of `argv`, naming each of `must_name`."""
    return assert_one_line_error(
        (main(argv, objective=objective), capsys.readouterr().err), *must_name
    )


BASE = ["--output_dir", "o", "--train_file", "a.txt"]


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        ([*BASE, "--per_device_train_batch_size", "0"], ("--per_device_train_batch_size", "positive", "0")),
        ([*BASE, "--learning_rate", "-0.001"], ("--learning_rate", "positive", "-0.001")),
        ([*BASE, "--max_steps", "0"], ("--max_steps", "positive", "0")),
        ([*BASE, "--warmup_steps", "-5"], ("--warmup_steps", "negative", "-5")),
        ([*BASE, "--adam_beta2", "1.0"], ("--adam_beta2", "[0, 1)", "1.0")),
        ([*BASE, "--lr_scheduler_type", "step"], ("--lr_scheduler_type", "'step'", "linear")),
        ([*BASE, "--dtype", "float16"], ("--dtype", "'float16'", "bfloat16")),
        ([*BASE, "--block_size", "abc"], ("--block_size", "int", "'abc'")),
        ([*BASE, "--do_train", "maybe"], ("--do_train", "boolean", "'maybe'")),
        ([*BASE, "--learning_rat", "1e-3"], ("'--learning_rat'", "--learning_rate")),
        ([*BASE, "--max_seq_length", "128"], ("unrecognized", "'--max_seq_length'")),
        (["--train_file", "a.txt"], ("--output_dir", "required")),
        (["--output_dir", "o"], ("no data", "--train_file")),
        ([*BASE, "--streaming"], ("--streaming", "--max_steps")),
        ([*BASE, "--fp16"], ("--fp16", "--bf16")),
        ([*BASE, "--gradient_checkpointing", "--remat", "dots"],
         ("--gradient_checkpointing", "--remat", "one")),
        ([*BASE, "--warmup_ratio", "1.5"], ("--warmup_ratio", "[0, 1]", "1.5")),
        ([*BASE, "--warmup_steps", "2.5"], ("--warmup_steps", "whole number", "2.5")),
        ([*BASE, "--report_to", "mlflow"], ("--report_to", "'mlflow'")),
        ([*BASE, "--save_strategy", "best"], ("--save_strategy", "'best'", "steps")),
        ([*BASE, "--streaming", "--max_steps", "9", "--save_strategy", "epoch"],
         ("--streaming", "--save_strategy steps")),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(argv, names, capsys):
    run_main_error(argv, capsys, *names)


def test_mlm_probability_range(capsys):
    argv = [*BASE, "--mlm_probability", "1.5"]
    run_main_error(argv, capsys, "--mlm_probability", "(0, 1)", "1.5", objective="mlm")


def test_yaml_typo_names_the_key_with_close_matches(tmp_path, capsys):
    config = write_yaml(tmp_path / "typo.yaml", "output_dir: o\nlearning_rte: 1e-3\n")
    run_main_error(
        ["--config", config, "--train_file", "a"], capsys, "'learning_rte'", "learning_rate?"
    )
    bad_value = write_yaml(tmp_path / "bad.yaml", "max_steps: lots\n")
    run_main_error(["--config", bad_value, *BASE], capsys, "max_steps", "'lots'")
    missing = str(tmp_path / "no.yaml")
    run_main_error(["--config", missing], capsys, "--config", missing)


def test_config_dataclass_fields_are_the_flags():
    """One name for everything: every TrainConfig field is a flag of at least one script."""
    from flax_lm.train.args import build_parser

    flags = set(build_parser("clm").known_flags()) | set(build_parser("mlm").known_flags())
    for name in TrainConfig.__dataclass_fields__:
        assert f"--{name}" in flags


def test_slow_tokenizers_are_refused_fast_ones_accepted():
    base = ["--output_dir", "o", "--train_file", "a.txt"]
    assert parse_config([*base, "--use_fast_tokenizer"], "clm").use_fast_tokenizer is True
    with raises_user_error("fast", "tokenizers"):
        parse_config([*base, "--use_fast_tokenizer", "False"], "mlm")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--bf16"], {"dtype": "bfloat16"}),
        (["--gradient_checkpointing"], {"remat": "full"}),
        (["--gradient_checkpointing", "--remat", "full"], {"remat": "full"}),
        (["--warmup_ratio", "0.1"], {"warmup_ratio": 0.1, "warmup_steps": 0}),
        (["--warmup_steps", "0.1"], {"warmup_steps": 0.1}),  # transformers 5: a fraction
        (["--warmup_steps", "1000"], {"warmup_steps": 1000}),
        (["--report_to", "tensorboard", "wandb"], {"report_to": ["tensorboard", "wandb"]}),
        (["--report_to", "wandb,tensorboard"], {"report_to": ["wandb", "tensorboard"]}),
        (["--report_to", "tensorboard", "tensorboard"], {"report_to": ["tensorboard"]}),
        (["--report_to", "tensorboard,none"], {"report_to": []}),
        (["--report_to", "none"], {"report_to": []}),
        (["--logging_first_step", "--run_name", "nb-1"],
         {"logging_first_step": True, "run_name": "nb-1"}),
        (["--save_strategy", "no", "--eval_strategy", "epoch"],
         {"save_strategy": "no", "eval_strategy": "epoch"}),
        (["--hub_private_repo"], {"hub_private_repo": True}),
    ],
)  # fmt: skip
def test_trainer_flags_take_the_trainers_meaning(flags, expected, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # wandb counts as installed here
                        lambda name, *a: True if name == "wandb" else real_find_spec(name, *a))
    cfg = parse_config([*BASE, *flags], "clm")
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert isinstance(cfg.warmup_steps, type(expected.get("warmup_steps", 0)))


def test_report_to_wandb_without_wandb_is_one_line_before_training(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    run_main_error([*BASE, "--report_to", "wandb"], capsys, "--report_to wandb", "pip install")
    assert parse_config([*BASE, "--report_to", "all"], "clm").report_to == ["tensorboard"]


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_one_settings_file_as_the_only_argument(suffix, tmp_path, capsys):
    """`run_clm_flax.py args.json`, as HfArgumentParser reads it."""
    settings = {"output_dir": "o", "train_file": ["a.txt"], "learning_rate": 3e-4,
                "bf16": True, "report_to": ["none"], "do_train": True}
    path = tmp_path / f"args{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    cfg = parse_config([str(path)], "clm")
    assert (cfg.output_dir, cfg.train_file, cfg.learning_rate) == ("o", ["a.txt"], 3e-4)
    assert (cfg.dtype, cfg.report_to, cfg.do_eval) == ("bfloat16", [], False)
    path.write_text('{"output_dir": "o", "fp16": true, "evaluation_strategy": "steps"}')
    if suffix == ".json":  # Hugging Face's older key is read as eval_strategy
        run_main_error([str(path)], capsys, "--fp16")
        path.write_text('{"output_dir": "o", "evaluation_strate": "steps"}')
        run_main_error([str(path)], capsys, "'evaluation_strate'", str(path))
        path.write_text('{"output_dir": "o",')
        run_main_error([str(path)], capsys, str(path), "JSON")


# ------------------------------------------------------- Hugging Face's flag names of recent years


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--evaluation_strategy", "epoch"], {"eval_strategy": "epoch", "do_eval": True}),
        (["--evaluation_strategy", "no"], {"eval_strategy": "no", "do_eval": False,
                                           "do_train": True}),
        (["--do_eval", "--evaluation_strategy", "no"], {"eval_strategy": "no", "do_eval": True}),
        (["--logging_dir", "tb/run-1"], {"logging_dir": "tb/run-1"}),
        (["--use_auth_token"], {"use_auth_token": True, "token": None}),
        (["--model_revision", "v2.0"], {"model_revision": "v2.0"}),
        (["--log_level", "warning"], {"log_level": "warning"}),
        (["--save_safetensors"], {"save_safetensors": True}),
        (["--save_safetensors", "True"], {"save_safetensors": True}),
        (["--report_to", "none"], {"report_to": []}),
    ],
)  # fmt: skip
def test_hugging_face_flag_names_parse_with_their_meaning(flags, expected):
    cfg = parse_config([*BASE, *flags], "clm")
    assert {name: getattr(cfg, name) for name in expected} == expected


def test_evaluation_strategy_in_a_yaml_file_is_eval_strategy(tmp_path):
    config = write_yaml(tmp_path / "hf.yaml", "evaluation_strategy: epoch\n")
    assert parse_config(["--config", config, *BASE], "clm").eval_strategy == "epoch"


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--save_safetensors", "false"], ("--save_safetensors", "safetensors")),
        (["--no_save_safetensors"], ("--save_safetensors",)),
        (["--log_level", "loud"], ("--log_level", "'loud'")),
        (["--logging_dir", "gs://bucket/tb"], ("--logging_dir", "gs://bucket/tb")),
    ],
)  # fmt: skip
def test_hugging_face_flags_that_cannot_apply_are_one_line_errors(flags, names, capsys):
    run_main_error([*BASE, *flags], capsys, *names)


def test_log_level_sets_the_libraries_loggers():
    import logging

    from flax_lm.train.args import LOGGERS, apply_log_level

    before = {name: logging.getLogger(name).level for name in LOGGERS}
    try:
        apply_log_level("passive")
        assert {name: logging.getLogger(name).level for name in LOGGERS} == before
        apply_log_level("error")
        assert all(logging.getLogger(name).level == logging.ERROR for name in LOGGERS)
        apply_log_level("debug")
        assert logging.getLogger("transformers.modeling_utils").isEnabledFor(logging.DEBUG)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_model_revision_reaches_every_hub_download(monkeypatch):
    """--model_revision is the revision of the Hub config, model and tokenizer a run reads."""
    import transformers

    from flax_lm import hub_models, model_source

    asked = []

    def download(name, *args, revision=None, **kwargs):
        asked.append((name, revision))
        raise OSError("offline")

    monkeypatch.setattr(hub_models, "hf_hub_download", download)
    monkeypatch.setattr(hub_models, "snapshot_download", download)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", download)
    cfg = parse_config([*BASE, "--config_name", "someone/gpt", "--model_revision", "v2"], "clm")
    for load in (lambda: model_source.config_source(cfg, None, "clm"),
                 lambda: model_source.tokenizer_of(cfg),
                 lambda: model_source.pretrained_model_dir(
                     dataclasses.replace(cfg, model_name_or_path="someone/gpt"))):  # fmt: skip
        with raises_user_error("someone/gpt"):
            load()
    assert asked == [("someone/gpt", "v2")] * 3


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_help_reads_like_a_tools_help(objective, capsys):
    """A one-paragraph description of the command (no internal docstring), then each flag with
    its default said once."""
    with pytest.raises(SystemExit):
        main(["--help"], objective=objective)
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert ("GPT-2" if objective == "clm" else "RoBERTa") in description
    assert "TrainConfig" not in text and "`" not in description
    entries = re.split(r"\n  (?=-)", text.split("options:")[1])
    assert len(entries) > 80
    for entry in entries:
        assert entry.count("default") <= 1, entry
    evaluation = next(e for e in entries if e.startswith("--eval_strategy"))
    assert "--evaluation_strategy" in evaluation

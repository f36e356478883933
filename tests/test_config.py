"""Model configs: published bases, typed overrides, dropout, tokenizer ids, create-config CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, raises_user_error
from transformers import AutoConfig, AutoTokenizer, GPT2Config, RobertaConfig

from flax_lm.commands.create_config import main
from flax_lm.config import (
    CONFIGS_DIR,
    apply_config_overrides,
    build_config,
    load_base_config,
    set_dropout,
)

REPO = Path(__file__).resolve().parent.parent

ROBERTA_BASE = {
    "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
}  # fmt: skip
GPT2 = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
    "initializer_range": 0.02, "n_inner": None, "tie_word_embeddings": True,
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "config_class", "expected"),
    [("roberta-base", RobertaConfig, ROBERTA_BASE), ("gpt2", GPT2Config, GPT2)],
)
def test_published_base_configs(name, config_class, expected):
    config = load_base_config(name)
    assert type(config) is config_class
    assert {key: getattr(config, key) for key in expected} == expected
    assert (CONFIGS_DIR / f"{name}.json").is_file()


def test_base_config_from_a_path_and_a_directory(tmp_path: Path):
    GPT2Config(n_layer=3, n_embd=96, n_head=4).save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json"):
        config = load_base_config(str(source), "gpt2")
        assert (config.n_layer, config.n_embd, config.n_head) == (3, 96, 4)


def test_overrides_are_typed_like_the_config_class():
    config = apply_config_overrides(
        load_base_config("gpt2"),
        "n_embd=128, n_head=4,n_layer=2,n_inner=256,resid_pdrop=0,scale_attn_weights=false,"
        "activation_function=relu,summary_activation=none",
    )
    values = (config.n_embd, config.n_head, config.n_layer, config.n_inner)
    assert values == (128, 4, 2, 256) and all(type(v) is int for v in values)
    assert config.resid_pdrop == 0.0 and type(config.resid_pdrop) is float
    assert config.scale_attn_weights is False
    assert config.activation_function == "relu" and config.summary_activation is None


def test_overrides_accept_the_common_attribute_names():
    config = apply_config_overrides(load_base_config("gpt2"), "hidden_size=64,num_hidden_layers=3")
    assert (config.n_embd, config.n_layer) == (64, 3)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ("n_embed=128", ("gpt2", "'n_embed'", "n_embd")),
        ("n_layer=two", ("n_layer", "'two'", "int")),
        ("n_layer=2.5", ("n_layer", "'2.5'", "int")),
        ("scale_attn_weights=maybe", ("scale_attn_weights", "'maybe'", "bool")),
        ("n_layer", ("'n_layer'", "key=value")),
        ("model_type=roberta", ("gpt2", "'model_type'")),
        ("to_dict=1", ("gpt2", "'to_dict'")),
    ],
)
def test_bad_overrides_are_user_errors(overrides: str, names: tuple[str, ...]):
    with raises_user_error(*names):
        apply_config_overrides(load_base_config("gpt2"), overrides)


def test_set_dropout_sets_every_dropout_of_the_model_type():
    gpt2 = set_dropout(load_base_config("gpt2"), 0.0)
    fields = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout")
    assert [getattr(gpt2, f) for f in fields] == [0.0] * 4
    roberta = set_dropout(load_base_config("roberta-base"), 0.25)
    assert (roberta.hidden_dropout_prob, roberta.attention_probs_dropout_prob) == (0.25, 0.25)
    assert roberta.classifier_dropout is None
    with raises_user_error("dropout", "[0, 1)", "1.0"):
        set_dropout(roberta, 1.0)


def test_tokenizer_sets_vocab_size_and_token_ids(tiny_tokenizer_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    roberta = build_config("roberta", tokenizer_dir=str(tiny_tokenizer_dir))
    assert roberta.vocab_size == len(tokenizer) == 512
    ids = (roberta.bos_token_id, roberta.pad_token_id, roberta.eos_token_id)
    assert ids == (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    gpt2 = build_config("gpt2", tokenizer_dir=str(tiny_tokenizer_dir))
    assert gpt2.vocab_size == 512
    assert gpt2.bos_token_id == gpt2.eos_token_id == tokenizer.eos_token_id == 2
    assert gpt2.pad_token_id == tokenizer.pad_token_id == 1


def test_overrides_win_over_tokenizer_and_dropout(tiny_tokenizer_dir: Path):
    config = build_config(
        "gpt2", None, str(tiny_tokenizer_dir), 0.0, "vocab_size=640,attn_pdrop=0.2,n_layer=2"
    )
    assert (config.vocab_size, config.attn_pdrop, config.resid_pdrop, config.n_layer) == (
        640, 0.2, 0.0, 2,
    )  # fmt: skip


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_writes_a_config_that_autoconfig_reloads(tiny_tokenizer_dir, tmp_path, capsys):
    status, out, _ = run_main(
        capsys, "--model_type", "gpt2", "--tokenizer_name", tiny_tokenizer_dir, "--dropout", "0",
        "--config_overrides", "n_embd=64,n_head=4,n_layer=2", "--output_dir", tmp_path,
    )  # fmt: skip
    assert status == 0
    summary = "config.json: gpt2, 2 layers, hidden 64, 4 heads, vocab 512, 1024 positions"
    assert out.strip().endswith(summary)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["architectures"] == ["GPT2LMHeadModel"]
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is GPT2Config
    expected = {"n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 512, "resid_pdrop": 0.0}
    assert {key: getattr(reloaded, key) for key in expected} == expected


def test_cli_roberta_from_a_saved_base(tmp_path: Path, capsys):
    base = tmp_path / "base"
    assert run_main(capsys, "--model_type", "roberta", "--output_dir", base)[0] == 0
    status, _, _ = run_main(
        capsys,
        "--base",
        base,
        "--config_overrides",
        "num_hidden_layers=2",
        "--output_dir",
        tmp_path,
    )
    assert status == 0
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is RobertaConfig
    assert (reloaded.num_hidden_layers, reloaded.max_position_embeddings) == (2, 514)


def test_config_saved_beside_the_tokenizer_leaves_it_unchanged(
    tiny_tokenizer_dir, tmp_path, capsys
):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for path in tiny_tokenizer_dir.iterdir():
        (model_dir / path.name).write_bytes(path.read_bytes())
    args = ["--tokenizer_name", model_dir, "--output_dir", model_dir]
    assert run_main(capsys, "--model_type", "roberta", *args)[0] == 0
    text = "def f(x):\n    return x  # æøå 🎉\n"
    plain, beside = (AutoTokenizer.from_pretrained(d) for d in (tiny_tokenizer_dir, model_dir))
    assert beside(text)["input_ids"] == plain(text)["input_ids"]
    assert len(beside) == len(plain)


ERROR_CASES = {  # flags -> what the one error line must name
    "unknown override key": (
        ["--model_type", "gpt2", "--config_overrides", "n_layers=2"],
        ("gpt2", "'n_layers'", "n_layer,"),
    ),
    "bad override value": (
        ["--model_type", "roberta", "--config_overrides", "hidden_size=big"],
        ("hidden_size", "'big'", "int"),
    ),
    "missing tokenizer": (
        ["--model_type", "gpt2", "--tokenizer_name", "{tmp}/no_tokenizer"],
        ("tokenizer", "{tmp}/no_tokenizer"),
    ),
    "unknown base": (["--base", "gpt3"], ("'gpt3'", "gpt2, roberta-base")),
    "type mismatch": (
        ["--model_type", "gpt2", "--base", "roberta-base"],
        ("--model_type gpt2", "roberta-base.json", "roberta"),
    ),
    "unknown model type": (["--model_type", "bert"], ("--model_type", "'bert'")),
    "no model type": ([], ("--model_type",)),
    "heads do not divide": (
        ["--model_type", "gpt2", "--config_overrides", "n_embd=100,n_head=3"],
        ("100", "3", "heads"),
    ),
    "vocab below tokenizer": (
        [
            "--model_type",
            "gpt2",
            "--tokenizer_name",
            "{tok}",
            "--config_overrides",
            "vocab_size=300",
        ],
        ("vocab_size 300", "512"),
    ),
    "zero layers": (
        ["--model_type", "roberta", "--config_overrides", "num_hidden_layers=0"],
        ("num_hidden_layers", "positive"),
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_are_one_line_and_write_nothing(tiny_tokenizer_dir, tmp_path, capsys, case):
    flags, names = ERROR_CASES[case]
    flags = [flag.format(tmp=tmp_path, tok=tiny_tokenizer_dir) for flag in flags]
    output = tmp_path / "out"
    status, _, err = run_main(capsys, *flags, "--output_dir", output)
    assert_one_line_error((status, err), *(name.format(tmp=tmp_path) for name in names))
    assert not output.exists()


def test_existing_config_is_kept_without_overwrite(tmp_path: Path, capsys):
    assert run_main(capsys, "--model_type", "gpt2", "--output_dir", tmp_path)[0] == 0
    before = (tmp_path / "config.json").read_bytes()
    status, _, err = run_main(capsys, "--model_type", "roberta", "--output_dir", tmp_path)
    assert_one_line_error((status, err), "config.json", "--overwrite_output_dir")
    assert (tmp_path / "config.json").read_bytes() == before
    args = ["--model_type", "roberta", "--output_dir", tmp_path, "--overwrite_output_dir"]
    assert run_main(capsys, *args)[0] == 0
    assert AutoConfig.from_pretrained(tmp_path).model_type == "roberta"


def test_script_runs_from_any_directory(tmp_path: Path):
    script = REPO / "configs" / "create_config.py"
    assert os.access(script, os.X_OK)
    command = [script, "--model_type", "gpt2", "--config_overrides", "n_layer=2"]
    done = subprocess.run(
        [*command, "--output_dir", "cfg"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert AutoConfig.from_pretrained(tmp_path / "cfg").n_layer == 2

"""configs/codeparrot-small.yaml run for real, shrunk by command-line overrides, on stdlib modules
of which every other one also uses pandas, scikit-learn and matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from flax_lm.commands.train import main
from flax_lm.train.args import parse_config
from flax_lm.train.data.batches import TrainBatches
from flax_lm.train.data.splits import load_raw_splits
from flax_lm.train.data.tokenize import tokenize_splits
from flax_lm.train.objectives import make_objective

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "codeparrot-small.yaml"
DATA_SCIENCE_CODE = """

import matplotlib.pyplot as plt
import pandas as pd
from sklearn.linear_model import LinearRegression


def fit_and_plot(frame: pd.DataFrame) -> None:
    model = LinearRegression().fit(frame[["x"]], frame["y"])
    frame["y_hat"] = model.predict(frame[["x"]])
    frame.plot(x="x", y=["y", "y_hat"])
    plt.show()
"""
FILTER_KEYWORDS = ("pandas", "sklearn", "matplotlib", "seaborn")  # the recipe's
TINY_GPT2 = (
    "n_embd=32,n_layer=2,n_head=2,n_positions=128,vocab_size=512,bos_token_id=2,eos_token_id=2,"
    "pad_token_id=1"
)
STEPS, GLOBAL_BATCH = 3, 4
INIT_LOSS_TOLERANCE = 0.05  # at initialisation a block's mean cross-entropy is ln(512) within 5%


def mixed_copy(source: Path, target: Path) -> tuple[int, int]:
    """Copies of source's modules, every other one (sorted) ending with data-science code;
    returns (how many mention a filter keyword, how many there are)."""
    target.mkdir(parents=True)
    modules = sorted(source.glob("*.py"))
    for index, module in enumerate(modules):
        extra = DATA_SCIENCE_CODE if index % 2 == 0 else ""
        (target / module.name).write_text(module.read_text(encoding="utf-8") + extra)
    texts = [path.read_text(encoding="utf-8") for path in target.iterdir()]
    return sum(any(word in text for word in FILTER_KEYWORDS) for text in texts), len(texts)


@pytest.fixture
def recipe_run(code_corpus, tiny_tokenizer_dir, tmp_path):
    """(argv, output_dir, {split: (documents kept, documents)}) of a recipe run."""
    kept = {split: mixed_copy(getattr(code_corpus, split), tmp_path / split)
            for split in ("train", "validation")}  # fmt: skip
    out = tmp_path / "out"
    argv = [
        "--config", str(RECIPE), "--tokenizer_name", str(tiny_tokenizer_dir),
        "--train_file", str(tmp_path / "train" / "*.py"), "--validation_file", str(tmp_path / "validation"),
        "--output_dir", str(out), "--config_overrides", TINY_GPT2,
        "--keytokens", "self,return,plt", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--per_device_eval_batch_size", "32",
        "--max_steps", str(STEPS), "--warmup_steps", "1", "--logging_steps", "1",
        "--eval_steps", str(STEPS), "--save_steps", str(STEPS), "--report_to", "none",
        "--compilation_cache_dir", str(tmp_path / "jax_cache"),
    ]  # fmt: skip
    return argv, out, kept


@pytest.mark.slow  # a whole training run: filter, train, evaluate, write its outputs
def test_the_recipe_filters_trains_and_writes_its_outputs(recipe_run, capsys):
    argv, out, kept = recipe_run
    status = main(argv, objective="clm")
    stdout, stderr = capsys.readouterr()
    assert status == 0, stderr[-2000:]
    for split, (n_kept, n_total) in kept.items():
        share = f"{100 * n_kept / n_total:.1f}%"
        assert f"filter_keywords: kept {n_kept} of {n_total} {split} documents ({share})" in stdout
    assert "skipping key tokens that are not single tokens: plt" in stderr

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [STEPS]
    # evaluation is plain token-level cross-entropy: near ln(512) after 3 small steps
    assert evals[0]["eval_loss"] == pytest.approx(np.log(512), rel=INIT_LOSS_TOLERANCE)
    assert evals[0]["perplexity"] == pytest.approx(np.exp(evals[0]["eval_loss"]), rel=1e-9)

    # training is weighted: step 1 (initial params) is ln(512) times the first batch's mean weight
    cfg = parse_config(argv, "clm")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name)
    splits = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")
    first = next(iter(TrainBatches(splits["train"], GLOBAL_BATCH, cfg.seed)))
    weights = make_objective("clm", tokenizer, cfg).make_batch(first, None)["keytoken_weight"]
    assert weights.mean() > 2  # stdlib blocks are full of self and return
    expected = np.log(512) * weights.mean()
    assert train[0]["loss"] == pytest.approx(expected, rel=INIT_LOSS_TOLERANCE)

    # documents are joined with </s>: one per kept training document, but perhaps the last
    # (cut off with the remainder shorter than a block)
    blocks = np.asarray(splits["train"]["input_ids"])
    assert blocks.shape[1] == 128
    eos_count = int((blocks == tokenizer.eos_token_id).sum())
    assert kept["train"][0] - 1 <= eos_count <= kept["train"][0]

    config = json.loads((out / "config.json").read_text())
    assert (config["n_embd"], config["eos_token_id"]) == (32, tokenizer.eos_token_id)
    for name in ("model.safetensors", "tokenizer.json", "train_results.json", "eval_results.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "train_results.json").read_text())["train_steps"] == STEPS

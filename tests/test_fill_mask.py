"""`flax-lm fill-mask` equals transformers' fill-mask pipeline on the exported model."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error
from transformers import AutoTokenizer, GPT2Config, pipeline

from flax_lm.commands.fill_mask import main
from flax_lm.fill_mask import fill_mask
from flax_lm.models.hf_io import load_model

pytest_plugins = ["fixtures_models"]

SCORE_TOLERANCE = 1e-4  # float32 forward passes in JAX and PyTorch
TEXTS = [
    "def __init__(self, <mask>):",
    "import <mask>\n",
    "    for i in range(len(<mask>)):\n        yield i",
]


@pytest.fixture(scope="module")
def roberta(tiny_roberta_run):
    out = tiny_roberta_run.output_dir
    return load_model(out), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def hf_fill_mask(tiny_roberta_run):
    out = str(tiny_roberta_run.output_dir)
    return pipeline("fill-mask", model=out, tokenizer=out, device="cpu")


def assert_same_predictions(ours: list[dict], theirs: list[dict]) -> None:
    assert [p["token"] for p in ours] == [p["token"] for p in theirs]
    assert [p["token_str"] for p in ours] == [p["token_str"] for p in theirs]
    assert [p["sequence"] for p in ours] == [p["sequence"] for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=SCORE_TOLERANCE)


def test_single_masks_equal_the_pipeline(roberta, hf_fill_mask):
    model, tokenizer = roberta
    ours = fill_mask(model, tokenizer, TEXTS, top_k=8)  # one batch, texts of different lengths
    for text, per_mask in zip(TEXTS, ours, strict=True):
        assert len(per_mask) == 1 and len(per_mask[0]) == 8
        assert_same_predictions(per_mask[0], hf_fill_mask(text, top_k=8))
        scores = [p["score"] for p in per_mask[0]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_several_masks_equal_the_pipeline(roberta, hf_fill_mask):
    model, tokenizer = roberta
    text = "class <mask>(object):\n    def <mask>(self):"
    (ours,) = fill_mask(model, tokenizer, text, top_k=5)
    theirs = hf_fill_mask(text, top_k=5)
    assert len(ours) == len(theirs) == 2
    for ours_mask, theirs_mask in zip(ours, theirs, strict=True):
        assert_same_predictions(ours_mask, theirs_mask)


def test_command_line_json_and_table(tiny_roberta_run, roberta, capsys):
    model, tokenizer = roberta
    out = str(tiny_roberta_run.output_dir)
    assert main(["--model", out, "--top_k", "3", "--json", TEXTS[0], TEXTS[1]]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = fill_mask(model, tokenizer, TEXTS[:2], top_k=3)
    assert [[[p["token"] for p in m] for m in t] for t in printed] == [
        [[p["token"] for p in m] for m in t] for t in expected
    ]
    assert main(["--model", out, TEXTS[0]]) == 0
    table = capsys.readouterr().out
    assert TEXTS[0] in table and "rank" in table
    assert repr(expected[0][0][0]["token_str"]) in table


@pytest.mark.parametrize(
    "text, extra, names",
    [
        ("no mask here", [], ("<mask>",)),
        ("x = <mask>" + " y" * 200, [], ("64",)),
        ("x = <mask>", ["--top_k", "0"], ("--top_k", "0", "1")),
    ],
    ids=["no-mask", "too-long", "top-k-0"],
)
def test_bad_input_is_one_line_error(tiny_roberta_run, capsys, text, extra, names):
    status = main(["--model", str(tiny_roberta_run.output_dir), text, *extra])
    assert_one_line_error((status, capsys.readouterr().err), *names)


def test_refuses_a_gpt2_model(tmp_path, capsys):
    GPT2Config().save_pretrained(tmp_path)
    status = main(["--model", str(tmp_path), "x <mask>"])
    assert_one_line_error((status, capsys.readouterr().err), "fill-mask", "roberta")

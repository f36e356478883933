"""`flax-lm generate`: greedy decoding equals PyTorch transformers' token for token; sampling
follows transformers' temperature / top-k / top-p rules."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from transformers import AutoTokenizer, GPT2LMHeadModel, RobertaConfig
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flax_lm.commands.generate import main
from flax_lm.generate import Sampling, filter_logits, generate, generate_ids, next_tokens
from flax_lm.models.hf_io import load_model

pytest_plugins = ["fixtures_models"]

PROMPTS = ["def fibonacci(n):", "import os\n\nclass ", "    return self."]
NEW_TOKENS = 24  # one length everywhere: the decode loop compiles once per batch size


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_run):
    """(our model, the exported model in PyTorch, tokenizer)."""
    out = tiny_gpt2_run.output_dir
    torch_model = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    return load_model(out), torch_model, AutoTokenizer.from_pretrained(out)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def torch_greedy(torch_model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt)),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers(gpt2, prompt):
    model, torch_model, tokenizer = gpt2
    ids = encode(tokenizer, prompt)
    eos = model.config.eos_token_id
    ours = generate_ids(
        model, [ids], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=eos, pad_token_id=eos
    )[0]
    assert ours == torch_greedy(torch_model, ids, NEW_TOKENS, eos)
    assert len(ours) > len(ids)


def test_stops_at_eos_like_transformers(gpt2):
    """With a token of the greedy continuation as eos, both stop right after it."""
    model, torch_model, tokenizer = gpt2
    ids = encode(tokenizer, PROMPTS[0])
    free = generate_ids(model, [ids], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None)[
        0
    ]
    stop = free[len(ids) + 5]
    cut = free[: free.index(stop, len(ids)) + 1]
    ours = generate_ids(
        model, [ids], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=stop, pad_token_id=0
    )[0]
    assert ours == cut and len(ours) < len(free)
    assert ours == torch_greedy(torch_model, ids, NEW_TOKENS, stop)


def test_batch_of_prompts_equals_each_alone(gpt2):
    """Left padding (positions counted over real tokens) does not change any prompt's output."""
    model, _, tokenizer = gpt2
    prompts = [encode(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1
    batched = generate_ids(
        model, prompts, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None
    )
    alone = [
        generate_ids(model, [p], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None)[0]
        for p in prompts
    ]
    assert batched == alone


def test_sampling_is_seeded(gpt2):
    model, _, tokenizer = gpt2
    ids = encode(tokenizer, PROMPTS[0])

    def sample(seed: int, **kwargs) -> list[list[int]]:
        return generate_ids(
            model,
            [ids],
            max_new_tokens=NEW_TOKENS,
            temperature=1.0,
            seed=seed,
            num_return_sequences=4,
            eos_token_id=None,
            **kwargs,
        )

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    assert len({tuple(s) for s in first}) > 1  # the 4 sequences differ
    greedy = generate_ids(
        model, [ids], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_id=None
    )[0]
    assert sample(3, top_k=1) == [greedy] * 4  # top-1 sampling is greedy


def test_text_api_and_command_line(gpt2, tiny_gpt2_run, capsys):
    model, _, tokenizer = gpt2
    texts = generate(
        model,
        tokenizer,
        PROMPTS[:2],
        max_new_tokens=NEW_TOKENS,
        temperature=0.8,
        top_k=20,
        top_p=0.95,
        seed=5,
        num_return_sequences=2,
    )
    assert len(texts) == 4
    assert texts[0].startswith(PROMPTS[0]) and texts[2].startswith(PROMPTS[1])
    argv = [
        "--model",
        str(tiny_gpt2_run.output_dir),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--max_new_tokens",
        str(NEW_TOKENS),
        "--temperature",
        "0.8",
        "--top_k",
        "20",
        "--top_p",
        "0.95",
        "--seed",
        "5",
        "--num_return_sequences",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == texts


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, None, 0.9),
        (0.7, 5, None),
        (1.3, 10, 0.5),
        (1.0, 1, None),
        (0.5, None, 0.01),
    ],
)
def test_filter_equals_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 300)).astype(np.float32)
    sampling = Sampling.of(temperature, top_k, top_p, vocab_size=logits.shape[-1])
    ours = np.asarray(filter_logits(jnp.asarray(logits), sampling))
    scores = torch.from_numpy(logits)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p else []
    for warper in warpers:
        scores = warper(None, scores)
    theirs = scores.numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    kept = np.isfinite(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    """200k draws: each token's frequency is within 5 sigma of its filtered probability."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    draws = 200_000
    keys = jax.random.split(jax.random.key(0), draws)
    sampling = Sampling.of(0.8, 4, 0.9, vocab_size=6)
    sample = jax.jit(jax.vmap(lambda k: next_tokens(logits, k, sampling)[0]))
    counts = np.bincount(np.asarray(sample(keys)), minlength=6)
    probs = np.asarray(jax.nn.softmax(filter_logits(logits, sampling))[0])
    assert probs[4] == probs[5] == 0 and counts[4] == counts[5] == 0
    sigma = np.sqrt(draws * probs * (1 - probs))
    assert np.all(np.abs(counts - draws * probs) <= 5 * sigma + 1e-9)


@pytest.mark.parametrize(
    "args, names",
    [
        (["--temperature", "-1"], ("temperature", ">= 0", "-1")),
        (["--top_p", "1.5"], ("top_p", "(0, 1]", "1.5")),
        (["--top_k", "0"], ("top_k", "1", "0")),
        (["--max_new_tokens", "500"], ("n_positions 128",)),
        (["--num_return_sequences", "0"], ("num_return_sequences", "1", "0")),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_gpt2_run, capsys, args, names):
    argv = ["--model", str(tiny_gpt2_run.output_dir), "--prompt", "x = ", *args]
    assert_one_line_error((main(argv), capsys.readouterr().err), *names)


def test_refuses_a_roberta_model(tmp_path, capsys):
    RobertaConfig().save_pretrained(tmp_path)
    status = main(["--model", str(tmp_path), "--prompt", "x"])
    assert_one_line_error((status, capsys.readouterr().err), "generate", "gpt2")

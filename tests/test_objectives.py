"""The MLM and CLM objectives: masking statistics on real code tokens, loss sums against NumPy."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raises_user_error
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flax_lm.train.objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    make_objective,
    mask_tokens,
)

SIGMAS = 4  # tolerance of every statistical check


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def mlm_rows(code_corpus, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, special_tokens_mask) [rows, 128]: the training modules as <s> doc </s>."""
    texts = [path.read_text() for path in sorted(code_corpus.train.iterdir())]
    documents = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.concatenate(
        [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in documents]
    )
    rows = stream[: len(stream) // 128 * 128].reshape(-1, 128).astype(np.int32)
    return rows, np.isin(rows, tokenizer.all_special_ids)


def within_sigmas(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= SIGMAS * np.sqrt(p * (1 - p) / n)


def mask(rows, special, seed: int, vocab_size: int = 512):
    return mask_tokens(
        rows,
        special,
        np.random.default_rng(seed),
        mlm_probability=0.15,
        mask_token_id=4,
        vocab_size=vocab_size,
    )


# ------------------------------------------------------------------------------------ masking


def test_masking_proportions_follow_hf(mlm_rows, tokenizer):
    rows, special = mlm_rows
    assert rows.size >= 150_000
    inputs, labels = mask(rows, special, seed=0, vocab_size=len(tokenizer))
    targets = labels != IGNORE_INDEX
    eligible = int((~special).sum())
    assert within_sigmas(targets.sum() / eligible, 0.15, eligible)
    assert not (targets & special).any()  # <s>, </s> are never targets
    np.testing.assert_array_equal(labels[targets], rows[targets])
    np.testing.assert_array_equal(inputs[~targets], rows[~targets])

    n, vocab = int(targets.sum()), len(tokenizer)
    masked = inputs[targets] == tokenizer.mask_token_id
    unchanged = inputs[targets] == rows[targets]
    replaced = ~masked & ~unchanged
    # a random replacement may draw <mask> or the original token: 1/vocab each
    assert within_sigmas(masked.mean(), 0.8 + 0.1 / vocab, n)
    assert within_sigmas(unchanged.mean(), 0.1 + 0.1 / vocab, n)
    assert within_sigmas(replaced.mean(), 0.1 * (1 - 2 / vocab), n)
    random_tokens = inputs[targets][replaced]
    assert random_tokens.min() >= 0 and random_tokens.max() < vocab
    uniform_sd = vocab / np.sqrt(12) / np.sqrt(len(random_tokens))
    assert abs(random_tokens.mean() - (vocab - 1) / 2) <= SIGMAS * uniform_sd
    assert inputs.dtype == labels.dtype == np.int32


def test_masking_is_reproducible_from_the_seed(mlm_rows):
    rows, special = mlm_rows[0][:64], mlm_rows[1][:64]
    first, again, other = mask(rows, special, 7), mask(rows, special, 7), mask(rows, special, 8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[1], other[1])


def test_masked_lm_batch_never_targets_padding(code_corpus, tokenizer):
    lines = [
        line for line in (code_corpus.train / "bisect.py").read_text().splitlines() if line.strip()
    ]
    encoded = tokenizer(
        lines, padding="max_length", truncation=True, max_length=32, return_tensors="np"
    )
    objective = make_objective("mlm", tokenizer, SimpleNamespace(mlm_probability=0.5))
    examples = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    batch = objective.make_batch(examples, np.random.default_rng(0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    padding = encoded["attention_mask"] == 0
    assert padding.any()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(batch["input_ids"][padding], tokenizer.pad_token_id)
    np.testing.assert_array_equal(batch["attention_mask"], encoded["attention_mask"])
    targets = batch["labels"] != IGNORE_INDEX
    assert within_sigmas(targets.sum() / (~padding).sum(), 0.5, int((~padding).sum()))


@pytest.mark.parametrize("name", ["clm", "mlm"])
def test_eval_padding_rows_have_no_targets(name, tokenizer, mlm_rows):
    rows, special = mlm_rows[0][:4], mlm_rows[1][:4].astype(np.int32)
    weight = np.array([1, 1, 0, 0], np.float32)
    examples = {"input_ids": rows, "special_tokens_mask": special, "example_weight": weight}
    objective = make_objective(name, tokenizer, SimpleNamespace(mlm_probability=0.15))
    batch = objective.make_batch(examples, np.random.default_rng(0))
    assert (batch["labels"][2:] == IGNORE_INDEX).all() and (batch["attention_mask"][2:] == 0).all()
    assert (batch["labels"][:2] != IGNORE_INDEX).any() and (batch["attention_mask"][:2] == 1).all()
    np.testing.assert_array_equal(batch["example_weight"], weight)
    assert {key: value.dtype for key, value in batch.items()} == {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "labels": np.int32,
        "example_weight": np.float32,
    }


def test_causal_lm_batch_targets_every_attended_token(mlm_rows):
    rows = mlm_rows[0][:3]
    attention = np.ones_like(rows)
    attention[1, 100:] = 0
    batch = CausalLM().make_batch(
        {"input_ids": rows, "attention_mask": attention}, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(batch["input_ids"], rows)
    np.testing.assert_array_equal(batch["labels"], np.where(attention == 1, rows, IGNORE_INDEX))


# --------------------------------------------------------------------------------------- loss


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int, int]:
    """(loss sum, targets, correct) computed directly, in float64."""
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = labels != IGNORE_INDEX
    picked = np.take_along_axis(log_probs, np.where(targets, labels, 0)[..., None], -1)[..., 0]
    correct = targets & (logits.argmax(-1) == labels)
    return -picked[targets].sum(), int(targets.sum()), int(correct.sum())


def loss_terms(objective, logits, labels) -> dict[str, jax.Array]:
    """The objective's loss terms, compiled as the train step compiles them."""
    return jax.jit(objective.loss_terms)(jnp.asarray(logits), {"labels": jnp.asarray(labels)})


@pytest.fixture(scope="module")
def logits_and_labels(mlm_rows):
    """Random logits [3, 16, 512] over real token ids, a quarter of the labels ignored."""
    rng = np.random.default_rng(0)
    ids = mlm_rows[0][:3, :16]
    logits = rng.normal(size=(3, 16, 512)).astype(np.float32) * 3
    logits[0, :5, :] += np.eye(512, dtype=np.float32)[ids[0, 1:6]] * 10  # some correct argmaxes
    labels = np.where(rng.random(ids.shape) < 0.25, IGNORE_INDEX, ids).astype(np.int32)
    return logits, labels


def test_causal_loss_is_shifted_cross_entropy(logits_and_labels):
    logits, labels = logits_and_labels
    terms = loss_terms(CausalLM(), logits, labels)
    loss, targets, correct = numpy_cross_entropy(logits[:, :-1], labels[:, 1:])
    assert correct > 0
    assert all(value.dtype == jnp.float32 for value in terms.values())
    np.testing.assert_allclose(float(terms["loss_sum"]), loss, rtol=1e-5)
    assert float(terms["num_targets"]) == targets
    assert float(terms["num_correct"]) == correct


def test_masked_loss_is_unshifted_cross_entropy(logits_and_labels, tokenizer):
    logits, labels = logits_and_labels
    objective = make_objective("mlm", tokenizer, SimpleNamespace(mlm_probability=0.15))
    terms = loss_terms(objective, logits, labels)
    loss, targets, correct = numpy_cross_entropy(logits, labels)
    np.testing.assert_allclose(float(terms["loss_sum"]), loss, rtol=1e-5)
    assert (float(terms["num_targets"]), float(terms["num_correct"])) == (targets, correct)


def test_bfloat16_logits_are_summed_in_float32(logits_and_labels):
    logits, labels = logits_and_labels
    rounded = jnp.asarray(logits).astype(jnp.bfloat16)
    terms = loss_terms(CausalLM(), rounded, labels)
    loss, _, _ = numpy_cross_entropy(np.asarray(rounded.astype(jnp.float32))[:, :-1], labels[:, 1:])
    assert terms["loss_sum"].dtype == jnp.float32
    np.testing.assert_allclose(float(terms["loss_sum"]), loss, rtol=1e-5)


@pytest.mark.parametrize("name", ["clm", "mlm"])
def test_nan_padding_rows_and_ignored_positions_do_not_leak(name, logits_and_labels, tokenizer):
    logits, labels = logits_and_labels
    objective = make_objective(name, tokenizer, SimpleNamespace(mlm_probability=0.15))
    garbage = logits.copy()
    if name == "mlm":  # logits at a position are scored against that position's label
        garbage[labels == IGNORE_INDEX] = np.inf
    garbage = np.concatenate([garbage, np.full_like(logits[:1], np.nan)])  # an eval padding row
    garbage_labels = jnp.asarray(np.concatenate([labels, np.full_like(labels[:1], IGNORE_INDEX)]))
    clean = loss_terms(objective, logits, labels)
    terms = loss_terms(objective, garbage, garbage_labels)
    for key in terms:
        assert np.isfinite(float(terms[key]))
        np.testing.assert_allclose(float(terms[key]), float(clean[key]), rtol=1e-6)
    loss_sum = jax.jit(
        jax.grad(lambda x: objective.loss_terms(x, {"labels": garbage_labels})["loss_sum"])
    )
    grad = np.asarray(loss_sum(jnp.asarray(garbage)))
    assert np.isfinite(grad).all() and (grad[3] == 0).all()


# ------------------------------------------------------------------------------ construction


def test_make_objective_reads_the_tokenizer(tokenizer):
    objective = make_objective("mlm", tokenizer, SimpleNamespace(mlm_probability=0.2))
    assert isinstance(objective, MaskedLM) and objective.name == "mlm"
    assert objective.mask_token_id == tokenizer.mask_token_id
    assert objective.vocab_size == len(tokenizer) == 512
    assert objective.mlm_probability == 0.2
    assert make_objective("clm", tokenizer, SimpleNamespace()).name == "clm"


def test_mlm_needs_a_mask_token(tiny_tokenizer_dir):
    without_mask = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json")),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    with raises_user_error("mask token", "MLM"):
        make_objective("mlm", without_mask, SimpleNamespace(mlm_probability=0.15))
    with raises_user_error("objective", "'seq2seq'"):
        make_objective("seq2seq", without_mask, SimpleNamespace())


# ------------------------------------------------------------- the MLM head at targets only


@pytest.fixture(scope="module")
def tiny_roberta(tokenizer):
    from flax_lm.config import build_config
    from flax_lm.models import create_model

    config = build_config("roberta", overrides=(
        "vocab_size=512,hidden_size=32,intermediate_size=64,num_hidden_layers=2,"
        "num_attention_heads=2,max_position_embeddings=160"))
    return create_model(config, seed=0)


def test_mlm_head_at_targets_only_gives_the_full_heads_sums(tiny_roberta, mlm_rows, tokenizer):
    """MaskedLM.terms runs the head only at (up to max_targets) target positions; its sums equal
    loss_terms on the full logits, in eval and with dropout, and for a batch with a row of more
    targets than max_targets (which takes the full head)."""
    from flax import nnx

    objective = make_objective("mlm", tokenizer, SimpleNamespace(mlm_probability=0.15))
    rows, _ = mlm_rows
    limit = objective.max_targets(rows.shape[1])
    assert limit == 48  # 128 tokens: mean 19.2 + 6 sd 4.04, rounded up to a multiple of 8
    batch = objective.make_batch({"input_ids": rows[:4]}, np.random.default_rng(0))
    crowded = dict(batch, labels=np.where(np.arange(128) < 100, rows[:4], IGNORE_INDEX))
    assert (batch["labels"] != IGNORE_INDEX).sum(1).max() <= limit
    graphdef, params = nnx.split(tiny_roberta)

    @jax.jit
    def both(params, batch, key):
        model = nnx.merge(graphdef, params)
        full = objective.loss_terms(
            model(batch["input_ids"], batch["attention_mask"], dropout_rng=key), batch)
        return objective.terms(model, batch, key), full

    for example in (batch, crowded):
        for key in (None, jax.random.key(0)):
            fast, full = both(params, {k: jnp.asarray(v) for k, v in example.items()}, key)
            assert float(full["num_targets"]) == (example["labels"] != IGNORE_INDEX).sum()
            np.testing.assert_allclose(float(fast["loss_sum"]), float(full["loss_sum"]),
                                       rtol=1e-5)  # float32 sums in another order
            assert float(fast["num_targets"]) == float(full["num_targets"])
            assert float(fast["num_correct"]) == float(full["num_correct"])

"""The key-token weighted CLM loss: the notebook's formula, its sums and gradients, the key-token
lookup in a real tokenizer, and plain token-level evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Bigram, raises_user_error
from flax import nnx
from transformers import AutoTokenizer

from flax_lm.train.args import parse_config
from flax_lm.train.objectives import CausalLM, KeytokenWeightedCLM, make_objective
from flax_lm.train.step import TrainState, make_train_step

VOCAB, BATCH, SEQ = 64, 8, 16
KEYS = (3, 7, 11)
TOLERANCE = 1e-5  # float32 sums of a few hundred terms against float64 NumPy


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def random_examples(seed: int, lengths: list[int] | None = None) -> dict[str, np.ndarray]:
    """input_ids [BATCH, SEQ] with key tokens sprinkled in; attention ends at `lengths`."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    input_ids[rng.random((BATCH, SEQ)) < 0.2] = rng.choice(KEYS)
    examples = {"input_ids": input_ids}
    if lengths is not None:
        examples["attention_mask"] = (np.arange(SEQ) < np.array(lengths)[:, None]).astype(np.int32)
    return examples


def random_logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (BATCH, SEQ, VOCAB)).astype(np.float32)


def notebook_loss(logits: np.ndarray, input_ids: np.ndarray, alpha: float) -> float:
    """The seed notebook's keytoken_weighted_loss, in float64 NumPy, for full blocks."""
    shifted = logits[:, :-1].astype(np.float64)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    token_loss = -np.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1)[..., 0]
    weights = 1.0 + alpha * np.isin(input_ids, KEYS).sum(axis=1)
    return float((token_loss.mean(axis=1) * weights).mean())


def mean(terms: dict) -> float:
    return float(terms["loss_sum"]) / float(terms["num_targets"])


def test_weighted_loss_is_the_notebook_formula():
    objective = KeytokenWeightedCLM(keytoken_ids=KEYS, alpha=0.7)
    examples, logits = random_examples(0), random_logits(1)
    batch = objective.make_batch(examples, np.random.default_rng(0))
    terms = objective.loss_terms(jnp.asarray(logits), batch)
    assert float(terms["num_targets"]) == BATCH  # the sums count sequences
    expected = notebook_loss(logits, examples["input_ids"], alpha=0.7)
    assert mean(terms) == pytest.approx(expected, rel=TOLERANCE)
    # a sequence's weight counts its key tokens among the inputs, the first position included
    counts = np.isin(examples["input_ids"], KEYS).sum(axis=1)
    np.testing.assert_allclose(batch["keytoken_weight"], 1 + 0.7 * counts, rtol=1e-6)
    # accuracy: the mean over sequences of each sequence's share of correct predictions
    hits = logits[:, :-1].argmax(-1) == examples["input_ids"][:, 1:]
    accuracy = float(terms["num_correct"]) / float(terms["num_targets"])
    assert accuracy == pytest.approx(hits.mean(axis=1).mean(), rel=TOLERANCE)


def test_alpha_zero_is_the_mean_of_per_sequence_clm_losses():
    """Ragged sequences (and one without any target), where per-sequence means differ from the
    token mean: alpha 0 gives the mean of CausalLM's loss of each sequence on its own."""
    lengths = [16, 9, 2, 16, 5, 1, 12, 7]  # a length-1 row has no target and must not count
    examples, logits = random_examples(2, lengths), random_logits(3)
    weighted = KeytokenWeightedCLM(keytoken_ids=KEYS, alpha=0.0)
    batch = weighted.make_batch(examples, np.random.default_rng(0))
    terms = weighted.loss_terms(jnp.asarray(logits), batch)
    plain, rows = CausalLM(), [i for i, n in enumerate(lengths) if n > 1]
    per_sequence = [
        mean(
            plain.loss_terms(
                jnp.asarray(logits[i : i + 1]), {k: v[i : i + 1] for k, v in batch.items()}
            )
        )
        for i in rows
    ]
    assert float(terms["num_targets"]) == len(rows)
    assert mean(terms) == pytest.approx(np.mean(per_sequence), rel=TOLERANCE)
    token_mean = mean(plain.loss_terms(jnp.asarray(logits), batch))
    assert abs(mean(terms) - token_mean) > 1e-3  # the two reductions really differ here


def test_sums_over_microbatches_give_the_whole_batch():
    objective = KeytokenWeightedCLM(keytoken_ids=KEYS, alpha=1.0)
    batch = objective.make_batch(random_examples(4, [16, 16, 11, 16, 3, 16, 16, 8]), None)
    logits = jnp.asarray(random_logits(5))
    loss_terms = jax.jit(objective.loss_terms)
    whole = loss_terms(logits, batch)
    for parts in (2, 4):
        split = [
            loss_terms(logits[rows], {k: v[rows] for k, v in batch.items()})
            for rows in np.array_split(np.arange(BATCH), parts)
        ]
        for key in ("loss_sum", "num_targets", "num_correct"):
            total = sum(float(t[key]) for t in split)
            assert total == pytest.approx(float(whole[key]), rel=1e-6), (key, parts)


def test_accumulated_train_step_follows_the_gradient_of_the_notebook_loss():
    """SGD with learning rate 1 moves the params by minus the gradient: accumulated over 4
    microbatches, it equals the gradient of the notebook formula on the whole batch in jnp."""
    graphdef, params = nnx.split(Bigram(VOCAB), nnx.Param)
    objective = KeytokenWeightedCLM(keytoken_ids=KEYS, alpha=0.5)
    batch = objective.make_batch(random_examples(6), None)

    def direct_loss(p):
        logits = nnx.merge(graphdef, p)(batch["input_ids"], batch["attention_mask"])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], batch["input_ids"][:, 1:]
        )
        return (ce.mean(axis=1) * batch["keytoken_weight"]).mean()

    loss, expected = jax.jit(jax.value_and_grad(direct_loss))(params)
    sgd = optax.sgd(1.0)
    step = jax.jit(make_train_step(graphdef, objective, sgd, optax.constant_schedule(1.0)))
    state = TrainState(jnp.zeros((), jnp.int32), params, sgd.init(params),
                       jax.random.key_data(jax.random.key(0)))  # fmt: skip
    micro = {k: jnp.asarray(v.reshape(4, -1, *v.shape[1:])) for k, v in batch.items()}
    new_state, metrics = step(state, micro)
    assert float(metrics["num_targets"]) == BATCH
    assert mean(metrics) == pytest.approx(float(loss), rel=TOLERANCE)
    grads = jax.tree.map(jnp.subtract, params, new_state.params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_evaluation_batches_are_scored_token_by_token():
    """Batches from eval_batches (with example_weight) get CausalLM's plain token terms."""
    examples = random_examples(7, [16, 16, 16, 16, 16, 16, 0, 0])
    examples["example_weight"] = np.array([1] * 6 + [0, 0], np.float32)
    weighted = KeytokenWeightedCLM(keytoken_ids=KEYS, alpha=1.0)
    batch = weighted.make_batch(examples, None)
    assert "keytoken_weight" not in batch
    logits = jnp.asarray(random_logits(8))
    terms = weighted.loss_terms(logits, batch)
    plain = CausalLM().loss_terms(logits, CausalLM().make_batch(examples, None))
    assert {k: float(v) for k, v in terms.items()} == {k: float(v) for k, v in plain.items()}
    assert float(terms["num_targets"]) == 6 * (SEQ - 1)


def keytoken_cfg(keytokens, alpha: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(loss="keytoken_weighted", keytokens=keytokens, keytoken_alpha=alpha)


def single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def test_key_tokens_are_single_tokens_with_or_without_a_leading_space(tokenizer, capsys):
    """In the tiny code tokenizer "self" is a token alone and after a space, "return" only as
    " return" (ĠReturn), and "plt" is no single token at all."""
    assert single_token(tokenizer, "plt") is None and single_token(tokenizer, " plt") is None
    assert single_token(tokenizer, "return") is None
    objective = make_objective("clm", tokenizer, keytoken_cfg(["self", "return", "plt"], 0.5))
    assert isinstance(objective, KeytokenWeightedCLM) and objective.alpha == 0.5
    spellings = ("self", " self", " return")
    assert objective.keytoken_ids == tuple(sorted({single_token(tokenizer, s) for s in spellings}))
    assert len(objective.keytoken_ids) == 3
    stderr = capsys.readouterr().err
    assert stderr == "skipping key tokens that are not single tokens: plt\n"


def test_bad_key_token_settings_are_user_errors(tokenizer, capsys):
    with raises_user_error("plt, pd", "single token"):
        make_objective("clm", tokenizer, keytoken_cfg(["plt", "pd"]))
    assert "skipping key tokens that are not single tokens: plt, pd" in capsys.readouterr().err
    with raises_user_error("--keytokens"):
        make_objective("clm", tokenizer, keytoken_cfg(None))
    plain = SimpleNamespace(loss="cross_entropy", keytokens=["self"], keytoken_alpha=1.0)
    assert type(make_objective("clm", tokenizer, plain)) is CausalLM


def test_flags_and_yaml_give_the_key_token_settings(tmp_path):
    base = ["--output_dir", str(tmp_path / "out"), "--train_file", "corpus"]
    flags = ["--loss", "keytoken_weighted", "--keytokens", "plt, pd,sk", "--keytoken_alpha", "0.5"]
    cfg = parse_config([*base, *flags], "clm")
    assert (cfg.loss, cfg.keytokens, cfg.keytoken_alpha) == (
        "keytoken_weighted",
        ["plt", "pd", "sk"],
        0.5,
    )
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("loss: keytoken_weighted\nkeytokens: [plt, fit]\nkeytoken_alpha: 2\n")
    cfg = parse_config([*base, "--config", str(yaml_file)], "clm")
    assert (cfg.loss, cfg.keytokens, cfg.keytoken_alpha) == (
        "keytoken_weighted",
        ["plt", "fit"],
        2.0,
    )
    assert parse_config(base, "clm").loss == "cross_entropy"
    for bad, names in (
        (["--loss", "focal"], ("--loss", "'focal'", "cross_entropy, keytoken_weighted")),
        (["--keytoken_alpha", "-1"], ("--keytoken_alpha", "negative", "-1")),
    ):
        with raises_user_error(*names):
            parse_config([*base, *bad], "clm")
    with raises_user_error("--keytokens"):  # a CLM-only flag
        parse_config([*base, "--keytokens", "plt"], "mlm")

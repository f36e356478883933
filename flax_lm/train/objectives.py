"""The pretraining objectives: what a batch's targets are and how the loss counts them.

An objective turns examples into model inputs with labels (NumPy, on the host) and reduces logits
to float32 SUMS (loss, target and correct counts), so that gradient accumulation and any number of
devices give exactly the global mean. A new objective is a class with `name`, `from_tokenizer`,
`make_batch`, `loss_terms` and `terms` (the train and eval steps call `terms(model, batch, rng)`,
which may run the output layer only where the loss needs it, as MaskedLM does), registered in
IMPLEMENTATIONS under a name of args.OBJECTIVES (the scripts' objectives); `token_cross_entropy`
gives it the per-token losses to weight as it needs (e.g. per sequence, as KeytokenWeightedCLM
does).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from flax_lm.errors import UserError
from flax_lm.models.output import (
    IGNORE_INDEX,
    OutputLayer,
    cross_entropy_sums,
    token_cross_entropy,
)
from flax_lm.train.args import OBJECTIVES, check_range

MASK_FRACTION = 0.8  # of the MLM targets: replaced by <mask>
RANDOM_FRACTION = 0.1  # replaced by a random token; the remaining 10% stay unchanged

Batch = dict[str, np.ndarray]


class Objective(Protocol):
    name: str

    def make_batch(self, examples: Batch, rng: np.random.Generator) -> Batch:
        """{"input_ids", "attention_mask", "labels"} int32 [batch, seq] (+ "example_weight" and
        any float32 [batch] the objective adds, e.g. "keytoken_weight")."""
        ...

    def loss_terms(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """float32 sums over the batch: "loss_sum", "num_targets", "num_correct"."""
        ...

    def terms(self, model, batch: dict[str, jax.Array],
              dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """`loss_terms` of the model's logits on the batch (dropout_rng None: eval mode); an
        objective may compute only the logits its loss needs."""
        ...


def summed_loss_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    losses, is_target, is_correct = token_cross_entropy(logits, labels)
    return {
        "loss_sum": losses.sum(),
        "num_targets": is_target.sum(dtype=jnp.float32),
        "num_correct": is_correct.sum(dtype=jnp.float32),
    }


def summed_output_terms(
    output: OutputLayer, labels: jax.Array, *, next_token: bool = False,
    most_per_chunk: int | None = None,
) -> dict[str, jax.Array]:
    """`summed_loss_terms` of the output layer's logits (with `next_token`, of the logits but the
    last against the labels but the first), made without holding them whole when they are large
    (models/output.py; `most_per_chunk` as there)."""
    is_target = labels != IGNORE_INDEX
    loss_sum, is_correct = cross_entropy_sums(
        output, labels, is_target.astype(jnp.float32), next_token=next_token,
        most_per_chunk=most_per_chunk,
    )
    return {
        "loss_sum": loss_sum,
        "num_targets": (is_target[:, 1:] if next_token else is_target).sum(dtype=jnp.float32),
        "num_correct": is_correct.sum(dtype=jnp.float32),
    }


def _inputs_and_attention(examples: Batch) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (all ones when absent), zeroed on eval padding rows."""
    input_ids = np.asarray(examples["input_ids"], dtype=np.int32)
    attention_mask = np.asarray(examples.get("attention_mask", np.ones_like(input_ids)), np.int32)
    if "example_weight" in examples:
        real_rows = np.asarray(examples["example_weight"]) > 0
        attention_mask = np.where(real_rows[:, None], attention_mask, 0).astype(np.int32)
    return input_ids, attention_mask


def _with_weight(batch: Batch, examples: Batch) -> Batch:
    if "example_weight" in examples:
        batch["example_weight"] = np.asarray(examples["example_weight"], dtype=np.float32)
    return batch


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction (GPT-2): every attended token is the target of the one before it."""

    name: ClassVar[str] = "clm"

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg) -> CausalLM:
        return cls()

    def make_batch(self, examples: Batch, rng: np.random.Generator) -> Batch:
        input_ids, attention_mask = _inputs_and_attention(examples)
        labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return _with_weight(batch, examples)

    def loss_terms(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return summed_loss_terms(logits[:, :-1], batch["labels"][:, 1:])

    def terms(self, model, batch: dict[str, jax.Array],
              dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        hidden = model.encode(batch["input_ids"], batch["attention_mask"],
                              dropout_rng=dropout_rng)
        return self.output_terms(model.output_layer(hidden), batch)

    def output_terms(self, output: OutputLayer, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """`loss_terms` of the output layer's logits, without them whole."""
        return summed_output_terms(output, batch["labels"], next_token=True)


@dataclass(frozen=True)
class KeytokenWeightedCLM(CausalLM):
    """CLM whose training loss favours sequences rich in key tokens (e.g. plt, pd, fit).

    loss = mean over sequences of weight × (mean token cross-entropy of the sequence), where
    weight = 1 + alpha × (occurrences of key-token ids among the sequence's attended input ids).
    As sums, the training terms are "loss_sum" = Σ weight × mean CE, "num_targets" = number of
    sequences with a target and "num_correct" = Σ per-sequence accuracy, so loss_sum / num_targets
    is the weighted loss and num_correct / num_targets the mean per-sequence accuracy, exactly,
    however the batch is split into devices and microbatches.

    Only training batches carry the weights ("keytoken_weight", made on the host). Evaluation
    batches (those with "example_weight") are scored token by token like CausalLM, so eval_loss,
    eval_accuracy and perplexity compare with any other CLM run and with `flax-lm evaluate`.
    """

    keytoken_ids: tuple[int, ...] = ()
    alpha: float = 1.0

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg) -> KeytokenWeightedCLM:
        if not cfg.keytokens:
            raise UserError("--loss keytoken_weighted needs --keytokens (e.g. plt,pd,fit)")
        return cls(keytoken_ids=keytoken_ids(tokenizer, cfg.keytokens), alpha=cfg.keytoken_alpha)

    def make_batch(self, examples: Batch, rng: np.random.Generator) -> Batch:
        batch = super().make_batch(examples, rng)
        if "example_weight" not in examples:
            is_key = np.isin(batch["input_ids"], self.keytoken_ids) & (batch["attention_mask"] == 1)
            batch["keytoken_weight"] = (1.0 + self.alpha * is_key.sum(axis=1)).astype(np.float32)
        return batch

    def loss_terms(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if "keytoken_weight" not in batch:
            return super().loss_terms(logits, batch)
        losses, _, is_correct = token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
        targets, per_target = self._targets_per_row(batch["labels"])
        loss_sum = (batch["keytoken_weight"] * losses.sum(axis=1) * per_target).sum()
        return self._sequence_terms(loss_sum, is_correct, targets, per_target)

    def output_terms(self, output: OutputLayer, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """`loss_terms` without whole logits: the same weighted sum, each target weighted by its
        row's keytoken_weight / targets (weights that do not depend on the parameters)."""
        if "keytoken_weight" not in batch:
            return super().output_terms(output, batch)
        labels = batch["labels"]
        targets, per_target = self._targets_per_row(labels)
        weights = (labels != IGNORE_INDEX) * (batch["keytoken_weight"] * per_target)[:, None]
        loss_sum, is_correct = cross_entropy_sums(output, labels, weights, next_token=True)
        return self._sequence_terms(loss_sum, is_correct, targets, per_target)

    @staticmethod
    def _targets_per_row(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(next-token targets of each row, 1 / max(targets, 1)): rows without targets add
        nothing."""
        targets = (labels[:, 1:] != IGNORE_INDEX).sum(axis=1, dtype=jnp.float32)
        return targets, 1.0 / jnp.maximum(targets, 1.0)

    @staticmethod
    def _sequence_terms(loss_sum, is_correct, targets, per_target) -> dict[str, jax.Array]:
        """The sums of the class docstring: sequences with a target, their accuracy."""
        return {
            "loss_sum": loss_sum,
            "num_targets": (targets > 0).sum(dtype=jnp.float32),
            "num_correct": (is_correct.sum(axis=1, dtype=jnp.float32) * per_target).sum(),
        }


def keytoken_ids(tokenizer, keytokens: list[str]) -> tuple[int, ...]:
    """The ids of the key tokens that are single tokens, alone or after a space (" plt", which a
    byte-level BPE spells "Ġplt"); the others are reported on stderr and skipped."""
    ids, skipped = set(), []
    for keytoken in keytokens:
        spellings = {keytoken, " " + keytoken.lstrip()}
        found = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in spellings]
        single = {encoded[0] for encoded in found if len(encoded) == 1}
        if single:
            ids |= single
        else:
            skipped.append(keytoken)
    if skipped:
        print(
            f"skipping key tokens that are not single tokens: {', '.join(skipped)}",
            file=sys.stderr,
        )
    if not ids:
        raise UserError(
            f"none of the key tokens {', '.join(keytokens)} is a single token of the tokenizer"
        )
    return tuple(sorted(ids))


def mask_tokens(
    input_ids: np.ndarray,
    special_tokens_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    mlm_probability: float,
    mask_token_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(masked inputs, labels) with the semantics of HF's DataCollatorForLanguageModeling.

    Each position outside `special_tokens_mask` (pass padding there too) becomes a target with
    probability mlm_probability; targets are replaced by <mask> 80%, a random token 10%, left
    unchanged 10% of the time. Labels are the original ids at targets, -100 elsewhere.
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    is_target = (rng.random(input_ids.shape) < mlm_probability) & ~np.asarray(
        special_tokens_mask, bool
    )
    labels = np.where(is_target, input_ids, IGNORE_INDEX).astype(np.int32)
    action = rng.random(input_ids.shape)
    random_tokens = rng.integers(0, vocab_size, size=input_ids.shape, dtype=np.int32)
    inputs = np.where(is_target & (action < MASK_FRACTION), mask_token_id, input_ids)
    is_random = is_target & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    inputs = np.where(is_random, random_tokens, inputs)
    return inputs.astype(np.int32), labels


@dataclass(frozen=True)
class MaskedLM:
    """Masked-token prediction (RoBERTa): a random mlm_probability share of the tokens is hidden."""

    mask_token_id: int
    vocab_size: int
    special_token_ids: tuple[int, ...]
    mlm_probability: float = 0.15
    name: ClassVar[str] = "mlm"

    @classmethod
    def from_tokenizer(cls, tokenizer, cfg) -> MaskedLM:
        if tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no mask token; MLM needs one")
        check_range("mlm_probability", cfg.mlm_probability)
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            special_token_ids=tuple(tokenizer.all_special_ids),
            mlm_probability=cfg.mlm_probability,
        )

    def make_batch(self, examples: Batch, rng: np.random.Generator) -> Batch:
        input_ids, attention_mask = _inputs_and_attention(examples)
        special = examples.get("special_tokens_mask")
        if special is None:
            special = np.isin(input_ids, self.special_token_ids)
        never_target = np.asarray(special, bool) | (attention_mask == 0)
        inputs, labels = mask_tokens(
            input_ids,
            never_target,
            rng,
            mlm_probability=self.mlm_probability,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
        )
        batch = {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}
        return _with_weight(batch, examples)

    def loss_terms(self, logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return summed_loss_terms(logits, batch["labels"])

    def terms(self, model, batch: dict[str, jax.Array],
              dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """The MLM head runs only where the loss looks: at most `max_targets(seq)` positions a
        row (targets first), a quarter to a third of the vocabulary projection's FLOPs at
        mlm_probability 0.15. A batch with a row holding more targets (6 standard deviations
        above the mean: about one row in a billion) takes the full head instead, so the result
        is always the same sums as `loss_terms` on the full logits."""
        labels = batch["labels"]
        hidden = model.encode(batch["input_ids"], batch["attention_mask"],
                              dropout_rng=dropout_rng)
        limit = self.max_targets(labels.shape[1])
        if limit >= labels.shape[1]:
            return summed_output_terms(model.output_layer(hidden), labels)
        is_target = labels != IGNORE_INDEX

        def targets_only(hidden):
            order = jnp.argsort(~is_target, axis=1, stable=True)[:, :limit]
            picked = jnp.take_along_axis(hidden, order[..., None], axis=1)
            return summed_output_terms(model.output_layer(picked),
                                       jnp.take_along_axis(labels, order, axis=1))

        @jax.checkpoint  # keeps its residuals out of the taken branch
        def every_position(hidden):  # in chunks no larger than the usual branch's logits
            return summed_output_terms(model.output_layer(hidden), labels, most_per_chunk=limit)

        fits = is_target.sum(axis=1).max() <= limit
        return jax.lax.cond(fits, targets_only, every_position, hidden)

    def max_targets(self, seq_len: int) -> int:
        """Targets a row is given room for: mean + 6 sd of Binomial(seq_len, mlm_probability),
        rounded up to a multiple of 8."""
        mean = seq_len * self.mlm_probability
        sd = math.sqrt(mean * (1.0 - self.mlm_probability))
        return min(seq_len, 8 * math.ceil((mean + 6.0 * sd) / 8))


IMPLEMENTATIONS: dict[str, type] = {objective.name: objective for objective in (CausalLM, MaskedLM)}


def make_objective(name: str, tokenizer, cfg) -> Objective:
    """The objective `name` ("clm" or "mlm"), configured from the tokenizer and the run config;
    CLM with `cfg.loss == "keytoken_weighted"` is KeytokenWeightedCLM."""
    if name not in IMPLEMENTATIONS:
        raise UserError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if name == "clm" and getattr(cfg, "loss", "cross_entropy") == "keytoken_weighted":
        return KeytokenWeightedCLM.from_tokenizer(tokenizer, cfg)
    return IMPLEMENTATIONS[name].from_tokenizer(tokenizer, cfg)

"""The output layer over the vocabulary, and its cross-entropy without [batch, seq, vocab] logits.

A model's last features [batch, seq, width] meet the vocabulary only here: `OutputLayer` holds
them with the table (and bias) they are multiplied by, `logits()` gives the float32 logits when
something wants them whole (generation, fill-mask, the reference loss), and `cross_entropy_sums`
gives the losses the training and eval steps need without ever holding the whole logits:

- The sequence is cut into chunks of `chunk_length(seq, vocab)` positions, each chunk's logits
  made, reduced and dropped before the next (a `lax.scan`): at most LOGITS_PER_CHUNK_ROW float32
  logits per row exist at a time, instead of seq x vocab. With GPT-2's 50,257-token vocabulary at
  512 positions that is 8 chunks of 64 positions: an eighth of the logits' memory.
- Differentiated, the same pass also makes the gradients (the way fused linear cross-entropy
  kernels do): each chunk's softmax minus one-hot, times the token weights, goes straight into
  the gradient of the features and of the table, so no logits are kept for the backward pass and
  none are recomputed. This works because the loss is a weighted SUM of per-token losses with
  weights that do not depend on the parameters: the backward pass only scales what the forward
  pass made by the loss's cotangent. The matmuls take the compute dtype with float32
  accumulation, the softmax is float32, as in `layers.low_precision_head`.
- Accuracy comes from the same reduction: a target counts as correct when its logit is the
  row's maximum, which the log-sum-exp computes anyway, so the step has no separate argmax over
  the vocabulary. (It differs from argmax only on exact ties with another token.)
- Off the CPU (`OutputLayer.fused`) the maximum and the sum of exponentials come from one pass
  over each chunk's float32 logits (an online softmax, `_max_and_sum_exp`), not two.

Rows whose logits fit in one chunk (e.g. an 8,192-token vocabulary at 512 positions, or the MLM
head's masked positions) take, on CPUs, the whole-logits loss, `token_cross_entropy`, and
autodiff: XLA:CPU fuses its softmax gradient into the head's matmuls and its argmax into the
softmax's maximum, which measured faster there than the hand-made gradient, and the memory is
bounded anyway. Elsewhere (`OutputLayer.fused`, the backend's choice) they take the one-chunk
case of the hand-made gradient: on a GPU the autodiff one makes separate passes over the float32
logits (exp, the label's scatter, the softmax's product), so a RoBERTa step compiled for a GPU
moves more bytes with it (bench/gpu_estimate.py; docs/performance.md, "On a GPU").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import optax

from flax_lm.models.layers import vocab_logits

IGNORE_INDEX = -100  # label of a position that is not a target
# Float32 logits a row holds at a time while the loss is computed: a sequence is cut
# into power-of-two chunks of positions that stay under it (one chunk when the whole row fits).
LOGITS_PER_CHUNK_ROW = 2**22
MIN_CHUNK = 8  # positions: fewer would leave the vocabulary matmul too thin to run well
VOCAB_MULTIPLE = 128  # a fused loss pads the vocabulary to this (see _padded_head)


@partial(jax.tree_util.register_dataclass, data_fields=["features", "table", "bias"],
         meta_fields=["fused"])
@dataclass(frozen=True)
class OutputLayer:
    """logits = features @ table.T (+ bias): features [..., width] in the compute dtype, the
    float32 table [vocab, width] (the tied input embeddings or an own one) and bias [vocab].
    fused: the loss as accelerators take it (the model's backend choice, flax_lm/backend.py):
    the hand-made gradient even where the logits fit one chunk, and the vocabulary padded to
    VOCAB_MULTIPLE for the chunks' matmuls. Static, not an array, under jit."""

    features: jax.Array
    table: jax.Array
    bias: jax.Array | None = None
    fused: bool = False

    def logits(self) -> jax.Array:
        """The float32 logits [..., vocab]."""
        logits = vocab_logits(self.features, self.table)
        return logits if self.bias is None else logits + self.bias


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    """(cross-entropy, is_target, is_correct), each [batch, seq], of whole logits; all 0 where
    labels == IGNORE_INDEX. Correct means the argmax is the label.

    Non-targets are dropped with jnp.where on the logits and the loss, so NaN/inf logits in padding
    rows reach neither the sums nor the logits' gradient.
    """
    is_target = labels != IGNORE_INDEX
    logits = jnp.where(is_target[..., None], logits.astype(jnp.float32), 0.0)
    safe_labels = jnp.where(is_target, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
    is_correct = is_target & (jnp.argmax(logits, axis=-1) == safe_labels)
    return jnp.where(is_target, losses, 0.0), is_target, is_correct


def chunk_length(length: int, vocab_size: int, most: int | None = None) -> int:
    """Positions per chunk: the whole row when its logits fit in LOGITS_PER_CHUNK_ROW (and it
    has at most `most` positions), else the largest power of two that does (at least
    MIN_CHUNK)."""
    fits = LOGITS_PER_CHUNK_ROW // vocab_size
    if most is not None:
        fits = min(fits, most)
    if length <= fits:
        return length
    return max(MIN_CHUNK, 1 << (max(fits, 1).bit_length() - 1))


def cross_entropy_sums(
    output: OutputLayer, labels: jax.Array, weights: jax.Array, *, next_token: bool = False,
    most_per_chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(Σ weights x cross-entropy, is_correct) over the [batch, seq] positions.

    labels: int [batch, seq], IGNORE_INDEX where a position is no target; weights: float32
    [batch, seq], each target's weight in the sum (0 elsewhere), not differentiated. With
    `next_token` (causal LM) the features at position t are scored against labels[:, t + 1] and
    weights[:, t + 1]; the last position has no target. The sum is differentiable in the
    features, table and bias; is_correct (bool [batch, seq or seq - 1]) is not. Logits of
    non-targets are taken as zeros, so whatever garbage (NaN, inf) padding rows produce reaches
    neither the sum nor the gradient of the logits. `most_per_chunk`: positions a chunk may
    hold at most (the MLM head's fallback over every position keeps its chunks no larger than
    the masked positions it usually takes, so the rare branch sets no memory peak).
    """
    length = output.features.shape[1]
    weights = weights.astype(jnp.float32)
    chunk = chunk_length(length, output.table.shape[0], most_per_chunk)
    if chunk == length and not output.fused:  # autodiff of whole logits: XLA:CPU fuses it better
        logits = output.logits()
        if next_token:
            logits, labels, weights = logits[:, :-1], labels[:, 1:], weights[:, 1:]
        losses, _, is_correct = token_cross_entropy(logits, labels)
        return (weights * losses).sum(), is_correct
    features = output.features
    if next_token:  # shifting the labels, not the features, keeps the length a power of two
        labels = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
        weights = jnp.pad(weights[:, 1:], ((0, 0), (0, 1)))
    chunks = -(-length // chunk)
    padding = chunks * chunk - length
    if padding:  # a last partial chunk is filled with positions that are no target
        features = jnp.pad(features, ((0, 0), (0, padding), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, padding)), constant_values=IGNORE_INDEX)
        weights = jnp.pad(weights, ((0, 0), (0, padding)))
    loss, is_correct = _chunked_cross_entropy(
        output.fused, _chunked(features, chunks), output.table, output.bias, _chunked(labels, chunks),
        _chunked(weights, chunks),
    )
    return loss, _unchunked(is_correct)[:, :length]


def _chunked(x: jax.Array, chunks: int) -> jax.Array:
    """[batch, seq, ...] -> [chunks, batch, seq / chunks, ...]: the batch axis keeps its place
    (and its sharding); the scan walks the new leading axis."""
    batch, length = x.shape[:2]
    return jnp.swapaxes(x.reshape(batch, chunks, length // chunks, *x.shape[2:]), 0, 1)


def _unchunked(x: jax.Array) -> jax.Array:
    chunks, batch, chunk = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(batch, chunks * chunk, *x.shape[3:])


def _padded_head(table, bias, dtype, fused):
    """The table in the compute dtype and the bias, their vocabulary padded, for a `fused` loss,
    to a multiple of VOCAB_MULTIPLE: done once for all chunks, where each chunk would otherwise
    convert the table again and XLA:GPU pad both it and the chunk's logits gradient to aligned
    widths. (XLA:CPU pads nothing: there the padding would only cost a copy of the table, so a
    CPU model's output layer, not `fused`, is left as it is.)"""
    padding = -table.shape[0] % VOCAB_MULTIPLE if fused else 0
    table = jnp.pad(table.astype(dtype), ((0, padding), (0, 0)))
    return table, None if bias is None else jnp.pad(bias, (0, padding))


def _max_and_sum_exp(logits):
    """(row maximum m, Σ exp(logits - m)) in ONE pass over the float32 logits: a variadic
    reduction of (maximum, sum) pairs, each merge rescaling the smaller maximum's sum (the online
    softmax), with one exponential a merge. Two reductions would read the chunk's logits twice;
    on a GPU those passes are memory-bound. The padding is the lowest float, not -inf: merging
    two padding-only partial results gives exp(0), never exp(-inf + inf)."""

    def merge(a, b):
        (max_a, sum_a), (max_b, sum_b) = a, b
        scale = jnp.exp(-jnp.abs(max_a - max_b))  # the smaller maximum's sum, rescaled
        a_larger = max_a >= max_b
        return (jnp.maximum(max_a, max_b),
                jnp.where(a_larger, sum_a + sum_b * scale, sum_a * scale + sum_b))

    lowest = jnp.finfo(jnp.float32).min
    return jax.lax.reduce((logits, jnp.ones_like(logits)), (lowest, 0.0), merge,
                          (logits.ndim - 1,))


def _softmax_terms(x, table, bias, labels, vocab, online):
    """One chunk's logits over a `_padded_head` (the padding's masked out), shifted by their row
    maximum (non-targets' zeroed), with their sum of exponentials, safe labels, target mask,
    cross-entropies and correctness. `online`: the maximum and the sum in one pass
    (`_max_and_sum_exp`), as a fused loss takes them; XLA:CPU keeps two reductions."""
    is_target = labels != IGNORE_INDEX
    logits = jnp.einsum("...d,vd->...v", x, table, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    if table.shape[0] > vocab:
        padding = jnp.finfo(jnp.float32).min if online else -jnp.inf
        logits = jnp.where(jnp.arange(table.shape[0]) < vocab, logits, padding)
    logits = jnp.where(is_target[..., None], logits, 0.0)
    if online:
        maximum, sum_exp = _max_and_sum_exp(logits)
        shifted = logits - maximum[..., None]
    else:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        sum_exp = jnp.exp(shifted).sum(axis=-1)
    safe_labels = jnp.where(is_target, labels, 0)
    label_logit = jnp.take_along_axis(shifted, safe_labels[..., None], axis=-1)[..., 0]
    cross_entropy = jnp.where(is_target, jnp.log(sum_exp) - label_logit, 0.0)
    return shifted, sum_exp, safe_labels, cross_entropy, is_target & (label_logit >= 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_cross_entropy(fused, features, table, bias, labels, weights):
    """Forward only (evaluation): the weighted sum and correctness, chunk by chunk; `fused`
    (OutputLayer.fused) pads the vocabulary to VOCAB_MULTIPLE and reduces it in one pass."""
    vocab = table.shape[0]
    table, bias = _padded_head(table, bias, features.dtype, fused)

    def body(loss, chunk):
        x, chunk_labels, chunk_weights = chunk
        *_, cross_entropy, correct = _softmax_terms(x, table, bias, chunk_labels, vocab, fused)
        return loss + (chunk_weights * cross_entropy).sum(), correct

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (features, labels, weights))


def _chunked_cross_entropy_forward(fused, features, table, bias, labels, weights):
    """The sum and correctness, and the sum's gradients made on the way (see the module)."""
    compute, vocab = features.dtype, table.shape[0]
    table_in_compute, padded_bias = _padded_head(table, bias, compute, fused)

    def body(carry, chunk):
        loss, d_table, d_bias = carry  # d_bias None without a bias
        x, chunk_labels, chunk_weights = chunk
        shifted, sum_exp, safe_labels, cross_entropy, correct = _softmax_terms(
            x, table_in_compute, padded_bias, chunk_labels, vocab, fused
        )
        probabilities = jnp.exp(shifted) / sum_exp[..., None]
        one_hot = jax.nn.one_hot(safe_labels, probabilities.shape[-1], dtype=jnp.float32)
        d_logits = ((probabilities - one_hot) * chunk_weights[..., None]).astype(compute)
        d_logits = d_logits.reshape(-1, d_logits.shape[-1])  # [tokens, vocab]
        if bias is not None:  # from the rounded gradient the table's takes too: the float32
            # one, read by both this sum and the rounding, would be written out in full first
            d_bias = d_bias + d_logits.sum(axis=0, dtype=jnp.float32)
        d_x = jnp.dot(d_logits, table_in_compute,
                      preferred_element_type=jnp.float32).astype(compute).reshape(x.shape)
        d_table = d_table + jnp.dot(d_logits.T, x.reshape(-1, x.shape[-1]),
                                    preferred_element_type=jnp.float32)
        loss = loss + (chunk_weights * cross_entropy).sum()
        return (loss, d_table, d_bias), (correct, d_x)

    start = (jnp.zeros((), jnp.float32), jnp.zeros(table_in_compute.shape, jnp.float32),
             None if bias is None else jnp.zeros(padded_bias.shape, jnp.float32))
    (loss, d_table, d_bias), (correct, d_features) = jax.lax.scan(
        body, start, (features, labels, weights)
    )
    return (loss, correct), (d_features, d_table[:vocab], None if bias is None else d_bias[:vocab])


def _chunked_cross_entropy_backward(fused, gradients, cotangents):
    d_features, d_table, d_bias = gradients
    scale = cotangents[0]  # the sum's; is_correct has none
    return ((scale * d_features).astype(d_features.dtype), scale * d_table,
            None if d_bias is None else scale * d_bias, None, None)


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_forward, _chunked_cross_entropy_backward)

"""The most likely tokens for each <mask> of a text, with a RoBERTa model (`flax-lm fill-mask`).

Results are those of transformers' `pipeline("fill-mask")` on the exported model: the same
tokens, the same probabilities (softmax over the vocabulary at each mask), `token_str` and
`sequence` decoded the same way. Texts are right-padded to a multiple of LENGTH_BUCKET tokens, so
texts of similar length share one compiled forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_lm.errors import UserError

LENGTH_BUCKET = 32


@functools.partial(jax.jit, static_argnames="graphdef")
def probabilities(
    graphdef: nnx.GraphDef, params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """Softmax over the vocabulary at every position, [batch, seq, vocab] float32."""
    logits = nnx.merge(graphdef, params)(input_ids, attention_mask)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids with <s> ... </s>; every text must hold a mask and fit the model."""
    if tokenizer.mask_token_id is None:
        raise UserError("the tokenizer has no mask token")
    encoded = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if tokenizer.mask_token_id not in ids:
            raise UserError(f"no {tokenizer.mask_token} in the text {text!r}")
        if len(ids) > max_length:
            raise UserError(f"the text is {len(ids)} tokens; the model takes at most {max_length}")
        encoded.append(ids)
    return encoded


def padded_batch(encoded: list[list[int]], pad_id: int, max_length: int) -> tuple[np.ndarray, ...]:
    longest = max(len(ids) for ids in encoded)
    width = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)
    input_ids = np.full((len(encoded), width), pad_id, np.int32)
    attention_mask = np.zeros((len(encoded), width), np.int32)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def predictions(tokenizer, ids: list[int], probs: np.ndarray, top_k: int) -> list[list[dict]]:
    """Per mask of one text (in order): top_k {"score", "token", "token_str", "sequence"}."""
    ids = np.asarray(ids)
    masks = np.flatnonzero(ids == tokenizer.mask_token_id)
    single = len(masks) == 1  # like the pipeline: other masks stay visible in multi-mask sequences
    results = []
    for position in masks:
        ranked = np.argsort(-probs[position], kind="stable")[:top_k]
        rows = []
        for token in ranked.tolist():
            filled = ids.copy()
            filled[position] = token
            filled = filled[filled != tokenizer.pad_token_id]
            rows.append(
                {
                    "score": float(probs[position, token]),
                    "token": token,
                    "token_str": tokenizer.decode([token]),
                    "sequence": tokenizer.decode(filled.tolist(), skip_special_tokens=single),
                }
            )
        results.append(rows)
    return results


def fill_mask(
    model, tokenizer, texts: str | Sequence[str], top_k: int = 5
) -> list[list[list[dict]]]:
    """Per text, per <mask> (in order), the top_k predictions, best first."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    config = model.config
    max_length = config.max_position_embeddings - (config.pad_token_id or 0) - 1
    encoded = encode(tokenizer, texts, max_length)
    input_ids, attention_mask = padded_batch(encoded, tokenizer.pad_token_id, max_length)
    graphdef, params = nnx.split(model)
    probs = np.asarray(probabilities(graphdef, params, input_ids, attention_mask))
    top_k = min(top_k, config.vocab_size)
    return [predictions(tokenizer, ids, p, top_k) for ids, p in zip(encoded, probs, strict=True)]

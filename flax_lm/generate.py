"""Text from a GPT-2 model, decoded in JAX with the key-value cache (for `flax-lm generate`).

The whole generation (prefill of the prompt, then one token per `lax.while_loop` iteration) is one
compiled program per (batch, prompt length rounded up to PROMPT_BUCKET, max_new_tokens, greedy or
sampling); the sampling settings are arrays, so changing them does not recompile. Nothing returns
to Python between tokens, and the loop stops as soon as every sequence has produced eos.
Sampling applies temperature, then top-k, then top-p, as transformers' `generate` does; a
temperature of 0 is greedy decoding (argmax), which equals transformers' `do_sample=False`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_lm.errors import UserError

PROMPT_BUCKET = 32  # prompts are left-padded to a multiple of this: fewer shapes to compile
# generate_ids' settings of what is generated (its other arguments: the model, prompts, ids)
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_return_sequences")


class Sampling(NamedTuple):
    """Sampling settings as arrays, so changing them does not recompile the decode loop."""

    temperature: jax.Array  # float32 scalar, > 0
    top_k: jax.Array  # int32 scalar; the vocabulary size turns top-k off
    top_p: jax.Array  # float32 scalar; 1.0 turns top-p off

    @classmethod
    def of(
        cls, temperature: float, top_k: int | None, top_p: float | None, vocab_size: int
    ) -> Sampling:
        k = vocab_size if top_k is None else min(top_k, vocab_size)
        return cls(
            jnp.float32(temperature), jnp.int32(k), jnp.float32(1.0 if top_p is None else top_p)
        )


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits [batch, vocab] divided by the temperature, with the tokens outside top-k, then
    outside top-p, set to -inf, as transformers' warpers do: top-k keeps every token scoring at
    least the k-th best; top-p keeps the most likely tokens whose probabilities (after top-k) sum
    to at least p, and always the best one. One sort serves both."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    ascending = jnp.sort(logits, axis=-1)
    vocab = logits.shape[-1]
    kth_best = jax.lax.dynamic_index_in_dim(ascending, vocab - sampling.top_k, axis=-1)
    ascending = jnp.where(ascending < kth_best, -jnp.inf, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1.0 - sampling.top_p).at[..., -1].set(False)
    removed = removed & (sampling.top_p < 1.0)
    smallest_kept = jnp.min(jnp.where(removed, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < jnp.maximum(kth_best, smallest_kept), -jnp.inf, logits)


def next_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling | None) -> jax.Array:
    """One token id per row: argmax when `sampling` is None (greedy), else a sample from the
    filtered logits."""
    if sampling is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def decode(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    eos_id: jax.Array,
    pad_id: jax.Array,
    sampling: Sampling | None,
    *,
    max_new_tokens: int,
) -> jax.Array:
    """New tokens [batch, max_new_tokens] for left-padded prompts; pad after a row's eos.

    Prefill runs the prompt through the cache once; each loop iteration feeds the last token,
    so the last new token never costs a forward pass.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    # Positions count real tokens only, so left padding does not shift them (as transformers does).
    positions = jnp.where(prompt_mask == 1, jnp.cumsum(prompt_mask, axis=1) - 1, 1)
    logits, cache = model.decode(prompt, cache, attention_mask=mask, position_ids=positions)

    key, first_key = jax.random.split(key)
    first = next_tokens(logits[:, -1], first_key, sampling)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    state = (jnp.int32(1), first, tokens, first == eos_id, cache, positions[:, -1] + 1, key)

    def unfinished(state):
        i, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, last, tokens, done, cache, position, key = state
        logits, cache = model.decode(
            last[:, None], cache, attention_mask=mask, position_ids=position[:, None]
        )
        key, step_key = jax.random.split(key)
        token = jnp.where(done, pad_id, next_tokens(logits[:, -1], step_key, sampling))
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        return i + 1, token, tokens, done | (token == eos_id), cache, position + 1, key

    return jax.lax.while_loop(unfinished, step, state)[2]


def check_settings(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    num_return_sequences: int,
) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if num_return_sequences < 1:
        raise UserError(f"num_return_sequences must be at least 1, got {num_return_sequences}")


def special_ids(model, tokenizer=None) -> tuple[int | None, int]:
    """(eos id, pad id) as transformers' generate picks them: the model config first."""
    config = model.config
    eos = config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    pad = config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return eos, pad


def generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Prompt + generated ids for each prompt (token-id lists), `num_return_sequences` per prompt
    in prompt order; each stops after its first eos (kept) or after max_new_tokens."""
    check_settings(max_new_tokens, temperature, top_k, top_p, num_return_sequences)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    limit = model.config.n_positions
    if longest + max_new_tokens > limit:
        raise UserError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the model's n_positions {limit}"
        )
    rows = [list(p) for p in prompts for _ in range(num_return_sequences)]
    width = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, limit - max_new_tokens)
    ids = np.full((len(rows), width), pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for row, prompt in enumerate(rows):  # left padding: every prompt ends at the same column
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    sampling = (
        None
        if temperature == 0
        else Sampling.of(temperature, top_k, top_p, model.config.vocab_size)
    )
    graphdef, params = nnx.split(model)
    eos = -1 if eos_token_id is None else eos_token_id
    new = np.asarray(
        decode(
            graphdef,
            params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jax.random.key(seed),
            jnp.int32(eos),
            jnp.int32(pad_token_id),
            sampling,
            max_new_tokens=max_new_tokens,
        )
    )
    return [
        prompt + until_eos(row.tolist(), eos_token_id)
        for prompt, row in zip(rows, new, strict=True)
    ]


def until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def generate(model, tokenizer, prompts: str | Sequence[str], **settings: Any) -> list[str]:
    """Prompt + completion texts, `num_return_sequences` per prompt, in prompt order; `settings`
    are generate_ids' SETTINGS (max_new_tokens, temperature, top_k, top_p, seed,
    num_return_sequences), with its defaults.

    Prompts are encoded without special tokens, as the training blocks are; the texts are decoded
    without special tokens (eos and padding do not show)."""
    return complete(model, tokenizer, prompts, **settings)[0]


def complete(model, tokenizer, prompts: str | Sequence[str], **settings) -> tuple[list[str], int]:
    """`generate`'s texts and the number of tokens it generated (for throughput figures)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos, pad = special_ids(model, tokenizer)
    sequences = generate_ids(model, encoded, eos_token_id=eos, pad_token_id=pad, **settings)
    prompt_tokens = sum(len(p) for p in encoded) * settings.get("num_return_sequences", 1)
    new_tokens = sum(len(s) for s in sequences) - prompt_tokens
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in sequences], new_tokens

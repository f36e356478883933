"""GPT-2 causal language model in Flax NNX, numerically matching transformers' GPT2LMHeadModel.

Pre-LayerNorm decoder: x += attn(ln_1(x)); x += mlp(ln_2(x)); logits = ln_f(x) @ wte.T (tied).
The n_layer blocks are one module with stacked parameters, run under `jax.lax.scan`.
`reorder_and_upcast_attn` needs nothing here: attention logits are always accumulated and
softmaxed in float32, whatever the compute dtype.

Incremental decoding (used by generation) is functional, with static shapes:

    cache = model.init_cache(batch_size, max_length)    # {"key", "value": [n_layer, batch,
                                                         #   max_length, n_head, head_dim],
                                                         #  "index": int32 scalar, next free slot}
    logits, cache = model.decode(prompt_ids, cache, attention_mask=mask)   # prefill
    logits, cache = model.decode(next_ids[:, None], cache, attention_mask=mask)   # one step

`decode` writes the chunk's keys/values at `cache["index"]`, attends causally over the cache, and
returns float32 logits [batch, chunk, vocab] and the cache with `index` advanced by the chunk.
`attention_mask` is [batch, max_length] over cache slots (1 = real token; for left-padded prompts
pass the prompt's mask followed by ones). Positions default to index + arange(chunk); left-padded
prompts should pass `position_ids` (e.g. cumsum(mask) - 1, as transformers' generate does).
Both arrays can be jit arguments: nothing recompiles as the index advances.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_lm.models.attention import (
    SelfAttention,
    cache_attention_mask,
    check_heads,
    self_attention_mask,
)
from flax_lm.models.errors import ModelError
from flax_lm.models.layers import (
    MLP,
    Embed,
    LanguageModel,
    LayerNorm,
    TorchTensor,
    check_activation,
    dropout,
    run_stacked,
    split_key,
    stacked,
)
from flax_lm.models.output import OutputLayer

if TYPE_CHECKING:  # transformers' config classes load torch: only named here
    from transformers import GPT2Config


def check_config(config: GPT2Config) -> None:
    if config.add_cross_attention:
        raise ModelError("add_cross_attention is not supported (GPT-2 here is decoder-only)")
    check_heads(config.n_embd, config.n_head)
    check_activation(config.activation_function)


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, key: jax.Array, attention: str, unrolled: bool):
        width, std = config.n_embd, config.initializer_range
        # GPT-2's scaled init of the two projections that write into the residual stream.
        out_std = std / math.sqrt(2 * config.n_layer)
        attn_key, mlp_key = jax.random.split(key)
        self.ln_1 = LayerNorm(width, config.layer_norm_epsilon)
        self.attn = SelfAttention(width, config.n_head, attn_key, std=std, out_std=out_std,
                                  attn_dropout=config.attn_pdrop, out_dropout=config.resid_pdrop,
                                  causal=True, implementation=attention)
        self.ln_2 = LayerNorm(width, config.layer_norm_epsilon)
        hidden = config.n_inner if config.n_inner is not None else 4 * width
        self.mlp = MLP(width, hidden, mlp_key, activation=config.activation_function, std=std,
                       out_std=out_std, dropout_rate=config.resid_pdrop,
                       recompute_activation=unrolled)

    def __call__(self, x, mask, *, scale, dropout_key=None, kv_cache=None, cache_index=None):
        attn_key, mlp_key = split_key(dropout_key, 2)
        y, kv_cache = self.attn(self.ln_1(x), mask, scale=scale, dropout_key=attn_key,
                                kv_cache=kv_cache, cache_index=cache_index)
        x = x + y
        return x + self.mlp(self.ln_2(x), mlp_key), kv_cache


class GPT2LMHeadModel(LanguageModel):
    """GPT-2 with its LM head; see `flax_lm.models.create_model` for the arguments."""

    ARCHITECTURE = "GPT2LMHeadModel"

    def __init__(self, config: GPT2Config, seed: int = 0, *, dtype: Any = "float32",
                 scan_layers: bool = True, remat: str | None = None,
                 attention: str = "reference", fused_loss: bool = False):
        check_config(config)
        super().__init__(config, dtype=dtype, scan_layers=scan_layers, remat=remat,
                         fused_loss=fused_loss)
        wte_key, wpe_key, layers_key, head_key = jax.random.split(jax.random.key(seed), 4)
        std = config.initializer_range
        self.wte = Embed(config.vocab_size, config.n_embd, wte_key, std=std)
        self.wpe = Embed(config.n_positions, config.n_embd, wpe_key, std=std)
        self.h = stacked(lambda key: GPT2Block(config, key, attention, not scan_layers), layers_key,
                         config.n_layer)
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else Embed(config.vocab_size, config.n_embd, head_key, std=std)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits [batch, seq, vocab] (float32). Positions are 0..seq-1, as transformers uses
        when no position_ids are given; `dropout_rng` None means eval mode."""
        return self.output_layer(self.encode(input_ids, attention_mask,
                                             dropout_rng=dropout_rng)).logits()

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """The last hidden states [batch, seq, n_embd] after ln_f (compute dtype): what the
        training loss takes, through `output_layer`, without whole logits."""
        length = input_ids.shape[1]
        self._check_length(length)
        mask = self_attention_mask(attention_mask, length, causal=True)
        hidden, _ = self._forward(input_ids, jnp.arange(length)[None], mask, dropout_rng)
        return hidden

    def output_layer(self, hidden: jax.Array) -> OutputLayer:
        """The LM head for hidden states from `encode`: the tied wte (or own lm_head) table."""
        head = self.wte if self.lm_head is None else self.lm_head
        return OutputLayer(hidden, head.embedding[...], fused=self.fused_loss)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, jax.Array]:
        """An empty key/value cache for `decode` (in the compute dtype)."""
        self._check_length(max_length)
        config = self.config
        shape = (config.n_layer, batch_size, max_length, config.n_head,
                 config.n_embd // config.n_head)
        zeros = jnp.zeros(shape, self.dtype)
        return {"key": zeros, "value": zeros, "index": jnp.array(0, jnp.int32)}

    def decode(self, input_ids: jax.Array, cache: dict[str, jax.Array], *,
               attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Run a chunk of tokens against the cache (eval mode); see the module docstring."""
        length, max_length = input_ids.shape[1], cache["key"].shape[2]
        index = cache["index"]
        query_positions = index + jnp.arange(length)
        mask = cache_attention_mask(attention_mask, query_positions, max_length)
        if position_ids is None:
            position_ids = query_positions[None]
        hidden, (keys, values) = self._forward(input_ids, position_ids, mask, None,
                                               (cache["key"], cache["value"]), index)
        cache = {"key": keys, "value": values, "index": index + length}
        return self.output_layer(hidden).logits(), cache

    def _check_length(self, length: int) -> None:
        if length > self.config.n_positions:
            raise ModelError(f"sequence length {length} exceeds n_positions "
                            f"{self.config.n_positions} of the GPT-2 config")

    def _attention_scale(self, layer_idx: jax.Array) -> float | jax.Array:
        config = self.config
        scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            return scale / (layer_idx + 1).astype(jnp.float32)
        return scale

    def _forward(self, input_ids, position_ids, mask, dropout_rng, kv_cache=None,
                 cache_index=None):
        config = self.config
        embed_key, layers_key = split_key(dropout_rng, 2)
        x = self.wte(input_ids, self.dtype) + self.wpe(position_ids, self.dtype)
        x = dropout(x, config.embd_pdrop, embed_key)
        layer_keys = None if layers_key is None else jax.random.split(layers_key, config.n_layer)

        def step(block, x, xs):
            layer_idx, key, layer_cache = xs
            return block(x, mask, scale=self._attention_scale(layer_idx), dropout_key=key,
                         kv_cache=layer_cache, cache_index=cache_index)

        xs = (jnp.arange(config.n_layer), layer_keys, kv_cache)
        x, kv_cache = run_stacked(self.h, step, x, xs, scan=self.scan_layers, remat=self.remat)
        return self.ln_f(x), kv_cache

    def torch_layout(self) -> list[TorchTensor]:
        """Our parameters <-> GPT2LMHeadModel's state dict (Conv1D weights are [in, out] too)."""
        layer = {"ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj",
                 "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        tensors = [TorchTensor("wte.embedding", ("transformer.wte.weight",)),
                   TorchTensor("wpe.embedding", ("transformer.wpe.weight",)),
                   TorchTensor("ln_f.scale", ("transformer.ln_f.weight",)),
                   TorchTensor("ln_f.bias", ("transformer.ln_f.bias",))]
        for ours, theirs in layer.items():
            weight = "scale" if theirs.startswith("ln") else "kernel"
            torch_name = f"transformer.h.{{i}}.{theirs}"
            tensors.append(TorchTensor(f"h.{ours}.{weight}", (f"{torch_name}.weight",)))
            tensors.append(TorchTensor(f"h.{ours}.bias", (f"{torch_name}.bias",)))
        if self.lm_head is not None:
            tensors.append(TorchTensor("lm_head.embedding", ("lm_head.weight",)))
        return tensors

    def redundant_torch_tensors(self) -> re.Pattern:
        """Names found in GPT-2 checkpoints that carry nothing we need (old attention-mask
        buffers; the LM head when it is tied to wte)."""
        names = [r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"]
        if self.lm_head is None:
            names.append(r"lm_head\.weight")
        return re.compile("|".join(names))

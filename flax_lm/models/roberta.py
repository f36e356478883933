"""RoBERTa masked language model in Flax NNX, numerically matching transformers'
RobertaForMaskedLM.

Post-LayerNorm encoder: x = LN(x + attn(x)); x = LN(x + mlp(x)). Embeddings are word + token type
(always type 0) + position, then LayerNorm; positions start at pad_token_id + 1 and padding tokens
keep position pad_token_id (fairseq's convention). The MLM head is dense -> gelu -> LayerNorm ->
decoder tied to the word embeddings, plus a bias. The layers are one module with stacked
parameters, run under `jax.lax.scan`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_lm.models.attention import SelfAttention, check_heads, self_attention_mask
from flax_lm.models.errors import ModelError
from flax_lm.models.layers import (
    ACTIVATIONS,
    MLP,
    Bias,
    Dense,
    Embed,
    LanguageModel,
    LayerNorm,
    TorchTensor,
    check_activation,
    dropout,
    param,
    run_stacked,
    split_key,
    stacked,
)
from flax_lm.models.output import OutputLayer

if TYPE_CHECKING:  # transformers' config classes load torch: only named here
    from transformers import RobertaConfig


def check_config(config: RobertaConfig) -> None:
    if config.is_decoder or config.add_cross_attention:
        raise ModelError("is_decoder/add_cross_attention are not supported for RoBERTa masked LM")
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":
        raise ModelError(f"position_embedding_type {kind!r} is not supported; use 'absolute'")
    if not isinstance(config.pad_token_id, int):
        raise ModelError("RoBERTa needs an integer pad_token_id (positions are counted from it)")
    check_heads(config.hidden_size, config.num_attention_heads)
    check_activation(config.hidden_act)


def position_ids_from_input_ids(input_ids: jax.Array, padding_idx: int) -> jax.Array:
    """padding_idx + 1, +2, ... for real tokens; padding_idx for padding tokens (as transformers'
    create_position_ids_from_input_ids)."""
    not_pad = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + padding_idx


class RobertaLayer(nnx.Module):
    def __init__(self, config: RobertaConfig, key: jax.Array, attention: str, unrolled: bool):
        width, std, eps = config.hidden_size, config.initializer_range, config.layer_norm_eps
        attn_key, mlp_key = jax.random.split(key)
        self.attention = SelfAttention(
            width, config.num_attention_heads, attn_key, std=std, out_std=std,
            attn_dropout=config.attention_probs_dropout_prob,
            out_dropout=config.hidden_dropout_prob, implementation=attention)
        self.attention_norm = LayerNorm(width, eps)
        self.mlp = MLP(width, config.intermediate_size, mlp_key, activation=config.hidden_act,
                       std=std, out_std=std, dropout_rate=config.hidden_dropout_prob,
                       recompute_activation=unrolled)
        self.output_norm = LayerNorm(width, eps)

    def __call__(self, x, mask, *, scale, dropout_key=None):
        attn_key, mlp_key = split_key(dropout_key, 2)
        x = self.attention_norm(x + self.attention(x, mask, scale=scale, dropout_key=attn_key)[0])
        return self.output_norm(x + self.mlp(x, mlp_key))


class MaskedLMHead(nnx.Module):
    def __init__(self, config: RobertaConfig, key: jax.Array):
        width, std = config.hidden_size, config.initializer_range
        dense_key, decoder_key = jax.random.split(key)
        self.dense = Dense(width, width, dense_key, std=std, axes=("embed", "embed"))
        self.layer_norm = LayerNorm(width, config.layer_norm_eps)
        self.bias = param(Bias, jnp.zeros((config.vocab_size,), jnp.float32), ("vocab",))
        tied = config.tie_word_embeddings
        self.decoder = None if tied else Embed(config.vocab_size, width, decoder_key, std=std)

    def __call__(self, x: jax.Array, word_embeddings: Embed) -> OutputLayer:
        x = self.layer_norm(ACTIVATIONS["gelu"](self.dense(x)))
        decoder = word_embeddings if self.decoder is None else self.decoder
        return OutputLayer(x, decoder.embedding[...], self.bias[...])


class RobertaForMaskedLM(LanguageModel):
    """RoBERTa with its MLM head; see `flax_lm.models.create_model` for the arguments."""

    ARCHITECTURE = "RobertaForMaskedLM"

    def __init__(self, config: RobertaConfig, seed: int = 0, *, dtype: Any = "float32",
                 scan_layers: bool = True, remat: str | None = None,
                 attention: str = "reference", fused_loss: bool = False):
        check_config(config)
        super().__init__(config, dtype=dtype, scan_layers=scan_layers, remat=remat,
                         fused_loss=fused_loss)
        keys = jax.random.split(jax.random.key(seed), 5)
        width, std, pad = config.hidden_size, config.initializer_range, config.pad_token_id
        self.word_embeddings = Embed(config.vocab_size, width, keys[0], std=std, padding_idx=pad)
        self.position_embeddings = Embed(config.max_position_embeddings, width, keys[1], std=std,
                                         padding_idx=pad)
        self.token_type_embeddings = Embed(config.type_vocab_size, width, keys[2], std=std)
        self.embeddings_norm = LayerNorm(width, config.layer_norm_eps)
        self.layers = stacked(lambda key: RobertaLayer(config, key, attention, not scan_layers),
                              keys[3], config.num_hidden_layers)
        self.lm_head = MaskedLMHead(config, keys[4])

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits [batch, seq, vocab] (float32); `dropout_rng` None means eval mode."""
        return self.predict(self.encode(input_ids, attention_mask, dropout_rng=dropout_rng))

    def predict(self, hidden: jax.Array) -> jax.Array:
        """The MLM head's logits (float32) for hidden states [..., hidden_size]."""
        return self.output_layer(hidden).logits()

    def output_layer(self, hidden: jax.Array) -> OutputLayer:
        """The MLM head for hidden states [..., hidden_size], e.g. only those of the masked
        positions, which is all the MLM loss needs (see objectives.MaskedLM)."""
        return replace(self.lm_head(hidden, self.word_embeddings), fused=self.fused_loss)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """The encoder's last hidden states [batch, seq, hidden_size] (compute dtype)."""
        config = self.config
        length = input_ids.shape[1]
        if length + config.pad_token_id + 1 > config.max_position_embeddings:
            raise ModelError(
                f"sequence length {length} needs max_position_embeddings >= "
                f"{length + config.pad_token_id + 1} (positions start after pad_token_id "
                f"{config.pad_token_id}); the config has {config.max_position_embeddings}")
        embed_key, layers_key = split_key(dropout_rng, 2)
        positions = position_ids_from_input_ids(input_ids, config.pad_token_id)
        x = (self.word_embeddings(input_ids, self.dtype)
             + self.token_type_embeddings(jnp.zeros_like(input_ids), self.dtype)
             + self.position_embeddings(positions, self.dtype))
        x = dropout(self.embeddings_norm(x), config.hidden_dropout_prob, embed_key)
        mask = self_attention_mask(attention_mask, length, causal=False)
        scale = (config.hidden_size // config.num_attention_heads) ** -0.5
        layer_keys = (None if layers_key is None
                      else jax.random.split(layers_key, config.num_hidden_layers))

        def step(layer, x, key):
            return layer(x, mask, scale=scale, dropout_key=key), None

        x, _ = run_stacked(self.layers, step, x, layer_keys, scan=self.scan_layers,
                           remat=self.remat)
        return x

    def torch_layout(self) -> list[TorchTensor]:
        """Our parameters <-> RobertaForMaskedLM's state dict (nn.Linear weights are [out, in])."""
        emb, layer = "roberta.embeddings.", "roberta.encoder.layer.{i}."
        tensors = [
            TorchTensor("word_embeddings.embedding", (emb + "word_embeddings.weight",)),
            TorchTensor("position_embeddings.embedding", (emb + "position_embeddings.weight",)),
            TorchTensor("token_type_embeddings.embedding",
                        (emb + "token_type_embeddings.weight",)),
            TorchTensor("embeddings_norm.scale", (emb + "LayerNorm.weight",)),
            TorchTensor("embeddings_norm.bias", (emb + "LayerNorm.bias",)),
        ]
        for kind in ("weight", "bias"):
            ours = "kernel" if kind == "weight" else "bias"
            qkv = tuple(f"{layer}attention.self.{n}.{kind}" for n in ("query", "key", "value"))
            tensors += [
                TorchTensor(f"layers.attention.qkv.{ours}", qkv, linear=True),
                TorchTensor(f"layers.attention.out.{ours}",
                            (f"{layer}attention.output.dense.{kind}",), linear=True),
                TorchTensor(f"layers.mlp.fc.{ours}", (f"{layer}intermediate.dense.{kind}",),
                            linear=True),
                TorchTensor(f"layers.mlp.proj.{ours}", (f"{layer}output.dense.{kind}",),
                            linear=True),
                TorchTensor(f"lm_head.dense.{ours}", (f"lm_head.dense.{kind}",), linear=True),
            ]
        for ours, theirs in (("layers.attention_norm", f"{layer}attention.output.LayerNorm"),
                             ("layers.output_norm", f"{layer}output.LayerNorm"),
                             ("lm_head.layer_norm", "lm_head.layer_norm")):
            tensors.append(TorchTensor(f"{ours}.scale", (f"{theirs}.weight",)))
            tensors.append(TorchTensor(f"{ours}.bias", (f"{theirs}.bias",)))
        if self.lm_head.decoder is None:
            tensors.append(TorchTensor("lm_head.bias", ("lm_head.bias",)))
        else:
            # Untied, transformers keeps lm_head.bias and lm_head.decoder.bias apart and uses the
            # latter; we hold one bias and write it under both names.
            tensors += [TorchTensor("lm_head.decoder.embedding", ("lm_head.decoder.weight",)),
                        TorchTensor("lm_head.bias", ("lm_head.decoder.bias",),
                                    copies=("lm_head.bias",))]
        return tensors

    def redundant_torch_tensors(self) -> re.Pattern:
        """Names found in RoBERTa checkpoints that carry nothing we need (the position-id buffer;
        the decoder's tensors when tied; lm_head.bias, a copy of the decoder's bias, when not)."""
        names = [r"(roberta\.)?embeddings\.position_ids"]
        if self.lm_head.decoder is None:
            names.append(r"lm_head\.decoder\.(weight|bias)")
        else:
            names.append(r"lm_head\.bias")
        return re.compile("|".join(names))

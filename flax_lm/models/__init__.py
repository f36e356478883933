"""GPT-2 (causal LM) and RoBERTa (masked LM) in Flax NNX, built from transformers configs."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flax_lm.backend import choices_for
from flax_lm.backend import platform as local_platform
from flax_lm.models.attention import (
    AttentionChoice,
    attention_choice,
    choose_attention,
    settle_attention,
)
from flax_lm.models.errors import ModelError
from flax_lm.models.gpt2 import GPT2LMHeadModel
from flax_lm.models.layers import NO_DECAY_KINDS, compute_dtype
from flax_lm.models.roberta import RobertaForMaskedLM

MODEL_CLASSES = {"gpt2": GPT2LMHeadModel, "roberta": RobertaForMaskedLM}
SUPPORTED_MODEL_TYPES = tuple(MODEL_CLASSES)

Model = GPT2LMHeadModel | RobertaForMaskedLM

__all__ = ["SUPPORTED_MODEL_TYPES", "create_model", "matmul_param_count", "settled_attention",
           "training_attention", "weight_decay_mask"]


def model_class(model_type: str | None) -> type[Model]:
    """Our class for a config's model_type; ModelError listing the supported ones otherwise."""
    if model_type not in MODEL_CLASSES:
        raise ModelError(f"unsupported model_type {model_type!r}; supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return MODEL_CLASSES[model_type]


def create_model(config: Any, seed: int = 0, *, dtype: Any = "float32",
                 scan_layers: bool | None = True, remat: str | None = None,
                 attention: str = "auto", platform: str | None = None) -> Model:
    """A freshly initialised model for a GPT2Config or RobertaConfig, as transformers initialises
    one for training from scratch (normal(initializer_range) weights, zero biases, unit LayerNorm).

    dtype: compute precision, "float32" or "bfloat16" (parameters stay float32; softmax, LayerNorm
    statistics and logits are float32). scan_layers: run the stacked layers under lax.scan (False:
    unrolled loop over the same parameters; None: the platform's choice). remat: None, "full" or "dots" (see
    layers.REMAT_POLICIES). attention: "auto" (the implementation for this backend and dtype),
    "reference", "xla" or "cudnn" (see attention.py). platform: the platform the model is built
    for, which decides "auto" and is checked against a named choice (default: this process's; a
    plan compiles for devices it need not have), and, from its entry in flax_lm/backend.py, the
    layer loop when scan_layers is None and whether its loss takes the fused gradient.
    """
    cls = model_class(getattr(config, "model_type", None))
    platform = platform or local_platform()
    choices = choices_for(platform)
    attention = choose_attention(platform, compute_dtype(dtype), attention)
    scan_layers = choices.scan_layers if scan_layers is None else scan_layers
    return cls(config, seed, dtype=dtype, scan_layers=scan_layers, remat=remat,
               attention=attention, fused_loss=choices.fused_loss)


def settled_attention(config: Any, *, dtype: Any, requested: str, platform: str, length: int,
                      try_kernel: bool) -> AttentionChoice:
    """The attention implementation a run of this model takes on `platform`, and why
    (attention.settle_attention: a fast kernel that fails here gives way to XLA's)."""
    heads, width = config.num_attention_heads, config.hidden_size
    is_causal = model_class(getattr(config, "model_type", None)) is GPT2LMHeadModel
    return settle_attention(attention_choice(platform, compute_dtype(dtype), requested),
                            heads=heads, head_dim=width // heads, length=length,
                            causal=is_causal, dtype=compute_dtype(dtype),
                            attn_dropout=attention_dropout(config), try_kernel=try_kernel)


def attention_dropout(config: Any) -> float:
    """The rate of dropout on the attention probabilities while training."""
    if model_class(getattr(config, "model_type", None)) is GPT2LMHeadModel:
        return float(config.attn_pdrop)
    return float(config.attention_probs_dropout_prob)


def training_attention(config: Any, implementation: str) -> str:
    """The attention a train step computes with `implementation` chosen: the reference path
    where attention dropout is active (attention.DROPOUT_FALLBACK says why)."""
    return "reference" if attention_dropout(config) > 0 else implementation


def weight_decay_mask(params_state: nnx.State) -> nnx.State:
    """True for parameters to decay (matmul kernels, embeddings), False for biases and LayerNorm
    parameters, decided by their variable type. Pass `nnx.state(model, nnx.Param)` or the state
    from `nnx.split(model, nnx.Param)` (Variables, not plain arrays); the result has the same
    structure with one bool per Variable: optax's `mask` for that state (or in `nnx.Optimizer`)."""
    return jax.tree.map(lambda v: not isinstance(v, NO_DECAY_KINDS), params_state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def matmul_param_count(config: Any) -> int:
    """Parameters multiplied with every token's activations, N in the 6*N FLOPs-per-token estimate.

    Counted: every weight matrix of attention (q, k, v, output) and MLP, RoBERTa's MLM-head dense,
    and the vocabulary projection once (tied to the word embeddings or not). Not counted: biases,
    LayerNorm parameters, and the embeddings that are only gathered (position, token type, and the
    word-embedding lookup itself). Attention's own score/value FLOPs are not parameters.
    """
    if model_class(getattr(config, "model_type", None)) is GPT2LMHeadModel:
        width, layers = config.n_embd, config.n_layer
        hidden = config.n_inner if config.n_inner is not None else 4 * width
        head = 0
    else:
        width, layers = config.hidden_size, config.num_hidden_layers
        hidden = config.intermediate_size
        head = width * width
    per_layer = 4 * width * width + 2 * width * hidden
    return layers * per_layer + head + config.vocab_size * width

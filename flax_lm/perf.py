"""Model FLOPs per token and MFU (model FLOPs utilisation) of a training run.

The count is the usual "model FLOPs" of a training step (forward + backward, no rematerialisation,
no optimizer, no elementwise work), so it does not depend on how a step is implemented:

    flops_per_token = 6 * matmul_params + attention_coefficient * n_layer * seq_len * d_model

- 6 * matmul_params: every weight that takes part in a matmul does 2 FLOPs per token forward
  (multiply + add) and 4 backward (gradient of its input and of itself). `matmul_params` comes from
  `flax_lm.models.matmul_param_count(config)`: attention, MLP and LM-head weights, the tied
  word-embedding matrix counted once as the LM head, position/token-type embeddings (only
  gathered) and biases/LayerNorm excluded.
- attention: per layer and token, q @ k^T and probs @ v each take 2 * seq_len * d_model FLOPs
  forward, so 4 forward and 12 forward + backward. Causal attention (GPT-2) needs only the lower
  triangle, so it is counted at half: coefficient 6 for causal models, 12 for bidirectional ones.

MFU = tokens/s * flops_per_token / peak FLOP/s, with the peak measured on the same machine
(bench/peak.py), so the figure says how close a run gets to what the hardware can do. A training
run's log lines give MFU against the device's published bfloat16 peak, where it is known.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

FLOPS_FORMULA = (
    "flops/token = 6 * matmul_params + c * n_layer * seq_len * d_model "
    "(fwd+bwd; c = 6 causal, 12 bidirectional)"
)
CAUSAL_MODEL_TYPES = frozenset({"gpt2"})


# Dense (no sparsity) bfloat16 tensor throughput from the vendors' data sheets, FLOP/s, matched
# against JAX's device_kind in this order (the first name found in it wins).
PUBLISHED_BF16_PEAKS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
)


def published_bf16_peak(device_kind: str) -> float | None:
    """A device's published dense bfloat16 FLOP/s, None where it is not known (CPUs among them)."""
    return next((peak for name, peak in PUBLISHED_BF16_PEAKS if name in device_kind), None)


def attention_flops_per_token(n_layer: int, seq_len: int, d_model: int, *, causal: bool) -> float:
    """Forward + backward FLOPs of the score and value matmuls, per token."""
    coefficient = 6 if causal else 12
    return float(coefficient * n_layer * seq_len * d_model)


def matmul_flops_per_token(matmul_params: int) -> float:
    """Forward (2) + backward (4) FLOPs per token for each weight used in a matmul."""
    return 6.0 * matmul_params


def model_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token of a GPT-2 or RoBERTa config at sequence length `seq_len`."""
    from flax_lm.models import matmul_param_count

    attention = attention_flops_per_token(
        config.num_hidden_layers,
        seq_len,
        config.hidden_size,
        causal=config.model_type in CAUSAL_MODEL_TYPES,
    )
    return matmul_flops_per_token(matmul_param_count(config)) + attention


def achieved_flops_per_second(tokens_per_second: float, flops_per_token: float) -> float:
    return tokens_per_second * flops_per_token


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: the share (0..1) of the peak that training turns into model FLOPs."""
    if peak_flops_per_second <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops_per_second}")
    return achieved_flops_per_second(tokens_per_second, flops_per_token) / peak_flops_per_second


def traced_matmul_flops(fn, *args) -> float:
    """FLOPs of every matrix multiplication `fn(*args)` traces to (args may be shapes): its
    forward, backward and any recomputation a remat policy adds, scan bodies counted once per
    iteration and each branch of a cond at its most. XLA's own count (`cost_analysis`) counts a
    loop body once, whatever its trip count, so it cannot say what a scanned model recomputes."""
    import jax.extend.core

    return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            total += _dot_flops(eqn)
        elif eqn.primitive.name == "cond":
            total += max(_jaxpr_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = sum(_jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
            total += inner * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else inner
    return total


def _sub_jaxprs(params: dict):
    import jax.extend.core

    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    kept = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    return 2.0 * math.prod(lhs) * math.prod(kept)

"""Learning-rate schedule and optimizer, as Hugging Face's Flax language-modeling scripts build them;
--lr_scheduler_type has the meanings of transformers' `get_scheduler`."""

from __future__ import annotations

import math
import sys

import jax.numpy as jnp
import optax

from flax_lm.models import weight_decay_mask
from flax_lm.train.args import TrainConfig

NEVER_APPLY_NONFINITE = 2**31 - 1  # apply_if_finite: consecutive non-finite updates before applying
POLYNOMIAL_END_LR = 1e-7  # transformers' polynomial schedule: lr_end 1e-7, power 1
INVERSE_SQRT_TIMESCALE = 10_000  # transformers' inverse_sqrt without warmup


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The warmup length as the Trainer computes it: --warmup_steps when at least 1; a fraction
    below 1 (--warmup_steps 0.1, or --warmup_ratio when --warmup_steps is 0) of total_steps,
    rounded up. `constant` has no warmup at all."""
    if cfg.lr_scheduler_type == "constant":
        return 0
    if cfg.warmup_steps >= 1:
        return int(cfg.warmup_steps)
    return math.ceil(total_steps * (cfg.warmup_steps or cfg.warmup_ratio))


def warn_about_warmup(cfg: TrainConfig, total_steps: int) -> None:
    """Warn (on stderr) about warmup flags that do not do what they seem to."""
    if cfg.lr_scheduler_type == "constant" and (cfg.warmup_steps or cfg.warmup_ratio):
        print(
            "warning: --lr_scheduler_type constant has no warmup (as in Hugging Face's "
            "Trainer): use --lr_scheduler_type constant_with_warmup to warm up",
            file=sys.stderr,
        )
    if warmup_steps(cfg, total_steps) > total_steps:  # only a step count can be (a ratio is <= 1)
        print(
            f"warning: --warmup_steps {cfg.warmup_steps} is longer than training "
            f"({total_steps} steps): the learning rate never reaches its peak",
            file=sys.stderr,
        )


def inverse_sqrt_schedule(peak: float, timescale: int) -> optax.Schedule:
    """peak / sqrt((t + timescale) / timescale), t counted from the end of warmup."""
    return lambda t: peak / jnp.sqrt((t + timescale) / timescale)


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over the warmup steps, then linear decay reaching 0
    at `total_steps` (or cosine to 0, polynomial to 1e-7, inverse square root, or constant).
    `constant` ignores warmup, as transformers' does (`constant_with_warmup` warms up). Step s
    is the learning rate of the (s+1)-th update."""
    peak, warmup = cfg.learning_rate, warmup_steps(cfg, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    after_warmup = {
        "linear": lambda: optax.linear_schedule(peak, 0.0, decay_steps),
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps),
        "constant": lambda: optax.constant_schedule(peak),
        "constant_with_warmup": lambda: optax.constant_schedule(peak),
        "polynomial": lambda: optax.polynomial_schedule(
            peak, POLYNOMIAL_END_LR, power=1, transition_steps=decay_steps
        ),
        "inverse_sqrt": lambda: inverse_sqrt_schedule(peak, warmup or INVERSE_SQRT_TIMESCALE),
    }[cfg.lr_scheduler_type]()
    if warmup == 0:
        return after_warmup
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])


def make_optimizer(
    cfg: TrainConfig, schedule: optax.Schedule, decay_mask
) -> optax.GradientTransformation:
    """AdamW (or Adafactor) with decoupled weight decay only where `decay_mask` is True,
    after clipping gradients to max_grad_norm."""
    if cfg.adafactor:
        optimizer = optax.adafactor(
            learning_rate=schedule,
            weight_decay_rate=cfg.weight_decay or None,
            weight_decay_mask=decay_mask,
        )
    else:
        optimizer = optax.adamw(
            schedule,
            b1=cfg.adam_beta1,
            b2=cfg.adam_beta2,
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    if cfg.max_grad_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optimizer)
    return optimizer


def make_training_optimizer(
    cfg: TrainConfig, schedule: optax.Schedule, params
) -> optax.GradientTransformation:
    """`make_optimizer` with weight decay on `params`' matmul weights and embeddings only, applying
    an update only when the whole gradient is finite (a non-finite step leaves params and
    optimizer state as they were)."""
    optimizer = make_optimizer(cfg, schedule, weight_decay_mask(params))
    return optax.apply_if_finite(optimizer, NEVER_APPLY_NONFINITE)

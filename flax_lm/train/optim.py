"""Learning-rate schedule and optimizer, as Hugging Face's Flax language-modeling scripts build them."""

from __future__ import annotations

import optax

from flax_lm.models import weight_decay_mask
from flax_lm.train.args import TrainConfig

NEVER_APPLY_NONFINITE = 2**31 - 1  # apply_if_finite: consecutive non-finite updates before applying


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then linear decay reaching 0 at
    `total_steps` (or cosine decay, or constant). Step s is the learning rate of the (s+1)-th update."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    after_warmup = {
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "constant": optax.constant_schedule(peak),
    }[cfg.lr_scheduler_type]
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

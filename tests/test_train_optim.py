"""Learning-rate schedules and the optimizer: weight decay by parameter kind, clipping, Adafactor."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_lm.config import apply_config_overrides, load_base_config
from flax_lm.models import create_model, weight_decay_mask
from flax_lm.models.layers import Bias, LayerNormParam
from flax_lm.train.args import TrainConfig
from flax_lm.train.optim import make_optimizer, make_schedule

PEAK = 1e-3


def config(**changes) -> TrainConfig:
    return dataclasses.replace(
        TrainConfig(output_dir="unused"), **{"learning_rate": PEAK, **changes}
    )


def lr(schedule, step: int) -> float:
    return float(schedule(step))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_warmup_is_linear_from_zero(kind):
    schedule = make_schedule(config(warmup_steps=10, lr_scheduler_type=kind), total_steps=110)
    assert lr(schedule, 0) == 0.0
    assert lr(schedule, 5) == pytest.approx(PEAK / 2, rel=1e-6)
    assert lr(schedule, 10) == pytest.approx(PEAK, rel=1e-6)  # warmup end: the peak


def test_linear_decay_reaches_zero_at_the_last_step():
    schedule = make_schedule(config(warmup_steps=10), total_steps=110)
    assert lr(schedule, 60) == pytest.approx(PEAK / 2, rel=1e-6)  # middle of the decay
    assert lr(schedule, 109) == pytest.approx(PEAK / 100, rel=1e-4)  # the last update
    assert lr(schedule, 110) == 0.0


def test_cosine_and_constant_after_warmup():
    cosine = make_schedule(config(warmup_steps=10, lr_scheduler_type="cosine"), total_steps=110)
    assert lr(cosine, 35) == pytest.approx(PEAK * (1 + np.cos(np.pi / 4)) / 2, rel=1e-5)
    assert lr(cosine, 60) == pytest.approx(PEAK / 2, rel=1e-5)
    assert lr(cosine, 110) == pytest.approx(0.0, abs=1e-12)
    constant = make_schedule(config(warmup_steps=10, lr_scheduler_type="constant_with_warmup"), 110)
    assert [lr(constant, s) for s in (10, 60, 110, 500)] == pytest.approx([PEAK] * 4)
    no_warmup = make_schedule(config(warmup_steps=10, lr_scheduler_type="constant"), 110)
    assert [lr(no_warmup, s) for s in (0, 5, 110)] == pytest.approx([PEAK] * 3)  # as in HF


@pytest.mark.parametrize(
    "kind",
    ["linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"],
)
@pytest.mark.parametrize(("warmup_steps", "warmup_ratio"), [(10, 0.0), (0, 0.25), (0.25, 0.0)])
def test_schedules_equal_transformers_get_scheduler(kind, warmup_steps, warmup_ratio):
    """Every --lr_scheduler_type gives the learning rates of transformers' scheduler of that
    name, with the warmup the Trainer computes (a ratio of 50 steps rounds up to 13)."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    total = 50
    hf_warmup = 10 if warmup_steps == 10 else 13  # math.ceil(50 * 0.25)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    hf = get_scheduler(kind, optimizer, num_warmup_steps=hf_warmup, num_training_steps=total)
    expected = []
    for _ in range(total):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    ours = make_schedule(
        config(lr_scheduler_type=kind, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio), total
    )
    assert [lr(ours, s) for s in range(total)] == pytest.approx(expected, rel=1e-5, abs=PEAK * 1e-6)


def test_no_warmup_starts_at_the_peak_and_warmup_longer_than_training_still_works():
    assert lr(make_schedule(config(), total_steps=100), 0) == pytest.approx(PEAK)
    schedule = make_schedule(config(warmup_steps=50), total_steps=20)
    assert lr(schedule, 19) == pytest.approx(PEAK * 19 / 50, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_params() -> nnx.State:
    gpt2 = apply_config_overrides(
        load_base_config("gpt2"), "n_embd=32,n_layer=2,n_head=2,vocab_size=64"
    )
    return nnx.split(create_model(gpt2), nnx.Param)[1]


def one_update(optimizer, params, grads):
    """Parameters after the first optimizer step (compiled: one dispatch instead of hundreds)."""

    def step(params, grads):
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    return jax.jit(step)(params, grads)


@pytest.mark.parametrize("adafactor", [False, True])
def test_weight_decay_skips_biases_and_layernorm(tiny_params, adafactor):
    """With zero gradients the only change is decoupled weight decay: matmul kernels and
    embeddings shrink (AdamW: exactly p * (1 - lr * wd)), biases and LayerNorm stay."""
    cfg = config(weight_decay=0.5, learning_rate=0.1, lr_scheduler_type="constant",
                 adafactor=adafactor)  # fmt: skip
    optimizer = make_optimizer(cfg, make_schedule(cfg, 10), weight_decay_mask(tiny_params))
    zeros = jax.tree.map(jnp.zeros_like, tiny_params)
    updated = one_update(optimizer, tiny_params, zeros)
    kinds = {"decayed": 0, "exempt": 0}
    for (path, variable), after in zip(
        nnx.to_flat_state(tiny_params), jax.tree.leaves(updated), strict=True
    ):
        before = np.asarray(variable[...])
        if isinstance(variable, Bias | LayerNormParam):
            np.testing.assert_array_equal(after, before, err_msg=str(path))
            kinds["exempt"] += 1
            continue
        kinds["decayed"] += 1
        if adafactor:  # decay scaled by Adafactor's own parameter-scale rule: only shrinks
            assert np.abs(after).sum() < np.abs(before).sum(), path
        else:
            np.testing.assert_allclose(
                after, before * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=str(path)
            )
    assert kinds["decayed"] >= 4 and kinds["exempt"] >= 4


def test_adafactor_replaces_adam(tiny_params):
    adam = make_optimizer(config(), make_schedule(config(), 10), weight_decay_mask(tiny_params))
    adafactor_cfg = config(adafactor=True)
    adafactor = make_optimizer(adafactor_cfg, make_schedule(adafactor_cfg, 10), None)

    def state_types(optimizer) -> set[str]:
        leaves = jax.tree.leaves(
            optimizer.init(tiny_params), is_leaf=lambda x: hasattr(x, "_fields")
        )
        return {type(leaf).__name__ for leaf in leaves}

    assert "ScaleByAdamState" in state_types(adam) and "FactoredState" not in state_types(adam)
    assert "FactoredState" in state_types(adafactor)


def test_gradients_are_clipped_to_max_grad_norm():
    """With a huge epsilon Adam's first update is linear in the gradient, so clipping shows:
    gradients of norm 10 and of norm 1 give the same update when max_grad_norm is 1."""
    params = {"w": jnp.zeros(4)}
    direction = jnp.array([1.0, -2.0, 3.0, -4.0]) / np.sqrt(30.0)  # unit norm

    def update(max_grad_norm: float, scale: float) -> np.ndarray:
        cfg = config(max_grad_norm=max_grad_norm, adam_epsilon=1e6, lr_scheduler_type="constant")
        optimizer = make_optimizer(cfg, make_schedule(cfg, 10), None)
        return np.asarray(one_update(optimizer, params, {"w": scale * direction})["w"])

    np.testing.assert_allclose(update(1.0, 10.0), update(1.0, 1.0), rtol=1e-5)
    np.testing.assert_allclose(update(0.0, 10.0), 10 * update(0.0, 1.0), rtol=1e-4)  # 0: no clip

"""The dropout mask (layers.keep_mask): rate, independence, determinism, sharding invariance."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import host_devices

from flax_lm.models.layers import dropout, keep_mask

SIGMAS = 5.0  # tolerance of every frequency check, in binomial standard deviations
SHAPE = (4, 4, 256, 256)  # an attention-probabilities shape: 2^20 elements


def assert_frequency(observed: float, expected: float, n: int) -> None:
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(observed - expected) <= SIGMAS * sigma, (observed, expected, sigma)


@pytest.mark.parametrize("keep_prob", [0.9, 0.5, 0.1])
def test_keep_rate_matches_the_probability(keep_prob):
    mask = np.asarray(keep_mask(jax.random.key(0), SHAPE, keep_prob))
    assert_frequency(mask.mean(), keep_prob, mask.size)


def test_neighbours_along_every_axis_are_independent():
    keep_prob = 0.9
    mask = np.asarray(keep_mask(jax.random.key(1), SHAPE, keep_prob))
    for axis in range(mask.ndim):
        first = np.take(mask, range(mask.shape[axis] - 1), axis=axis)
        second = np.take(mask, range(1, mask.shape[axis]), axis=axis)
        both = (first & second).mean()
        assert_frequency(both, keep_prob**2, first.size)


def test_different_keys_give_unrelated_masks_not_shifted_copies():
    """Masks of the keys a training run uses (one per layer, split from the key of a step, itself
    folded from the run's key with the step number) agree as two independent masks would, at
    every small shift of one against the other."""
    keep_prob = 0.5  # the most sensitive rate: agreement 0.5 unless related
    run_key = jax.random.key(2)
    keys = [layer_key for step in (1, 2) for layer_key in
            jax.random.split(jax.random.fold_in(run_key, step), 3)]
    data = np.stack([np.asarray(jax.random.key_data(k)) for k in keys])
    assert len(np.unique(data, axis=0)) == len(keys)
    masks = [np.asarray(keep_mask(k, SHAPE, keep_prob)).ravel() for k in keys]
    expected = keep_prob**2 + (1 - keep_prob) ** 2
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            for shift in range(0, 33):
                a, b = masks[i][shift:], masks[j][: masks[j].size - shift]
                assert_frequency((a == b).mean(), expected, a.size)


def test_same_key_same_mask():
    key = jax.random.key(3)
    np.testing.assert_array_equal(keep_mask(key, SHAPE, 0.9), keep_mask(key, SHAPE, 0.9))


def test_mask_of_a_block_is_that_block_of_the_full_mask():
    """Blocked attention draws each block's dropout with `origin`/`full_shape`: it must drop the
    very elements the full score matrix's mask drops."""
    key, keep_prob = jax.random.key(6), 0.9
    full = np.asarray(keep_mask(key, SHAPE, keep_prob))
    for origin, shape in [((0, 0, 128, 0), (4, 4, 64, 192)), ((1, 2, 0, 32), (2, 1, 256, 16))]:
        block = keep_mask(key, shape, keep_prob, origin=origin, full_shape=SHAPE)
        window = tuple(slice(o, o + n) for o, n in zip(origin, shape, strict=True))
        np.testing.assert_array_equal(np.asarray(block), full[window])


def test_dropout_zeroes_dropped_values_and_rescales_kept_ones():
    x = jnp.full(SHAPE, 2.0)
    y = np.asarray(dropout(x, 0.25, jax.random.key(4)))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2.0 / 0.75, rtol=1e-6)
    assert_frequency(kept.mean(), 0.75, y.size)
    np.testing.assert_array_equal(dropout(x, 0.25, None), x)  # eval: identity


@pytest.mark.slow
def test_mask_is_the_same_sharded_over_eight_devices():
    """Data parallelism must not change dropout: the mask of a batch split over 8 devices equals
    the mask computed on one."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec
        from flax_lm.models.layers import dropout
        assert jax.device_count() == 8
        mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        x = np.random.default_rng(0).normal(size=(16, 4, 64, 64)).astype(np.float32)
        key = jax.random.key(5)
        f = jax.jit(lambda x, k: dropout(x, 0.1, k))
        one = np.asarray(f(jax.device_put(x, jax.devices()[0]), key))
        eight = f(jax.device_put(x, NamedSharding(mesh, PartitionSpec("data"))), key)
        assert len(eight.sharding.device_set) == 8
        np.testing.assert_array_equal(one, np.asarray(eight))
        print("same")
        """
    )
    env = {**os.environ, **host_devices(8), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "same"

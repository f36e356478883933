"""Restoring a checkpoint whole or its parameters only, and what a failed restore leaves behind."""

from __future__ import annotations

import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_lm.errors import UserError
from flax_lm.train import checkpoint
from flax_lm.train.step import TrainState, make_mesh, state_sharding


@pytest.fixture
def saved(tmp_path) -> tuple[TrainState, object]:
    """A small TrainState saved as step 3: (the state, its checkpoints dir)."""
    mesh = make_mesh()
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32) for i in range(8)}
    state = TrainState(jnp.array(3, jnp.int32), params, (jax.tree.map(jnp.ones_like, params),),
                       jax.random.key_data(jax.random.key(7)))  # fmt: skip
    state = jax.device_put(state, state_sharding(mesh, state))
    manager = checkpoint.open_manager(tmp_path / "checkpoints")
    checkpoint.save(manager, state, {"step": 3})
    manager.close()
    return state, tmp_path / "checkpoints"


def test_params_only_restores_the_parameters_alone(saved):
    state, directory = saved
    like = jax.tree.map(jnp.zeros_like, state.params)
    manager = checkpoint.open_manager(directory, create=False)
    params, meta = checkpoint.restore(manager, 3, like, params_only=True)
    manager.close()
    assert meta == {"step": 3} and set(params) == set(state.params)
    for name, value in state.params.items():
        np.testing.assert_array_equal(params[name], value)
        assert params[name].sharding == like[name].sharding


def test_a_failed_restore_puts_the_unraisable_hook_and_asyncio_log_back(saved, monkeypatch):
    state, directory = saved
    for path in (directory / "3" / "state").rglob("manifest.ocdbt"):
        path.unlink()  # the arrays cannot be read
    hook = sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: hook(unraisable))
    ours = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    monkeypatch.setattr(asyncio_log, "level", logging.WARNING)
    manager = checkpoint.open_manager(directory, create=False)
    with pytest.raises(UserError, match="cannot be restored"):
        checkpoint.restore(manager, 3, state)
    manager.close()
    assert sys.unraisablehook is ours
    assert asyncio_log.level == logging.WARNING
    # A read that ends after the wait (a loaded machine) is still not printed, and only that:
    late = "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize()"
    late += " done, defined at /venv/site-packages/orbax/checkpoint/serialization.py:400>>"
    other = "Task exception was never retrieved\nfuture: <Task finished coro=<fetch() done>>"
    assert not asyncio_log.filter(logging.makeLogRecord({"msg": late, "levelno": logging.ERROR}))
    assert asyncio_log.filter(logging.makeLogRecord({"msg": other, "levelno": logging.ERROR}))

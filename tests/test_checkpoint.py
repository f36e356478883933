"""A checkpoint holds the state as it was when saved, even though saving is asynchronous and the
next train step donates (reuses) the state's buffers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax_lm.train import checkpoint
from flax_lm.train.step import TrainState, make_mesh, state_sharding


def test_async_save_is_safe_when_the_next_step_donates_the_state(tmp_path):
    """save() returns before the files are written; the state buffers are donated (deleted) by
    the very next step, and the checkpoint still holds the values from the time of saving."""
    mesh = make_mesh()
    values = np.random.default_rng(0).normal(size=(512, 256)).astype(np.float32)
    state = TrainState(jnp.array(3, jnp.int32), {"w": jnp.asarray(values)}, (jnp.ones(8),),
                       jax.random.key_data(jax.random.key(7)))  # fmt: skip
    state = jax.device_put(state, state_sharding(mesh, state))
    manager = checkpoint.open_manager(tmp_path / "checkpoints")
    checkpoint.save(manager, state, {"step": 3, "data": {"epoch": 0, "batch_in_epoch": 3}})
    step = jax.jit(lambda s: s._replace(params={"w": s.params["w"] * 0 - 1}), donate_argnums=0)
    like = jax.tree.map(jnp.zeros_like, state)
    after = step(state)
    # The step donates the saved buffers; JAX may decline a donation while orbax still holds a
    # reference, so whether they are deleted is not asserted: what must hold is the saved values.
    manager.wait_until_finished()
    restored, meta = checkpoint.restore(manager, 3, like=like)
    manager.close()
    np.testing.assert_array_equal(restored.params["w"], values)
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(7)))
    assert int(restored.step) == 3 and meta["data"] == {"epoch": 0, "batch_in_epoch": 3}
    assert restored.params["w"].sharding == like.params["w"].sharding
    assert float(after.params["w"][0, 0]) == -1.0

"""Restoring a checkpoint whole or its parameters only, and what a failed restore leaves behind."""

from __future__ import annotations

import os
import subprocess
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


def test_a_damaged_checkpoint_is_unreadable_with_its_reason(saved):
    state, directory = saved
    for path in (directory / "3" / "state").rglob("manifest.ocdbt"):
        path.unlink()  # the arrays cannot be read
    with checkpoint.open_manager(directory, create=False) as manager:
        with pytest.raises(checkpoint.Unreadable) as raised:
            checkpoint.restore(manager, 3, state)
    assert isinstance(raised.value, UserError)  # one error line where nothing else is tried
    assert raised.value.step_dir == directory / "3" and "NOT_FOUND" in raised.value.reason


# orbax alone, as it restores a checkpoint one of whose array files is cut short: before
# flax_lm.train.orbax_fix, the reads abandoned with orbax's closed event loop ended in "Exception
# ignored ... RuntimeError: Event loop is closed" and "Task was destroyed but it is pending!"
# after the error, as late as exit; with the reads cancelled instead of finished, a cancelled
# read's late TensorStore callback still reached the closed loop in a few runs of a hundred.
ABANDONED_READS = """
import sys
import jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from etils import epath
if sys.argv[2] == "fixed":
    import flax_lm.train.orbax_fix
directory = epath.Path(sys.argv[1])
params = {f"w{i}": jnp.asarray(np.random.default_rng(i).normal(size=(64, 64)), jnp.float32)
          for i in range(16)}
with ocp.CheckpointManager(directory) as manager:
    manager.save(3, args=ocp.args.StandardSave(params))
for path in (directory / "3" / "default" / "ocdbt.process_0" / "d").iterdir():
    path.write_bytes(path.read_bytes()[:100])
like = {name: ocp.utils.to_shape_dtype_struct(value) for name, value in params.items()}
for attempt in range(int(sys.argv[3])):  # the late callbacks are a race: several chances to lose it
    with ocp.CheckpointManager(directory) as manager:
        try:
            manager.restore(3, args=ocp.args.StandardRestore(like))
        except Exception as err:
            print("restore failed:", type(err).__name__, file=sys.stderr)
"""
ATTEMPTS = 8


def test_a_failed_restore_leaves_no_abandoned_read_behind(tmp_path):
    """The minimal reproduction of the orbax bug that orbax_fix works around: with the fix, the
    failed restore raises and nothing more is printed, at once or at exit."""
    from flax_lm.train import orbax_fix

    assert orbax_fix.INSTALLED, "orbax changed how it runs a restore: re-check orbax_fix"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", ABANDONED_READS, str(tmp_path / "checkpoints"), "fixed",
         str(ATTEMPTS)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines == ["restore failed: Exception"] * ATTEMPTS, done.stderr[-3000:]

"""Which model a command runs: a saved model directory (config.json, model.safetensors and the
tokenizer, e.g. a training output_dir) or a training checkpoint (OUTPUT_DIR/checkpoints/STEP, or
an output_dir's newest), and its parameters and tokenizer loaded onto a mesh.

A library module, shared by `flax-lm evaluate` and `flax-lm export`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from flax_lm.errors import UserError

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelSource:
    """A model to load: weights from a safetensors dir or a checkpoint step, config and
    tokenizer from the run's directory unless given."""

    run_dir: Path
    checkpoint: tuple[Path, int] | None  # (checkpoints dir, step)
    config: str
    tokenizer: str

    def describe(self) -> str:
        if self.checkpoint is None:
            return str(self.run_dir)
        directory, step = self.checkpoint
        return str(directory / str(step))


def find_model(
    model: str, config_name: str | None = None, tokenizer_name: str | None = None, *,
    flag: str = "--model", prefer_checkpoint: bool = False,
) -> ModelSource:
    """Resolve --model (`flag` in messages): a saved model, a checkpoint step dir, or an
    output_dir with checkpoints (its exported model, or with `prefer_checkpoint` its newest
    checkpoint)."""
    from flax_lm.train import checkpoint

    path = Path(model)
    if not path.is_dir():
        raise UserError(f"{flag} {model} is not a directory")
    steps = checkpoint.saved_steps(path / checkpoint.CHECKPOINTS_SUBDIR)
    if path.name.isdigit() and (path / checkpoint.ITEMS[0]).is_dir():
        found, run_dir = (path.parent, int(path.name)), path.parent.parent
    elif steps and prefer_checkpoint:
        found, run_dir = (path / checkpoint.CHECKPOINTS_SUBDIR, steps[-1]), path
    elif any((path / name).is_file() for name in SAFETENSORS_FILES):
        found, run_dir = None, path
    elif steps:
        found, run_dir = (path / checkpoint.CHECKPOINTS_SUBDIR, steps[-1]), path
    else:
        raise UserError(
            f"{flag} {model} holds no model.safetensors and no checkpoints: give a "
            "saved model directory or a checkpoint (OUTPUT_DIR/checkpoints/STEP)"
        )
    config = config_name or str(run_dir)
    if not config_name and not (run_dir / "config.json").is_file():
        raise UserError(
            f"no config.json in {run_dir} (the run wrote none yet): pass "
            "--config_name and --tokenizer_name of the run"
        )
    return ModelSource(run_dir, found, config, tokenizer_name or str(run_dir))


def load_model_and_tokenizer(source: ModelSource, mesh) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, parameters replicated over the mesh, tokenizer)."""
    from flax_lm.config import load_base_config, load_tokenizer
    from flax_lm.models import create_model
    from flax_lm.models.hf_io import load_model
    from flax_lm.train import checkpoint
    from flax_lm.train.step import state_sharding, with_shardings

    tokenizer = load_tokenizer(source.tokenizer)
    if source.checkpoint is None:
        graphdef, params = nnx.split(load_model(source.run_dir), nnx.Param)
    else:
        config = load_base_config(source.config)
        abstract = nnx.eval_shape(lambda: create_model(config))
        graphdef, params = nnx.split(abstract, nnx.Param)
        directory, step = source.checkpoint
        like = with_shardings(params, state_sharding(mesh, params))
        with checkpoint.open_manager(directory, create=False) as manager:
            params, _ = checkpoint.restore(manager, step, like, params_only=True)
    return graphdef, jax.device_put(params, state_sharding(mesh, params)), tokenizer

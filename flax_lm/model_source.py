"""Which model a command runs: a saved model directory (config.json, model.safetensors and the
tokenizer, e.g. a training output_dir) or a training checkpoint (OUTPUT_DIR/checkpoints/STEP, or
an output_dir's newest), and its parameters and tokenizer loaded onto a mesh; and, for training
and planning a run, the model config and tokenizer its flags name (--model_name_or_path,
--config_name, --tokenizer_name), checked against each other.

A library module, shared by the commands (export of any checkpoint included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from flax_lm.config import (
    apply_config_overrides,
    base_config_names,
    load_base_config,
    load_tokenizer,
)
from flax_lm.errors import UserError
from flax_lm.hub_models import download_config, download_model, is_hub_id
from flax_lm.storage import local_run_folder, save_pretrained
from flax_lm.train.args import SCRIPT_NAMES, TrainConfig

MODEL_TYPES = {"clm": "gpt2", "mlm": "roberta"}  # the model type each training objective trains
BASE_CONFIGS = {"gpt2": "gpt2", "roberta": "roberta-base"}

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


def load_saved_model(model_dir: str, model_type: str, command: str):
    """(model, tokenizer) of a saved `model_type` dir (config.json, model.safetensors, tokenizer)."""
    with local_run_folder(model_dir, "--model") as local:
        return load_local_model(local, model_type, command)


def load_local_model(model_dir: str, model_type: str, command: str):
    from flax_lm.models.hf_io import load_model

    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model {model_dir} has no config.json (give a saved model directory)")
    found = load_base_config(model_dir).model_type
    if found != model_type:
        other = {"gpt2": "generate", "roberta": "fill-mask"}[found]
        raise UserError(
            f"{command} needs a {model_type} model; {model_dir} holds a {found} model "
            f"(use `flax-lm {other}` for {found})"
        )
    return load_model(model_dir), load_tokenizer(model_dir)


def export_checkpoint(spec: str, output_dir: Path, config_name: str | None = None,
                      tokenizer_name: str | None = None) -> str:
    """Write checkpoint `spec` (a step dir, or a run's output_dir: its newest complete step) to
    output_dir as config.json, model.safetensors and the tokenizer (what a run writes at its end,
    for any other step); what was exported."""
    from flax_lm.models.hf_io import save_model
    from flax_lm.train.step import make_mesh

    with local_run_folder(spec, "checkpoint", checkpoint=True) as local:
        source = find_model(local, config_name, tokenizer_name, flag="checkpoint",
                            prefer_checkpoint=True)
        if source.checkpoint is None:
            raise UserError(f"checkpoint {spec} is a saved model, not a checkpoint: nothing to "
                            "export")
        graphdef, params, tokenizer = load_model_and_tokenizer(
            source, make_mesh(jax.devices()[:1])
        )
        save_model(nnx.merge(graphdef, params), output_dir)
        save_pretrained(tokenizer, output_dir)
        return spec if local != spec else source.describe()


# ------------------------------------------------------------------ a training run's model


def pretrained_model_dir(cfg: TrainConfig) -> Path | None:
    """--model_name_or_path as a local directory: itself, or a Hub model's cached download."""
    name = cfg.model_name_or_path
    if not name or not is_hub_id(name):
        return Path(name) if name else None
    return download_model(name, "--model_name_or_path", cfg.cache_dir, cfg.token,
                          cfg.model_revision)


def config_source(cfg: TrainConfig, model_dir: Path | None, objective_name: str) -> str:
    """Where the config comes from: the pretrained model, --config_name (a path, a name in
    configs/, or a Hub model's config.json) or the script's base config."""
    if model_dir is not None:
        return str(model_dir)
    name = cfg.config_name
    if name and name not in base_config_names() and is_hub_id(name):
        return str(download_config(name, "--config_name", cfg.cache_dir, cfg.token,
                                   cfg.model_revision))
    return name or BASE_CONFIGS[MODEL_TYPES[objective_name]]


def load_model_config(
    cfg: TrainConfig, objective_name: str, model_dir: Path | None = None
) -> PretrainedConfig:
    """The model's config: from --model_name_or_path, --config_name or --model_type, then
    --config_overrides; its type must be the one this script trains."""
    expected = MODEL_TYPES[objective_name]
    if cfg.model_type and cfg.model_type != expected:
        raise wrong_model_type(objective_name, cfg.model_type)
    config = load_base_config(config_source(cfg, model_dir, objective_name))
    if config.model_type != expected:
        raise wrong_model_type(objective_name, config.model_type)
    if cfg.config_overrides:
        config = apply_config_overrides(config, cfg.config_overrides)
    return config


def wrong_model_type(objective_name: str, found: str) -> UserError:
    other = next(name for name in MODEL_TYPES if name != objective_name)
    return UserError(
        f"{SCRIPT_NAMES[objective_name]} trains {MODEL_TYPES[objective_name]} models, "
        f"but the model is {found}: use {SCRIPT_NAMES[other]} for {MODEL_TYPES[other]}"
    )


def tokenizer_of(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """--tokenizer_name's tokenizer (default: the pretrained model's, or the config's dir)."""
    name = cfg.tokenizer_name or cfg.model_name_or_path or cfg.config_name
    if not name:
        raise UserError(
            "no tokenizer: give --tokenizer_name (a directory saved by train-tokenizer)"
        )
    return load_tokenizer(
        name, cache_dir=cfg.cache_dir, token=cfg.token, revision=cfg.model_revision
    )


def check_vocab(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}: make the config with --tokenizer_name or pass "
            f"--config_overrides vocab_size={len(tokenizer)}"
        )

"""Our models <-> PyTorch transformers checkpoints: config.json + safetensors in the exact names and
layouts of GPT2LMHeadModel / RobertaForMaskedLM.

Only safetensors are read: a pickle (`pytorch_model.bin`) can run code when loaded, so it is
refused.
Each model's `torch_layout()` lists where every parameter lives on the PyTorch side.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from flax_lm.errors import damaged_message
from flax_lm.models import Model, create_model, model_class
from flax_lm.models.errors import ModelError
from flax_lm.models.layers import TorchTensor
from flax_lm.storage import save_pretrained, write_bytes_atomically

__all__ = ["create_model", "export_state_dict", "import_state_dict", "load_model", "save_model"]

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
BASE_PREFIXES = ("transformer.", "roberta.")


def base_name(name: str) -> str:
    """The name without the base-model prefix, so that GPT2Model/RobertaModel checkpoints match."""
    for prefix in BASE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def flat_params(model: Model) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def layer_indices(spec: TorchTensor, num_layers: int) -> list[int | None]:
    return list(range(num_layers)) if "{i}" in spec.names[0] else [None]


def num_layers(model: Model) -> int:
    return model.config.num_hidden_layers


def to_torch_layout(array: np.ndarray, spec: TorchTensor) -> list[np.ndarray]:
    """One of our (per-layer) arrays -> the PyTorch tensors named by `spec.names`."""
    parts = np.split(array, len(spec.names), axis=-1)
    return [np.ascontiguousarray(p.T if spec.linear else p, dtype=np.float32) for p in parts]


def export_state_dict(model: Model) -> dict[str, np.ndarray]:
    """PyTorch transformers names -> float32 arrays in PyTorch layout; tied weights once."""
    params = flat_params(model)
    tensors: dict[str, np.ndarray] = {}
    for spec in model.torch_layout():
        value = np.asarray(params[spec.path].get_value(), dtype=np.float32)
        for i in layer_indices(spec, num_layers(model)):
            parts = to_torch_layout(value if i is None else value[i], spec)
            for template, part in zip(spec.names, parts, strict=True):
                tensors[template.format(i=i)] = part
            for template in spec.copies:
                tensors[template.format(i=i)] = parts[0].copy()
    return tensors


def expected_torch_shape(our_shape: tuple[int, ...], spec: TorchTensor) -> tuple[int, ...]:
    shape = (*our_shape[:-1], our_shape[-1] // len(spec.names))
    return shape[::-1] if spec.linear else shape


def import_state_dict(model: Model, state_dict: Mapping[str, Any]) -> Model:
    """Set the model's parameters (in place; also works on an `nnx.eval_shape` model) from a
    PyTorch-layout state dict of array-likes; names with or without `transformer.`/`roberta.`.

    Raises ModelError naming every missing or misshapen tensor. Tensors the model does not use are
    ignored, with a warning naming them.
    """
    found = {base_name(name): tensor for name, tensor in state_dict.items()}
    params = flat_params(model)
    missing, misshapen, used, values = [], [], set(), {}
    for spec in model.torch_layout():
        var = params[spec.path]
        indices = layer_indices(spec, num_layers(model))
        per_layer_shape = var.shape if indices[0] is None else var.shape[1:]
        expected = expected_torch_shape(per_layer_shape, spec)
        layers = []
        for i in indices:
            parts = []
            for template in spec.names:
                name = template.format(i=i)
                used.add(base_name(name))
                tensor = found.get(base_name(name))
                if tensor is None:
                    missing.append(name)
                elif tuple(tensor.shape) != expected:
                    misshapen.append(f"{name} (expected {expected}, found {tuple(tensor.shape)})")
                else:
                    array = np.asarray(tensor, dtype=np.float32)
                    parts.append(array.T if spec.linear else array)
            if len(parts) == len(spec.names):
                layers.append(np.concatenate(parts, axis=-1))
        if len(layers) == len(indices):
            values[spec.path] = layers[0] if indices[0] is None else np.stack(layers)
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"misshapen {', '.join(misshapen)}"] if misshapen else [])
    if problems:
        raise ModelError(f"checkpoint does not match the {model.config.model_type} config: "
                        + "; ".join(problems))
    redundant = model.redundant_torch_tensors()
    unused = [n for n in state_dict if base_name(n) not in used and not redundant.fullmatch(n)]
    if unused:
        logger.warning("ignoring %d tensors the model does not use: %s", len(unused),
                       ", ".join(sorted(unused)))
    for path, value in values.items():
        params[path].set_value(jnp.asarray(value))
    return model


def save_model(model: Model, out_dir: str | Path) -> None:
    """Write config.json (with `architectures`) and model.safetensors that PyTorch transformers
    loads with AutoModelForCausalLM / AutoModelForMaskedLM.from_pretrained(out_dir)."""
    tensors = export_state_dict(model)
    config = copy.deepcopy(model.config)
    config.architectures = [model.ARCHITECTURE]
    config.dtype = "float32"
    out = epath.Path(out_dir)  # a local dir or gs://...
    out.mkdir(parents=True, exist_ok=True)
    # replaced in one step: never a half-written file
    write_bytes_atomically(out / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    save_pretrained(config, out)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint directory: single or sharded."""
    if (model_dir / WEIGHTS).is_file():
        return [model_dir / WEIGHTS]
    if (model_dir / WEIGHTS_INDEX).is_file():
        try:
            weight_map = json.loads((model_dir / WEIGHTS_INDEX).read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as err:
            raise ModelError(damaged_message(model_dir / WEIGHTS_INDEX, err)) from None
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [shard.name for shard in shards if not shard.is_file()]
        if absent:
            raise ModelError(f"{model_dir / WEIGHTS_INDEX} lists missing shards: "
                            f"{', '.join(absent)}")
        return shards
    if any((model_dir / name).is_file() for name in PICKLED_WEIGHTS):
        raise ModelError(
            f"{model_dir} has only PyTorch pickle weights (pytorch_model.bin), which are never "
            "loaded here because unpickling can run arbitrary code; convert them to safetensors "
            "(in transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise ModelError(f"{model_dir} has no {WEIGHTS} or {WEIGHTS_INDEX}")


def check_weight_files(model_dir: Path) -> list[Path]:
    """The weight files of `model_dir`, each with a readable header that covers the whole file
    (cheap: no tensor is read), so one cut short is named before any work starts."""
    files = weight_files(Path(model_dir))
    for file in files:
        try:
            with safe_open(str(file), framework="np"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelError(damaged_message(file, err)) from None
    return files


def read_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{model_dir} has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(damaged_message(config_file, err)) from None
    model_class(model_type)
    return AutoConfig.from_pretrained(str(model_dir))


def load_model(model_dir: str | Path, *, dtype: Any = "float32", scan_layers: bool | None = True,
               remat: str | None = None, attention: str = "auto",
               platform: str | None = None) -> Model:
    """A model from a directory written by `save_model` or by PyTorch transformers'
    save_pretrained (config.json + model.safetensors, possibly sharded); the options are
    create_model's."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"model directory {model_dir} does not exist")
    config = read_config(model_dir)
    files = check_weight_files(model_dir)
    model = nnx.eval_shape(lambda: create_model(config, dtype=dtype, scan_layers=scan_layers,
                                                remat=remat, attention=attention,
                                                platform=platform))
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return import_state_dict(model, tensors)

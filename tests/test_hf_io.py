"""Checkpoints shared with PyTorch transformers: our save -> their load, their save -> our load."""

from __future__ import annotations

import json
import logging
import pickle

import jax
import numpy as np
import pytest
import torch
from conftest import raises_user_error
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_models import (
    LOSS_TOL,
    assert_logits_match,
    forward,
    gpt2_config,
    ours_and_torch_loss,
    padded_batch,
    roberta_config,
    torch_model,
)
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import flax_lm
from flax_lm.models import create_model
from flax_lm.models.errors import ModelError
from flax_lm.models.hf_io import export_state_dict, load_model, save_model

CONFIGS = {
    "gpt2": gpt2_config,
    "roberta": roberta_config,
    "gpt2-untied": lambda: gpt2_config(tie_word_embeddings=False),
    "roberta-untied": lambda: roberta_config(tie_word_embeddings=False),
}
AUTO_CLASSES = {"gpt2": AutoModelForCausalLM, "roberta": AutoModelForMaskedLM}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "roberta": "RobertaForMaskedLM"}


def perturbed(model):
    """The model with every parameter (biases and LayerNorm too) moved off its initial value."""
    rng = np.random.RandomState(7)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape), params))
    return model


def torch_checkpoint(config, path, **save_options):
    """A PyTorch model with random weights, saved as safetensors; returns the model."""
    reference = torch_model(config)
    reference.save_pretrained(path, safe_serialization=True, **save_options)
    return reference


def rewrite_weights(path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("name", CONFIGS)
def test_export_names_and_shapes_are_transformers_state_dict(name):
    config = CONFIGS[name]()
    reference = torch_model(config)
    tied = {"lm_head.weight", "lm_head.decoder.weight", "lm_head.decoder.bias"}
    expected = {key: tuple(t.shape) for key, t in reference.state_dict().items()
                if not (config.tie_word_embeddings and key in tied)}
    exported = export_state_dict(create_model(config))
    assert {key: a.shape for key, a in exported.items()} == expected
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in exported.values())


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_model_loads_in_transformers_without_warnings(name, tmp_path, capfd):
    config = CONFIGS[name]()
    ours = perturbed(create_model(config, seed=5))
    save_model(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        ARCHITECTURES[config.model_type]]
    capfd.readouterr()
    reference, info = AUTO_CLASSES[config.model_type].from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert info == {"missing_keys": set(), "unexpected_keys": set(),
                    "mismatched_keys": set(), "error_msgs": []}
    stderr = capfd.readouterr().err
    assert "MISSING" not in stderr and "UNEXPECTED" not in stderr and "initialized" not in stderr
    reference.eval()
    ids, mask = padded_batch(config)
    assert_logits_match(ours, reference, ids, mask)


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_transformers_checkpoint_loads_here(name, tmp_path):
    config = CONFIGS[name]()
    reference = torch_checkpoint(config, tmp_path)
    ours = load_model(tmp_path)
    # the same computation as a model created from the config: jit caches are shared
    assert nnx.graphdef(ours) == nnx.graphdef(create_model(config))
    ids, mask = padded_batch(config)
    assert_logits_match(ours, reference, ids, mask)
    ours_loss, torch_loss = ours_and_torch_loss(ours, reference, ids, mask)
    assert abs(ours_loss - torch_loss) <= LOSS_TOL


def test_load_options_reach_the_model(tmp_path):
    reference = torch_checkpoint(gpt2_config(), tmp_path)
    ours = load_model(tmp_path, dtype="bfloat16", scan_layers=False, remat="dots")
    assert (ours.dtype, ours.scan_layers, ours.remat) == (jax.numpy.bfloat16, False, "dots")
    np.testing.assert_array_equal(ours.wte.embedding[...],
                                  reference.transformer.wte.weight.detach().numpy())


def test_sharded_checkpoint_loads(tmp_path):
    reference = torch_checkpoint(roberta_config(), tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids, mask = padded_batch(reference.config)
    assert_logits_match(load_model(tmp_path), reference, ids, mask)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    reference = torch_model(gpt2_config()).to(torch.bfloat16)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_model(tmp_path)
    assert ours.wte.embedding[...].dtype == np.float32
    expected = reference.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(ours.wte.embedding[...], expected)


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_names_without_base_model_prefix_load(name, tmp_path):
    config = CONFIGS[name]()
    reference = torch_checkpoint(config, tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update(
        {key.split(".", 1)[1]: t.pop(key) for key in list(t) if key.startswith(name)}))
    assert not any(key.startswith(name) for key in load_file(tmp_path / "model.safetensors"))
    ids, mask = padded_batch(config)
    assert_logits_match(load_model(tmp_path), reference, ids, mask)


def test_unused_tensors_are_ignored_with_a_warning(tmp_path, caplog):
    reference = torch_checkpoint(roberta_config(), tmp_path)
    extra = {"roberta.pooler.dense.weight": np.zeros((64, 64), np.float32),
             "roberta.pooler.dense.bias": np.zeros(64, np.float32)}
    rewrite_weights(tmp_path, lambda t: t.update(extra))
    with caplog.at_level(logging.WARNING, logger="flax_lm.models.hf_io"):
        ours = load_model(tmp_path)
    assert "roberta.pooler.dense.bias, roberta.pooler.dense.weight" in caplog.text
    ids, mask = padded_batch(reference.config)
    assert_logits_match(ours, reference, ids, mask)


def test_missing_and_misshapen_tensors_are_all_named(tmp_path):
    torch_checkpoint(gpt2_config(), tmp_path)

    def damage(tensors):
        del tensors["transformer.wpe.weight"], tensors["transformer.h.1.ln_2.weight"]
        tensors["transformer.h.0.attn.c_attn.weight"] = np.zeros((64, 190), np.float32)
        tensors["transformer.ln_f.bias"] = np.zeros(65, np.float32)

    rewrite_weights(tmp_path, damage)
    with pytest.raises(ModelError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "missing transformer.wpe.weight, transformer.h.1.ln_2.weight" in message
    assert "transformer.h.0.attn.c_attn.weight (expected (64, 192), found (64, 190))" in message
    assert "transformer.ln_f.bias (expected (64,), found (65,))" in message


def test_pickle_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    gpt2_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "loaded"}))

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with raises_user_error("pytorch_model.bin", "safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("write, names", [
    (lambda d: None, ("{dir}", "config.json")),
    (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
     ("model_type", "'bert'", "gpt2, roberta")),
    (lambda d: (d / "config.json").write_text("{not json"), ("{dir}", "config.json", "damaged")),
    (lambda d: gpt2_config().save_pretrained(d), ("{dir}", "model.safetensors")),
])
def test_bad_model_directories_are_user_errors(write, names, tmp_path):
    write(tmp_path)
    with raises_user_error(*(name.format(dir=tmp_path) for name in names)):
        load_model(tmp_path)
    with raises_user_error(str(tmp_path / "absent"), "not exist"):
        load_model(tmp_path / "absent")


@pytest.mark.parametrize("name", CONFIGS)
def test_torch_layout_covers_every_parameter_exactly_once(name):
    model = nnx.eval_shape(lambda: create_model(CONFIGS[name]()))
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sorted(spec.path for spec in model.torch_layout()) == sorted(paths)


def test_package_exposes_model_io():
    assert flax_lm.create_model is create_model
    assert flax_lm.load_model is load_model and flax_lm.save_model is save_model


def test_round_trip_through_our_own_files_is_exact(tmp_path):
    ours = perturbed(create_model(roberta_config(tie_word_embeddings=False)))
    save_model(ours, tmp_path)
    again = load_model(tmp_path)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(again, nnx.Param)), strict=True):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
    ids, mask = padded_batch(ours.config)
    np.testing.assert_array_equal(forward(ours, ids, mask), forward(again, ids, mask))

"""`flax-lm export`: any checkpoint of a run as a transformers model dir, equal to what the run
itself exports at that step."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from safetensors.numpy import load_file
from test_resume import TINY_MODELS, checkpoint_arrays

from flax_lm.commands.export import main as export_main
from flax_lm.commands.train import main as train_main


@pytest.fixture(scope="module", params=["clm", "mlm"])
def finished_run(request, code_corpus, tiny_tokenizer_dir, tmp_path_factory):
    """(objective, output_dir) of a 4-step run with checkpoints at steps 2 and 4."""
    objective = request.param
    out = tmp_path_factory.mktemp(f"run_{objective}") / "run"
    argv = ["--output_dir", str(out), *TINY_MODELS[objective], "--tokenizer_name",
            str(tiny_tokenizer_dir), "--train_file", str(code_corpus.train), "--validation_file",
            str(code_corpus.validation), "--per_device_train_batch_size", "4", "--max_steps", "4",
            "--save_steps", "2", "--learning_rate", "3e-3", "--do_train", "--report_to", "none"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(argv, objective=objective) == 0
    return objective, out


def export(*argv: str | Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = export_main([str(a) for a in argv])
    return status, err.getvalue()


def test_the_newest_checkpoint_exports_to_the_runs_own_model(finished_run, tmp_path):
    objective, run = finished_run
    status, message = export(run, "--output_dir", tmp_path / "model")
    assert status == 0, message
    assert message == f"exported {run / 'checkpoints' / '4'} to {tmp_path / 'model'}\n"
    got, want = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "model", run))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "model" / name).read_text() == (run / name).read_text(), name


def test_an_earlier_checkpoint_exports_its_own_parameters(finished_run, tmp_path):
    objective, run = finished_run
    status, message = export(run / "checkpoints" / "2", "--output_dir", tmp_path / "step2")
    assert status == 0, message
    exported = load_file(str(tmp_path / "step2" / "model.safetensors"))
    name = {"clm": "transformer.wte.weight", "mlm": "roberta.embeddings.word_embeddings.weight"}
    embeddings = exported[name[objective]]
    saved = checkpoint_arrays(run / "checkpoints" / "2")
    key = {"clm": "wte", "mlm": "word_embeddings"}[objective]
    (want,) = [a for path, a in saved.items() if "params" in path and f"'{key}'" in path]
    np.testing.assert_array_equal(embeddings, want)
    final = load_file(str(run / "model.safetensors"))[name[objective]]
    assert not np.array_equal(embeddings, final)  # step 2 is not step 4


def test_export_errors_are_one_line(finished_run, tmp_path):
    _, run = finished_run
    cases = [
        (
            (tmp_path / "missing", "--output_dir", tmp_path / "a"),
            (f"checkpoint {tmp_path / 'missing'}", "not a directory"),
        ),
        (
            (tmp_path, "--output_dir", tmp_path / "a"),
            (f"checkpoint {tmp_path}", "model.safetensors", "checkpoints/STEP"),
        ),
        ((run, "--output_dir", run), (f"--output_dir {run}", "--overwrite_output_dir")),
        (
            (run, "--output_dir", tmp_path / "b", "--tokenizer_name", tmp_path),
            (f"tokenizer in {tmp_path}", "tokenizer.json", "--tokenizer_name"),
        ),
    ]  # argv -> what the one error line names
    for argv, names in cases:
        assert_one_line_error(export(*argv), *names)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

"""--push_to_hub: the repo is opened before training, the finished output_dir (not its
checkpoints) is uploaded from it, and the token is never stored. No machine here reaches the Hub:
HfApi is replaced by a recorder that filters files with huggingface_hub's own pattern matching."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from conftest import assert_one_line_error
from huggingface_hub.utils import filter_repo_objects
from test_resume import TINY_MODELS

from flax_lm.commands.train import main
from flax_lm.train import hub
from flax_lm.train.hub import LAST_CHECKPOINT

TOKEN = "hf_secret_token_of_the_test"


class RecordingHub:
    """HfApi's create_repo and upload_folder, recording what they were asked to do."""

    calls: list[tuple] = []
    fail_upload = False  # every upload fails
    fail_background = False  # uploads made with run_as_future fail

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, exist_ok=False, private=None):
        output_dir_exists = RecordingHub.output_dir.exists()
        RecordingHub.calls.append(("create_repo", repo_id, self.token, exist_ok, output_dir_exists,
                                   private))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, commit_message, path_in_repo=None,
                      allow_patterns=None, ignore_patterns=None, delete_patterns=None,
                      run_as_future=False):
        if RecordingHub.fail_upload or (run_as_future and RecordingHub.fail_background):
            error = OSError("Connection reset by peer")
            if run_as_future:
                future = Future()
                future.set_exception(error)
                return future
            raise error
        root = Path(folder_path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        selected = filter_repo_objects(files, allow_patterns=allow_patterns,
                                       ignore_patterns=ignore_patterns)
        uploaded = sorted(f"{path_in_repo}/{f}" if path_in_repo else f for f in selected)
        RecordingHub.calls.append(("upload_folder", repo_id, uploaded, commit_message,
                                   run_as_future))
        self.commit_to_repo(root, path_in_repo, uploaded, delete_patterns)
        commit = SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")
        return self.as_future(commit) if run_as_future else commit

    @staticmethod
    def as_future(commit):
        future = Future()
        future.set_result(commit)
        return future

    @staticmethod
    def commit_to_repo(root: Path, path_in_repo, uploaded: list[str], delete_patterns) -> None:
        """The repo as the Hub would hold it after the commit, in RecordingHub.repo."""
        repo, prefix = RecordingHub.repo, f"{path_in_repo}/" if path_in_repo else ""
        if delete_patterns:
            present = [str(p.relative_to(repo / prefix)) for p in (repo / prefix).rglob("*")
                       if p.is_file()] if (repo / prefix).is_dir() else []
            for name in filter_repo_objects(present, allow_patterns=delete_patterns):
                if f"{prefix}{name}" not in uploaded:
                    (repo / prefix / name).unlink()
        for name in uploaded:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name.removeprefix(prefix), repo / name)


@pytest.fixture
def online_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HfApi", RecordingHub)
    RecordingHub.calls, RecordingHub.fail_upload, RecordingHub.fail_background = [], False, False
    RecordingHub.output_dir = tmp_path / "tiny-gpt2"
    RecordingHub.repo = tmp_path / "the-hub-repo"
    return RecordingHub


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv, objective="clm")
    return status, out.getvalue(), err.getvalue()


def push_argv(code_corpus, tokenizer_dir, out: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(out), *TINY_MODELS["clm"], "--tokenizer_name", str(tokenizer_dir),
        "--train_file", str(code_corpus.train), "--validation_file", str(code_corpus.validation),
        "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_steps", "2",
        "--report_to", "none", "--push_to_hub", *extra,
    ]  # fmt: skip


def test_push_to_hub_uploads_at_checkpoints_and_at_the_end(online_hub, code_corpus,
                                                            tiny_tokenizer_dir):
    out = online_hub.output_dir
    status, stdout, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, out,
                                           "--hub_token", TOKEN))
    assert status == 0, stderr[-3000:]
    (create, at_checkpoint, final) = online_hub.calls
    # the repo is opened first, before the run has written anything, with the token given
    assert create == ("create_repo", "tiny-gpt2", TOKEN, True, False, None)  # the Hub's default
    # the checkpoint at step 2 (--save_steps 2) in the background, then the end, waited for
    _, repo_id, uploaded, message, background = at_checkpoint
    assert (repo_id, message, background) == (
        "someone/tiny-gpt2", "flax-lm: model after 2 training steps", True)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(uploaded)
    _, repo_id, uploaded, message, background = final
    assert repo_id == "someone/tiny-gpt2" and not background
    assert message == "flax-lm: model after 3 training steps"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "all_results.json", "train_results.json", "eval_results.json", "metrics.jsonl"):
        assert name in uploaded
    assert not [name for name in uploaded if name.startswith("checkpoints")]
    assert (out / "checkpoints").is_dir()  # kept locally
    assert "pushed to the Hub: https://huggingface.co/someone/tiny-gpt2/commit/0123abc" in stdout
    leaked = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


def test_a_failed_upload_at_a_checkpoint_is_a_warning(online_hub, code_corpus,
                                                      tiny_tokenizer_dir):
    online_hub.fail_background = True
    out = online_hub.output_dir
    status, stdout, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, out,
                                           "--hub_token", TOKEN))
    assert status == 0, stderr[-3000:]
    assert ("warning: the Hub upload of the step-2 model failed (Connection reset by peer); "
            "training goes on") in stderr
    assert [call[3] for call in online_hub.calls[1:]] == ["flax-lm: model after 3 training steps"]
    assert "pushed to the Hub:" in stdout


def test_a_failed_upload_keeps_the_model_and_says_how_to_push_it(
        online_hub, code_corpus, tiny_tokenizer_dir, monkeypatch):
    online_hub.fail_upload = True
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)  # as after `hf auth login`
    out = online_hub.output_dir
    argv = push_argv(code_corpus, tiny_tokenizer_dir, out, "--hub_model_id", "me/tiny")
    status, _, stderr = run(argv)
    assert status == 2
    last = stderr.strip().splitlines()[-1]  # after the run's own lines: what failed, what to do
    assert last.startswith("error: "), stderr[-3000:]
    for name in ("me/tiny", "Connection reset by peer", f"hf upload me/tiny {out}"):
        assert name in last, (name, last)
    assert (out / "model.safetensors").is_file() and (out / "all_results.json").is_file()


@pytest.mark.parametrize(("offline", "token", "names"), [
    (True, TOKEN, ("--push_to_hub", "HF_HUB_OFFLINE")),
    (False, None, ("--push_to_hub", "token", "hf auth login", "HF_TOKEN", "--hub_token")),
])  # fmt: skip
def test_push_to_hub_without_the_hub_fails_before_anything_is_written(
        offline, token, names, online_hub, code_corpus, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    out = online_hub.output_dir
    status, _, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, out))
    assert_one_line_error((status, stderr), *names)
    assert not out.exists() and online_hub.calls == []


@pytest.mark.parametrize("flag", ["--hub_token", "--token"])
def test_a_token_is_not_printed_with_the_config(flag, capsys):
    argv = ["--output_dir", "o", "--train_file", "a.txt", "--push_to_hub", flag, TOKEN,
            "--print_config"]
    assert main(argv, objective="clm") == 0
    printed = capsys.readouterr().out
    assert TOKEN not in printed and "push_to_hub: true" in printed


def test_token_reaches_the_hub_dataset_and_tokenizer_loads(monkeypatch, tiny_tokenizer_dir,
                                                           tmp_path):
    """--token (for a gated dataset such as OSCAR) is what datasets and transformers get."""
    import datasets
    import transformers

    seen = {}

    def refuse(what):
        def load(*args, **kwargs):
            seen[what] = kwargs.get("token")
            raise OSError(f"{what} recorded")
        return load

    base = ["--output_dir", str(tmp_path / "o"), "--config_name", "gpt2", "--token", TOKEN,
            "--dataset_name", "someone/gated"]
    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse("tokenizer"))
        status, _, stderr = run([*base, "--tokenizer_name", "someone/tokenizer"])
    assert status == 2 and seen == {"tokenizer": TOKEN}, stderr
    assert "cannot load the tokenizer 'someone/tokenizer': tokenizer recorded" in stderr
    monkeypatch.setattr(datasets, "load_dataset", refuse("dataset"))
    status, _, stderr = run([*base, "--tokenizer_name", str(tiny_tokenizer_dir),
                             "--config_overrides", "vocab_size=512"])
    assert status == 2 and seen == {"tokenizer": TOKEN, "dataset": TOKEN}, stderr
    assert "cannot load dataset 'someone/gated': dataset recorded" in stderr


def test_a_checkpoint_during_a_running_upload_is_not_queued(online_hub, tmp_path):
    """Uploads slower than checkpoints must not pile up: the next one carries a newer model."""
    pusher = hub.HubPusher("me/tiny", tmp_path, TOKEN)
    unfinished = Future()
    pusher.running = (2, unfinished)
    assert pusher.push_in_background(4) is False and online_hub.calls == []
    unfinished.set_result(None)
    assert pusher.push_in_background(6) is True
    assert [call[3] for call in online_hub.calls] == ["flax-lm: model after 6 training steps"]


def test_hub_private_repo_creates_a_private_repo(online_hub, tmp_path):
    repo_id = hub.prepare_hub_repo("me/tiny", str(tmp_path), TOKEN, private=True)
    assert repo_id == "me/tiny"
    assert online_hub.calls == [("create_repo", "me/tiny", TOKEN, True, False, True)]


def repo_files(online_hub) -> set[str]:
    return {str(p.relative_to(online_hub.repo)) for p in online_hub.repo.rglob("*") if p.is_file()}


AT_2, AT_3 = "flax-lm: model after 2 training steps", "flax-lm: model after 3 training steps"


@pytest.mark.parametrize("strategy", ["end", "all_checkpoints"])
def test_hub_strategy_uploads_what_the_trainer_does(strategy, online_hub, code_corpus,
                                                    tiny_tokenizer_dir):
    """Checkpoints at steps 2 and 3 (the end): `end` uploads once, at the end;
    `all_checkpoints` uploads checkpoints/ with the model each time."""
    out = online_hub.output_dir
    status, _, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, out, "--hub_token", TOKEN,
                                      "--hub_strategy", strategy, "--hub_private_repo"))
    assert status == 0, stderr[-3000:]
    assert online_hub.calls[0] == ("create_repo", "tiny-gpt2", TOKEN, True, False, True)
    uploads = [(call[3], call[4]) for call in online_hub.calls[1:]]
    in_repo = repo_files(online_hub)
    assert {"model.safetensors", "config.json", "all_results.json"} <= in_repo
    checkpoint_files = {name for name in in_repo if name.startswith("checkpoints/")}
    assert not [name for name in in_repo if name.startswith(LAST_CHECKPOINT)]
    if strategy == "end":
        assert uploads == [(AT_3, False)] and not checkpoint_files
    else:
        assert uploads == [(AT_2, True), (AT_3, False)]
        for step in ("2", "3"):
            assert any(name.startswith(f"checkpoints/{step}/state/") for name in checkpoint_files)
            assert f"checkpoints/{step}/commit_success.txt" in checkpoint_files


def test_a_run_continues_on_another_machine_from_last_checkpoint(online_hub, code_corpus,
                                                                 tiny_tokenizer_dir, tmp_path):
    """--hub_strategy checkpoint uploads the newest checkpoint as last-checkpoint/ (step 2's
    replaced by step 3's); on "another machine" the downloaded repo's last-checkpoint/ given to
    --resume_from_checkpoint continues the run."""
    first = online_hub.output_dir
    status, _, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, first, "--hub_token", TOKEN,
                                      "--hub_strategy", "checkpoint"))
    assert status == 0, stderr[-3000:]
    assert [(call[3], call[4]) for call in online_hub.calls[1:]] == [
        (AT_2, True), ("flax-lm: checkpoint 2 as last-checkpoint", True),
        (AT_3, False), ("flax-lm: checkpoint 3 as last-checkpoint", False)]
    in_repo = repo_files(online_hub)
    assert not [name for name in in_repo if name.startswith("checkpoints/")]
    local = {f"{LAST_CHECKPOINT}/{p.relative_to(first / 'checkpoints')}"
             for p in (first / "checkpoints" / "3").rglob("*") if p.is_file()}
    assert {name for name in in_repo if name.startswith(LAST_CHECKPOINT)} == local
    download = tmp_path / "downloaded"
    shutil.copytree(online_hub.repo, download)  # `hf download someone/tiny-gpt2 --local-dir ..`
    argv = [*push_argv(code_corpus, tiny_tokenizer_dir, tmp_path / "second", "--hub_token", TOKEN,
                       "--hub_strategy", "checkpoint"),
            "--max_steps", "4", "--resume_from_checkpoint", str(download / LAST_CHECKPOINT)]
    status, stdout, stderr = run(argv)
    assert status == 0, stderr[-3000:]
    assert f"resumed from checkpoint {download / LAST_CHECKPOINT / '3'} at step 3" in stderr + stdout
    results = json.loads((tmp_path / "second" / "train_results.json").read_text())
    assert results["train_steps"] == 4


def test_push_to_hub_from_a_gs_output_dir(online_hub, code_corpus, tiny_tokenizer_dir,
                                          fake_gcs):
    """A run writing to gs:// pushes from local copies: the repo gets the bucket's model and,
    with --hub_strategy checkpoint, its newest checkpoint as last-checkpoint/."""
    status, stdout, stderr = run(push_argv(code_corpus, tiny_tokenizer_dir, "gs://bucket/tiny-gpt2",
                                           "--hub_token", TOKEN, "--hub_strategy", "checkpoint"))
    assert status == 0, stderr[-3000:]
    assert "pushed to the Hub: https://huggingface.co/someone/tiny-gpt2/commit/0123abc" in stdout
    assert [(call[3], call[4]) for call in online_hub.calls[1:]] == [
        (AT_2, True), ("flax-lm: checkpoint 2 as last-checkpoint", True),
        (AT_3, False), ("flax-lm: checkpoint 3 as last-checkpoint", False)]
    bucket, in_repo = fake_gcs / "bucket" / "tiny-gpt2", repo_files(online_hub)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "all_results.json"):
        assert (online_hub.repo / name).read_bytes() == (bucket / name).read_bytes(), name
    saved = {f"{LAST_CHECKPOINT}/{p.relative_to(bucket / 'checkpoints')}"
             for p in (bucket / "checkpoints" / "3").rglob("*") if p.is_file()}
    assert {name for name in in_repo if name.startswith(LAST_CHECKPOINT)} == saved
    assert not (Path.cwd() / "gs:").exists()  # nothing local named after the URL


# ------------------------------------------------------------- models and configs from Hub ids

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_hub_model(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay out `files` as huggingface_hub's cache holds a downloaded model repo (refs/main
    naming the snapshot), so HF_HUB_OFFLINE finds them there."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return snapshot


def test_model_config_and_tokenizer_from_hub_ids_through_the_hub_cache(tiny_tokenizer_dir,
                                                                       tmp_path, stdlib_dir):
    """--model_name_or_path / --config_name / --tokenizer_name take Hub ids, read (offline
    here) from the Hub cache at --cache_dir."""
    import numpy as np
    from safetensors.numpy import load_file

    from flax_lm.config import apply_config_overrides, load_base_config
    from flax_lm.models import create_model
    from flax_lm.models.hf_io import export_state_dict, save_model
    from flax_lm.train.args import parse_config
    from flax_lm.train.build import build_model
    from flax_lm.train.prepare import prepare
    from flax_lm.train.step import make_mesh

    config = apply_config_overrides(load_base_config("gpt2"), "n_embd=32,n_layer=1,n_head=2,"
                                    "n_positions=64,vocab_size=512,bos_token_id=2,eos_token_id=2")
    save_model(create_model(config, seed=5), tmp_path / "model")
    names = ("config.json", "model.safetensors")
    files = {name: tmp_path / "model" / name for name in names}
    files.update({p.name: p for p in tiny_tokenizer_dir.iterdir()})
    cache = tmp_path / "hub-cache"
    snapshot = cached_hub_model(cache, "someone/tiny-gpt2", files)
    validation = tmp_path / "validation.txt"
    validation.write_text((stdlib_dir / "textwrap.py").read_text())
    base = ["--output_dir", str(tmp_path / "out"), "--validation_file", str(validation),
            "--do_eval", "--block_size", "32", "--cache_dir", str(cache)]

    cfg = parse_config([*base, "--model_name_or_path", "someone/tiny-gpt2"], "clm")
    prepared = prepare(cfg, "clm", num_devices=1)
    assert prepared.model_dir == snapshot
    assert prepared.model_config.n_embd == 32 and len(prepared.tokenizer) == 512
    model = build_model(prepared, make_mesh())
    loaded = export_state_dict(model)
    saved = load_file(str(snapshot / "model.safetensors"))
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)

    cfg = parse_config([*base, "--config_name", "someone/tiny-gpt2", "--tokenizer_name",
                        "someone/tiny-gpt2"], "clm")
    prepared = prepare(cfg, "clm", num_devices=1)
    assert prepared.model_dir is None and prepared.model_config.n_layer == 1
    assert prepared.tokenizer("def f():").input_ids == prepared.tokenizer.__class__.from_pretrained(
        tiny_tokenizer_dir)("def f():").input_ids

    status, _, stderr = run([*base, "--model_name_or_path", "someone/missing"])
    assert_one_line_error((status, stderr), "--model_name_or_path", "'someone/missing'")

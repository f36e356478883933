"""Shared test setup: CPU only, never reach a hub, small real corpora."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests compare float32 results with PyTorch's and with each other at float32 tolerances:
# ask for true float32 matmuls (JAX runs them as TF32 on NVIDIA GPUs by default; CPUs are
# unaffected). Set in the environment, so the training commands the tests start get it too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# XLA's CPU compiler without LLVM's costly optimisation passes, with its older and quicker fusion
# emitters: the tests' tiny programs take far longer to compile than to run, and every comparison
# in the suite is between programs compiled with the same flags (the commands the tests start
# inherit them; host_devices keeps them). Benchmark figures (docs/performance.md) are measured
# without them. XLA ends the process on a flag it does not know, so those a later XLA may drop are
# tried first, once (xdist's workers inherit the result).
if "FLAX_LM_TEST_XLA_FLAGS" not in os.environ:
    import subprocess as _subprocess
    import sys as _sys

    for _flags in (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        " --xla_cpu_use_fusion_emitters=false",
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        "",
    ):
        _env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": _flags}
        _probe = [_sys.executable, "-c", "import jax; jax.devices()"]
        if not _flags or _subprocess.run(_probe, env=_env, capture_output=True).returncode == 0:
            break
    os.environ["FLAX_LM_TEST_XLA_FLAGS"] = _flags
    os.environ["XLA_FLAGS"] = f"{_flags} {os.environ.get('XLA_FLAGS', '')}".strip()

import contextlib
import hashlib
import importlib
import shutil
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import stringify_path

from flax_lm.models.output import OutputLayer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject.toml): a worker per core on the CPU (xdist's default); on an
    accelerator, no workers: the tests run in this one process, which holds the device."""
    return None if os.environ["JAX_PLATFORMS"] == "cpu" else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with long end-to-end tests (marked slow) first, in their order: spread over
    workers a module at a time (pyproject.toml's addopts), the short modules then fill the end
    instead of one long module running alone."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # a stable sort


@pytest.fixture(scope="session")
def stdlib_dir() -> Path:
    """The Python standard library's source: a real corpus on every machine."""
    return STDLIB


@dataclass(frozen=True)
class CodeCorpus:
    """A small real corpus: copies of stdlib modules split into train/ and validation/."""

    root: Path
    train: Path
    validation: Path


def stdlib_modules(min_bytes: int = 2_000, max_bytes: int = 30_000) -> list[Path]:
    """Top-level stdlib .py files of moderate size, sorted by name: a fixed, varied selection."""
    return sorted(p for p in STDLIB.glob("*.py") if min_bytes <= p.stat().st_size <= max_bytes)


def copy_until(files: list[Path], target: Path, total_bytes: int) -> list[Path]:
    """Copy files into `target` until `total_bytes` are there; returns the files not used."""
    target.mkdir(parents=True)
    copied = 0
    while files and copied < total_bytes:
        source = files.pop(0)
        shutil.copyfile(source, target / source.name)
        copied += source.stat().st_size
    return files


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory) -> CodeCorpus:
    """~400 KB of Python source for training and ~60 KB (other modules) for validation."""
    root = tmp_path_factory.mktemp("code_corpus")
    rest = copy_until(stdlib_modules(), root / "train", 400_000)
    copy_until(rest, root / "validation", 60_000)
    return CodeCorpus(root, root / "train", root / "validation")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(code_corpus, tmp_path_factory) -> Path:
    """A 512-token ByteLevelBPE tokenizer trained on code_corpus.train."""
    from flax_lm.tokenizer import train_tokenizer

    texts = (path.read_text(encoding="utf-8") for path in sorted(code_corpus.train.iterdir()))
    return train_tokenizer(texts, 512, 2, tmp_path_factory.mktemp("tiny_tokenizer"))


def assert_one_line_error(
    result: subprocess.CompletedProcess | tuple[int, str], *must_name: str, status: int = 2
) -> str:
    """What a user given bad input needs: exit `status`, ONE line `error: ...` on stderr (no
    traceback) naming each of `must_name` (the bad value, the flag or file). The wording around
    them is free, so clearer messages do not break tests. `result` is a finished subprocess or an
    (exit status, stderr) pair of an in-process run. Returns the line."""
    code, stderr = (
        (result.returncode, result.stderr)
        if isinstance(result, subprocess.CompletedProcess)
        else result
    )
    lines = stderr.strip().splitlines()
    assert code == status, f"exit {code}, expected {status}: {stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    missing = [name for name in must_name if str(name) not in lines[0]]
    assert not missing, f"{lines[0]!r} does not name {missing}"
    return lines[0]


@contextlib.contextmanager
def raises_user_error(*must_name: str) -> Iterator[pytest.ExceptionInfo]:
    """The library's side of assert_one_line_error: a UserError (or the models' ModelError) whose
    message names each of `must_name` (the bad value, the setting or file), whatever its wording."""
    from flax_lm.errors import UserError
    from flax_lm.models.errors import ModelError

    with pytest.raises((UserError, ModelError)) as raised:
        yield raised
    missing = [name for name in must_name if str(name) not in str(raised.value)]
    assert not missing, f"{str(raised.value)!r} does not name {missing}"


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `directory`: modification time and content hash (dirs: "dir")."""
    return {
        str(p.relative_to(directory)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
        )
        for p in sorted(directory.rglob("*"))
    }


def training_fails_cleanly(
    argv: list[str], objective: str, capsys, output_dir: Path, *must_name: str
) -> str:
    """Run the training CLI in-process: it must fail as `assert_one_line_error` says, naming each
    of `must_name`, leaving output_dir as it was (or absent). Returns the error line."""
    from flax_lm.commands.train import main

    before = snapshot(output_dir) if output_dir.exists() else None
    status = main(argv, objective=objective)
    line = assert_one_line_error((status, capsys.readouterr().err), *must_name)
    if before is None:
        assert not output_dir.exists(), "a failed run created output_dir"
    else:
        assert snapshot(output_dir) == before, "a failed run changed output_dir"
    return line


# The environment for test commands whose compiled programs a later process of the same test runs
# again with the same --compilation_cache_dir: JAX then keeps every compilation there, not only
# those over a second (a tiny model's initializer, eval step and the eager ops of a checkpoint
# save compile in less, but add up to seconds in every process), and the later one loads them.
CACHE_EVERY_COMPILE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def host_devices(count: int) -> dict[str, str]:
    """The environment of a command that sees `count` CPU devices, with the suite's XLA flags."""
    return {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={count}"}


class Background:
    """A command started now, in the background, its output kept in files of `folder`.

    For tests whose time goes into starting Python processes that import JAX or torch and
    compiling, mostly on one core: started together they overlap instead of queueing one after
    the other. `result()` waits for the command; `exit_time` is when it ended."""

    def __init__(self, command: list[str], folder: Path, **popen) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, text=True, **popen)
        self.exit_time: float | None = None
        self.waiter = threading.Thread(target=self.wait_for_exit, daemon=True)
        self.waiter.start()

    def wait_for_exit(self) -> None:
        self.process.wait()
        self.exit_time = time.time()

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.waiter.join(timeout)
        if self.exit_time is None:
            self.process.kill()
            pytest.fail(f"{self.process.args[:3]} did not finish in {timeout} s")
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, self.stdout.read_text(),
            self.stderr.read_text(),
        )  # fmt: skip

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


class Bigram(nnx.Module):
    """A model with a real gradient that compiles in a moment: the next token's logits are a
    learned row per current token, reached the way the objectives reach GPT-2's (`encode`,
    then `output_layer`)."""

    def __init__(self, vocab: int, seed: int = 0):
        self.table = nnx.Embed(vocab, vocab, rngs=nnx.Rngs(seed))

    def encode(self, input_ids, attention_mask, dropout_rng=None):
        return self.table(input_ids)

    def output_layer(self, hidden):
        return OutputLayer(hidden, jnp.eye(hidden.shape[-1], dtype=hidden.dtype))

    def __call__(self, input_ids, attention_mask, dropout_rng=None):
        return self.output_layer(self.encode(input_ids, attention_mask)).logits()


class FakeGCS(LocalFileSystem):
    """fsspec's gs:// (and gcs://) protocol kept in a local folder, `root`."""

    protocol = ("gs", "gcs")
    root = ""

    @classmethod
    def _strip_protocol(cls, path):
        path = stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = os.path.join(cls.root, path.removeprefix(prefix))
        return super()._strip_protocol(path)

    def glob(self, path, **kwargs):  # "bucket/path" names, as gcsfs gives (epath adds gs://)
        found = super().glob(path, **kwargs)
        if kwargs.get("detail"):  # {name: info}, as datasets asks for it
            return {os.path.relpath(p, self.root): info for p, info in found.items()}
        return [os.path.relpath(p, self.root) for p in found]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch) -> Path:
    """gs://BUCKET/PATH lives in tmp_path/gcs/BUCKET/PATH, for both ways a run reaches it:
    epath's fsspec backend (what it uses without TensorFlow) and the TensorStore specs orbax
    builds for checkpoint arrays (for gs:// its GCS driver; here its local one). The Cloud Storage client
    orbax asks whether the bucket has a hierarchical namespace is answered: no. No network."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, protocol, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()

    def local_path(path: str) -> str:  # orbax's kvstore specs then take their local route
        path = os.path.normpath(path).replace("gs:/", "gs://")
        return str(root / path.removeprefix("gs://")) if path.startswith("gs://") else path

    monkeypatch.setattr(ts_utils, "_normalize_path", local_path)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(importlib.import_module("flax_lm.train.runlock"), "CLAIM_SETTLE_SECONDS", 0.1)
    monkeypatch.chdir(tmp_path)
    yield root
    backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[bool]:
    """`folder` (created) as a tmpfs of `size` ("1800k"), to fill as a full disk fills: True
    where this runs as root and may mount (CI), else False and `folder` stays a plain folder
    (the test then injects the write error). Unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    try:
        mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount command
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)  # (files left open)

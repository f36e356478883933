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

import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


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

"""Models, configs and tokenizers named by a Hugging Face Hub id ("gpt2", "someone/model"), as
Hugging Face's scripts take them: downloaded once into the Hub cache (HF_HUB_CACHE, or
--cache_dir), then read from there like a local directory (offline too, with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from flax_lm.errors import UserError, one_line

# What loading a model reads: config, safetensors weights (single or sharded), tokenizer files.
MODEL_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
]  # fmt: skip


def is_hub_id(name: str) -> bool:
    """Whether `name` can only be a Hub repo id: no local file or directory, valid as an id."""
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_error(flag: str, name: str, err: Exception) -> UserError:
    reason = one_line(err)
    return UserError(
        f"{flag} {name!r} is neither a local file or directory nor a Hub model that can be "
        f"downloaded or found in the Hub cache: {reason}"
    )


def download_config(
    name: str, flag: str, cache_dir: str | None, token: str | None, revision: str | None = None
) -> Path:
    """The config.json of Hub model `name` (at `revision`: a branch, tag or commit), downloaded
    (or found) in the Hub cache."""
    try:
        return Path(hf_hub_download(name, "config.json", cache_dir=cache_dir, token=token,
                                    revision=revision))  # fmt: skip
    except Exception as err:  # unknown repo, no network and not cached, refused token: one line
        raise hub_error(flag, name, err) from None


def download_model(
    name: str, flag: str, cache_dir: str | None, token: str | None, revision: str | None = None
) -> Path:
    """A local directory holding Hub model `name`'s config, weights and tokenizer files (at
    `revision`)."""
    try:
        folder = snapshot_download(
            name, allow_patterns=MODEL_FILES, cache_dir=cache_dir, token=token, revision=revision
        )
    except Exception as err:
        raise hub_error(flag, name, err) from None
    return Path(folder)

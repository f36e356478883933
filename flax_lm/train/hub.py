"""--push_to_hub: the finished run's output_dir (model, tokenizer, results, logs) uploaded to a
Hugging Face Hub model repo, which `AutoModel.from_pretrained("user/name")` then loads.

The repo is created (or found) before training, so a missing token, a wrong name or no network
fails the command at once instead of after the run. The upload happens once, at the end, from
process 0; checkpoints stay local. If the upload fails, the trained model is still in output_dir
and the error says how to upload it by hand.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi

from flax_lm.errors import UserError

LOCAL_ONLY = ["checkpoints/**", "*.lock", ".cache/**"]  # never uploaded


def hub_repo_name(hub_model_id: str | None, output_dir: str) -> str:
    """--hub_model_id, or output_dir's last part (the Hub puts it under the token's user)."""
    return hub_model_id or Path(output_dir).resolve().name


def prepare_hub_repo(hub_model_id: str | None, output_dir: str, token: str | None) -> str:
    """Create the model repo if needed; its full id ("user/name"). Raises UserError if the Hub
    cannot be used (offline mode, no token, a name or permission the Hub refuses, no network)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set")
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError("--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN "
                        "or give --hub_token")
    name = hub_repo_name(hub_model_id, output_dir)
    try:
        return HfApi(token=token).create_repo(name, exist_ok=True).repo_id
    except Exception as err:  # HTTP, validation and network errors alike: one line for the user
        raise UserError(f"--push_to_hub: cannot create or open the Hub repo {name!r}: "
                        f"{' '.join(str(err).split())}") from None


def push_output_dir(output_dir: Path, repo_id: str, token: str | None, step: int) -> str:
    """Upload output_dir (without checkpoints) to `repo_id`; the commit's URL."""
    try:
        commit = HfApi(token=token or huggingface_hub.get_token()).upload_folder(
            repo_id=repo_id, folder_path=output_dir, ignore_patterns=LOCAL_ONLY,
            commit_message=f"flax-lm: model after {step} training steps")
    except Exception as err:
        raise UserError(
            f"the upload to the Hub repo {repo_id} failed ({' '.join(str(err).split())}); the "
            f"model is saved in {output_dir}: upload it with `hf upload {repo_id} {output_dir} "
            f"--exclude 'checkpoints/*'`") from None
    return commit.commit_url

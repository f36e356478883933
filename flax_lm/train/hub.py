"""--push_to_hub: the finished run's output_dir (model, tokenizer, results, logs) uploaded to a
Hugging Face Hub model repo, which `AutoModel.from_pretrained("user/name")` then loads.

The repo is created (or found) before training, so a missing token, a wrong name or no network
fails the command at once instead of after the run. Process 0 uploads in the background at every
checkpoint (as Hugging Face's scripts do; a failure there is a warning, and a checkpoint that
comes while an upload still runs is not queued) and once more, waiting for it, at the end;
checkpoints/ stays local. If the final upload fails, the trained model is still in output_dir and
the error says how to upload it by hand.
"""

from __future__ import annotations

import sys
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi

from flax_lm.errors import UserError

LOCAL_ONLY = ["checkpoints/**", "*.lock", ".cache/**"]  # never uploaded


def hub_repo_name(hub_model_id: str | None, output_dir: str) -> str:
    """--hub_model_id, or output_dir's last part (the Hub puts it under the token's user)."""
    return hub_model_id or Path(output_dir).resolve().name


def prepare_hub_repo(
    hub_model_id: str | None, output_dir: str, token: str | None, private: bool = False
) -> str:
    """Create the model repo if needed (`private`: as a private repo; otherwise the Hub's
    default, public unless the organisation says otherwise; an existing repo keeps its
    visibility); its full id ("user/name"). Raises UserError if the Hub cannot be used
    (offline mode, no token, a name or permission the Hub refuses, no network)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set")
    token = token or huggingface_hub.get_token()
    if not token:
        raise UserError("--push_to_hub needs a Hub token: run `hf auth login`, set HF_TOKEN "
                        "or give --hub_token")
    name = hub_repo_name(hub_model_id, output_dir)
    try:
        return HfApi(token=token).create_repo(name, exist_ok=True, private=private or None).repo_id
    except Exception as err:  # HTTP, validation and network errors alike: one line for the user
        raise UserError(f"--push_to_hub: cannot create or open the Hub repo {name!r}: "
                        f"{' '.join(str(err).split())}") from None


class HubPusher:
    """Uploads of one output_dir to one repo: in the background at checkpoints, then the last."""

    def __init__(self, repo_id: str, output_dir: Path, token: str | None):
        self.repo_id, self.output_dir = repo_id, output_dir
        self.api = HfApi(token=token)  # None: the saved token, as prepare_hub_repo found it
        self.running: tuple[int, Future] | None = None

    def _upload(self, step: int, **options):
        return self.api.upload_folder(
            repo_id=self.repo_id, folder_path=self.output_dir, ignore_patterns=LOCAL_ONLY,
            commit_message=f"flax-lm: model after {step} training steps", **options)

    def push_in_background(self, step: int) -> bool:
        """Start uploading the model of checkpoint `step`, unless an upload still runs."""
        if self.running is not None and not self.running[1].done():
            return False
        self._report_background_failure()
        self.running = (step, self._upload(step, run_as_future=True))
        return True

    def _report_background_failure(self) -> None:
        if self.running is None:
            return
        step, future = self.running
        self.running = None
        if future.exception() is not None:
            print(f"warning: the Hub upload of the step-{step} model failed "
                  f"({' '.join(str(future.exception()).split())}); training goes on",
                  file=sys.stderr)

    def push(self, step: int) -> str:
        """Upload the final output_dir, after any background upload; the commit's URL."""
        if self.running is not None:
            self.running[1].exception()  # waits for it
            self._report_background_failure()
        try:
            return self._upload(step).commit_url
        except Exception as err:
            raise UserError(
                f"the upload to the Hub repo {self.repo_id} failed "
                f"({' '.join(str(err).split())}); the model is saved in {self.output_dir}: "
                f"upload it with `hf upload {self.repo_id} {self.output_dir} "
                "--exclude 'checkpoints/*'`") from None

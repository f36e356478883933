"""--push_to_hub: the finished run's output_dir (model, tokenizer, results, logs) uploaded to a
Hugging Face Hub model repo, which `AutoModel.from_pretrained("user/name")` then loads.

The repo is created (or found) before training, so a missing token, a wrong name or no network
fails the command at once instead of after the run. --hub_strategy says what else goes up, with
the Trainer's meanings: `end` uploads only at the end; `every_save` (the default) also uploads
the model in the background at every checkpoint; `checkpoint` also uploads the newest checkpoint
as `last-checkpoint/STEP/` (older ones deleted from the repo), so another machine continues the
run with `--resume_from_checkpoint` on its download; `all_checkpoints` uploads checkpoints/ too.
Process 0 uploads; a background failure is a warning, and a checkpoint that comes while an
upload still runs is not queued (the next carries a newer model). If the final upload fails, the
trained model is still in output_dir and the error says how to upload it by hand.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi

from flax_lm.errors import UserError, one_line
from flax_lm.storage import is_cloud, stage_files

NEVER_UPLOADED = ["*.lock", ".cache/**"]
CHECKPOINTS = "checkpoints/**"  # uploaded with --hub_strategy all_checkpoints only
LAST_CHECKPOINT = "last-checkpoint"  # --hub_strategy checkpoint: the newest one, in the repo
CHECKPOINTS_UPLOADED = ("checkpoint", "all_checkpoints")  # strategies that need finished saves


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
                        f"{one_line(err, None)}") from None


class HubPusher:
    """Uploads of one output_dir to one repo: in the background at checkpoints, then the last."""

    def __init__(
        self, repo_id: str, output_dir: Path, token: str | None, strategy: str = "every_save"
    ):
        self.repo_id, self.output_dir, self.strategy = repo_id, output_dir, strategy
        self.api = HfApi(token=token)  # None: the saved token, as prepare_hub_repo found it
        self.running: tuple[int, Future] | None = None
        self.staged: list[Path] = []  # local copies of a gs:// output_dir, uploaded from

    def local(self, folder, subfolders: tuple[str, ...] = ()) -> Path:
        """`folder` itself, or for gs:// a local copy of its files (and `subfolders`), which the
        Hub client uploads from; the copies are removed after the final upload."""
        if not is_cloud(folder):
            return Path(folder)
        staging = Path(tempfile.mkdtemp(prefix="flax-lm-hub-"))
        self.staged.append(staging)
        stage_files(folder, staging / folder.name, folders=subfolders)
        return staging / folder.name

    def _upload(self, step: int, checkpoint: Path | None, **options):
        """The model folder (with checkpoints/ for all_checkpoints), then for `checkpoint` the
        checkpoint as last-checkpoint/STEP/, replacing the one there; the last upload's result
        (HfApi runs background uploads one after another, in order)."""
        every_checkpoint = self.strategy == "all_checkpoints"
        ignored = NEVER_UPLOADED + ([] if every_checkpoint else [CHECKPOINTS])
        message = f"flax-lm: model after {step} training steps"
        folder = self.local(self.output_dir, ("checkpoints",) if every_checkpoint else ())
        result = self.api.upload_folder(
            repo_id=self.repo_id, folder_path=folder, ignore_patterns=ignored,
            commit_message=message, **options)
        if self.strategy == "checkpoint" and checkpoint is not None:
            checkpoint = self.local(checkpoint, tuple(p.name for p in checkpoint.iterdir()))
            result = self.api.upload_folder(
                repo_id=self.repo_id, folder_path=checkpoint.parent, path_in_repo=LAST_CHECKPOINT,
                allow_patterns=[f"{checkpoint.name}/*"], delete_patterns=["*"],
                commit_message=f"flax-lm: checkpoint {checkpoint.name} as {LAST_CHECKPOINT}",
                **options)
        return result

    def push_in_background(self, step: int, checkpoint: Path | None = None) -> bool:
        """Start uploading the model of checkpoint `step` (and, by strategy, the `checkpoint`
        dir, whose save must have finished), unless an upload still runs or the strategy is
        `end`."""
        if self.strategy == "end":
            return False
        if self.running is not None and not self.running[1].done():
            return False
        self._report_background_failure()
        self.running = (step, self._upload(step, checkpoint, run_as_future=True))
        return True

    def _report_background_failure(self) -> None:
        if self.running is None:
            return
        step, future = self.running
        self.running = None
        if future.exception() is not None:
            print(f"warning: the Hub upload of the step-{step} model failed "
                  f"({one_line(future.exception(), None)}); training goes on",
                  file=sys.stderr)

    def push(self, step: int, checkpoint: Path | None = None) -> str:
        """Upload the final output_dir (and, by strategy, the final `checkpoint`), after any
        background upload; the commit's URL."""
        if self.running is not None:
            self.running[1].exception()  # waits for it
            self._report_background_failure()
        try:
            return self._upload(step, checkpoint).commit_url
        except UserError:
            raise
        except Exception as err:
            raise UserError(
                f"the upload to the Hub repo {self.repo_id} failed "
                f"({one_line(err, None)}); the model is saved in {self.output_dir}: "
                f"upload it with `hf upload {self.repo_id} {self.output_dir} "
                "--exclude 'checkpoints/*'`") from None
        finally:
            for staging in self.staged:
                shutil.rmtree(staging, ignore_errors=True)
            self.staged = []

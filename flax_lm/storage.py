"""Where a training run writes: a local or shared-filesystem path, or Google Cloud Storage.

`gs://bucket/path` output and checkpoint dirs go through `etils.epath` (over fsspec's gcsfs) for
files and through orbax / TensorStore's own GCS driver for checkpoint arrays, so a run on a
preemptible VM keeps its checkpoints when the VM goes. No other URL scheme can be written by orbax
here, so any other `scheme://` is refused before the run starts: never a local folder named after
a URL. Local paths keep working as plain paths (epath's local backend is `os`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from etils import epath

from flax_lm.errors import UserError

CLOUD_SCHEMES = ("gs",)
URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
GCS_EXTRA = "pip install 'flax-lm[gcs]'  (gcsfs)"


def location(value: str, flag: str) -> epath.Path:
    """`value` of `flag` as a path runs can write: local (made absolute later by its users) or
    gs://bucket/...; anything else is a UserError."""
    match = URL.match(value)
    if match is None:
        return epath.Path(value)
    scheme, rest = match.groups()
    if scheme not in CLOUD_SCHEMES:
        raise UserError(
            f"{flag} {value}: {scheme}:// paths cannot be written here; use a local or "
            "shared-filesystem path (a mounted bucket works too) or gs://bucket/path"
        )
    if not rest.split("/")[0]:
        raise UserError(f"{flag} {value} names no bucket: write gs://bucket/path")
    check_cloud_client(scheme, value, flag)
    return epath.Path(value)


def check_cloud_client(scheme: str, value: str, flag: str) -> None:
    """The filesystem package epath needs for `scheme` (gcsfs for gs://) must be installed."""
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        raise UserError(
            f"{flag} {value} needs Google Cloud Storage support, which is not installed: "
            f"{GCS_EXTRA}"
        ) from None


def is_cloud(path: epath.PathLike) -> bool:
    return URL.match(os.fspath(path)) is not None


def absolute(path: epath.PathLike) -> epath.Path:
    """An absolute path (as orbax wants): local paths resolved, URLs as they are."""
    path = epath.Path(path)
    return path if is_cloud(path) else epath.Path(os.path.abspath(path))


def same_place(a: epath.PathLike, b: epath.PathLike) -> bool:
    return os.fspath(absolute(a)).rstrip("/") == os.fspath(absolute(b)).rstrip("/")


def is_inside(path: epath.PathLike, folder: epath.PathLike) -> bool:
    inner, outer = (os.fspath(absolute(p)).rstrip("/") for p in (path, folder))
    return inner == outer or inner.startswith(outer + "/")


def write_bytes_atomically(path: epath.Path, data: bytes) -> None:
    """Replace `path` in one step: readers see the old file or the new one, never half of one
    (a cloud object appears only once its upload is complete)."""
    if is_cloud(path):
        path.write_bytes(data)
        return
    partial = path.parent / f".{path.name}.partial"
    try:
        partial.write_bytes(data)
    except OSError as err:  # a full disk: what was written of it would only take space
        partial.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None  # (named as it is known)
    os.replace(partial, path)


def copy_into(local_dir: Path, target: epath.Path) -> None:
    """Every file under `local_dir` to the same relative path under `target`."""
    for source in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        destination = target / source.relative_to(local_dir).as_posix()
        destination.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(destination, source.read_bytes())


def save_pretrained(obj, target: epath.Path) -> None:
    """`obj.save_pretrained` (a tokenizer or config) into a local or cloud dir, each file replaced
    in one step: the folder may hold the very files a run reads (its config and tokenizer), and
    a run killed while exporting must leave them whole."""
    staging = Path(tempfile.mkdtemp(prefix="flax-lm-save-"))
    try:
        obj.save_pretrained(str(staging))
        copy_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def stage_files(source: epath.Path, target: Path, *, folders: Collection[str] = ()) -> None:
    """The files directly in `source` (and everything under its subfolders named in `folders`)
    copied into the local folder `target` (walked a folder at a time: gs:// has no `**`)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
        elif path.name in folders:
            stage_files(path, target / path.name, folders=[p.name for p in path.iterdir()])


@contextlib.contextmanager
def local_run_folder(spec: str, flag: str, *, checkpoint: bool = False) -> Iterator[str]:
    """`spec` as a local path for commands that read a run: itself, or for a gs:// run folder or
    checkpoint a local copy of what they read (the run's top-level files: config, tokenizer,
    model.safetensors, metrics.jsonl; and the checkpoint named, or the run's newest when
    `checkpoint` or when it has no model.safetensors), removed afterwards."""
    if not is_cloud(spec):
        yield spec
        return
    from flax_lm.train import checkpoint as checkpoints

    path = location(spec, flag)
    if not path.is_dir():
        raise UserError(f"{flag} {spec} is not a directory")
    staging = Path(tempfile.mkdtemp(prefix="flax-lm-run-"))
    try:
        if path.name.isdigit() and (path / checkpoints.ITEMS[0]).is_dir():
            run, step_dir = path.parent.parent, path
        else:
            steps = checkpoints.saved_steps(path / checkpoints.CHECKPOINTS_SUBDIR)
            has_model = (path / "model.safetensors").exists()
            newest = path / checkpoints.CHECKPOINTS_SUBDIR / str(steps[-1]) if steps else None
            run, step_dir = path, newest if (checkpoint or not has_model) else None
        stage_files(run, staging)
        local = staging
        if step_dir is not None:
            staged_step = staging / checkpoints.CHECKPOINTS_SUBDIR / step_dir.name
            stage_files(step_dir, staged_step, folders=[p.name for p in step_dir.iterdir()])
            local = staged_step if step_dir == path else staging
        yield str(local)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


REPLACE_ADVICE = "; use --overwrite_output_dir to replace"


def check_output_dir(
    output_dir: epath.PathLike,
    *,
    overwrite: bool,
    may_hold: Collection[str] = (),
    advice: str = REPLACE_ADVICE,
    cloud: bool = False,
) -> None:
    """Refuse an --output_dir a command cannot write into before it writes anything: a file, a
    directory holding files (other than `may_hold`) without --overwrite_output_dir (`advice`
    says what to do instead), a local path whose nearest existing folder is not writable, or a
    URL where the command writes local files only (`cloud` False; else see `location`)."""
    if is_cloud(output_dir) and not cloud:
        raise UserError(
            f"--output_dir {output_dir}: this command writes a local (or mounted) directory, "
            "not a URL"
        )
    output_dir = epath.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a directory")
    names = {path.name for path in output_dir.iterdir()} if output_dir.is_dir() else set()
    if names - set(may_hold) and not overwrite:
        raise UserError(f"--output_dir {output_dir} already holds files{advice}")
    if is_cloud(output_dir):  # the first write tells whether the bucket takes it
        return
    local = Path(output_dir)
    existing = next(p for p in (local, *local.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"--output_dir {output_dir} cannot be written: {existing} is not a writable directory"
        )

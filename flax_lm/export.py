"""`flax-lm export`: one training checkpoint as a transformers model directory.

    flax-lm export OUTPUT_DIR/checkpoints/2500 --output_dir step-2500

A run exports its newest checkpoint to its output_dir by itself; this exports any other one (an
earlier step with a better eval loss, say). The checkpoint carries everything needed besides the
tokenizer: the model config and the run's optimizer settings (to lay out the saved state). The
tokenizer comes from the run's output_dir next to `checkpoints/`, or --tokenizer_name.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
from flax import nnx
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.models import create_model
from flax_lm.models.hf_io import save_model
from flax_lm.train import checkpoint
from flax_lm.train.args import TrainConfig
from flax_lm.train.optim import make_schedule, make_training_optimizer
from flax_lm.train.step import init_state, make_mesh


def restore_model(checkpoints_dir: Path, step: int) -> nnx.Module:
    """The model of checkpoint `step` (float32 parameters, as trained)."""
    meta = checkpoint.read_meta(checkpoints_dir, step)
    settings = dict(meta["model"])
    model_type = settings.pop("model_type", None)
    if model_type is None:
        raise UserError(f"checkpoint {checkpoints_dir / str(step)} does not name its model type")
    config = AutoConfig.for_model(model_type, **settings)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in meta.get("train_config", {}).items() if k in known})
    graphdef, params = nnx.split(create_model(config, seed=0), nnx.Param)
    optimizer = make_training_optimizer(cfg, make_schedule(cfg, max(step, 1)), params)
    like = init_state(params, optimizer, 0, make_mesh(jax.devices()[:1]))
    manager = checkpoint.open_manager(checkpoints_dir, create=False)
    try:
        state, _ = checkpoint.restore(manager, step, like=like)
    finally:
        manager.close()
    return nnx.merge(graphdef, state.params)


def find_tokenizer(checkpoints_dir: Path, tokenizer_name: str | None) -> PreTrainedTokenizerBase:
    source = tokenizer_name or str(checkpoints_dir.parent)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        where = tokenizer_name or f"the run's output_dir {checkpoints_dir.parent}"
        raise UserError(f"no tokenizer in {where}: give --tokenizer_name") from None


def export_checkpoint(spec: str, output_dir: Path, tokenizer_name: str | None = None) -> Path:
    """Write checkpoint `spec` (a step dir, a checkpoints dir or a run's output_dir: its newest
    complete step) to output_dir as config.json, model.safetensors and the tokenizer."""
    checkpoints_dir, step = checkpoint.find_checkpoint(spec, Path(spec), purpose="export")
    tokenizer = find_tokenizer(checkpoints_dir, tokenizer_name)
    model = restore_model(checkpoints_dir, step)
    save_model(model, output_dir)
    tokenizer.save_pretrained(output_dir)
    return checkpoints_dir / str(step)


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint step dir, a checkpoints dir or a run's "
                        "output_dir (then its newest complete checkpoint)")
    parser.add_argument("--output_dir", required=True, help="where the model is written")
    parser.add_argument("--tokenizer_name", help="tokenizer dir (default: the run's output_dir)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="write into an output_dir that already holds files")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds files; use --overwrite_output_dir")
    exported = export_checkpoint(args.checkpoint, out, args.tokenizer_name)
    print(f"exported {exported} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

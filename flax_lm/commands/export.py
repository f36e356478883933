"""`flax-lm export`: one training checkpoint as a transformers model directory.

    flax-lm export OUTPUT_DIR/checkpoints/2500 --output_dir step-2500

A run exports its newest checkpoint to its output_dir by itself; this exports any other one (an
earlier step with a better eval loss, say). Only the checkpoint's parameters are read; the model
config and tokenizer come from the run's output_dir (next to `checkpoints/`) or --config_name and
--tokenizer_name, as `flax-lm evaluate` finds them.
"""

from __future__ import annotations

import sys

from flax_lm.errors import ArgParser, UserError, is_write_fault, os_reason, report_user_errors
from flax_lm.model_source import export_checkpoint
from flax_lm.storage import check_output_dir, location


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint step dir (OUTPUT_DIR/checkpoints/STEP) or "
                        "a run's output_dir (its newest complete checkpoint)")
    parser.add_argument("--output_dir", required=True,
                        help="where the model is written (a local dir or gs://bucket/path)")
    parser.add_argument("--config_name", help="model config (default: the run's config.json)")
    parser.add_argument("--tokenizer_name", help="tokenizer dir (default: the run's output_dir)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="write into an output_dir that already holds files")
    return parser.parse_args(argv)


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = location(args.output_dir, "--output_dir")  # a local dir or gs://bucket/path
    check_output_dir(out, overwrite=args.overwrite_output_dir, cloud=True)
    try:
        exported = export_checkpoint(args.checkpoint, out, args.config_name, args.tokenizer_name)
    except OSError as err:
        if not is_write_fault(err):
            raise
        raise UserError(
            f"cannot write {err.filename or out}: {os_reason(err)}; free space and rerun the "
            "command with --overwrite_output_dir (a model file is replaced in one step, never "
            "left half-written)"
        ) from None
    print(f"exported {exported} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`flax-lm plot OUTPUT_DIR`: one PNG with the curves of a training run, from its metrics.jsonl
(drawing: flax_lm.plot)."""

from __future__ import annotations

from pathlib import Path

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.plot import plot_metrics
from flax_lm.storage import is_cloud, local_run_folder, location, write_bytes_atomically


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm plot", description=__doc__)
    parser.add_argument("output_dir", help="a training output_dir holding metrics.jsonl")
    parser.add_argument("--out", help="PNG file to write (default: OUTPUT_DIR/metrics.png)")
    args = parser.parse_args(argv)
    if not is_cloud(args.output_dir) and not Path(args.output_dir).is_dir():
        raise UserError(f"{args.output_dir} is not a directory")
    if args.out is not None:
        if Path(args.out).suffix.lower() != ".png":
            raise UserError(f"--out must be a .png file, got {args.out}")
        if not Path(args.out).resolve().parent.is_dir():
            raise UserError(f"the directory of --out {args.out} does not exist")
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with local_run_folder(args.output_dir, "output_dir") as run:
        out = plot_metrics(run, args.out)
        if args.out is None and run != args.output_dir:  # the PNG goes beside a gs:// run's logs
            target = location(args.output_dir, "output_dir") / out.name
            write_bytes_atomically(target, out.read_bytes())
            out = target
    print(f"wrote {out}")
    return 0

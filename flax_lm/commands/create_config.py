"""`flax-lm create-config` (and `configs/create_config.py`): save a RoBERTa or GPT-2
config.json from a published base, a tokenizer and overrides (see flax_lm.config).

    flax-lm create-config --model_type gpt2 --tokenizer_name tok/ \\
        --config_overrides "n_embd=256,n_head=4,n_layer=4" --dropout 0 --output_dir tok/
"""

from __future__ import annotations

import sys
from pathlib import Path

from flax_lm.config import CONFIG_CLASSES, base_config_names, build_config, describe
from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.storage import check_output_dir


def build_parser() -> ArgParser:
    parser = ArgParser(
        prog="flax-lm create-config",
        description="Save a RoBERTa or GPT-2 config.json (published base + tokenizer + overrides).",
    )
    parser.add_argument("--model_type", choices=sorted(CONFIG_CLASSES), help="default: the base's")
    parser.add_argument(
        "--base",
        help=f"one of {', '.join(base_config_names())}, or a config.json / model directory "
        "(default: roberta-base or gpt2)",
    )
    parser.add_argument("--tokenizer_name", help="tokenizer dir or Hub id: vocab size and token ids")
    parser.add_argument("--dropout", type=float, help="every dropout probability of the model")
    parser.add_argument("--config_overrides", help='e.g. "n_embd=128,n_head=4,n_layer=2"')
    parser.add_argument("--output_dir", required=True, help="where config.json is written")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace an existing config.json"
    )
    return parser


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, overwrite=True)  # may hold a tokenizer: only config.json counts
    if (output_dir / "config.json").exists() and not args.overwrite_output_dir:
        raise UserError(
            f"{output_dir / 'config.json'} exists; use --overwrite_output_dir to replace"
        )
    config = build_config(
        args.model_type, args.base, args.tokenizer_name, args.dropout, args.config_overrides
    )
    config.save_pretrained(output_dir)
    print(f"saved {output_dir / 'config.json'}: {describe(config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`flax-lm fill-mask`: the most likely tokens for each <mask> of a text, with a RoBERTa model
(predictions: flax_lm.fill_mask)."""

from __future__ import annotations

import json

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.fill_mask import fill_mask
from flax_lm.model_source import load_saved_model


def table(text: str, per_mask: list[list[dict]]) -> str:
    """A readable block: the text, then rank, score and token for each mask."""
    lines = [text]
    for number, rows in enumerate(per_mask, start=1):
        if len(per_mask) > 1:
            lines.append(f"  mask {number}:")
        lines.append(f"  {'rank':>4}  {'score':>8}  token")
        lines += [
            f"  {rank:>4}  {row['score']:8.4f}  {row['token_str']!r}"
            for rank, row in enumerate(rows, start=1)
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm fill-mask", description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="+", help="text(s) with one or more <mask> tokens")
    parser.add_argument("--model", required=True, help="a saved RoBERTa dir (training output_dir)")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_saved_model(args.model, "roberta", "fill-mask")
    results = fill_mask(model, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        print("\n\n".join(table(t, r) for t, r in zip(args.text, results, strict=True)))
    return 0

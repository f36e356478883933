"""`flax-lm generate`: text from a GPT-2 model (decoding: flax_lm.generate)."""

from __future__ import annotations

import json
import sys
import time

from flax_lm.errors import ArgParser, report_user_errors
from flax_lm.generate import SETTINGS, check_settings, complete
from flax_lm.model_source import load_saved_model


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a saved GPT-2 directory (training output_dir)"
    )
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="text to continue (repeat the flag for several prompts)",
    )
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_return_sequences", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    args = parser.parse_args(argv)
    check_settings(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_return_sequences
    )
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_saved_model(args.model, "gpt2", "generate")
    settings = {name: getattr(args, name) for name in SETTINGS}
    start = time.perf_counter()
    texts, new_tokens = complete(model, tokenizer, args.prompt, **settings)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(texts, ensure_ascii=False, indent=2))
    elif len(texts) == 1:
        print(texts[0])
    else:
        print("\n".join(f"--- {number} ---\n{text}" for number, text in enumerate(texts, 1)))
    print(f"[{new_tokens} tokens generated in {seconds:.2f} s, {new_tokens / seconds:,.1f} tokens/s "
          "including compilation]", file=sys.stderr)  # fmt: skip
    return 0

"""The `flax-lm` command: one entry point, one subcommand per pipeline step."""

from __future__ import annotations

import importlib
import os
import sys

from flax_lm.backend import skip_unused_tpu_plugin
from flax_lm.errors import EXIT_USAGE
from flax_lm.hostmem import MODEL_COMMANDS, reexec_with_huge_pages

# name -> (module of flax_lm.commands with a main(argv) -> int, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("quickstart", "run the whole pipeline on a built-in corpus"),
    "train-tokenizer": ("train_tokenizer", "train a ByteLevelBPE tokenizer on a corpus"),
    "create-config": ("create_config", "save a RoBERTa or GPT-2 config.json"),
    "run-clm": ("train", "train GPT-2 with causal LM (same flags as run_clm_flax.py)"),
    "run-mlm": ("train", "train RoBERTa with masked LM (same flags as run_mlm_flax.py)"),
    "plan": ("plan", "will a run's train step fit its devices (compiled, not run)"),
    "export": ("export", "write a training checkpoint as a transformers model dir"),
    "evaluate": ("evaluate", "eval loss, accuracy and perplexity of a saved model"),
    "generate": ("generate", "generate text with a GPT-2 model"),
    "fill-mask": ("fill_mask", "predict <mask> tokens with a RoBERTa model"),
    "plot": ("plot", "plot metrics.jsonl of a training run to a PNG"),
}


def usage() -> str:
    lines = ["usage: flax-lm COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<16} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=2)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; run `flax-lm --help`", file=sys.stderr)
        return EXIT_USAGE
    if from_command_line:
        skip_unused_tpu_plugin(os.environ)
        if name in MODEL_COMMANDS:
            reexec_with_huge_pages()
    module = importlib.import_module(f"flax_lm.commands.{COMMANDS[name][0]}")
    if name in ("run-clm", "run-mlm"):
        return module.main(rest, objective=name.split("-")[1])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())

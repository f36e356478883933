#!/usr/bin/env python3
"""Train a ByteLevelBPE tokenizer: `./tokenizer/train_tokenizer.py --help` (same as `flax-lm train-tokenizer`)."""

import sys
from pathlib import Path

try:
    import flax_lm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flax_lm.commands.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())

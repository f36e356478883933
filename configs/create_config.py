#!/usr/bin/env python3
"""Save a RoBERTa or GPT-2 config.json: `./configs/create_config.py --help` (same as `flax-lm create-config`)."""

import sys
from pathlib import Path

try:
    import flax_lm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flax_lm.commands.create_config import main

if __name__ == "__main__":
    sys.exit(main())

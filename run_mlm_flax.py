#!/usr/bin/env python3
"""Pretrain a RoBERTa model with masked language modeling, data-parallel over all
local devices. Flags as Hugging Face's examples/flax/language-modeling/run_mlm_flax.py; see --help."""

import sys
from pathlib import Path

try:
    from flax_lm.commands.train import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from flax_lm.commands.train import main

if __name__ == "__main__":
    sys.exit(main(objective="mlm"))

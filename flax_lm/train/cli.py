"""`run_clm_flax.py` / `run_mlm_flax.py` (and `flax-lm run-clm` / `run-mlm`): parse, then run."""

from __future__ import annotations

import sys

from flax_lm.errors import EXIT_INTERRUPTED, report_user_errors
from flax_lm.train.args import OBJECTIVES, config_yaml, parse_config


@report_user_errors
def main(argv: list[str] | None = None, objective: str = "clm") -> int:
    """Train (and/or evaluate) a GPT-2 (objective "clm") or RoBERTa ("mlm") model."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cfg = parse_config(sys.argv[1:] if argv is None else argv, objective)
    if cfg.print_config:
        print(config_yaml(cfg, objective), end="")
        return 0
    from flax_lm.train.trainer import run  # JAX and the models load only for a real run

    try:
        run(cfg, objective)
    except KeyboardInterrupt:
        print("interrupted: continue with --resume_from_checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

"""`run_clm_flax.py` / `run_mlm_flax.py` (and `flax-lm run-clm` / `run-mlm`): parse, then run.

Exit status: 0 done, 2 bad input or a storage fault (one `error:` line, the last; see
docs/storage.md), 1 stopped on a non-finite loss,
128 + signal when SIGTERM/SIGINT stopped training (after saving a checkpoint to resume from).
"""

from __future__ import annotations

import os
import sys

from flax_lm.backend import skip_unused_tpu_plugin
from flax_lm.errors import EXIT_INTERRUPTED, report_user_errors
from flax_lm.hostmem import reexec_with_huge_pages
from flax_lm.train.args import (
    OBJECTIVES,
    apply_log_level,
    config_yaml,
    parse_config,
    warn_about_secrets_on_the_command_line,
)

EXIT_NONFINITE = 1


@report_user_errors
def main(argv: list[str] | None = None, objective: str = "clm") -> int:
    """Train (and/or evaluate) a GPT-2 (objective "clm") or RoBERTa ("mlm") model."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if argv is None:  # run_clm_flax.py / run_mlm_flax.py as commands (flax-lm does it itself)
        skip_unused_tpu_plugin(os.environ)
        reexec_with_huge_pages()
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv, objective)
    warn_about_secrets_on_the_command_line(argv)
    if cfg.print_config:
        print(config_yaml(cfg, objective), end="")
        return 0
    apply_log_level(cfg.log_level)
    # JAX and the models load only for a real run
    from flax_lm.train.distributed import Interrupted
    from flax_lm.train.progress import NonFiniteLoss
    from flax_lm.train.trainer import run

    try:
        run(cfg, objective)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_status
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

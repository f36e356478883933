"""Evaluating a model on text files as training evaluates: the training pipeline's tokenization
and batches, the objective's masks drawn from the seed, and the trainer's compiled eval step.

A library module, so that `flax-lm evaluate`, the quickstart and anything else that scores a
model report the figures a training run reports.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def eval_config(model_config, tokenizer, objective: str, **flags: Any):
    """A TrainConfig (the data pipeline's settings) from training flags, with the sequence length
    resolved and checked as training does (default: min(1024, tokenizer and model limits))."""
    from flax_lm.train.args import TrainConfig
    from flax_lm.train.prepare import resolve_sequence_length

    cfg = TrainConfig(do_eval=True, pad_to_max_length=flags.get("line_by_line", False), **flags)
    return resolve_sequence_length(cfg, objective, model_config, tokenizer)


def evaluate(
    graphdef: nnx.GraphDef, params: nnx.State, tokenizer, cfg, objective_name: str, mesh
) -> dict[str, Any]:
    """Loss, accuracy, perplexity, examples and targets over all of cfg.validation_file."""
    from flax_lm.corpus import load_text_dataset
    from flax_lm.train.data.batches import eval_batches
    from flax_lm.train.data.feed import EVAL_MASK_STREAM
    from flax_lm.train.data.prefetch import Prefetcher
    from flax_lm.train.data.tokenize import tokenize_splits
    from flax_lm.train.metrics import perplexity
    from flax_lm.train.objectives import make_objective
    from flax_lm.train.step import compile_eval_step, make_eval_step, make_put, process_rows
    from flax_lm.train.trainer import PREFETCH_BATCHES

    objective = make_objective(objective_name, tokenizer, cfg)
    raw = load_text_dataset(data_files=cfg.validation_file, text_column=cfg.text_column)
    dataset = tokenize_splits({"validation": raw}, tokenizer, cfg, objective_name)["validation"]
    rng = np.random.default_rng([cfg.seed, EVAL_MASK_STREAM])
    batch_size = cfg.per_device_eval_batch_size * mesh.size
    examples_seen = []

    def model_batches():
        for examples in eval_batches(dataset, batch_size):
            examples_seen.append(int(examples["example_weight"].sum()))
            yield process_rows(objective.make_batch(examples, rng), batch_axis=0)

    eval_step, sums = None, []
    with Prefetcher(model_batches(), PREFETCH_BATCHES, make_put(mesh, 0)) as batches:
        for batch in batches:
            if eval_step is None:
                eval_step, _ = compile_eval_step(
                    make_eval_step(graphdef, objective), params, batch, mesh
                )
            sums.append(eval_step(params, batch))
    totals = {k: sum(float(s[k]) for s in jax.device_get(sums)) for k in sums[0]}
    targets = max(totals["num_targets"], 1.0)
    loss = totals["loss_sum"] / targets
    return {
        "eval_loss": loss,
        "eval_accuracy": totals["num_correct"] / targets,
        "perplexity": perplexity(loss),
        "eval_samples": sum(examples_seen),
        "eval_targets": int(totals["num_targets"]),
    }

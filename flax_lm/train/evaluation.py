"""Evaluating a model on text files as training evaluates: the training pipeline's tokenization
and batches, the objective's masks drawn from the seed, and the trainer's compiled eval step.

One loop (`Evaluation`) serves the trainer's evaluations and `evaluate`, which `flax-lm
evaluate` and the quickstart call, so a saved model or checkpoint scored again reports the
figures its training run reported.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import numpy as np
from flax import nnx

from flax_lm.corpus import load_text_dataset
from flax_lm.train.args import TrainConfig
from flax_lm.train.data.feed import PREFETCH_BATCHES, eval_host_batches
from flax_lm.train.data.prefetch import Prefetcher
from flax_lm.train.data.tokenize import resolve_sequence_length, tokenize_splits
from flax_lm.train.metrics import perplexity
from flax_lm.train.objectives import make_objective
from flax_lm.train.step import compile_eval_step, make_eval_step, make_put, process_rows


def eval_config(model_config, tokenizer, objective: str, **flags: Any) -> TrainConfig:
    """A TrainConfig (the data pipeline's settings) from training flags, with the sequence length
    resolved and checked as training does (default: min(1024, tokenizer and model limits))."""
    cfg = TrainConfig(do_eval=True, pad_to_max_length=flags.get("line_by_line", False), **flags)
    return resolve_sequence_length(cfg, objective, model_config, tokenizer)


def evaluate(
    graphdef: nnx.GraphDef, params: nnx.State, tokenizer, cfg, objective_name: str, mesh
) -> dict[str, Any]:
    """Loss, accuracy, perplexity, examples and targets over all of cfg.validation_file, with
    the masks a training run of the same seed and eval batch size draws (its data shard 0)."""
    objective = make_objective(objective_name, tokenizer, cfg)
    raw = load_text_dataset(data_files=cfg.validation_file, text_column=cfg.text_column,
                            say=partial(print, file=sys.stderr))  # stdout: the results' JSON
    dataset = tokenize_splits({"validation": raw}, tokenizer, cfg, objective_name)["validation"]
    batch_size = cfg.per_device_eval_batch_size * mesh.size
    examples_seen = []

    def model_batches():
        for batch in eval_host_batches(dataset, objective, batch_size, cfg.seed):
            examples_seen.append(int(batch["example_weight"].sum()))
            yield process_rows(batch, batch_axis=0)

    sums = Evaluation(graphdef, objective, mesh).sums(params, model_batches())
    return {
        **eval_metrics(sums),
        "eval_samples": sum(examples_seen),
        "eval_targets": int(sums["num_targets"]),
    }


class Evaluation:
    """The eval step of one model and objective, compiled on the first batch it sees and reused
    by every later evaluation."""

    def __init__(self, graphdef: nnx.GraphDef, objective: Any, mesh: jax.sharding.Mesh):
        self.graphdef, self.objective, self.mesh = graphdef, objective, mesh
        self.step = None
        self.compile_seconds: float | None = None

    def sums(
        self, params: nnx.State, host_batches: Iterable[dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """loss_sum, num_targets and num_correct over `host_batches` (this process's rows of
        each model-ready batch), which are made and placed on the devices ahead of the step."""
        sums = []
        with Prefetcher(host_batches, PREFETCH_BATCHES, make_put(self.mesh, 0)) as batches:
            for batch in batches:
                if self.step is None:
                    eval_fn = make_eval_step(self.graphdef, self.objective)
                    self.step, self.compile_seconds = compile_eval_step(
                        eval_fn, params, batch, self.mesh
                    )
                sums.append(self.step(params, batch))
        fetched = jax.device_get(sums)
        return {key: sum(float(s[key]) for s in fetched) for key in fetched[0]}


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """eval_loss (per target), eval_accuracy and perplexity from the summed eval metrics."""
    targets = max(sums["num_targets"], 1.0)
    loss = sums["loss_sum"] / targets
    return {
        "eval_loss": loss,
        "eval_accuracy": sums["num_correct"] / targets,
        "perplexity": perplexity(loss),
    }

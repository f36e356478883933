#!/usr/bin/env python3
"""The PyTorch peer: transformers' `Trainer` on the same model config, batches and optimizer.

    python bench/peer_trainer.py SPEC.json RESULT.json

SPEC (written by bench/bench.py) names the objective ("clm" | "mlm"), a directory with the model's
config.json, an .npz of the exact batches our trainer trains on (input_ids, attention_mask, labels,
step after step, MLM masks included) and its evaluation examples, and the hyperparameters. The
Trainer runs as a user would run it: AdamW (its default fused implementation), linear warmup and
decay, weight decay on all but biases and LayerNorm, clip 1.0, float32, no gradient checkpointing
(its default), torch threads = cores, eval with its last partial batch kept. Fed in order
(sequential sampler), the batches are ours one for one; GPT-2's loss is the per-token mean
(`loss_type="ForCausalLM"`). Needs `accelerate` (transformers' Trainer does).

Tokens/s is steady state, like ours: wall time from the end of the first step to the end of the
last, so data loading, logging and everything else between steps is included.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

MODEL_CLASSES = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM}


class Rows(torch.utils.data.Dataset):
    """Examples of an .npz, row by row, as the dicts of tensors the Trainer collates."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.arrays.items()}


class StepTimes(TrainerCallback):
    """perf_counter at the end of every optimizer step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def split_arrays(data: np.lib.npyio.NpzFile, prefix: str) -> dict[str, np.ndarray]:
    return {k.removeprefix(prefix): data[k] for k in data.files if k.startswith(prefix)}


def build_model(spec: dict) -> torch.nn.Module:
    torch.manual_seed(spec["seed"])
    config = AutoConfig.from_pretrained(spec["model_dir"])
    model = MODEL_CLASSES[spec["objective"]].from_config(config)
    if spec["objective"] == "clm":
        model.loss_type = "ForCausalLM"
    return model


def training_arguments(spec: dict, output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["eval_batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["learning_rate"],
        warmup_steps=spec["warmup_steps"],
        lr_scheduler_type=spec["lr_scheduler_type"],
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        adam_epsilon=spec["adam_epsilon"],
        max_grad_norm=spec["max_grad_norm"],
        logging_steps=spec["logging_steps"],
        seed=spec["seed"],
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    train, evaluation = Rows(split_arrays(data, "train_")), Rows(split_arrays(data, "eval_"))
    model = build_model(spec)
    times = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model,
            args=training_arguments(spec, output_dir),
            train_dataset=train,
            data_collator=default_data_collator,
            callbacks=[times],
        )
        started = time.perf_counter()
        output = trainer.train()
        metrics = trainer.evaluate(evaluation)
    steps = len(times.ends)
    tokens_per_step = spec["batch_size"] * train.arrays["input_ids"].shape[1]
    steady_seconds = times.ends[-1] - times.ends[0]
    return {
        "tokens_per_second": (steps - 1) * tokens_per_step / steady_seconds,
        "step_seconds": steady_seconds / (steps - 1),
        "first_step_seconds": times.ends[0] - started,
        "train_steps": steps,
        "train_loss": output.training_loss,
        "eval_loss": metrics["eval_loss"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "optimizer": str(trainer.args.optim),
    }


def main(argv: list[str] | None = None) -> int:
    spec_path, result_path = sys.argv[1:] if argv is None else argv
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["steps"] < 2:
        raise SystemExit("the peer needs at least 2 steps: the first one is not steady state")
    result = run(spec)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

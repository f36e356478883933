"""`flax-lm evaluate`: eval loss, accuracy and perplexity of a saved model on text files, as JSON.

The model is a saved directory (config.json + model.safetensors + tokenizer files, e.g. a training
output_dir) or an orbax checkpoint of a run: `OUTPUT_DIR/checkpoints/STEP`, or an output_dir that
has checkpoints but no exported model yet (its latest). The text goes through the training
pipeline and the evaluation loop a training run uses (flax_lm/train/evaluation.py), so the
figures are those a training run reports. GPT-2 is scored as a causal LM (next-token loss),
RoBERTa as a masked LM with masks drawn from `--seed` exactly as the trainer draws its eval masks
(same seed and eval batch size: the same masks). This module is the command only: its flags,
their checks and the JSON it prints.
"""

from __future__ import annotations

import json

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.model_source import find_model, load_model_and_tokenizer
from flax_lm.storage import local_run_folder
from flax_lm.train.args import check_range

OBJECTIVE_OF_MODEL = {"gpt2": "clm", "roberta": "mlm"}
PIPELINE_FLAGS = (  # flags shared with the training scripts, passed on to the data pipeline
    "validation_file", "block_size", "max_seq_length", "mlm_probability", "line_by_line",
    "add_eos_between_documents", "text_column", "max_eval_samples", "per_device_eval_batch_size",
    "seed",
)  # fmt: skip


def parse_args(argv: list[str] | None):
    parser = ArgParser(prog="flax-lm evaluate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="saved model dir, training output_dir, or OUTPUT_DIR/checkpoints/STEP",
    )
    parser.add_argument(
        "--validation_file", required=True, nargs="+", help="text files, directories or globs"
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--block_size", type=int, help="GPT-2: tokens per block")
    length.add_argument("--max_seq_length", type=int, help="RoBERTa: tokens per example")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42, help="RoBERTa: seed of the eval masks")
    parser.add_argument("--mlm_probability", type=float, default=0.15)
    parser.add_argument(
        "--line_by_line",
        action="store_true",
        help="RoBERTa: one example per non-empty line (padded)",
    )
    parser.add_argument(
        "--add_eos_between_documents",
        action="store_true",
        help="GPT-2: join documents with eos, as the run did if it used this flag",
    )
    parser.add_argument("--max_eval_samples", type=int, help="only the first N examples (blocks), as in training")
    parser.add_argument("--text_column", default="text")
    parser.add_argument(
        "--config_name", help="model config (checkpoints of a run without config.json)"
    )
    parser.add_argument("--tokenizer_name", help="tokenizer dir (default: the model's dir)")
    args = parser.parse_args(argv)
    for name in ("block_size", "max_seq_length", "per_device_eval_batch_size", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be positive, got {value}")
    check_range("mlm_probability", args.mlm_probability)
    return args


def check_length_flag(args, model_type: str) -> None:
    wrong = {"gpt2": ("max_seq_length", "block_size"), "roberta": ("block_size", "max_seq_length")}
    flag, right = wrong[model_type]
    if getattr(args, flag) is not None:
        raise UserError(f"--{flag} does not apply to a {model_type} model: use --{right}")


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flax_lm.corpus import resolve_data_files

    resolve_data_files(args.validation_file)  # a missing file is reported before loading a model
    with local_run_folder(args.model, "--model") as model:
        return evaluate_model(args, model)


def evaluate_model(args, model: str) -> int:
    from flax_lm.config import load_base_config
    from flax_lm.train.evaluation import eval_config, evaluate
    from flax_lm.train.metrics import strict_json
    from flax_lm.train.step import make_mesh

    source = find_model(model, args.config_name, args.tokenizer_name)
    model_config = load_base_config(source.config)  # gpt2 or roberta, else a UserError
    check_length_flag(args, model_config.model_type)
    objective = OBJECTIVE_OF_MODEL[model_config.model_type]
    mesh = make_mesh()
    graphdef, params, tokenizer = load_model_and_tokenizer(source, mesh)
    flags = {name: getattr(args, name) for name in PIPELINE_FLAGS}
    cfg = eval_config(model_config, tokenizer, objective, **flags)
    results = evaluate(graphdef, params, tokenizer, cfg, objective, mesh)
    seq_len = cfg.block_size if objective == "clm" else cfg.max_seq_length
    report = {
        "model": args.model if model != args.model else source.describe(),
        "model_type": model_config.model_type,
        "objective": objective,
        "seq_len": seq_len,
        **results,
    }
    print(json.dumps(json.loads(strict_json(report)), indent=2))
    return 0

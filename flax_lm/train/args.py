"""The run configuration: one `TrainConfig` built from the command line and an optional YAML file.

Flag names and defaults follow Hugging Face's `examples/flax/language-modeling` scripts, so their
README commands run unchanged; flags copied from the PyTorch Trainer (`--bf16`,
`--gradient_checkpointing`, `--warmup_ratio`, ...) keep the Trainer's meaning. Boolean flags may be
given bare (`--do_train`) or with a value (`--do_train True`), as HF's TrainingArguments accept
both. `--config FILE.yaml` sets any flag; the command line wins over it. A single `.json`, `.yaml`
or `.yml` file as the only argument is read like `--config FILE` (HfArgumentParser's way).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flax_lm.errors import ArgParser, UserError, one_line

SCRIPT_NAMES = {"clm": "run_clm_flax.py", "mlm": "run_mlm_flax.py"}
OBJECTIVES = tuple(SCRIPT_NAMES)  # the objectives' names (train/objectives.py implements each)
LATEST_CHECKPOINT = "latest"
REPORTERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}  # logger -> its package
SCHEDULERS = (
    "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt",
)  # fmt: skip
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
DEFAULT_CACHE_DIR = "~/.cache/flax_lm/jax"


MAX_SEED = 2**32  # seeds NumPy and JAX both take


@dataclass(frozen=True)
class Range:
    """The interval a numeric flag's value must lie in, written as its error message says it."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True
    high_text: str | None = None  # `high` as the message writes it ("2**32")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def must(self) -> str:
        """What the value must be: "be positive", "not be negative", "be in [0, 1)"."""
        if self.high == math.inf and self.low == 0:
            return "be positive" if self.low_open else "not be negative"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"be in {left}{self.low}, {self.high_text or self.high}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=False)
BELOW_ONE = Range(0, 1)
PROBABILITY = Range(0, 1, low_open=True)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("true", "yes", "1", "y"):
        return True
    if lowered in ("false", "no", "0", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {text!r}")


def parse_comma_list(text: str | list) -> list[str]:
    """A list flag given as one a,b,c value."""
    items = text if isinstance(text, list) else str(text).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def parse_steps_or_fraction(text: str | float) -> int | float:
    """--warmup_steps: a whole number of steps (int), or a fraction of training below 1
    (transformers 5's meaning)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def opt(
    default: Any,
    help: str,
    *,
    only: str | None = None,
    choices: tuple = (),
    range: Range | None = None,
    parse: Callable[[Any], Any] | None = None,
    bare: Any = None,
    in_yaml: bool = True,
    secret: bool = False,
) -> Any:
    """A TrainConfig field and everything about its flag: the help, the objective it belongs to
    (None: both), its choices or range, how a value is parsed (default: by the field's type), the
    value of the flag given bare (booleans: True), whether a --config file may set it, and whether
    it is a secret (never printed or stored; see secret_flag)."""
    metadata = {"help": help, "only": only, "choices": choices, "range": range, "parse": parse,
                "bare": bare, "in_yaml": in_yaml, "secret": secret}  # fmt: skip
    return field(default=default, metadata=metadata, repr=not secret)


@dataclass
class TrainConfig:
    """Every setting of a training run; field names are the flag names."""

    # output
    output_dir: str | None = opt(
        None, "where checkpoints, metrics and the final model go (a local path or gs://bucket/path)"
    )
    checkpoint_dir: str | None = opt(
        None, "the run's checkpoints folder (default: output_dir/checkpoints), e.g. gs://bucket/run"
    )
    overwrite_output_dir: bool = opt(
        False, "start over in an output_dir that holds files (replaces its checkpoints)"
    )
    do_train: bool = opt(False, "train (with neither --do_train nor --do_eval: both)")
    do_eval: bool = opt(False, "evaluate on the validation split")
    push_to_hub: bool = opt(
        False, "upload the model and results to the Hugging Face Hub (at checkpoints, at the end)"
    )
    hub_model_id: str | None = opt(None, "Hub repo for --push_to_hub (default: output_dir's name)")
    hub_token: str | None = opt(
        None,
        "Hub token for --push_to_hub (default: --token, HF_TOKEN or `hf auth login`'s)",
        secret=True,
    )
    hub_private_repo: bool = opt(False, "create the --push_to_hub repo private")
    hub_strategy: str = opt(
        "every_save",
        "what --push_to_hub uploads when: the model at the end only, at every checkpoint too, "
        "and the newest checkpoint as last-checkpoint/, or every checkpoint",
        choices=HUB_STRATEGIES,
    )
    # model and tokenizer
    model_type: str | None = opt(None, "model type", choices=("gpt2", "roberta"))
    config_name: str | None = opt(
        None, "config.json, a dir holding one, a name in configs/, or a Hub model id"
    )
    tokenizer_name: str | None = opt(
        None, "tokenizer dir or Hub id (default: model_name_or_path, config_name)"
    )
    model_name_or_path: str | None = opt(
        None, "a saved model to start from (its weights): a dir or a Hub model id"
    )
    config_overrides: str | None = opt(None, 'config changes, e.g. "n_embd=128,n_layer=2"')
    use_fast_tokenizer: bool = opt(True, "fast (Rust) tokenizers, the only kind flax-lm uses")
    token: str | None = opt(
        None, "Hub token for gated or private datasets and tokenizers", secret=True
    )
    dtype: str = opt(
        "float32", "compute dtype (params stay float32)", choices=("float32", "bfloat16")
    )
    bf16: bool = opt(False, "compute in bfloat16: the same as --dtype bfloat16")
    fp16: bool = opt(False, "float16 is not supported: use --bf16")
    scan_layers: bool | None = opt(
        None, "scan over stacked layers (faster compile) or, with --no_scan_layers, unroll them "
        "(less memory traffic); default: the backend's choice, scanned on CPUs and TPUs, "
        "unrolled on GPUs"
    )
    remat: str | None = opt(
        None,
        "rematerialise each block to save memory: what it keeps for the backward pass",
        choices=("full", "qkv_out", "mlp", "dots"),  # models.layers.REMAT_POLICIES
    )
    gradient_checkpointing: bool = opt(
        False, "recompute activations in the backward pass: the same as --remat full"
    )
    attn_implementation: str = opt(
        "auto", "attention: auto picks cuDNN's fused attention on NVIDIA GPUs in bfloat16, "
        "XLA's on TPUs, the reference on CPUs", choices=("auto", "reference", "xla", "cudnn")
    )
    mesh: str | None = opt(
        None, "device mesh, e.g. data=2,fsdp=4: parameters and optimizer state sharded over "
        "fsdp (default: all devices on data, replicated)"
    )
    # data
    dataset_name: str | None = opt(None, "a datasets hub name")
    dataset_config_name: str | None = opt(None, "its config name")
    dataset_revision: str | None = opt(
        None, "the dataset's branch, tag or commit (refs/convert/parquet: the Hub's Parquet copy)"
    )
    trust_remote_code: bool = opt(
        False, "refused: flax-lm never runs code from the Hub (a dataset's loading script)"
    )
    train_file: list[str] | None = opt(None, "training files, dirs or globs")
    validation_file: list[str] | None = opt(None, "validation files, dirs or globs")
    validation_split_percentage: int = opt(
        5, "%% of train held out when there is no validation set", range=Range(0, 100)
    )
    max_train_samples: int | None = opt(
        None, "keep the first N training examples (blocks, or MLM examples)", range=POSITIVE
    )
    max_eval_samples: int | None = opt(
        None, "keep the first N validation examples (blocks, or MLM examples)", range=POSITIVE
    )
    preprocessing_num_workers: int | None = opt(None, "processes for tokenization", range=POSITIVE)
    overwrite_cache: bool = opt(False, "ignore cached tokenized datasets")
    cache_dir: str | None = opt(None, "cache dir of Hub downloads: datasets, models, tokenizers")
    keep_linebreaks: bool = opt(True, "keep line breaks of .txt files (--no_keep_linebreaks)")
    text_column: str = opt("text", "the column holding the text")
    streaming: bool = opt(False, "stream the dataset instead of downloading it (needs --max_steps)")
    filter_keywords: list[str] | None = opt(
        None, "keep documents containing any of a,b,c", parse=parse_comma_list
    )
    data_shards: int | None = opt(
        None,
        "split the data into N shards, each read by one process (default: the number of "
        "processes, or the resumed checkpoint's); the same N gives the same batches on any "
        "number of processes dividing it",
        range=POSITIVE,
    )
    block_size: int | None = opt(None, "tokens per training block", only="clm", range=POSITIVE)
    add_eos_between_documents: bool = opt(False, "join documents with the eos token", only="clm")
    loss: str = opt(
        "cross_entropy",
        "training loss; keytoken_weighted weighs each sequence by its key tokens",
        only="clm",
        choices=("cross_entropy", "keytoken_weighted"),
    )
    keytokens: list[str] | None = opt(
        None, "key tokens of keytoken_weighted, as a,b,c", only="clm", parse=parse_comma_list
    )
    keytoken_alpha: float = opt(
        1.0, "sequence weight: 1 + alpha x its key tokens", only="clm", range=NON_NEGATIVE
    )
    max_seq_length: int | None = opt(None, "tokens per example", only="mlm", range=POSITIVE)
    mlm_probability: float = opt(
        0.15, "fraction of tokens to predict", only="mlm", range=PROBABILITY
    )
    pad_to_max_length: bool = opt(False, "pad every example to max_seq_length", only="mlm")
    line_by_line: bool = opt(False, "one example per non-empty line", only="mlm")
    # optimisation
    per_device_train_batch_size: int = opt(
        8, "training examples per device per microbatch", range=POSITIVE
    )
    per_device_eval_batch_size: int = opt(8, "evaluation examples per device", range=POSITIVE)
    gradient_accumulation_steps: int = opt(1, "microbatches per optimizer step", range=POSITIVE)
    learning_rate: float = opt(5e-5, "peak learning rate", range=POSITIVE)
    weight_decay: float = opt(
        0.0, "decoupled weight decay (not on biases and LayerNorm)", range=NON_NEGATIVE
    )
    adam_beta1: float = opt(0.9, "AdamW beta1", range=BELOW_ONE)
    adam_beta2: float = opt(0.999, "AdamW beta2", range=BELOW_ONE)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon", range=POSITIVE)
    adafactor: bool = opt(False, "use Adafactor instead of AdamW")
    max_grad_norm: float = opt(
        1.0, "clip gradients to this global norm (0: no clipping)", range=NON_NEGATIVE
    )
    skip_nonfinite_steps: int = opt(
        0,
        "skip up to N steps whose loss or gradient is not finite (0: stop at the first)",
        range=NON_NEGATIVE,
    )
    lr_scheduler_type: str = opt(
        "linear", "learning-rate schedule (constant: no warmup)", choices=SCHEDULERS
    )
    warmup_steps: float = opt(
        0,
        "linear warmup steps from 0 to learning_rate (a value below 1: a fraction of training)",
        range=NON_NEGATIVE,
        parse=parse_steps_or_fraction,
    )
    warmup_ratio: float = opt(
        0.0, "warmup as a fraction of training steps (if no --warmup_steps)", range=FRACTION
    )
    num_train_epochs: float = opt(3.0, "epochs to train", range=POSITIVE)
    max_steps: int | None = opt(
        None, "optimizer steps to train (overrides num_train_epochs)", range=POSITIVE
    )
    seed: int = opt(
        42,
        "seed of initialisation, shuffling, masking and dropout",
        range=Range(0, MAX_SEED, high_text="2**32"),
    )
    # logging and checkpoints
    logging_steps: int = opt(500, "log train metrics every N steps", range=POSITIVE)
    logging_first_step: bool = opt(False, "log the train metrics of the first step too")
    eval_strategy: str = opt(
        "steps",
        "evaluate every eval_steps, at the end of each epoch, or only after training",
        choices=("steps", "epoch", "no"),
    )
    eval_steps: int | None = opt(
        None, "evaluate every N steps (default: logging_steps)", range=POSITIVE
    )
    save_strategy: str = opt(
        "steps",
        "checkpoint every save_steps, at the end of each epoch, or never (a signal still saves)",
        choices=("steps", "epoch", "no"),
    )
    save_steps: int = opt(500, "checkpoint every N steps", range=POSITIVE)
    save_total_limit: int | None = opt(None, "keep only the last N checkpoints", range=POSITIVE)
    resume_from_checkpoint: str | None = opt(
        None, "continue from a checkpoint dir (bare flag: the latest in output_dir, which a "
        "rerun without --overwrite_output_dir continues anyway)",
        bare=LATEST_CHECKPOINT,
    )
    report_to: list[str] | None = opt(
        None, "also log to: tensorboard, wandb, all or none (default: tensorboard)"
    )
    run_name: str | None = opt(None, "the run's name in Weights & Biases (default: output_dir)")
    compilation_cache_dir: str = opt(DEFAULT_CACHE_DIR, "JAX compilation cache ('none': off)")
    # the command itself
    config: str | None = opt(None, "YAML file setting any of these flags", in_yaml=False)
    print_config: bool = opt(False, "print the resolved config as YAML and exit", in_yaml=False)


FIELD_TYPES = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def is_word_list(f: dataclasses.Field) -> bool:
    """A list flag given as separate values (`--train_file a b`), not one a,b,c value."""
    return FIELD_TYPES[f.name] == list[str] | None and f.metadata["parse"] is None


def fields_for(objective: str) -> list[dataclasses.Field]:
    """The TrainConfig fields that are flags of this objective's script."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata["only"] in (None, objective)]


def converter(f: dataclasses.Field):
    """The function turning one flag value (a string, or a YAML scalar) into the field's type."""
    kind = FIELD_TYPES[f.name]
    if f.metadata["parse"] is not None:
        return f.metadata["parse"]
    if kind in (bool, bool | None):
        return parse_bool
    for base in (int, float):
        if kind is base or kind == base | None:
            return base
    return str


def build_parser(objective: str) -> ArgParser:
    script = SCRIPT_NAMES[objective]
    parser = ArgParser(
        prog=script,
        allow_abbrev=False,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields_for(objective):
        flag, kind, help_text = f"--{f.name}", FIELD_TYPES[f.name], f.metadata["help"]
        if f.metadata["choices"]:
            help_text += f" ({'|'.join(f.metadata['choices'])})"
        if kind in (bool, bool | None):
            parser.add_argument(
                flag, nargs="?", const=True, type=parse_bool, metavar="BOOL", help=help_text
            )
            if f.default is not False:
                parser.add_argument(
                    f"--no_{f.name}",
                    dest=f.name,
                    action="store_false",
                    help=f"same as {flag} False",
                )
        elif f.metadata["bare"] is not None:
            parser.add_argument(
                flag, nargs="?", const=f.metadata["bare"], metavar="PATH", help=help_text
            )
        elif is_word_list(f):
            parser.add_argument(flag, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, type=converter(f), help=help_text)
    parser.set_defaults(**{f.name: f.default for f in fields_for(objective)})
    return parser


def read_yaml_config(path: str, objective: str) -> dict[str, Any]:
    """Flag values from a YAML (or, named .json, JSON) mapping, converted like command-line
    values."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except OSError as err:
        raise UserError(f"cannot read --config {path}: {err.strerror or err}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        kind = "JSON" if path.endswith(".json") else "YAML"
        raise UserError(
            f"--config {path} is not valid {kind}: {one_line(err, None)}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values")
    known = {f.name: f for f in fields_for(objective) if f.metadata["in_yaml"]}
    values = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown key {key!r} in {path} for {SCRIPT_NAMES[objective]}{hint}")
        values[key] = convert_yaml_value(known[key], value, path)
    return values


def convert_yaml_value(f: dataclasses.Field, value: Any, path: str) -> Any:
    if value is None:
        return None
    if is_word_list(f):
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    try:
        return converter(f)(value if isinstance(value, bool | list) else str(value))
    except (ValueError, argparse.ArgumentTypeError):
        raise UserError(f"{f.name}: {value!r} in {path} is not a valid value") from None


# A negative number in scientific notation, which argparse would take for an option ("-1e-4").
NEGATIVE_EXPONENT = re.compile(r"^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--flag -1e-4` -> `--flag=-1e-4`, so such a value reaches the range checks (which give
    the real error) instead of failing as a missing argument."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if NEGATIVE_EXPONENT.match(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def is_config_file_argument(argv: list[str]) -> bool:
    """`run_clm_flax.py args.json`: one settings file as the only argument (HfArgumentParser)."""
    return (
        len(argv) == 1
        and not argv[0].startswith("-")
        and argv[0].lower().endswith(CONFIG_FILE_SUFFIXES)
    )


def parse_config(argv: list[str] | None, objective: str) -> TrainConfig:
    """The resolved, checked TrainConfig of a command line (and its --config YAML file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if is_config_file_argument(argv):
        argv = ["--config", argv[0]]
    cfg = TrainConfig(**vars(parse_flags(argv, objective, build_parser(objective))))
    return resolve_defaults(check_config(cfg, objective))


def parse_flags(argv: list[str], objective: str, parser: ArgParser) -> argparse.Namespace:
    """`parser`'s values for `argv`, with --config's YAML file as the defaults."""
    argv = join_negative_values(argv)
    pre = ArgParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_yaml_config(known.config, objective))
    return parser.parse_args(argv)


def check_config(cfg: TrainConfig, objective: str) -> TrainConfig:
    """Reject values no run can use, before anything is loaded or written."""
    check_values(cfg, objective)
    if not cfg.print_config:
        check_run_inputs(cfg)
    return cfg


def check_values(cfg: TrainConfig, objective: str) -> TrainConfig:
    """Reject flag values that are wrong whatever the run (ranges, choices)."""
    for f in fields_for(objective):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise UserError(f"--{f.name} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name} must be a finite number, got {value}")
        if value is not None and f.metadata["range"] is not None:
            check_range(f.name, value)
    if isinstance(cfg.warmup_steps, float) and cfg.warmup_steps > 1:
        raise UserError(
            f"--warmup_steps must be a whole number of steps, or a fraction below 1 of the "
            f"training steps, got {cfg.warmup_steps}"
        )
    check_trainer_flags(cfg)
    if not cfg.use_fast_tokenizer:
        raise UserError("--use_fast_tokenizer False: flax-lm uses fast (Rust) tokenizers only")
    return cfg


def check_range(name: str, value: float) -> None:
    """`value` of flag `name` must lie in the range its field declares (the same check for any
    command taking that flag)."""
    bounds = FIELDS[name].metadata["range"]
    if value not in bounds:
        raise UserError(f"--{name} must {bounds.must()}, got {value}")


def check_run_inputs(cfg: TrainConfig) -> None:
    """A run needs somewhere to write and something to read."""
    if not cfg.output_dir:
        raise UserError("--output_dir is required")
    if not (cfg.dataset_name or cfg.train_file or cfg.validation_file):
        raise UserError("no data: give --dataset_name or --train_file (and --validation_file)")
    if cfg.model_name_or_path and cfg.config_overrides:
        raise UserError(
            "--config_overrides cannot change a pretrained model (--model_name_or_path); "
            "use --config_name to train a new one"
        )
    trains = cfg.do_train or not cfg.do_eval
    if cfg.streaming and trains and cfg.max_steps is None:
        raise UserError("--streaming needs --max_steps: a stream has no known length")
    if "wandb" in report_to_names(cfg.report_to) and importlib.util.find_spec("wandb") is None:
        raise UserError("--report_to wandb needs the wandb package: pip install 'flax-lm[wandb]'")
    for name in ("save_strategy", "eval_strategy"):
        if cfg.streaming and getattr(cfg, name) == "epoch":
            raise UserError(
                f"--{name} epoch needs epochs, which a stream (--streaming) does not have: "
                f"use --{name} steps with --{name.split('_')[0]}_steps"
            )


def check_trainer_flags(cfg: TrainConfig) -> None:
    """The Trainer flags flax-lm maps onto its own (or refuses, naming the flag to use)."""
    if cfg.fp16:
        raise UserError("--fp16: flax-lm does not compute in float16; use --bf16 "
                        "(--dtype bfloat16), which needs no loss scaling")
    if cfg.trust_remote_code:
        from flax_lm.corpus import refuse_remote_code  # imports datasets: only when needed

        refuse_remote_code(cfg.trust_remote_code)
    if cfg.gradient_checkpointing and cfg.remat not in (None, "full"):
        raise UserError(
            f"--gradient_checkpointing is --remat full, but --remat {cfg.remat} is given too: "
            "give one of them"
        )
    for value in report_to_names(cfg.report_to):
        if value not in (*REPORTERS, "all", "none"):
            raise UserError(
                f"--report_to {value!r}: flax-lm logs to {', '.join(REPORTERS)}, all or none"
            )


def report_to_names(values: list[str] | None) -> list[str]:
    """--report_to's values, whether given as `a b` or `a,b`."""
    return [name for value in values or () for name in parse_comma_list(value)]


def resolve_report_to(values: list[str] | None) -> list[str]:
    """The loggers --report_to asks for: default TensorBoard, `all` the installed ones."""
    names = report_to_names(values) if values else ["tensorboard"]
    if "none" in names:
        return []
    if "all" in names:
        return [name for name, package in REPORTERS.items() if importlib.util.find_spec(package)]
    return list(dict.fromkeys(names))


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other flags."""
    both = not cfg.do_train and not cfg.do_eval
    return dataclasses.replace(
        cfg,
        do_train=cfg.do_train or both,
        do_eval=cfg.do_eval or both,
        eval_steps=cfg.eval_steps or cfg.logging_steps,
        dtype="bfloat16" if cfg.bf16 else cfg.dtype,
        remat="full" if cfg.gradient_checkpointing else cfg.remat,
        report_to=resolve_report_to(cfg.report_to),
    )


def recorded_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a dict to print or store, secrets blanked."""
    return {name: None if secret_flag(name) else value
            for name, value in dataclasses.asdict(cfg).items()}  # fmt: skip


def config_yaml(cfg: TrainConfig, objective: str) -> str:
    """The config as YAML that `--config` reads back (this objective's flags only; no secrets)."""
    recorded = recorded_config(cfg)
    values = {f.name: recorded[f.name] for f in fields_for(objective)}
    return yaml.safe_dump(
        {k: v for k, v in values.items() if FIELDS[k].metadata["in_yaml"]}, sort_keys=False
    )


# ------------------------------------------------------------------------------------ secrets

SECRET_MASK = "***"
COMMAND_LINE_SECRET_WARNING = (
    "warning: {flags} on the command line: visible to other users of this machine (`ps`) and "
    "kept in the shell history; run `hf auth login` once, or set HF_TOKEN, instead"
)


def secret_flag(name: str) -> bool:
    """Whether the flag `name` (`--name`, `--name=value` or `name`) takes a secret: those marked
    secret here, and any flag of any command whose name ends in "token" (a Hub token)."""
    name = name.split("=", 1)[0].lstrip("-")
    return name.endswith("token") or (name in FIELDS and FIELDS[name].metadata["secret"])


def secret_flags_given(argv: list[str]) -> list[str]:
    """The secret flags of a command line, as given (`--hub_token`), in order."""
    flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--") and secret_flag(arg)]
    return list(dict.fromkeys(flags))


def mask_secrets(argv: list[str]) -> list[str]:
    """The command line with every secret flag's value replaced by SECRET_MASK, for whatever
    records a command line (W&B's run metadata)."""
    masked: list[str] = []
    for arg in argv:
        previous = masked[-1] if masked else ""
        value_of_previous = previous.startswith("--") and "=" not in previous
        if value_of_previous and secret_flag(previous) and not arg.startswith("--"):
            arg = SECRET_MASK
        elif arg.startswith("--") and "=" in arg and secret_flag(arg):
            arg = f"{arg.split('=', 1)[0]}={SECRET_MASK}"
        masked.append(arg)
    return masked


def warn_about_secrets_on_the_command_line(argv: list[str]) -> None:
    """One line on stderr when a command line holds a token (kept working, for compatibility)."""
    flags = secret_flags_given(argv)
    if flags:
        print(COMMAND_LINE_SECRET_WARNING.format(flags=", ".join(flags)), file=sys.stderr)

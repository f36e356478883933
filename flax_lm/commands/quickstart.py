"""`flax-lm quickstart`: the whole pipeline in a few minutes, on a corpus every machine has.

The Python standard library's own source is the corpus (no download): its modules are split into
train and validation by file, a ByteLevelBPE tokenizer is trained on the train files, a small
GPT-2 config is written, and the real training CLI (`run-clm`) trains it for `--minutes`. The
step count comes from a short measured run of the same CLI (whose compiled step then sits in
JAX's compilation cache), so the time box holds on any machine. The model is evaluated before
and after training, exported for PyTorch transformers, plotted, and asked to complete a line
of code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.storage import check_output_dir

STAGES = 7
VALIDATION_EVERY = 50  # every 50th module (sorted by path) is held out: a fixed 2% split by file
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                "encodings",  # codec tables, not code
                "pydoc_data"}  # fmt: skip
MAX_FILE_BYTES = 150_000  # a handful of huge modules (generated tables, docs) are left out
CALIBRATION_STEPS = 6
PROMPT = "def fibonacci(n):"
COMPLETION_TOKENS = 80
COMPLETION_TEMPERATURE = 0.6
# What learned most in a FLOP-matched sweep on two CPU cores (1 and 4 minutes' worth; held-out
# loss after 4: n_embd 96 x 4 layers 3.51, 128 x 4 layers 3.70; at 1 minute 192 and 256 wide were
# worse still, and learning rates 1e-3 and 4e-3 worse than 2e-3).
DEFAULT_MODEL = "n_embd=96,n_layer=4,n_head=4,n_positions=128"
DEFAULT_BLOCK_SIZE = 128
DEFAULT_VOCAB_SIZE = 8192
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
RERUN_ADVICE = (": add --overwrite_output_dir to replace an earlier quickstart, "
                "or choose another directory")  # fmt: skip


class Layout(NamedTuple):
    """Where each stage writes, under --output_dir."""

    root: Path
    train: Path
    validation: Path
    tokenizer: Path
    config: Path
    calibration: Path
    model: Path
    results: Path

    @classmethod
    def under(cls, root: Path) -> Layout:
        data = root / "data"
        return cls(root, train=data / "train", validation=data / "validation",
                   tokenizer=root / "tokenizer", config=root / "config",
                   calibration=root / "calibration", model=root / "model",
                   results=root / "quickstart_results.json")  # fmt: skip

    def owned(self) -> list[Path]:
        """What a quickstart writes directly under root (a rerun replaces only these)."""
        return sorted({self.root / path.relative_to(self.root).parts[0] for path in self[1:]})


def stage(number: int, title: str) -> float:
    print(f"\n[{number}/{STAGES}] {title}", flush=True)
    return time.perf_counter()


def done(started: float, summary: str) -> None:
    print(f"      {summary} ({time.perf_counter() - started:.1f} s)", flush=True)


# ----------------------------------------------------------------------------------- corpus


def stdlib_modules(max_files: int | None = None) -> tuple[Path, list[Path]]:
    """(stdlib root, its .py modules sorted by relative path), tests and huge files left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS]  # never walk site-packages
        for name in files:
            path = Path(directory, name)
            if name.endswith(".py") and 0 < path.stat().st_size <= MAX_FILE_BYTES:
                modules.append(path.relative_to(root))
    if len(modules) < VALIDATION_EVERY:
        raise UserError(f"the Python standard library source was not found under {root}")
    modules.sort()
    return root, modules[:max_files] if max_files else modules


def is_validation(index: int) -> bool:
    return index % VALIDATION_EVERY == VALIDATION_EVERY // 2


def copy_corpus(root: Path, modules: list[Path], layout: Layout) -> dict[str, int]:
    """Copy the modules into data/train and data/validation (keeping package paths)."""
    stats = {"train_files": 0, "train_bytes": 0, "validation_files": 0, "validation_bytes": 0}
    for index, relative in enumerate(modules):
        split = "validation" if is_validation(index) else "train"
        target = getattr(layout, split) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target)
        stats[f"{split}_files"] += 1
        stats[f"{split}_bytes"] += target.stat().st_size
    return stats


def read_texts(directory: Path):
    for path in sorted(directory.rglob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------------- training


def train_flags(layout: Layout, block_size: int, seed: int) -> list[str]:
    """run-clm flags shared by the calibration and the real run."""
    return [
        "--config_name", str(layout.config), "--tokenizer_name", str(layout.tokenizer),
        "--train_file", str(layout.train), "--validation_file", str(layout.validation),
        "--block_size", str(block_size), "--add_eos_between_documents",
        "--per_device_train_batch_size", str(BATCH_SIZE), "--per_device_eval_batch_size", "16",
        "--learning_rate", str(LEARNING_RATE), "--weight_decay", "0.01",
        "--adam_beta2", "0.98", "--report_to", "none", "--seed", str(seed),
        "--overwrite_output_dir",
    ]  # fmt: skip


def run_clm(argv: list[str]) -> None:
    from flax_lm.commands.train import main as run

    status = run(argv, objective="clm")
    if status != 0:
        raise UserError(f"training stopped (exit status {status})")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def measure_step_seconds(layout: Layout, flags: list[str], block_size: int) -> tuple[float, float]:
    """(seconds per train step at steady state, compile seconds) from a short real run."""
    run_clm([*flags, "--output_dir", str(layout.calibration), "--do_train",
             "--max_steps", str(CALIBRATION_STEPS), "--logging_steps", str(CALIBRATION_STEPS),
             "--save_steps", str(CALIBRATION_STEPS)])  # fmt: skip
    results = read_json(layout.calibration / "train_results.json")
    shutil.rmtree(layout.calibration)
    return BATCH_SIZE * block_size / results["train_tokens_per_second"], results["compile_seconds"]


def steps_in(minutes: float, step_seconds: float) -> int:
    """Train steps that fit in `minutes`, to two significant digits: a rerun on the same machine
    usually gets the same count, so its compiled train step comes from JAX's cache."""
    steps = minutes * 60 / step_seconds
    scale = 10 ** max(0, math.floor(math.log10(max(steps, 1.0))) - 1)
    return max(CALIBRATION_STEPS, round(steps / scale) * scale)


def schedule_flags(steps: int) -> list[str]:
    """Warmup 5%, linear decay to 0, three evaluations, ~50 log lines, one checkpoint."""
    return [
        "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 20)),
        "--logging_steps", str(max(1, steps // 50)), "--eval_steps", str(-(-steps // 3)),
        "--save_steps", str(steps),
    ]  # fmt: skip


def untrained_eval(layout: Layout, block_size: int, seed: int) -> dict:
    """Eval figures of the freshly initialised model (as training starts from it)."""
    import jax
    from flax import nnx

    from flax_lm.config import load_base_config, load_tokenizer
    from flax_lm.models import create_model
    from flax_lm.train.evaluation import eval_config, evaluate
    from flax_lm.train.step import make_mesh, state_sharding

    config = load_base_config(str(layout.config))
    tokenizer = load_tokenizer(str(layout.tokenizer))
    mesh = make_mesh()
    graphdef, params = nnx.split(create_model(config, seed=seed), nnx.Param)
    params = jax.device_put(params, state_sharding(mesh, params))
    cfg = eval_config(config, tokenizer, "clm", validation_file=[str(layout.validation)],
                      block_size=block_size, add_eos_between_documents=True,
                      per_device_eval_batch_size=16)  # fmt: skip
    return evaluate(graphdef, params, tokenizer, cfg, "clm", mesh)


def complete(model_dir: Path, prompt: str, seed: int) -> str:
    """The prompt continued by the trained model (at most COMPLETION_TOKENS new tokens)."""
    from flax_lm.generate import generate
    from flax_lm.model_source import load_saved_model

    model, tokenizer = load_saved_model(str(model_dir), "gpt2", "quickstart")
    room = model.config.n_positions - len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return generate(model, tokenizer, prompt, max_new_tokens=min(COMPLETION_TOKENS, room),
                    temperature=COMPLETION_TEMPERATURE, top_k=40, seed=seed)[0]  # fmt: skip


# -------------------------------------------------------------------------------- command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgParser(prog="flax-lm quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="./quickstart", help="default: ./quickstart")
    parser.add_argument(
        "--minutes",
        type=float,
        default=4.0,
        help="training time (default 4); the other stages add about a minute",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="replace an earlier quickstart in --output_dir",
    )
    parser.add_argument("--seed", type=int, default=42)
    # Smaller settings for tests and slow machines.
    hidden = argparse.SUPPRESS
    parser.add_argument("--max_files", type=int, help=hidden)
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE, help=hidden)
    parser.add_argument("--config_overrides", default=DEFAULT_MODEL, help=hidden)
    parser.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE, help=hidden)
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        raise UserError(f"--minutes must be positive, got {args.minutes}")
    if args.max_files is not None and args.max_files < VALIDATION_EVERY:
        raise UserError(f"--max_files must be at least {VALIDATION_EVERY}, got {args.max_files}")
    if args.block_size < 2:
        raise UserError(f"--block_size must be at least 2, got {args.block_size}")
    from flax_lm.tokenizer import check_vocab_size

    check_vocab_size(args.vocab_size)
    return args


def clear_earlier_run(layout: Layout) -> None:
    """Remove what an earlier quickstart wrote (only those entries)."""
    for path in layout.owned():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layout = Layout.under(Path(args.output_dir))
    check_output_dir(layout.root, overwrite=args.overwrite_output_dir, advice=RERUN_ADVICE)
    root, modules = stdlib_modules(args.max_files)
    started = time.perf_counter()
    import datasets

    from flax_lm.train.args import TrainConfig
    from flax_lm.train.distributed import setup_jax

    datasets.disable_progress_bars()
    setup_jax(TrainConfig())  # the compilation cache, so later stages reuse compiled steps
    clear_earlier_run(layout)
    results: dict = {"minutes": args.minutes, "block_size": args.block_size}

    t = stage(1, f"Corpus: the Python standard library's source ({root})")
    results["corpus"] = corpus = copy_corpus(root, modules, layout)
    done(
        t,
        f"{corpus['train_files']} train modules ({corpus['train_bytes'] / 1e6:.1f} MB), "
        f"{corpus['validation_files']} validation modules "
        f"({corpus['validation_bytes'] / 1e6:.2f} MB) in {layout.root / 'data'}",
    )

    t = stage(2, f"Tokenizer: ByteLevelBPE, vocabulary {args.vocab_size:,}")
    from flax_lm.tokenizer import train_tokenizer

    train_tokenizer(read_texts(layout.train), args.vocab_size, 2, layout.tokenizer)
    done(t, f"saved {layout.tokenizer}")

    t = stage(3, "Model config: GPT-2")
    from flax_lm.config import build_config, describe

    config = build_config("gpt2", None, str(layout.tokenizer), 0.0, args.config_overrides)
    config.save_pretrained(layout.config)
    done(t, f"{describe(config)}, block {args.block_size}: {layout.config / 'config.json'}")

    t = stage(4, "Untrained model on the validation modules")
    results["untrained"] = untrained = untrained_eval(layout, args.block_size, args.seed)
    done(
        t,
        f"eval loss {untrained['eval_loss']:.3f}, perplexity {untrained['perplexity']:,.0f} "
        f"(a uniform guess over {config.vocab_size:,} tokens: {config.vocab_size:,})",
    )

    flags = train_flags(layout, args.block_size, args.seed)
    t = stage(5, f"Measuring the train step (a {CALIBRATION_STEPS}-step run of run-clm)")
    step_seconds, compile_seconds = measure_step_seconds(layout, flags, args.block_size)
    steps = steps_in(args.minutes, step_seconds)
    done(
        t,
        f"{step_seconds * 1000:.0f} ms/step after {compile_seconds:.1f} s of compilation: "
        f"{steps} steps fit in {args.minutes:g} min",
    )

    t = stage(6, f"Training: run-clm for {steps} steps ({args.minutes:g} min)")
    run_clm([*flags, "--output_dir", str(layout.model), *schedule_flags(steps)])
    results["train"] = read_json(layout.model / "train_results.json")
    results["trained"] = read_json(layout.model / "eval_results.json")
    done(t, f"model, tokenizer, metrics and checkpoint in {layout.model}")

    t = stage(7, "Plot and a completion")
    from flax_lm.plot import plot_metrics

    plot = plot_metrics(layout.model)
    results["completion"] = complete(layout.model, PROMPT, args.seed)
    done(t, f"plot: {plot}")

    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    layout.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_summary(layout, results)
    return 0


def print_summary(layout: Layout, results: dict) -> None:
    """What was reached, where it is, and what to run next."""
    untrained, trained, train = results["untrained"], results["trained"], results["train"]
    minutes, seconds = divmod(results["wall_seconds"], 60)
    tokens = train["train_steps"] * BATCH_SIZE * results["block_size"]
    model, root = layout.model, layout.root
    print(
        f"""
Quickstart finished in {minutes:.0f} min {seconds:.0f} s
  held-out perplexity  {untrained["perplexity"]:,.0f} untrained -> {trained["perplexity"]:,.1f} \
after {train["train_steps"]:,} steps ({tokens / 1e6:.2f} M tokens)
  eval loss            {untrained["eval_loss"]:.3f} -> {trained["eval_loss"]:.3f} \
(next-token accuracy {trained["eval_accuracy"]:.1%})
  training speed       {train["train_tokens_per_second"]:,.0f} tokens/s (steady state); \
{train["train_runtime"]:.0f} s of training, {train["compile_seconds"]:.1f} s of compilation

Outputs in {root}
  model/      the trained GPT-2: model.safetensors + config.json + tokenizer (loads in PyTorch
              transformers), metrics.jsonl, metrics.png (its curves), checkpoints/
  tokenizer/  the ByteLevelBPE tokenizer      config/  the GPT-2 config it started from
  data/       the train/ and validation/ modules
  quickstart_results.json  these figures

{PROMPT!r} continued by the model (temperature {COMPLETION_TEMPERATURE}):
{results["completion"]}

Next
  flax-lm generate --model {model} --prompt "import os" --temperature 0.7
  flax-lm evaluate --model {model} --validation_file {layout.validation} \
--block_size {results["block_size"]} --add_eos_between_documents
  flax-lm plot {model}"""
    )

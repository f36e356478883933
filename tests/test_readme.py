"""The README is the front door: its commands must stay true, and docs/flags.md current."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CACHE_EVERY_COMPILE
from test_plan import HAS_CUDA_PLUGIN, HAS_LIBTPU

from flax_lm.commands.cli import COMMANDS
from flax_lm.train.args import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_docs_flags_md_is_generated_from_train_config():
    """docs/flags.md is what docs/make_flags.py prints from TrainConfig: a flag added, removed or
    reworded in flax_lm/train/args.py fails here until the page is regenerated."""
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs" / "make_flags.py")
    make_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_flags)
    expected = make_flags.flags_markdown()
    for f in dataclasses.fields(TrainConfig):
        assert f"`--{f.name}`" in expected, f.name
    assert (ROOT / "docs" / "flags.md").read_text(encoding="utf-8") == expected, (
        "docs/flags.md is stale: run `python docs/make_flags.py > docs/flags.md`"
    )


def test_commands_and_files_named_in_the_readme_exist():
    commands = re.findall(r"(?:^|&& |`)flax-lm ([a-z-]+)", README, flags=re.M)
    assert {"quickstart", "train-tokenizer", "create-config", "generate"} <= set(commands)
    for name in commands:
        assert name in COMMANDS, name
    for path in re.findall(r"(configs/[\w.-]+\.(?:yaml|json|py))", README):
        assert (ROOT / path).is_file(), path
    for script in ("run_clm_flax.py", "run_mlm_flax.py", "tokenizer/train_tokenizer.py"):
        assert (ROOT / script).is_file() and (ROOT / script).stat().st_mode & 0o111, script


def readme_install_and_test() -> list[str]:
    """The README's one line that installs and runs the test suite, as its separate commands."""
    (line,) = [line for line in README.splitlines() if "&&" in line and line.endswith(" pytest")]
    return [command.strip() for command in line.split("&&")]


def ci_commands() -> list[str]:
    """The commands .ci/run runs, pip spelled as the README spells it (no `python -m`, `--quiet`)."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return [re.sub(r"^python -m pip install --quiet ", "pip install ", c) for c in commands]


def test_ci_runs_the_readmes_install_and_test_commands():
    """Whoever follows the README installs what CI installs (the same pinned torch the parity
    tests compare against) and runs the suite the way CI runs it, in the same order."""
    readme, ci = readme_install_and_test(), ci_commands()
    assert [command for command in ci if command in readme] == readme, (readme, ci)
    assert any(command.startswith("pip install torch==") for command in readme)
    assert ci[-1] == readme[-1] == "JAX_PLATFORMS=cpu pytest"


# --- The README's pipeline, run as written -----------------------------------------------------
# Each command of the pipeline's bash blocks runs in bash, in one folder, in the README's layout
# (tokenizer, config and run in $MODEL_DIR). Only flags the commands document are added, after the
# README's own (the last value of a flag wins): a local corpus for the Hub dataset, a tiny model,
# short blocks and batches, a few steps.

SMALL_TRAINING = (
    "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
    "--max_steps 2 --save_steps 2 --eval_steps 2 --logging_steps 1 "
    "--compilation_cache_dir jax_cache"  # the test's own, which the rerun loads its programs from
)
TINY_CONFIG = {
    "gpt2": "--config_overrides n_embd=32,n_head=2,n_layer=2,n_positions=64",
    "roberta": "--config_overrides hidden_size=32,num_attention_heads=2,num_hidden_layers=2,"
    "intermediate_size=64,max_position_embeddings=66",
}
SMALL_FLAGS = {  # program -> what makes it small
    "./tokenizer/train_tokenizer.py": "--vocab_size 512",
    "flax-lm train-tokenizer": "--vocab_size 512",
    "./configs/create_config.py": TINY_CONFIG,
    "flax-lm create-config": TINY_CONFIG,
    "./run_clm_flax.py": f"{SMALL_TRAINING} --block_size 32",
    "./run_mlm_flax.py": f"{SMALL_TRAINING} --max_seq_length 32",
    "flax-lm evaluate": "--block_size 32",
    "flax-lm generate": "--max_new_tokens 8",
    "flax-lm fill-mask": "",
    "flax-lm plot": "",
    "flax-lm export": "",
}
HUB_DATASET = re.compile(
    r"""--dataset_name[= ]"?[\w./-]+"?(\s+--dataset_config_name[= ]"?[\w./-]+"?)?"""
)
ASSIGNMENT = re.compile(r"^[A-Z_]+=\S+$")


def pipeline_commands() -> tuple[list[str], list[str]]:
    """The variable assignments and the commands of the README's pipeline, in order."""
    return section_commands("The pipeline")


def section_commands(heading: str) -> tuple[list[str], list[str]]:
    """The variable assignments and the commands of the README section `heading`, in order: each
    bash block between "## heading" and the next section, continuation lines joined, comments
    dropped."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    assignments, commands = [], []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = without_comment(line).strip()
            if ASSIGNMENT.match(line):
                assignments.append(line)
            elif line:
                commands.append(re.sub(r"\s+", " ", line))
    return assignments, commands


def without_comment(line: str) -> str:
    """The line up to a ` #` that is outside quotes."""
    for match in re.finditer(r"(^|\s)#", line):
        before = line[: match.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return before
    return line


def program(command: str) -> str:
    words = command.split()
    return " ".join(words[:2]) if words[0] == "flax-lm" else words[0]


def made_small(command: str) -> str:
    """The command as written, with a local corpus for a Hub dataset and the small flags added."""
    command = HUB_DATASET.sub('--train_file "$CORPUS"', command)
    small = SMALL_FLAGS[program(command)]
    if isinstance(small, dict):
        (model_type,) = re.findall(r"""--model_type[= ]"?(\w+)""", command)
        small = small[model_type]
    return f"{command} {small}".strip()


def test_the_readme_pipeline_is_what_the_run_below_covers():
    """Every command of the pipeline is one this test knows how to make small, and the pipeline
    still has each step a user takes (so the run below tests all of them)."""
    assignments, commands = pipeline_commands()
    assert "MODEL_DIR=./norwegian-gpt2" in assignments
    programs = [program(c) for c in commands]
    assert set(programs) <= set(SMALL_FLAGS), set(programs) - set(SMALL_FLAGS)
    for needed in ("./tokenizer/train_tokenizer.py", "./configs/create_config.py",
                   "./run_clm_flax.py", "./run_mlm_flax.py", "flax-lm evaluate",
                   "flax-lm generate", "flax-lm fill-mask", "flax-lm export", "flax-lm plot"):
        assert needed in programs, needed
    for command in commands:
        assert "--dataset_name" not in made_small(command), command  # the test needs no network


@dataclasses.dataclass
class Step:
    command: str
    result: subprocess.CompletedProcess
    seconds: float

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr

    def assert_ok(self) -> None:
        assert self.result.returncode == 0, (
            f"{self.command}\n({self.seconds:.0f} s)\n{self.output[-3000:]}"
        )


def folder_env(folder: Path, code_corpus) -> dict[str, str]:
    """The environment of the README's commands in `folder`: this checkout's flax-lm first on
    PATH, the local corpus that stands in for the Hub dataset."""
    return {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(folder / ".bin"), str(Path(sys.executable).parent), os.environ["PATH"]]
        ),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CORPUS": str(code_corpus.train),
        **CACHE_EVERY_COMPILE,
    }


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, code_corpus) -> tuple[Path, dict[str, Step]]:
    """The README's pipeline run once, command after command, in one folder; the training command
    runs twice (the rerun after a preemption). A failing command does not stop the ones after it,
    so each test below reports its own step."""
    folder = tmp_path_factory.mktemp("readme")
    for script in ("run_clm_flax.py", "run_mlm_flax.py", "tokenizer", "configs"):
        (folder / script).symlink_to(ROOT / script)
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    flax_lm_command = bin_dir / "flax-lm"  # this checkout's flax-lm, whatever is installed
    flax_lm_command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flax_lm.commands.cli "$@"\n')
    flax_lm_command.chmod(0o755)
    (folder / "test.txt").write_text(
        "".join(p.read_text(encoding="utf-8") for p in sorted(code_corpus.validation.iterdir())),
        encoding="utf-8",
    )
    env = folder_env(folder, code_corpus)
    assignments, commands = pipeline_commands()
    steps: dict[str, Step] = {}
    for command in commands:
        names = [program(command)]
        if names[0] == "./run_clm_flax.py":
            names.append("rerun")
        for name in names:
            small = made_small(command)
            start = time.monotonic()
            result = subprocess.run(
                ["bash", "-c", "\n".join([*assignments, small])], cwd=folder, env=env,
                capture_output=True, text=True, timeout=900,
            )
            key = name if name not in steps else f"{name} (again)"
            steps[key] = Step(small, result, time.monotonic() - start)
    return folder, steps


@pytest.mark.slow
def test_readme_tokenizer_and_configs(readme_run):
    folder, steps = readme_run
    for name in ("./tokenizer/train_tokenizer.py", "./configs/create_config.py",
                 "flax-lm create-config", "./configs/create_config.py (again)"):
        steps[name].assert_ok()
    gpt2 = json.loads((folder / "norwegian-gpt2" / "config.json").read_text())
    roberta = json.loads((folder / "norwegian-roberta" / "config.json").read_text())
    assert (gpt2["model_type"], roberta["model_type"]) == ("gpt2", "roberta")
    assert gpt2["vocab_size"] == roberta["vocab_size"] == 512  # the tokenizer's


@pytest.mark.slow
def test_readme_training_commands_train_and_export(readme_run):
    folder, steps = readme_run
    for name, run_dir in (("./run_clm_flax.py", "norwegian-gpt2"),
                          ("./run_mlm_flax.py", "norwegian-roberta")):
        steps[name].assert_ok()
        out = folder / run_dir
        assert (out / "checkpoints" / "2").is_dir(), sorted(p.name for p in out.iterdir())
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        results = json.loads((out / "eval_results.json").read_text())
        assert math.isfinite(results["eval_loss"])


@pytest.mark.slow
def test_readme_rerun_of_the_training_command_continues_the_run(readme_run):
    """The README: "Rerunning the same command continues the run", in its own layout."""
    folder, steps = readme_run
    rerun = steps["rerun"]
    rerun.assert_ok()
    assert "resumed from checkpoint" in rerun.output
    assert sorted(p.name for p in (folder / "norwegian-gpt2" / "checkpoints").iterdir()) == ["2"]


@pytest.mark.slow
def test_readme_commands_that_use_the_model(readme_run):
    folder, steps = readme_run
    for name in SMALL_FLAGS:
        if name.startswith("flax-lm ") and name not in ("flax-lm train-tokenizer",
                                                         "flax-lm create-config"):
            steps[name].assert_ok()
    evaluation = json.loads(steps["flax-lm evaluate"].result.stdout)
    assert math.isfinite(evaluation["eval_loss"]) and evaluation["perplexity"] > 1
    (prompt,) = re.findall(r'--prompt "([^"]+)"', steps["flax-lm generate"].command)
    assert steps["flax-lm generate"].result.stdout.startswith(prompt)
    assert steps["flax-lm fill-mask"].result.stdout.strip()
    assert (folder / "norwegian-gpt2" / "metrics.png").stat().st_size > 0
    exported = folder / "exported"
    assert (exported / "model.safetensors").is_file()
    assert json.loads((exported / "config.json").read_text())["n_layer"] == 2


# --- flax-lm plan, as the README writes it --------------------------------------------------------
TOPOLOGY_NEEDS = {  # whether this CPU has the compiler of each of the plan section's topologies
    "v3-8": (HAS_LIBTPU, "libtpu is not installed: pip install -e '.[tpu]'"),
    "h100:8": (HAS_CUDA_PLUGIN, "JAX's CUDA plugin is not installed: pip install -e '.[cuda]'"),
}


def plan_commands() -> dict[str, str]:
    """The `flax-lm plan` commands of the README's plan section, by topology."""
    _, commands = section_commands("Will it fit? (`flax-lm plan`)")
    return {re.findall(r"--topology[= ](\S+)", command)[0]: command
            for command in commands if command.startswith("flax-lm plan")}  # fmt: skip


def test_the_readme_plan_section_is_what_the_test_below_runs():
    assert sorted(plan_commands()) == sorted(TOPOLOGY_NEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("topology", sorted(TOPOLOGY_NEEDS))
def test_readme_plan_commands_compile_the_pipelines_model(readme_run, code_corpus, topology):
    """Each plan command as written, after the pipeline in its folder ($MODEL_DIR holds the tiny
    GPT-2 the pipeline made), with short blocks added: the recipe's step compiles for that
    topology on this CPU and fits (exit 0)."""
    compiler, reason = TOPOLOGY_NEEDS[topology]
    if not compiler:
        pytest.skip(reason)
    folder, _ = readme_run
    assignments, _ = pipeline_commands()
    command = f"{plan_commands()[topology]} --block_size 32"
    done = subprocess.run(
        ["bash", "-c", "\n".join([*assignments, command])], cwd=folder,
        env=folder_env(folder, code_corpus), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    assert "fits" in done.stdout and "does not fit" not in done.stdout, done.stdout[-2000:]

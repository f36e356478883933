#!/usr/bin/env python3
"""Prepare a corpus for CLM training two ways, on the same files, tokenizer and worker count:
flax-lm's pipeline (`load_raw_splits` + `tokenize_splits`, what run_clm_flax.py runs) and
Hugging Face's run_clm.py recipe (`load_dataset`, a tokenize `map`, a `group_texts` `map`).

    python bench/data_prep.py --megabytes 100 200 --num_proc 2 --out /tmp/data_prep.json

The corpus is the Python standard library's source repeated into 8 .txt files under --work_dir
(one example per line, as both read .txt files), with 5% held out for validation as both do.
Each preparation runs in a fresh process with an empty `datasets` cache; this process samples
the memory of that process and all its children every 50 ms from /proc/PID/smaps_rollup, summed
over the tree as proportional set sizes (PSS: pages shared by forked workers counted once), in
two parts: anonymous memory (what the processes allocate: the figure that must not grow with the
corpus) and file pages (the memory-mapped Arrow cache files and the shared libraries: page cache
the kernel can drop and read again). Sizes are measured in turn, flax-lm then Hugging Face, so
both see the same machine load. Prints MB/s (corpus bytes over the preparation's wall time,
imports excluded), the CPU seconds of the whole process tree (imports included: steadier than
wall time on a shared machine) and the tree's peak memory: all of its PSS, its anonymous part
and its file part (each the peak of its own sum, so the parts need not add up to the whole).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from itertools import chain
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
FILES = 8
VOCAB_SIZE = 8192


def write_corpus(directory: Path, megabytes: int) -> int:
    """FILES .txt files of stdlib source, megabytes MB in all; returns the bytes written."""
    sources = [p for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
               if "site-packages" not in p.parts]  # fmt: skip
    per_file = megabytes * 1_000_000 // FILES
    directory.mkdir(parents=True, exist_ok=True)
    texts = (p.read_bytes() for p in chain.from_iterable([sources] * 1000))
    for index in range(FILES):
        with open(directory / f"part-{index}.txt", "wb") as f:
            written = 0
            while written < per_file:
                text = next(texts)
                try:
                    text.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                f.write(text)
                written += len(text)
    return sum(p.stat().st_size for p in directory.iterdir())


def train_tokenizer(directory: Path) -> Path:
    if not (directory / "tokenizer.json").exists():
        sys.path.insert(0, str(REPO))
        from flax_lm.tokenizer import train_tokenizer as train

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))
        train(texts, VOCAB_SIZE, 2, directory)
    return directory


def prepare_flax_lm(files: list[str], tokenizer, cache: str, num_proc: int, block_size: int):
    from flax_lm.train.args import TrainConfig
    from flax_lm.train.data.splits import load_raw_splits
    from flax_lm.train.data.tokenize import tokenize_splits

    cfg = TrainConfig(train_file=files, cache_dir=cache, preprocessing_num_workers=num_proc,
                      block_size=block_size, do_train=True, do_eval=True)  # fmt: skip
    splits = tokenize_splits(load_raw_splits(cfg), tokenizer, cfg, "clm")
    return {name: len(split) for name, split in splits.items()}


def prepare_hugging_face(files: list[str], tokenizer, cache: str, num_proc: int, block_size: int):
    """run_clm.py's data preparation for --train_file *.txt, as it is written there."""
    from datasets import load_dataset

    percent = 5
    raw = load_dataset("text", data_files={"train": files}, cache_dir=cache, keep_linebreaks=True)
    raw["validation"] = load_dataset("text", data_files={"train": files}, cache_dir=cache,
                                     keep_linebreaks=True, split=f"train[:{percent}%]")  # fmt: skip
    raw["train"] = load_dataset("text", data_files={"train": files}, cache_dir=cache,
                                keep_linebreaks=True, split=f"train[{percent}%:]")  # fmt: skip

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    tokenized = raw.map(tokenize_function, batched=True, num_proc=num_proc,
                        remove_columns=["text"], desc="Running tokenizer on dataset")  # fmt: skip

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[next(iter(examples))]) // block_size * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}  # fmt: skip
        result["labels"] = result["input_ids"].copy()
        return result

    blocks = tokenized.map(group_texts, batched=True, num_proc=num_proc,
                           desc=f"Grouping texts in chunks of {block_size}")  # fmt: skip
    return {name: len(split) for name, split in blocks.items()}


RECIPES = {"flax-lm": prepare_flax_lm, "hugging-face": prepare_hugging_face}


def worker(args) -> None:
    sys.path.insert(0, str(REPO))
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    files = sorted(str(p) for p in Path(args.corpus).iterdir())
    prepare = RECIPES[args.worker]
    if args.worker == "flax-lm":  # its imports (jax among them) are not preparation time
        import flax_lm.train.data.tokenize  # noqa: F401
    started = time.perf_counter()
    blocks = prepare(files, tokenizer, args.cache, args.num_proc, args.block_size)
    print(json.dumps({"seconds": time.perf_counter() - started, "blocks": blocks}))


def tree_memory(root: psutil.Process) -> dict[str, int]:
    """Bytes of PSS, anonymous PSS and file-backed PSS, summed over `root` and its children."""
    total = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    for process in [root, *root.children(recursive=True)]:
        try:
            with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
                for line in rollup:
                    name, _, rest = line.partition(":")
                    if name in total:
                        total[name] += int(rest.split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError):  # a worker ended meanwhile
            pass
    return total


def measure(recipe: str, corpus: Path, tokenizer: Path, cache: Path, args) -> dict:
    """Run one preparation in a fresh process; its seconds, blocks and peak tree memory."""
    shutil.rmtree(cache, ignore_errors=True)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, __file__, "--worker", recipe, "--corpus", str(corpus),
               "--tokenizer", str(tokenizer), "--cache", str(cache),
               "--num_proc", str(args.num_proc), "--block_size", str(args.block_size)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    while process.poll() is None:
        try:
            now = tree_memory(root)
        except psutil.Error:  # the process ended between polling and listing
            continue
        peak = {name: max(value, now[name]) for name, value in peak.items()}
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"{recipe} failed:\n{stderr[-3000:]}")
    shutil.rmtree(cache, ignore_errors=True)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_memory_mb": peak["Pss"] / 1e6,
            "peak_anonymous_mb": peak["Pss_Anon"] / 1e6, "peak_file_mb": peak["Pss_File"] / 1e6,
            "cpu_seconds_whole_process": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--work_dir", default="/tmp/flax_lm_data_prep")
    parser.add_argument("--out", help="write the results here as JSON")
    for name in ("--worker", "--corpus", "--tokenizer", "--cache"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    work = Path(args.work_dir)
    tokenizer = train_tokenizer(work / "tokenizer")
    results = []
    print("corpus MB | recipe | seconds | MB/s | CPU s (whole process) | peak memory MB (PSS) | "
          "peak anonymous MB | peak file pages MB | train blocks | load avg")
    for megabytes in args.megabytes:
        corpus = work / f"corpus-{megabytes}MB"
        size = write_corpus(corpus, megabytes) if not corpus.exists() else sum(
            p.stat().st_size for p in corpus.iterdir())
        for recipe in args.recipes:
            load = psutil.getloadavg()[0]
            result = measure(recipe, corpus, tokenizer, work / "cache", args)
            result.update(recipe=recipe, corpus_mb=size / 1e6, mb_per_s=size / 1e6 / result["seconds"],
                          num_proc=args.num_proc, block_size=args.block_size, load_average=load)
            results.append(result)
            print(f"{size / 1e6:.0f} | {recipe} | {result['seconds']:.1f} | "
                  f"{result['mb_per_s']:.2f} | {result['cpu_seconds_whole_process']:.1f} | "
                  f"{result['peak_memory_mb']:,.0f} | {result['peak_anonymous_mb']:,.0f} | "
                  f"{result['peak_file_mb']:,.0f} | "
                  f"{result['blocks']['train']:,} | {load:.1f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prepare a corpus for CLM training two ways, on the same files, tokenizer and worker count:
flax-lm's pipeline (`load_raw_splits` + `tokenize_splits`, what run_clm_flax.py runs) and
Hugging Face's run_clm.py recipe (`load_dataset`, a tokenize `map`, a `group_texts` `map`).

    python bench/data_prep.py --megabytes 50 200 400 --num_proc 2 --memory_limit_mb 800 \
        --out /tmp/data_prep.json

The corpus is the Python standard library's source repeated into 8 .txt files under --work_dir
(one example per line, as both read .txt files), with 5% held out for validation as both do.
Each preparation runs in a fresh process with an empty `datasets` cache, the corpus evicted from
the page cache first; this process samples the memory of that process and all its children
every 50 ms from /proc/PID/smaps_rollup, summed over the tree as proportional set sizes (PSS:
pages shared by forked workers counted once), in two parts: anonymous memory (what the
processes allocate: the figure that must not grow with the corpus) and file pages (the
memory-mapped Arrow cache files and the shared libraries: page cache the kernel can drop and
read again; a shared library's share also falls as other processes on the machine map it).
Sizes are measured in turn, flax-lm then Hugging Face, so both see the same machine load.
Prints MB/s (corpus bytes over the preparation's wall time, imports excluded), the CPU seconds
of the whole process tree (imports included: steadier than wall time on a shared machine), the
tree's peak memory: all of its PSS, its anonymous part and its file part (each the peak of its
own sum, so the parts need not add up to the whole), and the seconds and CPU seconds of the
first stage, converting the text files to `datasets`' Arrow cache.

--memory_limit_mb N (root only) runs each preparation in a fresh memory cgroup capped at N MB,
which is what the preparation needs rather than what it happened to map: the kernel charges the
group the processes' memory and the page cache they read and write, reclaims clean cache pages
at the cap and kills a process only when nothing more can be reclaimed. It reports whether the
preparation finished, the group's peak charge, its peak rss and cache (sampled), and how often
it reached the cap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
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
    with stage_clock() as convert:
        raw = load_raw_splits(cfg)
    splits = tokenize_splits(raw, tokenizer, cfg, "clm")
    return {name: len(split) for name, split in splits.items()}, convert


def prepare_hugging_face(files: list[str], tokenizer, cache: str, num_proc: int, block_size: int):
    """run_clm.py's data preparation for --train_file *.txt, as it is written there."""
    from datasets import load_dataset

    percent = 5
    with stage_clock() as convert:
        raw = load_dataset("text", data_files={"train": files}, cache_dir=cache,
                           keep_linebreaks=True)  # fmt: skip
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
    return {name: len(split) for name, split in blocks.items()}, convert


@contextlib.contextmanager
def stage_clock():
    """Seconds and CPU seconds (this process and the workers it waited for) of a stage."""

    def cpu_seconds() -> float:
        usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        return sum(usage.ru_utime + usage.ru_stime for usage in usages)

    took, started, cpu = {}, time.perf_counter(), cpu_seconds()
    yield took
    took["convert_seconds"] = time.perf_counter() - started
    took["convert_cpu_seconds"] = cpu_seconds() - cpu


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
    blocks, convert = prepare(files, tokenizer, args.cache, args.num_proc, args.block_size)
    print(json.dumps({"seconds": time.perf_counter() - started, "blocks": blocks, **convert}))


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


class MemoryGroup:
    """A fresh memory cgroup capped at `limit_mb` for one preparation and everything it starts:
    the kernel charges it the processes' memory and the page cache they read and write, reclaims
    its clean cache pages when it reaches the cap, and kills a process when nothing more can be
    reclaimed. cgroup v1 (/sys/fs/cgroup/memory) or v2 (a cgroup2 mount at /sys/fs/cgroup with
    the memory controller; the figures in docs/performance.md come from v1); both need root."""

    V1, V2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")

    def __init__(self, limit_mb: int, name: str):
        self.v1 = (self.V1 / "memory.limit_in_bytes").exists()
        self.path = (self.V1 if self.v1 else self.V2) / name
        self.path.mkdir()
        self.write("memory.limit_in_bytes" if self.v1 else "memory.max", limit_mb * 1_000_000)
        if not self.v1 and (self.path / "memory.swap.max").exists():
            self.write("memory.swap.max", 0)
        self.peak = {"rss": 0, "cache": 0}

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no memory cgroup can be made here, or None when one can."""
        v2 = cls.V2 / "cgroup.controllers"
        if (cls.V1 / "memory.limit_in_bytes").exists():
            writable = os.access(cls.V1, os.W_OK)
        elif v2.exists() and "memory" in v2.read_text().split():
            writable = os.access(cls.V2, os.W_OK)
        else:
            return "no memory cgroup controller is mounted (cgroup v1 or v2 at /sys/fs/cgroup)"
        return None if writable else "creating a memory cgroup needs root (run as root)"

    def write(self, name: str, value: int) -> None:
        (self.path / name).write_text(f"{value}\n")

    def join(self) -> None:
        """Put the calling process (a child before it execs) in the group."""
        self.write("cgroup.procs", os.getpid())

    def stat(self) -> dict[str, int]:
        lines = (self.path / "memory.stat").read_text().split("\n")
        return {name: int(value) for name, value in (line.split() for line in lines if line)}

    def sample(self) -> None:
        """Keep the peaks of the group's process memory (rss) and page cache."""
        stat = self.stat()
        now = {"rss": stat["rss"], "cache": stat["cache"]} if self.v1 else {
            "rss": stat["anon"], "cache": stat["file"]}  # fmt: skip
        self.peak = {name: max(value, now[name]) for name, value in self.peak.items()}

    def report(self) -> dict:
        """The group's peak usage (all it was charged), peak rss and cache, and how often it hit
        the cap (v2 counts reclaim events, not failed charges) and killed a process."""
        if self.v1:
            peak = int((self.path / "memory.max_usage_in_bytes").read_text())
            hits = int((self.path / "memory.failcnt").read_text())
            oom = (self.path / "memory.oom_control").read_text().split()
            kills = int(oom[oom.index("oom_kill") + 1]) if "oom_kill" in oom else 0
        else:
            peak = int((self.path / "memory.peak").read_text())
            events = (self.path / "memory.events").read_text().splitlines()
            events = dict(line.split() for line in events)
            hits, kills = int(events["max"]), int(events["oom_kill"])
        return {"cgroup_peak_mb": peak / 1e6, "cgroup_peak_rss_mb": self.peak["rss"] / 1e6,
                "cgroup_peak_cache_mb": self.peak["cache"] / 1e6, "cgroup_limit_hits": hits,
                "cgroup_oom_kills": kills}  # fmt: skip

    def kill_remaining(self) -> None:
        """Kill the processes left in the group: the workers of a preparation whose main
        process was killed at the cap wait for it forever, holding its output pipes open."""
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        """Remove the group once its processes are gone (the cache files they wrote deleted
        first, so few pages are left charged to it)."""
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:  # its last process is still exiting
                time.sleep(0.1)


def drop_from_page_cache(directory: Path) -> None:
    """Evict the files' pages from the page cache, so a preparation reads them from disk (and
    the page cache it fills is charged to its memory cgroup, not to whoever wrote them)."""
    for path in directory.iterdir():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def measure(recipe: str, corpus: Path, tokenizer: Path, cache: Path, args) -> dict:
    """Run one preparation in a fresh process (in a fresh memory cgroup with
    --memory_limit_mb) that reads the corpus from disk; its seconds, blocks and peak memory."""
    shutil.rmtree(cache, ignore_errors=True)
    drop_from_page_cache(corpus)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, __file__, "--worker", recipe, "--corpus", str(corpus),
               "--tokenizer", str(tokenizer), "--cache", str(cache),
               "--num_proc", str(args.num_proc), "--block_size", str(args.block_size)]  # fmt: skip
    group = args.memory_limit_mb and MemoryGroup(
        args.memory_limit_mb, f"flax_lm_data_prep_{os.getpid()}_{recipe}_{time.monotonic_ns()}")
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=group.join if group else None)  # fmt: skip
        root, peak = psutil.Process(process.pid), {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
        while process.poll() is None:
            try:
                now = tree_memory(root)
                if group:
                    group.sample()
            except psutil.Error:  # the process ended between polling and listing
                continue
            peak = {name: max(value, now[name]) for name, value in peak.items()}
            time.sleep(0.05)
        if group:
            group.kill_remaining()
        stdout, stderr = process.communicate()
        shutil.rmtree(cache, ignore_errors=True)
        limited = group.report() if group else {}
    finally:
        if group:
            group.remove()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    memory = {"peak_memory_mb": peak["Pss"] / 1e6, "peak_anonymous_mb": peak["Pss_Anon"] / 1e6,
              "peak_file_mb": peak["Pss_File"] / 1e6, "cpu_seconds_whole_process": cpu,
              **limited}  # fmt: skip
    if process.returncode:
        if not group:
            raise SystemExit(f"{recipe} failed:\n{stderr[-3000:]}")
        killed = process.returncode < 0 and f"killed by signal {-process.returncode}" + (
            " (out of memory)" if limited["cgroup_oom_kills"] else "")  # fmt: skip
        error = killed or (stderr.strip().splitlines() or [f"exit status {process.returncode}"])[-1]
        return {"finished": False, "error": error[-300:], **memory}
    return {"finished": True, **json.loads(stdout.strip().splitlines()[-1]), **memory}


def row(result: dict) -> str:
    """One result as a line of the printed table."""
    if result["finished"]:
        result["mb_per_s"] = result["corpus_mb"] / result["seconds"]
        done = (f"{result['seconds']:.1f} | {result['mb_per_s']:.2f}",
                f"{result['blocks']['train']:,}",
                f"{result['convert_seconds']:.1f} "
                f"({result['convert_cpu_seconds']:.1f})")  # fmt: skip
    else:
        done = ("- | -", "-", "-")
    line = (f"{result['corpus_mb']:.0f} | {result['recipe']} | {done[0]} | "
            f"{result['cpu_seconds_whole_process']:.1f} | {result['peak_memory_mb']:,.0f} | "
            f"{result['peak_anonymous_mb']:,.0f} | {result['peak_file_mb']:,.0f} | {done[1]} | "
            f"{result['load_average']:.1f} | {done[2]}")  # fmt: skip
    if result["memory_limit_mb"]:
        line += (f" | {'yes' if result['finished'] else 'no: ' + result['error']} | "
                 f"{result['cgroup_peak_mb']:,.0f} | {result['cgroup_peak_rss_mb']:,.0f} | "
                 f"{result['cgroup_peak_cache_mb']:,.0f} | "
                 f"{result['cgroup_limit_hits']:,}")  # fmt: skip
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--work_dir", default="/tmp/flax_lm_data_prep")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--memory_limit_mb", type=int,
                        help="run each preparation in a fresh memory cgroup capped at this many "
                             "MB (needs root) and report whether it finished")  # fmt: skip
    for name in ("--worker", "--corpus", "--tokenizer", "--cache"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.memory_limit_mb is not None and args.memory_limit_mb <= 0:
        print(f"error: --memory_limit_mb must be positive, got {args.memory_limit_mb}",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    if args.memory_limit_mb and (reason := MemoryGroup.unavailable()):
        print(f"error: --memory_limit_mb {args.memory_limit_mb}: {reason}", file=sys.stderr)
        raise SystemExit(2)
    work = Path(args.work_dir)
    tokenizer = train_tokenizer(work / "tokenizer")
    results = []
    print("corpus MB | recipe | seconds | MB/s | CPU s (whole process) | peak memory MB (PSS) | "
          "peak anonymous MB | peak file pages MB | train blocks | load avg | convert s (CPU s)"
          + (f" | under {args.memory_limit_mb} MB: finished | cgroup peak MB | peak rss MB | "
             "peak cache MB | times at the cap" if args.memory_limit_mb else ""))  # fmt: skip
    for megabytes in args.megabytes:
        corpus = work / f"corpus-{megabytes}MB"
        size = write_corpus(corpus, megabytes) if not corpus.exists() else sum(
            p.stat().st_size for p in corpus.iterdir())
        for recipe in args.recipes:
            load = psutil.getloadavg()[0]
            result = measure(recipe, corpus, tokenizer, work / "cache", args)
            result.update(recipe=recipe, corpus_mb=size / 1e6, num_proc=args.num_proc,
                          block_size=args.block_size, load_average=load,
                          memory_limit_mb=args.memory_limit_mb)  # fmt: skip
            results.append(result)
            print(row(result), flush=True)
            if args.out:  # after each preparation: a long run keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""What a run's log file tells a person (stdout and stderr redirected to a file, as a TPU VM's
`nohup ... > train.log 2>&1` does): the run header, data-preparation progress lines, one line per
logging step with loss, accuracy and perplexity, one per checkpoint saved; --profile_steps'
trace; and train accuracy, which is the argmax's within ties on every loss path."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zstandard
from conftest import CACHE_EVERY_COMPILE, assert_one_line_error, stdlib_modules
from test_corpus_sources import oscar_record

from flax_lm.commands.train import main
from flax_lm.console import duration, progress_line
from flax_lm.models import output as output_module
from flax_lm.models.output import IGNORE_INDEX, OutputLayer, cross_entropy_sums
from flax_lm.train.metrics import train_line
from flax_lm.train.objectives import CausalLM, summed_output_terms

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS, PROFILED = 4, 2, (3, 4)
LINE = re.compile(
    r"^step (\d+)/(\d+): epoch \S+, loss ([\d.]+), accuracy ([\d.]+), perplexity ([\d.]+), "
    r"learning_rate \S+, grad_norm [\d.]+, [\d,]+ tokens/s"
)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_tokenizer_dir, jax_cache):
    """A short CLM run from OSCAR-layout .jsonl.zst, its output all going to one file; steps 3
    and 4 profiled. (output_dir, log text)."""
    root = tmp_path_factory.mktemp("logged")
    records = [oscar_record(i, m.read_text()) for i, m in enumerate(stdlib_modules()[:40])]
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    (root / "oscar.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    out = root / "run"
    argv = [
        "--output_dir", str(out), "--config_name", "gpt2", "--config_overrides",
        "n_embd=32,n_layer=2,n_head=2,n_positions=32,vocab_size=512,bos_token_id=0,"
        "eos_token_id=2", "--block_size", "32", "--tokenizer_name", str(tiny_tokenizer_dir),
        "--train_file", str(root / "oscar.jsonl.zst"), "--do_train",
        "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--logging_steps", "1",
        "--save_steps", str(SAVE_STEPS), "--profile_steps", "{}:{}".format(*PROFILED),
        "--cache_dir", str(root / "hf"), "--compilation_cache_dir", str(jax_cache),
    ]  # fmt: skip
    log = root / "train.log"
    with log.open("w") as file:
        done = subprocess.run(
            [sys.executable, str(REPO / "run_clm_flax.py"), *argv], stdout=file,
            stderr=subprocess.STDOUT, env={**os.environ, **CACHE_EVERY_COMPILE}, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    return out, text


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


def test_a_log_file_tells_the_run(logged_run):
    out, text = logged_run
    assert "\r" not in text  # no progress bar redrawn into the file
    lines = text.splitlines()
    header = lines.index("***** Running training *****")
    said = "\n".join(lines[header:header + 6])
    for what in ("documents: 38 train", "train examples:", "devices: 1 x cpu",
                 "mesh data=1", "global batch: 4 sequences", "steps: 4 ("):
        assert what in said, said
    # data preparation said how it went before training
    progress = [line for line in lines[:header] if "documents/s" in line]
    assert any(line.startswith("tokenizing train") and "ETA" in line for line in progress), text
    assert "'content'" in text  # the text column it took
    # one line per logging step, the numbers of metrics.jsonl
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if "header" not in record]  # train records only
    logged = [LINE.match(line) for line in lines if LINE.match(line)]
    assert [int(m[1]) for m in logged] == [r["step"] for r in records] == list(range(1, 5))
    for match, record in zip(logged, records, strict=True):
        assert int(match[2]) == STEPS
        assert float(match[3]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(match[4]) == pytest.approx(record["accuracy"], abs=1e-4)
        assert float(match[5]) == pytest.approx(math.exp(record["loss"]), rel=1e-3)
    assert all("ETA" in line for line in lines if LINE.match(line) and "step 1/" not in line)
    # one line per checkpoint: its step, how long, where
    saved = [line for line in lines if "saved checkpoint" in line]
    assert len(saved) == STEPS // SAVE_STEPS
    for step, line in zip((2, 4), saved, strict=True):
        assert line.startswith(f"step {step}:") and str(out / "checkpoints" / str(step)) in line
        assert re.search(r"in \d+\.\d+ s", line)


def test_profile_steps_trace_those_steps(logged_run):
    """output_dir/profile/ holds TensorBoard's profile plugin layout: an XSpace (.xplane.pb) and
    a trace whose step markers are the profiled steps, no others."""
    out, text = logged_run
    runs = list((out / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1
    assert list(runs[0].glob("*.xplane.pb"))
    (trace,) = runs[0].glob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = sorted({int(e["args"]["step_num"]) for e in events if e.get("name") == "train"})
    assert steps == list(PROFILED)
    assert "profile of steps 3-4 written to" in text


@pytest.mark.parametrize("value", ["5:2", "0:3", "7"])
def test_a_bad_profile_range_is_one_error_line(tmp_path, capsys, value):
    argv = ["--output_dir", str(tmp_path / "o"), "--train_file", "x.txt",
            "--profile_steps", value]
    assert_one_line_error((main(argv, objective="clm"), capsys.readouterr().err),
                          "--profile_steps", value)


def test_a_train_line_reads_as_it_should():
    record = {"step": 20, "epoch": 0.4123, "loss": 5.0, "accuracy": 0.25, "perplexity": 148.41,
              "learning_rate": 2e-4, "grad_norm": 1.5, "tokens_per_second": 12345.6, "mfu": 0.412}
    line = train_line(record, 100, 65.0)
    assert line == ("step 20/100: epoch 0.4123, loss 5.0000, accuracy 0.2500, perplexity 148.41, "
                    "learning_rate 2.000e-04, grad_norm 1.500, 12,346 tokens/s, MFU 41.2%, "
                    "ETA 0:01:05")
    assert "MFU" not in train_line({**record, "mfu": None}, 100, None)
    assert duration(2 * 86400 + 3 * 3600 + 61) == "2-03:01:01"
    assert progress_line("tokenizing train", 250, 1000, 5.0) == (
        "tokenizing train: 250/1,000 documents (25%), 50 documents/s, ETA 0:00:15")


# ------------------------------------------------------------------------- train accuracy

VOCAB, WIDTH, BATCH, SEQ = 40, 8, 4, 32
TIED_TOKENS = 30  # tokens 0-29: fifteen pairs of equal rows


def tied_example(next_token: bool, seed: int = 0):
    """Features and a table whose first TIED_TOKENS rows come in identical pairs (tokens 2k and
    2k + 1 then have equal logits: a row whose best token is one of them has a tie at its
    maximum), labels often the best token or its twin."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(VOCAB, WIDTH)).astype(np.float32)
    table[1:TIED_TOKENS:2] = table[0:TIED_TOKENS:2]
    table = jnp.asarray(table)
    features = jnp.asarray(rng.normal(size=(BATCH, SEQ, WIDTH)), jnp.float32)
    logits = np.asarray(OutputLayer(features, table).logits())
    best = logits.argmax(-1)  # of a tied pair, the first
    twin = np.where(best < TIED_TOKENS, best + 1, best)
    pick = rng.random((BATCH, SEQ))
    labels = np.where(pick < 0.3, best, np.where(pick < 0.6, twin,
                                                 rng.integers(0, VOCAB, (BATCH, SEQ))))
    labels = np.where(rng.random((BATCH, SEQ)) < 0.15, IGNORE_INDEX, labels).astype(np.int32)
    if next_token:  # position t's logits are scored against the label at t + 1
        labels = np.concatenate([labels[:, -1:], labels[:, :-1]], axis=1)
    return features, table, logits, labels


def argmax_and_ties(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax == label, the label's logit is the maximum but another token's is too)."""
    safe = np.where(labels == IGNORE_INDEX, 0, labels)
    label_logit = np.take_along_axis(logits, safe[..., None], -1)[..., 0]
    maximum = logits.max(-1)
    tied = (label_logit == maximum) & ((logits == maximum[..., None]).sum(-1) > 1)
    is_target = labels != IGNORE_INDEX
    return is_target & (logits.argmax(-1) == safe), is_target & tied


@pytest.mark.parametrize("fused", [False, True], ids=["two-pass", "online-softmax"])
@pytest.mark.parametrize("objective", ["clm", "mlm"])
@pytest.mark.parametrize("chunk", [SEQ, 8], ids=["one-chunk", "chunked"])
def test_train_accuracy_is_the_argmax_within_ties(monkeypatch, fused, objective, chunk):
    """The loss's correctness is the argmax's at every position without a tie: on both
    reductions (XLA:CPU's two passes, the accelerators' online softmax), in one chunk or
    several, for next-token (CLM) and same-position (MLM) targets; the train step's num_correct
    is their count. At an exact tie for the maximum, the chunked loss (which asks whether the
    label's logit reaches the row maximum its softmax finds anyway) counts the label correct;
    the whole-logits loss (XLA:CPU's one chunk) takes the argmax, the first of the tied."""
    monkeypatch.setattr(output_module, "LOGITS_PER_CHUNK_ROW", chunk * VOCAB)
    next_token = objective == "clm"
    features, table, logits, labels = tied_example(next_token)
    output = OutputLayer(features, table, fused=fused)
    weights = jnp.asarray(labels != IGNORE_INDEX, jnp.float32)
    # (fresh functions to jit: a jitted function's cache would ignore the patched chunk size)
    _, correct = jax.jit(lambda o, y, w: cross_entropy_sums(o, y, w, next_token=next_token))(
        output, jnp.asarray(labels), weights)
    if next_token:
        terms = jax.jit(lambda o, b: CausalLM().output_terms(o, b))(
            output, {"labels": jnp.asarray(labels)})
        logits, labels, correct = logits[:, :-1], labels[:, 1:], correct[:, : SEQ - 1]
    else:
        terms = jax.jit(lambda o, y: summed_output_terms(o, y))(output, jnp.asarray(labels))
    argmax_correct, tied = argmax_and_ties(logits, labels)
    untied = (labels != IGNORE_INDEX) & ~tied
    assert tied.sum() > 5 and (argmax_correct & untied).sum() > 5  # both cases occur
    np.testing.assert_array_equal(np.asarray(correct)[untied], argmax_correct[untied])
    whole_logits = chunk == SEQ and not fused
    want_at_ties = argmax_correct[tied] if whole_logits else np.ones(tied.sum(), bool)
    np.testing.assert_array_equal(np.asarray(correct)[tied], want_at_ties)
    assert not argmax_correct[tied].all()  # the ties do tell the two apart
    assert float(terms["num_correct"]) == np.asarray(correct).sum()

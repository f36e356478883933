"""One PNG with the curves of a training run, from its metrics.jsonl (for `flax-lm plot`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

from flax_lm.errors import UserError
from flax_lm.train.metrics import METRICS_FILE, perplexity

TRAIN_COLOR, EVAL_COLOR = "tab:blue", "tab:orange"


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Train and eval records of a metrics.jsonl, each sorted by step.

    A resumed run logs again the steps after its checkpoint: the last record of a step wins.
    """
    if not path.is_file():
        raise UserError(f"no {path.name} in {path.parent} (is it a training output_dir?)")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise UserError(f"{path}:{number} has no 'step'")
        if "eval_loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    if not train and not evals:
        raise UserError(f"{path} holds no train or eval metrics yet")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def series(records: list[dict], key: str, transform=None) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping records without it and non-finite values."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        value = transform(value) if transform else float(value)
        if math.isfinite(value):
            steps.append(record["step"])
            values.append(value)
    return steps, values


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def draw(
    ax,
    title: str,
    ylabel: str,
    curves: list[tuple[str, str, tuple]],
    *,
    log: bool = False,
    from_zero: bool = False,
):
    """One panel of curves (label, color, (steps, values)); a note when none was logged."""
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    shown = [(label, color, data) for label, color, data in curves if data[0]]
    if not shown:
        ax.text(
            0.5, 0.5, "not logged", ha="center", va="center", color="gray", transform=ax.transAxes
        )
        return
    for label, color, (steps, values) in shown:
        marker = "o" if len(steps) < 30 else None
        ax.plot(
            steps,
            values,
            color=color,
            label=f"{label}: {fmt(values[-1])}",
            marker=marker,
            markersize=3,
            linewidth=1.5,
        )
    if log and all(v > 0 for _, _, (_, values) in shown for v in values):
        ax.set_yscale("log")
        # Plain numbers at 1, 2, 5 x 10^k (only 10^k over many decades), not powers of ten.
        low, high = ax.get_ylim()
        subs = (1.0,) if high / low > 1e4 else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:.3g}")
        )
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    elif from_zero:
        ax.set_ylim(bottom=0, top=1.1 * max(max(values) for _, _, (_, values) in shown))
    ax.legend(frameon=False, title="last value", title_fontsize=8, fontsize=9)


def progress(train: list[dict], evals: list[dict]) -> str:
    """The title's summary: how far the run got."""
    last_step = max(r["step"] for r in train + evals)
    parts = [f"step {last_step:,}"]
    if train and train[-1].get("epoch") is not None:
        parts.append(f"epoch {train[-1]['epoch']:.2f}")
    if evals:
        parts.append(f"eval loss {evals[-1]['eval_loss']:.4f}")
    return ", ".join(parts)


def panels(train: list[dict], evals: list[dict]) -> list[tuple[str, str, list, dict]]:
    """(title, y label, curves, draw options) of each panel, by rows of three."""

    def train_curve(key: str) -> list[tuple]:
        return [("train", TRAIN_COLOR, series(train, key))]

    return [
        ("Loss", "cross-entropy (nats/token)",
         [*train_curve("loss"), ("eval", EVAL_COLOR, series(evals, "eval_loss"))], {}),
        ("Perplexity", "perplexity (log scale)",
         [("train (exp loss)", TRAIN_COLOR, series(train, "loss", perplexity)),
          ("eval", EVAL_COLOR, series(evals, "perplexity"))], {"log": True}),
        ("Eval accuracy", "token accuracy", [("eval", EVAL_COLOR, series(evals, "eval_accuracy"))],
         {}),
        ("Learning rate", "learning rate", train_curve("learning_rate"), {}),
        ("Gradient norm", "global L2 norm (before clipping)", train_curve("grad_norm"),
         {"from_zero": True}),
        ("Throughput", "tokens / second", train_curve("tokens_per_second"), {"from_zero": True}),
    ]  # fmt: skip


def plot_metrics(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, perplexity, accuracy, learning rate, grad norm and tokens/s against step, as a PNG."""
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    out = Path(out) if out is not None else output_dir / "metrics.png"
    train, evals = read_metrics(output_dir / METRICS_FILE)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), dpi=100)
    for ax, (title, ylabel, curves, options) in zip(axes.flat, panels(train, evals), strict=True):
        draw(ax, title, ylabel, curves, **options)
    lr_ax, speed_ax = axes[1][0], axes[1][2]
    speed_ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    run_name = "/".join(output_dir.resolve().parts[-2:])
    fig.suptitle(f"{run_name}: {progress(train, evals)}", fontsize=14)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out

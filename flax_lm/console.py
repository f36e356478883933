"""What a person following a run sees: progress bars on a terminal, whole lines in a log file.

Progress bars go to stderr; on a terminal they stay. Where stderr is not a terminal (a run under
`nohup ... > train.log 2>&1` or a scheduler), a bar's carriage-return updates would pile into one
line, so there `data_progress` turns `datasets`' bars (loading files, tokenizing) into a line on
stdout every LINE_FRACTION of the work or LINE_SECONDS, with the rate and the time left. The
lines that tell the story (the run header, a line per logging step, per evaluation and per
checkpoint) are printed in both cases, above the bars on a terminal.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
from collections.abc import Iterator

LINE_FRACTION = 0.1  # of the total: a progress line at least every tenth of the work
LINE_SECONDS = 60.0  # and at least every minute when the work is slow or its total unknown
# The modules of `datasets` whose progress bars (loading files, map and filter) data preparation
# shows; each creates its bars through its module-level `hf_tqdm`.
DATASETS_BAR_MODULES = ("datasets.builder", "datasets.arrow_dataset")


def stderr_is_terminal() -> bool:
    """Whether progress bars can update in place: the one test of it the package makes."""
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS (days as D-HH:MM:SS), as a log line shows an ETA."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def progress_line(what: str, done: float, total: float | None, seconds: float) -> str:
    """"tokenizing train: 4,000/10,000 documents (40%), 1,234 documents/s, ETA 0:00:05"."""
    rate = done / seconds if seconds > 0 else 0.0
    if not total:
        return f"{what}: {done:,.0f} documents, {rate:,.0f} documents/s"
    eta = duration((total - done) / rate) if rate > 0 else "?"
    return (f"{what}: {done:,.0f}/{total:,.0f} documents ({100 * done / total:.0f}%), "
            f"{rate:,.0f} documents/s, ETA {eta}")


class _Discard:
    """Where a LineProgress's own bar goes: nowhere."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _line_progress_class():
    """A `datasets` progress bar (its tqdm) that prints whole lines on stdout instead of
    redrawing: at least every LINE_FRACTION of the total or LINE_SECONDS, and when it ends."""
    from datasets.utils import tqdm as datasets_tqdm

    class LineProgress(datasets_tqdm):
        def __init__(self, *args, **kwargs):
            self.line_at = (kwargs.get("initial", 0), time.monotonic())  # of the last line
            kwargs.update(file=_Discard(), mininterval=0.5)
            # past datasets' own __init__: it disables every bar while data_progress hides them
            super(datasets_tqdm, self).__init__(*args, **kwargs)

        def display(self, msg=None, pos=None) -> None:
            done, when = self.line_at
            total, now = self.total, time.monotonic()
            step = (total or 0) * LINE_FRACTION
            if (step and self.n - done >= step) or now - when >= LINE_SECONDS:
                self.print_line()

        def print_line(self) -> None:
            seconds = self._time() - self.start_t  # tqdm's clock
            what = (self.desc or "preparing data").rstrip(": ")
            print(progress_line(what, self.n, self.total, seconds), flush=True)
            self.line_at = (self.n, time.monotonic())

        def close(self) -> None:
            if not self.disable and self.n != self.line_at[0]:
                self.print_line()
            super().close()

    return LineProgress


@contextlib.contextmanager
def data_progress(lines: bool = False) -> Iterator[None]:
    """`datasets`' progress bars while loading and tokenizing: on a terminal as they are; else
    hidden, and with `lines` replaced by progress lines on stdout. Captured or logged stderr
    stays clean: a failing command prints exactly its one error line there."""
    import datasets

    if stderr_is_terminal() or datasets.are_progress_bars_disabled():  # (or an outer one hid them)
        yield
        return
    datasets.disable_progress_bars()  # downloads' and the others' bars too
    modules = [importlib.import_module(name) for name in DATASETS_BAR_MODULES] if lines else []
    bars = [module.hf_tqdm for module in modules]
    line_progress = _line_progress_class()
    for module in modules:
        module.hf_tqdm = line_progress
    try:
        yield
    finally:
        for module, bar in zip(modules, bars, strict=True):
            module.hf_tqdm = bar
        datasets.enable_progress_bars()

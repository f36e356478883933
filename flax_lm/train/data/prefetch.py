"""Prefetching: batches made and copied to devices in a background thread."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

_ITEM, _END, _ERROR = "item", "end", "error"


class Prefetcher:
    """Runs an iterator in a background thread, `size` items ahead, applying `put` (e.g. a
    jax.device_put with a NamedSharding) there, so batch making and host->device copies overlap
    the step. Exceptions in the thread are re-raised in the consumer; close() stops it.

    `wait_seconds` is the time the consumer spent waiting in __next__ (the input stall). When the
    source has a `state()` (TrainBatches), `state()` here is the source's position after the last
    item handed out, which is what a checkpoint must store (the source itself runs ahead).
    """

    def __init__(self, iterator: Iterable, size: int = 2, put: Callable | None = None):
        self._source_state = getattr(iterator, "state", None)
        self._state = self._source_state() if self._source_state else None
        self._source = iter(iterator)
        self._put = put
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="prefetcher", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                state = self._source_state() if self._source_state else None
                if self._put is not None:
                    item = self._put(item)
                if not self._offer((_ITEM, item, state)):
                    return
        except BaseException as err:  # re-raised in the consumer
            self._offer((_ERROR, err, None))
            return
        self._offer((_END, None, None))

    def _offer(self, entry: tuple) -> bool:
        """Queue `entry` unless close() is called meanwhile; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def state(self) -> dict[str, int] | None:
        return self._state

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        started = time.perf_counter()
        kind, value, state = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if kind == _ITEM:
            self._state = state
            return value
        self._finished = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread; items already made are dropped."""
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

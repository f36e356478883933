"""The one workaround for a bug of orbax-checkpoint: the reads a failed restore abandons.

orbax runs each restore's coroutines on an event loop of its own, made for the call and closed
when it returns (`asyncio_utils._run_sync_via_new_loop`). When one array of a damaged checkpoint
fails to read, `asyncio.gather` raises at once and orbax closes that loop while the reads of the
other arrays are still pending on it: as they finish, TensorStore's threads call back into the
closed loop ("Exception ignored ... RuntimeError: Event loop is closed") and asyncio reports the
tasks it destroys ("Task was destroyed but it is pending!"), after the run's own error line and
as late as exit. tests/test_checkpoint_restore.py reproduces it with orbax alone.

The fix, only when the coroutine failed: before the loop closes, let the tasks still pending on
it end as they would (each read finishes or fails on its own), so that every TensorStore
callback has reached the loop while it still runs. Cancelling them is not enough: a cancelled
read's TensorStore future still calls back into the loop when its thread gets to it, which may
be after the close. Reads still running after a grace period are cancelled, as a last resort.
(orbax avoids `asyncio.run` for its teardown's iteration over asyncio's global task set, which
other threads change; here that happens only after a failure, and if the set keeps changing the
tasks are left as orbax leaves them.) It replaces orbax's function once, on import; if a later
orbax renames it, the fix is skipped and that test says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from orbax.checkpoint._src import asyncio_utils

ORBAX_LOOP_RUNNER = "_run_sync_via_new_loop"  # orbax's function that closes its loop too early


def run_on_a_new_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """`coro` run to completion on a new event loop, as orbax runs it; if it fails, the tasks it
    leaves pending end before the loop closes."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            finish_pending_tasks(loop)
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def finish_pending_tasks(loop: asyncio.AbstractEventLoop, grace_seconds: float = 120.0) -> None:
    """Run `loop` until no task is left on it (the reads a failed gather abandoned, and those they
    start); tasks still running after `grace_seconds` are cancelled and awaited. Their failures
    are the damage the restore's own error already reports: asyncio is told not to report them
    again as never retrieved."""
    loop.set_exception_handler(not_the_abandoned_reads)
    deadline = time.monotonic() + grace_seconds
    while True:
        try:
            pending = asyncio.all_tasks(loop)
        except RuntimeError:  # other threads kept changing asyncio's task set: leave them, as orbax
            return
        if not pending:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            break
        loop.run_until_complete(asyncio.wait(pending, timeout=left))
    loop.run_until_complete(asyncio.sleep(0))  # callbacks posted as the last reads ended


def not_the_abandoned_reads(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler after a failed restore: a task's exception that nobody
    retrieved is one of the abandoned reads; anything else is reported as asyncio would."""
    if isinstance(context.get("future"), asyncio.Task) and "exception" in context:
        return
    loop.default_exception_handler(context)


def install() -> bool:
    """Make orbax close its restore loops as run_on_a_new_loop does; False where this orbax has
    no such function (a version that changed it)."""
    if not callable(getattr(asyncio_utils, ORBAX_LOOP_RUNNER, None)):
        return False
    setattr(asyncio_utils, ORBAX_LOOP_RUNNER, run_on_a_new_loop)
    return True


INSTALLED = install()

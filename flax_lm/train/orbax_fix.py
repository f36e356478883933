"""The one workaround for a bug of orbax-checkpoint: the reads a failed restore abandons.

orbax runs each restore's coroutines on an event loop of its own, made for the call and closed
when it returns (`asyncio_utils._run_sync_via_new_loop`). When one array of a damaged checkpoint
fails to read, `asyncio.gather` raises at once and orbax closes that loop while the reads of the
other arrays are still pending on it: as they finish, TensorStore's threads call back into the
closed loop ("Exception ignored ... RuntimeError: Event loop is closed") and asyncio reports the
tasks it destroys ("Task was destroyed but it is pending!"), after the run's own error line and
as late as exit. tests/test_checkpoint_restore.py reproduces it with orbax alone.

The fix does what `asyncio.run` does before closing its loop, and only when the coroutine failed:
cancel the tasks still pending on that loop and let them end. (orbax avoids `asyncio.run` for
its teardown's iteration over asyncio's global task set, which other threads change; here that
happens only after a failure, and if the set keeps changing the tasks are left as orbax leaves
them.) It replaces orbax's function once, on import; if a later orbax renames it, the fix is
skipped and that test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from orbax.checkpoint._src import asyncio_utils

ORBAX_LOOP_RUNNER = "_run_sync_via_new_loop"  # orbax's function that closes its loop too early


def run_on_a_new_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """`coro` run to completion on a new event loop, as orbax runs it; if it fails, the tasks it
    leaves pending are cancelled and awaited before the loop closes."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            cancel_pending_tasks(loop)
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def cancel_pending_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks left on `loop` (the reads a failed gather abandoned) and wait for them."""
    try:
        pending = asyncio.all_tasks(loop)
    except RuntimeError:  # other threads kept changing asyncio's task set: leave them, as orbax
        return
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def install() -> bool:
    """Make orbax close its restore loops as run_on_a_new_loop does; False where this orbax has
    no such function (a version that changed it)."""
    if not callable(getattr(asyncio_utils, ORBAX_LOOP_RUNNER, None)):
        return False
    setattr(asyncio_utils, ORBAX_LOOP_RUNNER, run_on_a_new_loop)
    return True


INSTALLED = install()

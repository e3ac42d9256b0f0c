"""Keep a long-running duty alive: run it, and when it fails log once, back off and start it again.

A seed's announce worker and maintenance loop run for weeks; one unexpected error (a full disk during GC, a
bug in a rare path) must not end them silently for the rest of the process's life.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from p2pmega.errors import P2PMegaError

log = logging.getLogger(__name__)

# The first restart waits BASE_DELAY_S; each further failure in a row doubles it, up to MAX_DELAY_S. A duty that
# ran for STABLE_AFTER_S before failing starts again from BASE_DELAY_S. Jitter (up to +50%) keeps many seeds that
# fail on the same cause (say a shared disk) from retrying in step.
BASE_DELAY_S = 1.0
MAX_DELAY_S = 300.0
STABLE_AFTER_S = 600.0

Sleep = Callable[[float], Awaitable[None]]


async def supervise(
    name: str,
    factory: Callable[[], Coroutine[Any, Any, None]],
    *,
    rng: random.Random | None = None,
    base_delay_s: float = BASE_DELAY_S,
    max_delay_s: float = MAX_DELAY_S,
    stable_after_s: float = STABLE_AFTER_S,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Run ``factory()`` until it returns; restart it after each exception, with backoff.

    A failure is logged at WARNING the first time (with its traceback unless it is a P2PMegaError, whose
    message says it all), and again only when its kind or message changes; the same failure repeated is
    logged at DEBUG, so a persistent fault gives one warning, not one per retry.
    Cancellation is never caught: cancelling the supervising task stops the duty.

    Args:
        name: what the duty is, for the log ("garbage collector").
        factory: makes a fresh coroutine of the duty on each start.
        rng: jitter source (a test passes a seeded one).
        base_delay_s, max_delay_s: the backoff's first and largest wait.
        stable_after_s: a run this long resets the backoff.
        sleep: how to wait (a test can pass a fake).
    """
    rng = rng or random.Random()  # noqa: S311 - jitter only
    loop = asyncio.get_running_loop()
    delay_s = base_delay_s
    last: tuple[type[BaseException], str] | None = None
    while True:
        started = loop.time()
        try:
            await factory()
            return
        except Exception as exc:
            if loop.time() - started >= stable_after_s:
                delay_s = base_delay_s
            wait_s = delay_s * (1.0 + rng.random() / 2)
            seen = (type(exc), str(exc))
            if seen != last:
                # Our own errors carry a full one-line message; anything else is a bug, whose traceback is
                # what a report needs.
                log.warning(
                    "%s failed (%s: %s); restarting it in %.3g s",
                    name,
                    type(exc).__name__,
                    exc,
                    wait_s,
                    exc_info=not isinstance(exc, P2PMegaError),
                )
                last = seen
            else:
                log.debug("%s failed again (%s: %s)", name, type(exc).__name__, exc)
        await sleep(wait_s)
        delay_s = min(delay_s * 2, max_delay_s)

"""net.supervise: a failed duty is logged once, backed off and restarted (issue 21, bug 3)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from p2pmega.errors import StorageError
from p2pmega.net.supervise import supervise


class FakeSleep:
    """Records the backoff waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.waits.append(delay_s)


async def test_restarts_after_failures_and_stops_when_the_duty_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []

    async def duty() -> None:
        runs.append(len(runs))
        if len(runs) <= 3:
            raise StorageError("disk full")

    sleep = FakeSleep()
    with caplog.at_level(logging.DEBUG, logger="p2pmega.net.supervise"):
        async with asyncio.timeout(5):
            await supervise("gc", duty, rng=random.Random(1), base_delay_s=1.0, sleep=sleep)
    assert runs == [0, 1, 2, 3]
    # Exponential backoff with at most +50% jitter: 1, 2, 4.
    assert all(base <= w <= base * 1.5 for base, w in zip([1, 2, 4], sleep.waits, strict=True))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the same failure repeated is logged once"
    assert "gc failed (StorageError: disk full)" in warnings[0].getMessage()


async def test_a_new_kind_of_failure_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    errors: list[Exception] = [StorageError("a"), StorageError("a"), ValueError("b")]

    async def duty() -> None:
        if errors:
            raise errors.pop(0)

    with caplog.at_level(logging.WARNING, logger="p2pmega.net.supervise"):
        async with asyncio.timeout(5):
            await supervise("announcer", duty, sleep=FakeSleep())
    assert [r.getMessage().split(" (")[1].split(":")[0] for r in caplog.records] == [
        "StorageError",
        "ValueError",
    ]


async def test_backoff_is_capped() -> None:
    failures = 12

    async def duty() -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("x")

    sleep = FakeSleep()
    async with asyncio.timeout(5):
        await supervise("d", duty, base_delay_s=1.0, max_delay_s=8.0, sleep=sleep)
    assert max(sleep.waits) <= 12.0
    assert sleep.waits[-1] >= 8.0


async def test_cancellation_stops_the_duty() -> None:
    started = asyncio.Event()

    async def duty() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(supervise("d", duty))
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

"""The web app's running shares and fetches: one task each, with the progress and outcome the page polls.

A job wraps one call of the use case the CLI runs (``api.share.share_on``, ``api.fetch_stream.open_stream``); it
only records what the call reports. An upload lives in the run's private directory until shared; a fetched file
never touches the disk: the browser's download request streams it (web.server.WebApp.job_file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pmega.errors import P2PMegaError

if TYPE_CHECKING:
    from p2pmega.api.fetch_stream import FileStream

log = logging.getLogger(__name__)

RUNNING = "running"
DONE = "done"
FAILED = "failed"
# How long a stopping app waits for its jobs to save their state (a share's placed chunks, a fetch's part file).
STOP_TIMEOUT_S = 10.0


@dataclass(eq=False)
class Job:
    """One share or fetch as the page sees it. ``result`` is JSON-ready; a fetch's comes as soon as its manifest is
    found (the page then starts the download), while the job still runs until the file is delivered."""

    id: str
    kind: str  # "share" or "fetch"
    workdir: (
        Path  # private to this job (a share's upload); removed once shared, or when the app stops
    )
    state: str = RUNNING
    done_bytes: int = 0
    total_bytes: int = 0
    error: str | None = None
    result: dict[str, Any] | None = None
    link: str | None = None  # a share's read link, for its QR code
    # A fetch's file, ready to stream; ``started`` once the browser asked for it (one download per fetch), then
    # ``delivered`` ends with the outcome of that download.
    stream: FileStream | None = field(default=None, repr=False)
    started: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    delivered: asyncio.Future[None] | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def progress(self, done: int, total: int) -> None:
        self.done_bytes, self.total_bytes = done, total

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "done": self.done_bytes,
            "total": self.total_bytes,
            "error": self.error,
            "result": self.result,
        }


class Jobs:
    """The jobs of one run of the app, each with a directory under ``root`` (mode 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: dict[str, Job] = {}

    def new(self, kind: str, *, workdir: bool = True) -> Job:
        """A job, not started yet, with a fresh private directory unless ``workdir`` is false."""
        job_id = secrets.token_hex(8)
        path = self.root / job_id
        if workdir:
            path.mkdir(mode=0o700)
        job = Job(job_id, kind, path)
        self.jobs[job_id] = job
        return job

    def start(self, job: Job, run: Callable[[Job], Awaitable[dict[str, Any]]]) -> None:
        """Run ``run(job)`` as a task; its return value becomes the result, a p2pmega error the message."""

        async def go() -> None:
            try:
                job.result = await run(job)
                job.state = DONE
            except P2PMegaError as exc:
                job.error, job.state = str(exc), FAILED
            except asyncio.CancelledError:
                job.error, job.state = "stopped", FAILED
                raise
            except Exception:
                # A bug: its traceback goes to the terminal (no locals, so no keys); the page gets a pointer there.
                log.exception("%s job failed", job.kind)
                job.error, job.state = (
                    "internal error; the terminal running p2pmega ui shows it",
                    FAILED,
                )

        job.task = asyncio.create_task(go(), name=f"ui-{job.kind}-{job.id}")

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    async def discard_files(self, job: Job) -> None:
        """Remove a job's directory (its upload); the job's record stays for the page."""
        await asyncio.to_thread(shutil.rmtree, job.workdir, True)

    async def stop(self) -> None:
        """Cancel what still runs (a share saves its state as on Ctrl-C), wait, drop every file."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, self.root, True)

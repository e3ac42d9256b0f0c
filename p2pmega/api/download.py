"""What a download is, whatever it writes to: the result, the names it may write, and _Download, which fetches a
file's chunks by the schedule (api/fetch_schedule.py) into a part file. fetch.py (a file), fetch_tree.py (a folder)
and fetch_stream.py (stdout, the web app) build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from p2pmega.api.fetch_schedule import FetchSchedule
from p2pmega.core.magnet import ReadCap
from p2pmega.core.manifest import Manifest
from p2pmega.errors import (
    ChunkUnavailable,
    OutputWriteFailed,
)
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.peers import batch_keys
from p2pmega.storage.part_file import (
    PartWriter,
    ResumeState,
)
from p2pmega.storage.tree_part import TreeWriter

log = logging.getLogger(__name__)

# Chunks downloading at once; spread over every holder, so each holder sees a few requests at a time. Measured
# with 256 MiB from 8 seeds, 2 MiB chunks (3 runs each): 6 -> 0.95-1.00 s, 8 -> 0.80-0.89 s, 10 -> 0.82-0.91 s,
# 12 -> 0.81-1.03 s, 16 -> 0.91-1.20 s. (With 1 MiB chunks 16 was best: about the same bytes in flight.)
FETCH_CONCURRENCY = 8
# The resume state is written after at most this many newly finished chunks (and on any exit).
STATE_SAVE_EVERY = 16

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    size: int
    chunks_total: int
    chunks_fetched: int
    chunks_resumed: int
    files: int | None = None  # a folder's files (None: a single file)


# The longest file name Linux, macOS and Windows file systems all take, in UTF-8 bytes (NAME_MAX).
MAX_NAME_BYTES = 255


def safe_name(name: str | None, fallback: str) -> str:
    """The manifest's name made safe as a single file name: no separators, no ``..``, no control characters,
    at most MAX_NAME_BYTES bytes of UTF-8 (cut between characters, never inside one)."""
    cleaned = "".join(ch for ch in (name or "") if ch.isprintable() and ch not in "/\\\x00")
    cleaned = cleaned.strip().lstrip(".").strip()
    cut = cleaned.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore").strip()
    return cut or fallback


class _Download:
    """One run of a download: a FetchSchedule asks each chunk of its holders, then it is decrypted and written.

    The first failure stops the schedule from asking for a new chunk, but the chunks under way are finished and
    recorded (a rerun does not fetch them again), then the failure is raised. A chunk no holder has is not such a
    failure: the others are still fetched (and kept for a rerun), and the missing ones are counted exactly.
    """

    def __init__(
        self,
        locator: HolderLocator,
        cap: ReadCap,
        manifest: Manifest,
        target: Path,
        progress: Progress | None,
        resume: ResumeState,
        writer: PartWriter | TreeWriter,
    ) -> None:
        self.locator, self.cap, self.manifest, self.target = locator, cap, manifest, target
        self.progress, self.resume, self.writer = progress, resume, writer
        self.chunk_size = manifest.chunk_size or 1
        self.resumed = len(resume.done)
        self.fetched = 0
        self.unsaved = 0
        self.done_bytes = sum(
            min(self.chunk_size, resume.size - i * self.chunk_size) for i in resume.done
        )
        self.missing: list[tuple[int, ChunkUnavailable]] = []
        self.schedule: FetchSchedule[int] | None = (
            None  # the last run's (tests read what it cancelled)
        )

    async def run(self) -> None:
        ids = self.manifest.chunk_ids
        todo = [i for i in range(len(ids)) if i not in self.resume.done]
        self._report()
        finished = False
        try:
            # Learn in one batch per likely holder which chunks each one has, before asking the DHT chunk by chunk.
            await self.locator.want([ids[i] for i in todo], placed_near=batch_keys(ids))
            sizes = [
                max(1, min(self.chunk_size, self.resume.size - i * self.chunk_size))
                for i in range(len(ids))
            ]
            # Each chunk goes to the holder expected to deliver it first, by measured rates; near the end a chunk
            # still on its way from a slow holder is asked of another too (api/fetch_schedule.py).
            self.schedule = FetchSchedule(
                self.locator,
                ids,
                todo,
                sizes,
                self._write,
                self._done,
                max_in_flight=FETCH_CONCURRENCY,
            )
            await self.schedule.run()
            self.missing = self.schedule.missing
            if self.missing:
                first = min(self.missing, key=lambda m: m[0])[1]
                raise _unavailable(len(self.missing), len(ids), self.resume, first) from first
            await self._on_disk(self.writer.finish, self.resume, self.target)
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(OutputWriteFailed):
                    await self._save()

    async def _done(self, index: int, written: int) -> None:
        self.resume.done.add(index)
        self.fetched += 1
        self.unsaved += 1
        self.done_bytes += written
        self._report()
        if self.unsaved >= STATE_SAVE_EVERY:
            self.unsaved = 0
            await self._save()

    def _write(self, index: int, data: bytes | memoryview) -> int:
        try:
            return self.writer.write_chunk(
                self.cap, self.manifest, index, data, index * self.chunk_size
            )
        except OSError as exc:
            raise _write_failed(self.target, exc) from exc

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done_bytes, self.resume.size)

    async def _save(self) -> None:
        await self._on_disk(self.writer.save, self.resume, frozenset(self.resume.done))

    async def _on_disk(self, call: Callable[..., object], *args: object) -> None:
        try:
            await asyncio.to_thread(call, *args)
        except OSError as exc:
            raise _write_failed(self.target, exc) from exc


def _unavailable(
    missing: int, total: int, resume: ResumeState, first: ChunkUnavailable
) -> ChunkUnavailable:
    """The fetch's own word for chunks no holder has: how many, and that what was fetched is kept."""
    return ChunkUnavailable(
        f"{missing} of {total} chunks {'has' if missing == 1 else 'have'} no reachable holder "
        f"({first}); {len(resume.done)} of {total} chunks are saved in {str(resume.part)!r}: "
        "run the same command again later to resume"
    )


def _write_failed(target: Path, exc: OSError) -> OutputWriteFailed:
    return OutputWriteFailed(
        f"cannot write {str(target)!r}: {exc.strerror or exc}; free space and run "
        "the same command again to resume"
    )

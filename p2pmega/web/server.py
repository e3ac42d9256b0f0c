"""``p2pmega ui``'s web app: the page and its JSON API on 127.0.0.1, over the same use cases as the CLI.

It renders and streams; sharing, fetching, checking and renewing are the ``api`` calls the commands make, all on
the one client node the app starts with. A file given to the page is streamed into a private directory of the data
dir, then shared as ``share FILE`` shares it; a fetched file goes to the browser as its chunks arrive, in order
(``fetch -o -``), never to disk. Nothing logs a link or a key.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from p2pmega.api.common import NetSettings
from p2pmega.api.download import safe_name
from p2pmega.api.fetch_stream import open_stream
from p2pmega.api.ls import (
    FileHealth,
    discard_share_state,
    forget,
    health_on,
    keep_alive_on,
    my_files,
)
from p2pmega.api.share import ShareResult, share_on
from p2pmega.errors import (
    BadOption,
    InputFileError,
    NetworkError,
    P2PMegaError,
    StorageError,
    UsageError,
)
from p2pmega.node import Node
from p2pmega.web.jobs import Job, Jobs

log = logging.getLogger(__name__)

# The browser sends a file in pieces of about this size; each is written from a worker thread.
UPLOAD_READ_BYTES = 1 << 20
# A fetch whose file the browser has not started to download this long after the page was told is given up: the
# page was closed. Far above the page's poll interval (250 ms) on a busy machine.
DOWNLOAD_START_TIMEOUT_S = 60.0
# An upload is refused unless the data dir keeps this much room besides it (the chunk store and state files).
UPLOAD_DISK_MARGIN_BYTES = 256 * 1000**2
# Default --max-upload: a file the page accepts is copied into the data dir before it is shared.
DEFAULT_MAX_UPLOAD_BYTES = 8 * 1000**3
STATIC_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "icon.svg": "image/svg+xml",
}


def _load_static() -> dict[str, bytes]:
    root = importlib.resources.files("p2pmega.web") / "static"
    return {name: (root / name).read_bytes() for name in STATIC_FILES}


class WebApp:
    """The routes of the page's API, bound to one network setting, one client node and one run directory."""

    def __init__(self, net: NetSettings, node: Node, jobs: Jobs, *, max_upload_bytes: int) -> None:
        self.net = net
        self.node = node
        self.jobs = jobs
        self.max_upload_bytes = max_upload_bytes
        self.static = _load_static()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.get("/static/{name}", self.static_file),
            # Chromium sometimes asks for /favicon.ico before it reads the page's icon link: the same icon, not a 404.
            web.get("/favicon.ico", self.favicon),
            web.get("/api/limits", self.limits),
            web.post("/api/share", self.start_share),
            web.post("/api/fetch", self.start_fetch),
            web.get("/api/jobs/{id}", self.job_state),
            web.get("/api/jobs/{id}/qr.svg", self.job_qr),
            web.get("/api/jobs/{id}/file", self.job_file),
            web.get("/api/files", self.files),
            web.get("/api/files/health", self.files_health),
            web.post("/api/files/{root}/keep-alive", self.file_keep_alive),
            web.post("/api/files/{root}/forget", self.file_forget),
        ]

    # --- the page ---

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.static["index.html"], content_type="text/html")

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(body=self.static[name], content_type=STATIC_FILES[name])

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(body=self.static["icon.svg"], content_type=STATIC_FILES["icon.svg"])

    async def limits(self, request: web.Request) -> web.Response:
        """What the page checks before it sends a file (a refused upload would only show as a reset)."""
        return web.json_response({"max_upload_bytes": self.max_upload_bytes})

    # --- share: the browser streams the file here, then the job shares it ---

    async def start_share(self, request: web.Request) -> web.Response:
        name = safe_name(request.query.get("name"), fallback="shared-file")
        length = request.content_length
        if length is None:
            return _error(411, "the upload gave no Content-Length")
        if length > self.max_upload_bytes:
            return _error(
                413,
                f"{name!r} is {length:,} bytes, over this app's limit of {self.max_upload_bytes:,} "
                "(p2pmega ui --max-upload); share it with `p2pmega share FILE`",
            )
        job = self.jobs.new("share")
        path = job.workdir / name
        try:
            await self._receive(request, path, length)
        except (
            BaseException
        ) as exc:  # also a browser gone mid-upload: nothing of it may stay behind
            await self.jobs.discard_files(job)
            del self.jobs.jobs[job.id]
            if isinstance(exc, P2PMegaError):
                return _p2pmega_error(exc)
            raise

        async def run(job: Job) -> dict[str, Any]:
            try:
                self._rejoin_if_alone()
                result = await share_on(self.node, path, net=self.net, progress=job.progress)
            finally:
                # The upload goes, so its share state (which holds the key) could never resume or repeat
                # this share: the link list keeps the link.
                try:
                    await discard_share_state(self.net.data_dir, path)
                except StorageError as exc:
                    log.warning("%s", exc)
                await self.jobs.discard_files(job)
            job.link = result.read_link
            return self.share_view(name, result)

        self.jobs.start(job, run)
        return web.json_response({"job": job.id})

    def share_view(self, name: str, result: ShareResult) -> dict[str, Any]:
        """What the page shows of a share: the link, and the countries and jurisdiction blocs of every chunk."""
        countries: dict[str, int] = {}
        for c in result.chunks:
            for cc in {h.country or "??" for h in c.holders}:
                countries[cc] = countries.get(cc, 0) + 1
        return {
            "link": result.read_link,
            "name": name,
            "size": result.size,
            "status": result.status,
            "chunk_count": result.chunk_count,
            "countries": dict(sorted(countries.items())),
            "chunks": [
                {
                    "kind": c.kind,
                    "index": c.index,
                    "countries": sorted({h.country or "??" for h in c.holders}),
                    "blocs": self.net.blocs.spanned(h.country for h in c.holders),
                }
                for c in result.chunks
            ],
        }

    def _rejoin_if_alone(self) -> None:
        """Join again if the node's join failed (the network was down) or it lost every contact since."""
        if self.node.dht_node.rejoin_in_background(self.net.bootstrap):
            log.info("joining the network again")

    async def _receive(self, request: web.Request, path: Path, length: int) -> None:
        """Write the request body to ``path`` (new, 0600), exactly ``length`` bytes.

        Raises:
            StorageError: the data dir has too little room, or writing failed.
            InputFileError: the body was not ``length`` bytes long.
        """
        free = (await asyncio.to_thread(shutil.disk_usage, path.parent)).free
        if free < length + UPLOAD_DISK_MARGIN_BYTES:
            raise StorageError(
                f"the data dir has {free:,} bytes free, too little to take a {length:,}-byte file; "
                "free some space or share it with `p2pmega share FILE`"
            )
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        received = 0
        try:
            async for piece in request.content.iter_chunked(UPLOAD_READ_BYTES):
                received += len(piece)
                if received > length:
                    break
                await asyncio.to_thread(_write_all, fd, piece)
        except OSError as exc:
            raise StorageError(f"cannot store the upload: {exc.strerror or exc}") from exc
        finally:
            await asyncio.to_thread(os.close, fd)
        if received != length:
            raise InputFileError(f"the upload was {received:,} bytes, not the {length:,} announced")

    # --- fetch: the job finds the manifest, then the browser's download request streams the chunks ---

    async def start_fetch(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
        except ValueError:
            return _error(400, "the request is not JSON")
        link = doc.get("link") if isinstance(doc, dict) else None
        if not isinstance(link, str):
            return _error(400, "no link given")
        job = self.jobs.new("fetch", workdir=False)  # a fetch writes nothing to disk

        async def run(job: Job) -> dict[str, Any]:
            self._rejoin_if_alone()
            opened = await open_stream(self.node, link.strip())
            try:
                if opened.is_folder:
                    raise BadOption(
                        "this link is a folder: a browser saves single files only; fetch it with "
                        "`p2pmega fetch LINK -o DIR`"
                    )
                job.total_bytes = opened.size
                result = {
                    "name": opened.name,
                    "size": opened.size,
                    "download": f"/api/jobs/{job.id}/file",
                }
                delivered = asyncio.get_running_loop().create_future()
                job.stream, job.delivered = opened, delivered
                # The page starts the browser's download once it sees this, then follows the job to its end.
                job.result = result
                try:
                    async with asyncio.timeout(DOWNLOAD_START_TIMEOUT_S):
                        await job.started.wait()
                except TimeoutError:
                    raise BrowserDownloadFailed(
                        "the browser did not start the download (was the page closed?); fetch the link again"
                    ) from None
                await delivered
                return result
            finally:
                job.stream = None
                await opened.close()

        self.jobs.start(job, run)
        return web.json_response({"job": job.id})

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            raise web.HTTPNotFound(text="no such job (the app was restarted?)\n")
        return job

    async def job_state(self, request: web.Request) -> web.Response:
        return web.json_response(self._job(request).view())

    async def job_qr(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.link is None:
            raise web.HTTPNotFound(text="this job has no link yet\n")
        try:
            svg = await asyncio.to_thread(qr_svg, job.link)
        except ValueError as exc:
            return _error(422, str(exc))
        return web.Response(body=svg, content_type="image/svg+xml")

    async def job_file(self, request: web.Request) -> web.StreamResponse:
        """The fetched file, decrypted chunk by chunk in order as the chunks arrive (bounded memory, no disk).

        A fetch that fails part way aborts the connection, so the browser shows a failed download rather than
        saving a short file; the job carries the error for the page.
        """
        job = self._job(request)
        if job.kind == "fetch" and job.started.is_set():
            raise web.HTTPGone(text="the file was downloaded already; fetch the link again\n")
        opened, delivered = job.stream, job.delivered
        if opened is None or delivered is None:
            raise web.HTTPNotFound(text="this job has no file (or it failed)\n")
        job.started.set()
        response = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": content_disposition(opened.name),
            }
        )
        response.content_length = opened.size
        try:
            await response.prepare(request)
            await opened.write_to(response.write, job.progress)
            await response.write_eof()
        except P2PMegaError as exc:
            _settle(delivered, exc)
            _abort(request)
        except (ConnectionError, asyncio.CancelledError) as exc:
            _settle(delivered, BrowserDownloadFailed("the browser stopped the download"))
            _abort(request)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except BaseException as exc:
            _settle(delivered, exc)  # a bug: the job logs its traceback
            _abort(request)
            raise
        else:
            _settle(delivered, None)
        return response

    # --- my files ---

    async def files(self, request: web.Request) -> web.Response:
        try:
            entries = await my_files(self.net.data_dir)
        except P2PMegaError as exc:
            return _p2pmega_error(exc)
        return web.json_response(
            [
                {
                    "root": e.root,
                    "link": e.link,
                    "name": e.name,
                    "size": e.size,
                    "shared_at": e.shared_at,
                }
                for e in entries
            ]
        )

    async def files_health(self, request: web.Request) -> web.Response:
        try:
            self._rejoin_if_alone()
            found = await health_on(self.node, await my_files(self.net.data_dir), geo=self.net.geo)
        except P2PMegaError as exc:
            return _p2pmega_error(exc)
        return web.json_response([health_view(h) for h in found])

    async def _entry_link(self, root: str) -> str:
        for entry in await my_files(self.net.data_dir):
            if entry.root == root:
                return entry.link
        raise web.HTTPNotFound(text="no such file in the list\n")

    async def file_keep_alive(self, request: web.Request) -> web.Response:
        try:
            link = await self._entry_link(request.match_info["root"])
            self._rejoin_if_alone()
            result = await keep_alive_on(self.node, link, geo=self.net.geo)
        except P2PMegaError as exc:
            return _p2pmega_error(exc)
        return web.json_response(
            {"renewed": result.renewed, "chunks": result.chunks, "healthy": result.healthy}
        )

    async def file_forget(self, request: web.Request) -> web.Response:
        try:
            forgotten = await forget(self.net.data_dir, request.match_info["root"])
        except P2PMegaError as exc:
            return _p2pmega_error(exc)
        return web.json_response({"forgotten": forgotten})


class BrowserDownloadFailed(NetworkError):
    """The browser never asked for, or stopped reading, a fetched file."""


def _settle(delivered: asyncio.Future[None], exc: BaseException | None) -> None:
    """End a fetch job's wait for its download (unless the job was stopped meanwhile)."""
    if delivered.done():
        return
    if exc is None:
        delivered.set_result(None)
    else:
        delivered.set_exception(exc)


def _abort(request: web.Request) -> None:
    """Reset the connection of a response that cannot be finished, so the browser fails the download."""
    if request.transport is not None:
        request.transport.abort()


def health_view(h: FileHealth) -> dict[str, Any]:
    return {
        "root": h.root,
        "health": h.health,
        "chunks": h.chunks,
        "chunks_short": h.chunks_short,
        "chunks_missing": h.chunks_missing,
        "countries": list(h.countries),
        "countries_unknown": h.countries_unknown,
        "lease_left_s": h.lease_left_s,
        "problem": h.problem,
    }


def content_disposition(name: str) -> str:
    """An attachment header naming ``name``: RFC 6266 ``filename*`` in UTF-8, an ASCII ``filename`` fallback."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def qr_svg(link: str) -> bytes:
    """The link as a QR code, an SVG image (black on white, the standard 4-module quiet zone).

    Raises:
        ValueError: the link is too long for any QR code.
    """
    import segno  # only when a QR code is drawn

    try:
        code = segno.make(link, error="m", micro=False)
    except segno.DataOverflowError as exc:
        raise ValueError("the link is too long for a QR code; copy it instead") from exc
    out = io.BytesIO()
    code.save(out, kind="svg", scale=4, border=4, xmldecl=False, title="read link")
    return out.getvalue()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _p2pmega_error(exc: P2PMegaError) -> web.Response:
    status = 400 if isinstance(exc, UsageError) else 507 if isinstance(exc, StorageError) else 502
    return _error(status, str(exc))

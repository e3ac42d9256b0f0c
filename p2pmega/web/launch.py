"""Starting and stopping ``p2pmega ui``: the listening socket on 127.0.0.1, the run's private directory, one client
node for the whole run, and the aiohttp runner around web.server.WebApp.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from p2pmega.api.common import NetSettings, client_node
from p2pmega.api.service import stop_signals
from p2pmega.errors import (
    BadOption,
    NetworkError,
    StorageError,
)
from p2pmega.node import Node
from p2pmega.web.guard import Guard, add_security_headers, new_token
from p2pmega.web.jobs import Jobs
from p2pmega.web.server import DEFAULT_MAX_UPLOAD_BYTES, WebApp

HOST = "127.0.0.1"
# Requests still open when the app stops (a download under way) get this long to finish.
SHUTDOWN_TIMEOUT_S = 2.0
UI_DIR = "ui"


@dataclass(frozen=True)
class Served:
    """What ``serve`` tells its caller once the page can be opened."""

    url: str  # with the token: the one line `p2pmega ui` prints
    opener: Path  # a 0600 page that redirects to ``url``: the browser opens it, so the token is not in argv


def _make_run_dir(data_dir: Path) -> Path:
    """``DATA_DIR/ui/run-PID`` (0700), after removing those of runs that are gone (a crash leaves files)."""
    base = data_dir / UI_DIR
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in base.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    run_dir = base / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700)
    return run_dir


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_opener(run_dir: Path, url: str) -> Path:
    path = run_dir / "open.html"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        target = html.escape(url, quote=True)
        f.write(
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={target}">'
            f'<title>p2pmega</title><a href="{target}">open p2pmega</a>\n'
        )
    return path


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: a free port).

    Raises:
        NetworkError: the port is taken or cannot be bound.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise NetworkError(
            f"cannot listen on {HOST}:{port}: {exc.strerror}; pick another --port"
        ) from exc
    return sock


async def serve(
    net: NetSettings,
    *,
    port: int = 0,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    on_ready: Callable[[Served], None],
) -> None:
    """Run a client node and the web app on 127.0.0.1 until SIGINT or SIGTERM; ``on_ready`` gets its URL once
    it listens (the node joins in the background meanwhile).

    Raises:
        BadOption: ``max_upload_bytes`` is not positive.
        BootstrapFailed: no bootstrap node given and no saved contact (nothing to join through).
        NetworkError: the port cannot be bound.
        StorageError: the data dir cannot be written.
    """
    if max_upload_bytes <= 0:
        raise BadOption(f"--max-upload {max_upload_bytes}: give a positive size, e.g. 8GB")
    with stop_signals() as stop:
        try:
            run_dir = await asyncio.to_thread(_make_run_dir, net.data_dir)
        except OSError as exc:
            raise StorageError(
                f"cannot create the app's directory in {str(net.data_dir)!r}: {exc.strerror}"
            ) from exc
        jobs = Jobs(run_dir)
        sock = bind(port)
        try:
            # One client node for the whole run: every share, fetch, check and keep-alive of the page runs on
            # it (the DHT is joined once). It joins in the background, so the page opens at once.
            async with client_node(net, join_in_background=True) as node:
                node.dht_node.keep_learning()  # it lives for hours: its table must keep up with the network
                await _serve_on(node, net, jobs, sock, max_upload_bytes, run_dir, on_ready, stop)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            await asyncio.to_thread(shutil.rmtree, run_dir, True)


async def _serve_on(
    node: Node,
    net: NetSettings,
    jobs: Jobs,
    sock: socket.socket,
    max_upload_bytes: int,
    run_dir: Path,
    on_ready: Callable[[Served], None],
    stop: asyncio.Event,
) -> None:
    bound = int(sock.getsockname()[1])
    guard = Guard(host=HOST, port=bound, token=new_token())
    app = web.Application(middlewares=[guard.middleware])
    app.on_response_prepare.append(add_security_headers)
    app.add_routes(WebApp(net, node, jobs, max_upload_bytes=max_upload_bytes).routes())
    # No access log: a request line can hold the token.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        url = guard.url(HOST, bound)
        opener = await asyncio.to_thread(_write_opener, run_dir, url)
        on_ready(Served(url, opener))
        await stop.wait()
    finally:
        await jobs.stop()
        await runner.cleanup()

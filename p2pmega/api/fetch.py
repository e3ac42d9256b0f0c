"""``fetch``: find the holders of a link's chunks, download and verify them in parallel, resume after a crash.

The output appears only when complete: chunks go into a part file next to it whose resume state records which
chunks it holds (storage/part_file.py), so a rerun after Ctrl-C, a crash or a network loss downloads only what is
missing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from p2pmega.api.common import NetSettings, client_node
from p2pmega.api.download import (
    FetchResult,
    Progress,
    _Download,
    safe_name,
)
from p2pmega.core.chunking import format_id
from p2pmega.core.magnet import KeepCap, ReadCap, parse_link
from p2pmega.core.manifest import Manifest
from p2pmega.errors import (
    BadLink,
    BadOption,
    OutputExists,
    OutputWriteFailed,
    UsageError,
)
from p2pmega.node import Node
from p2pmega.replicate.locator import HolderLocator
from p2pmega.replicate.manifest import walk_manifest
from p2pmega.storage.part_file import (
    PART_SUFFIX,
    STATE_SUFFIX,
    PartWriter,
    ResumeState,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")


async def fetch(
    link: str,
    *,
    net: NetSettings,
    output: Path | None = None,
    cwd: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_part: Callable[[Path], None] | None = None,
    stream: BinaryIO | None = None,
) -> FetchResult:
    """Download the file of a read link, verified chunk by chunk, to ``output`` (or cwd/NAME).

    An ``output`` that is a symbolic link is written through: the file it names is replaced, never the link.
    The finished file gets the mode any new file gets (0666 less the umask). ``on_part`` is told the path of
    the partial file once it exists (the CLI names it when interrupted). A shared folder is recreated under
    ``output`` (or cwd/NAME) by api.fetch_tree. With ``stream`` the file's bytes are written there in order
    as they arrive instead (api.fetch_stream); ``output`` is then ignored.

    Raises:
        BadLink: the link is malformed or is a keep-alive link.
        BadOption: ``stream`` given for a folder.
        OutputExists: the output exists and ``force`` is false.
        ManifestNotFound, ChunkUnavailable: no reachable holder has what is needed.
        IntegrityError: data that no holder can provide intact; UnsafePath: a folder path that could
            land outside the output (nothing is written).
    """
    cap = await _read_cap(link, output, force, stream)
    # With hints, the hinted holders are asked while the node joins: a file they hold needs no DHT at all.
    async with client_node(net, hints=cap.peers, join_in_background=bool(cap.peers)) as node:
        return await _fetch_on(node, cap, output, cwd, force, progress, on_part, stream)


async def fetch_on(
    node: Node,
    link: str,
    *,
    output: Path | None = None,
    cwd: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    on_part: Callable[[Path], None] | None = None,
    stream: BinaryIO | None = None,
) -> FetchResult:
    """``fetch`` on a node already joined (the web app's), which it leaves running. Concurrent fetches and
    shares may use the same node.

    Raises:
        BadLink, BadOption, OutputExists, ManifestNotFound, ChunkUnavailable, IntegrityError: as ``fetch``.
    """
    cap = await _read_cap(link, output, force, stream)
    return await _fetch_on(node, cap, output, cwd, force, progress, on_part, stream)


async def _read_cap(
    link: str, output: Path | None, force: bool, stream: BinaryIO | None
) -> ReadCap:
    """The link's read capability, once the output is known not to be in the way (before joining).

    Raises:
        BadLink: the link is malformed or is a keep-alive link.
        OutputExists: the output exists and ``force`` is false.
    """
    cap = parse_link(link)
    if isinstance(cap, KeepCap):
        raise BadLink("this is a keep-alive link: it can check and keep a file alive, not fetch it")
    if (
        stream is None
        and output is not None
        and not force
        and await asyncio.to_thread(_is_existing_file, output)
    ):
        raise OutputExists(f"{str(output)!r} exists; pass --force to overwrite it")
    return cap


async def _fetch_on(
    node: Node,
    cap: ReadCap,
    output: Path | None,
    cwd: Path | None,
    force: bool,
    progress: Progress | None,
    on_part: Callable[[Path], None] | None,
    stream: BinaryIO | None,
) -> FetchResult:
    locator = HolderLocator(node, hints=cap.peers)
    try:
        return await _fetch_with(locator, cap, output, cwd, force, progress, on_part, stream)
    finally:
        # Also when the manifest is not found: a node that outlives this fetch must not keep its search going.
        await locator.close()


async def _fetch_with(
    locator: HolderLocator,
    cap: ReadCap,
    output: Path | None,
    cwd: Path | None,
    force: bool,
    progress: Progress | None,
    on_part: Callable[[Path], None] | None,
    stream: BinaryIO | None,
) -> FetchResult:
    manifest = await walk_manifest(locator, cap)
    if manifest.is_tree and stream is not None:
        raise BadOption(
            f"the link is a folder ({len(manifest.chunk_ids)} chunks): -o - streams one file only; "
            "pass -o DIR"
        )
    if stream is not None:
        from p2pmega.api import fetch_stream  # it uses this module's names

        return await fetch_stream.stream(locator, cap, manifest, stream, progress)
    if manifest.is_tree:
        from p2pmega.api import fetch_tree  # it uses this module's download

        return await fetch_tree.fetch_tree(
            locator, cap, manifest, output, cwd or Path.cwd(), force, progress, on_part
        )
    try:
        target = await asyncio.to_thread(_target, output, cwd or Path.cwd(), manifest, cap)
        exists = await asyncio.to_thread(target.exists)
    except OSError as exc:  # a path too long for this file system, a folder we may not read
        where = output if output is not None else cwd or Path.cwd()
        raise OutputWriteFailed(
            f"cannot write the file in {str(where)!r}: {exc.strerror or exc}; pass -o PATH"
        ) from exc
    if exists and not force:
        raise OutputExists(f"{str(target)!r} exists; pass --force to overwrite it")
    return await _download(locator, cap, manifest, target, progress, on_part)


def _is_existing_file(path: Path) -> bool:
    return path.exists() and not path.is_dir()


def _target(output: Path | None, cwd: Path, manifest: Manifest, cap: ReadCap) -> Path:
    name = safe_name(manifest.name, fallback=f"p2pmega-{format_id(cap.root)[:16]}")
    if output is None:
        target = cwd / name
    elif output.is_dir():
        target = output / name
    else:
        target = output
    # A link (given with -o, or met at ./NAME) means the file it names: write through it, keep the link.
    return target.resolve() if target.is_symlink() else target


async def _download(
    locator: HolderLocator,
    cap: ReadCap,
    manifest: Manifest,
    target: Path,
    progress: Progress | None,
    on_part: Callable[[Path], None] | None = None,
) -> FetchResult:
    """Download every data chunk not already in the part file, then rename it to ``target``.

    Raises:
        ChunkUnavailable: some chunks have no reachable holder (the others are kept for a rerun).
        OutputWriteFailed: the part file cannot be written.
        UsageError: nothing can be created next to ``target``.
    """
    resume = ResumeState(
        part=target.with_name(f".{target.name}{PART_SUFFIX}"),
        state=target.with_name(f".{target.name}{STATE_SUFFIX}"),
        root=cap.root.hex(),
        size=manifest.size or 0,
        done=set(),
    )
    try:
        await asyncio.to_thread(resume.load)
        writer = await asyncio.to_thread(
            PartWriter.open, resume.part, resume.size, manifest.chunk_size or 1, bool(resume.done)
        )
    except OSError as exc:
        raise UsageError(f"cannot write next to {str(target)!r}: {exc.strerror}") from exc
    if on_part is not None:
        on_part(resume.part)
    download = _Download(locator, cap, manifest, target, progress, resume, writer)
    try:
        await download.run()
    finally:
        await asyncio.to_thread(writer.close)
    return FetchResult(
        target, resume.size, len(manifest.chunk_ids), download.fetched, download.resumed
    )

"""Folders, streams and QR links end to end: the real console script against a real ``p2pmega testnet``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import segno

from p2pmega.core.magnet import ReadCap, format_link
from p2pmega.core.manifest import FileEncoder
from p2pmega.net.transfer_client import TransferClient
from tests.integration.cli_helpers import P2PMEGA, RunningTestnet, run, running_testnet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1 << 20


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestnet]:
    with running_testnet(tmp_path_factory.mktemp("testnet")) as running:
        yield running


def _share(net: RunningTestnet, path: Path | str, data_dir: Path, *extra: str, **kw):
    return run("share", str(path), "--data-dir", str(data_dir), *extra, env=net.env, **kw)


def _fetch(net: RunningTestnet, link: str, out: Path, data_dir: Path, *extra: str):
    return run("fetch", link, "-o", str(out), "--data-dir", str(data_dir), *extra, env=net.env)


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def _make_tree(root: Path) -> None:
    (root / "docs" / "ünïcödé 文件").mkdir(parents=True)
    (root / "empty dir").mkdir()
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "ünïcödé 文件" / "naïve résumé.txt").write_text("bonjour ✓\n", "utf-8")
    (root / "docs" / "deep" / "er" / "big.bin").write_bytes(os.urandom(5 * MIB + 123))
    (root / "docs" / "deep" / "zero.bin").write_bytes(b"")
    (root / "a.txt").write_bytes(b"a" * 1000)
    (root / "🌍.bin").write_bytes(os.urandom(MIB // 3))


def test_folder_round_trips_with_nested_empty_and_unicode_names(
    net: RunningTestnet, tmp_path: Path
) -> None:
    src = tmp_path / "photos"
    _make_tree(src)
    (src / "link-out").symlink_to("/etc/passwd")
    shared = _share(net, src, tmp_path / "c1")
    assert shared.returncode == 0, shared.stderr
    link = shared.stdout.strip()
    assert link.startswith("magnet:?xt=urn:p2pmega:")
    assert "\n" not in link
    warnings = [line for line in shared.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "p2pmega: warning: skipped 1 symbolic links or special files ('link-out'): "
        "only folders and regular files are shared"
    ]
    assert "shared 5 files in " in shared.stderr

    out = tmp_path / "out" / "restored"
    fetched = _fetch(net, link, out, tmp_path / "c2")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == str(out)
    assert "in 5 files, all verified" in fetched.stderr
    expected = _snapshot(src)
    del expected["link-out"]
    assert _snapshot(out) == expected  # names, contents, the empty directory; nothing left over
    assert (out / "empty dir").is_dir()

    # Without -o the folder lands at ./NAME; a second fetch there refuses to overwrite without --force.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    again = run("fetch", link, "--data-dir", str(tmp_path / "c3"), env=net.env, cwd=cwd)
    assert again.returncode == 0, again.stderr
    assert _snapshot(cwd / "photos") == expected
    third = run("fetch", link, "--data-dir", str(tmp_path / "c3"), env=net.env, cwd=cwd)
    assert third.returncode == 2, third.stderr
    assert "exists; pass --force" in third.stderr


def _raw_listing(entries: list[tuple[str, int | None]]) -> bytes:
    """A listing in the format's bytes with no checks at all (core.tree.encode_listing refuses these)."""
    parts = [struct.pack(">I", len(entries))]
    for path, size in entries:
        raw = path.encode("utf-8")
        parts.append(struct.pack(">BH", 0 if size is None else 1, len(raw)) + raw)
        if size is not None:
            parts.append(struct.pack(">Q", size))
    return b"".join(parts)


def _place_crafted_tree(net: RunningTestnet, entries: list[tuple[str, int | None]]) -> str:
    """Seal a folder with this listing through the real encoder, store it on two seeds, return its link."""
    listing = _raw_listing(entries)
    stream = listing + b"".join(b"x" * (size or 0) for _, size in entries)
    chunk_size = 64 * 1024
    encoder = FileEncoder(
        name="evil", size=len(stream), chunk_size=chunk_size, listing_bytes=len(listing)
    )
    chunks = [
        encoder.encode_chunk(i, stream[i * chunk_size : (i + 1) * chunk_size])
        for i in range(encoder.chunk_count)
    ]
    cap, manifest = encoder.finish()
    holders = [
        (p["address"].rsplit(":", 1)[0], int(p["address"].rsplit(":", 1)[1]))
        for p in net.peers[:1]
        + [q for q in net.peers if q["country"] != net.peers[0]["country"]][:1]
    ]

    async def store_all() -> None:
        async with TransferClient() as client:
            for holder in holders:
                for chunk_id, data in [*chunks, *manifest]:
                    async with asyncio.timeout(30):
                        assert await client.store(holder, chunk_id, data, 3600)

    asyncio.run(store_all())
    return format_link(ReadCap(cap.root, cap.key, peers=tuple(holders)))


@pytest.mark.parametrize("evil", ["../x", "/etc/x", "a/../../x", "a/./x", "a//x", "x\x00y"])
def test_crafted_folder_paths_are_refused_and_nothing_is_written(
    net: RunningTestnet, tmp_path: Path, evil: str
) -> None:
    entries: list[tuple[str, int | None]] = [("a", None), ("a/ok.txt", 3), (evil, 5)]
    link = _place_crafted_tree(net, entries)
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "keep.txt").write_bytes(b"keep")
    before = _snapshot(tmp_path)
    fetched = _fetch(net, link, parent / "dest", tmp_path / "client")
    assert fetched.returncode == 5, fetched.stderr
    lines = fetched.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("p2pmega: error: folder listing refused: ")
    assert fetched.stdout == ""
    after = _snapshot(tmp_path)
    # The client's data dir may have saved contacts; nothing else changed, and dest was never made.
    assert {k: v for k, v in after.items() if not k.startswith("client")} == before
    assert not (parent / "dest").exists()
    assert not Path("/etc/x").exists()


def test_a_folder_link_to_stdout_is_a_usage_error(net: RunningTestnet, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"f")
    link = _share(net, src, tmp_path / "c").stdout.strip()
    fetched = run("fetch", link, "-o", "-", "--data-dir", str(tmp_path / "c"), env=net.env)
    assert fetched.returncode == 2
    assert fetched.stdout == ""
    assert "the link is a folder" in fetched.stderr
    assert "pass -o DIR" in fetched.stderr


def _stream_fetch(net: RunningTestnet, link: str, data_dir: Path) -> tuple[str, int, int]:
    """``p2pmega fetch LINK -o - | sha256sum``: the digest sha256sum printed, fetch's exit code and peak RSS."""
    fetch = subprocess.Popen(
        [*P2PMEGA, "fetch", link, "-o", "-", "--data-dir", str(data_dir)],
        env=net.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert fetch.stdout is not None
    digest = subprocess.run(
        [shutil.which("sha256sum") or "/usr/bin/sha256sum"],
        stdin=fetch.stdout,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    fetch.stdout.close()
    # wait4 gives the fetch process's own peak resident set (ru_maxrss, KiB on Linux).
    _, status, usage = os.wait4(fetch.pid, 0)
    fetch.returncode = os.waitstatus_to_exitcode(status)
    return digest.stdout.split()[0], fetch.returncode, usage.ru_maxrss * 1024


def test_stream_50_mib_to_sha256sum_with_flat_memory(net: RunningTestnet, tmp_path: Path) -> None:
    small, big = os.urandom(MIB), os.urandom(50 * MIB)
    links = {}
    for name, data in (("small.bin", small), ("big.bin", big)):
        (tmp_path / name).write_bytes(data)
        shared = _share(net, tmp_path / name, tmp_path / "c")
        assert shared.returncode == 0, shared.stderr
        links[name] = shared.stdout.strip()
    digest_small, code_small, rss_small = _stream_fetch(net, links["small.bin"], tmp_path / "c")
    digest_big, code_big, rss_big = _stream_fetch(net, links["big.bin"], tmp_path / "c")
    assert (code_small, code_big) == (0, 0)
    assert digest_small == hashlib.sha256(small).hexdigest()
    assert digest_big == hashlib.sha256(big).hexdigest()
    # Reported for the record (shown with -s): the numbers README quotes.
    sys.stderr.write(
        f"peak RSS of fetch -o -: 1 MiB file {rss_small / MIB:.1f} MiB, "
        f"50 MiB file {rss_big / MIB:.1f} MiB\n"
    )
    # Flat: fifty times the file adds well under half of it (at most FETCH_CONCURRENCY chunks are held).
    assert rss_big - rss_small < 25 * MIB, (rss_small, rss_big)


def test_stream_into_a_closed_pipe_ends_quietly(net: RunningTestnet, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(os.urandom(8 * MIB))
    link = _share(net, tmp_path / "f.bin", tmp_path / "c").stdout.strip()
    fetch = subprocess.Popen(
        [*P2PMEGA, "fetch", link, "-o", "-", "--data-dir", str(tmp_path / "c")],
        env=net.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert fetch.stdout is not None
    assert fetch.stderr is not None
    assert len(fetch.stdout.read(1000)) == 1000  # like `| head -c 1000`
    fetch.stdout.close()
    err = fetch.stderr.read().decode()
    fetch.stderr.close()
    assert fetch.wait(timeout=60) == 141
    assert err == ""


def test_share_from_a_pipe_round_trips(net: RunningTestnet, tmp_path: Path) -> None:
    data = os.urandom(4 * MIB + 777)
    share = subprocess.Popen(
        [*P2PMEGA, "share", "-", "--name", "piped.bin", "--data-dir", str(tmp_path / "c")],
        env=net.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = share.communicate(data, timeout=120)
    assert share.returncode == 0, err
    link = out.decode().strip()
    dest = tmp_path / "dest"
    dest.mkdir()
    fetched = _fetch(net, link, dest, tmp_path / "c2")
    assert fetched.returncode == 0, fetched.stderr
    assert (dest / "piped.bin").read_bytes() == data


def _matrix_of(drawing: str) -> list[list[int]]:
    """The QR modules a half-block drawing shows: 1 where a module is dark (not drawn; see cli.qr_text)."""
    halves = {" ": (1, 1), "▀": (0, 1), "▄": (1, 0), "█": (0, 0)}
    rows: list[list[int]] = []
    for line in drawing.splitlines():
        pairs = [halves[ch] for ch in line]
        rows.append([top for top, _ in pairs])
        rows.append([bottom for _, bottom in pairs])
    return rows


def test_share_qr_draws_the_link(net: RunningTestnet, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_bytes(b"hello")
    shared = _share(net, tmp_path / "f.txt", tmp_path / "c", "--qr")
    assert shared.returncode == 0, shared.stderr
    link = shared.stdout.strip()
    drawing = "\n".join(
        line for line in shared.stderr.splitlines() if line and set(line) <= set(" ▀▄█")
    )
    shown = _matrix_of(drawing)
    # segno's own matrix for the link, with the 4-module quiet zone the drawing has.
    qr = segno.make_qr(link, error="l", boost_error=False)
    size = len(qr.matrix) + 8
    expected = [[0] * size for _ in range(4)]
    expected += [[0] * 4 + list(row) + [0] * 4 for row in qr.matrix]
    expected += [[0] * size for _ in range(4)]
    assert shown[: len(expected)] == expected
    assert len(shown) - len(expected) in (0, 1)  # an odd height ends with a padding half row


def test_folder_fetch_killed_half_way_resumes(net: RunningTestnet, tmp_path: Path) -> None:
    src = tmp_path / "many"
    (src / "sub").mkdir(parents=True)
    files = {f"sub/f{i:02}.bin": os.urandom(3 * MIB + i) for i in range(16)}
    files["top.bin"] = os.urandom(20 * MIB)
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    link = _share(net, src, tmp_path / "c").stdout.strip()
    out = tmp_path / "out"
    state = out / ".p2pmega-part" / "state"
    proc = subprocess.Popen(
        [*P2PMEGA, "fetch", link, "-o", str(out), "--data-dir", str(tmp_path / "c2")],
        env=net.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert state.exists(), "the fetch finished (or never started) before it could be killed"
    assert [p.name for p in out.iterdir()] == [".p2pmega-part"]  # nothing at a listed path yet

    again = _fetch(net, link, out, tmp_path / "c2")
    assert again.returncode == 0, again.stderr
    assert _snapshot(out) == _snapshot(src)
    words = again.stderr.strip().splitlines()[-1].split()
    fetched, total, resumed = int(words[1]), int(words[3]), int(words[5].lstrip("("))
    assert resumed >= 16, words
    assert fetched == total - resumed, words


def test_empty_folder_and_unchanged_reshare(net: RunningTestnet, tmp_path: Path) -> None:
    src = tmp_path / "nothing"
    src.mkdir()
    first = _share(net, src, tmp_path / "c")
    assert first.returncode == 0, first.stderr
    again = _share(net, src, tmp_path / "c")
    assert again.stdout == first.stdout  # the same link: the folder is unchanged
    assert "already shared and unchanged" in again.stderr
    (src / "new.txt").write_text("now")
    changed = _share(net, src, tmp_path / "c")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout != first.stdout
    checked = run("check", first.stdout.strip(), "--data-dir", str(tmp_path / "c"), env=net.env)
    assert checked.returncode == 0, checked.stderr
    out = tmp_path / "restored"
    fetched = _fetch(net, first.stdout.strip(), out, tmp_path / "c")
    assert fetched.returncode == 0, fetched.stderr
    assert out.is_dir()
    assert not list(out.iterdir())

"""``p2pmega ui`` in a real Chromium (Debian's, driven by playwright) against a real ``p2pmega testnet``.

Chromium is /usr/bin/chromium (or $P2PMEGA_CHROMIUM); .ci/run installs it. Without it the browser test is skipped,
except in CI, where it fails. Set P2PMEGA_UI_SCREENSHOT=docs/ui.png to keep the page's screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from p2pmega.storage.share_state import SHARES_DIR, state_path
from tests.integration.cli_helpers import (
    P2PMEGA,
    RunningTestnet,
    run,
    running_testnet,
    stored_chunk_files,
)

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Playwright

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM = Path(os.environ.get("P2PMEGA_CHROMIUM", "/usr/bin/chromium"))
# A fresh profile per run (launch_persistent_context below), and no traffic of Chromium's own: without the
# background-networking flags it keeps calling Google's services, which a closed network never answers.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Long enough for a share or fetch of a few MiB on a busy 2-core machine; reached only when something is broken.
STEP_TIMEOUT_MS = 60_000
UI_START_TIMEOUT_S = 30.0


@dataclass
class RunningUI:
    url: str  # with the token
    host: str
    port: int
    token: str
    data_dir: Path
    pid: int


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTestnet]:
    with running_testnet(tmp_path_factory.mktemp("testnet")) as running:
        yield running


@pytest.fixture(scope="module")
def ui(net: RunningTestnet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningUI]:
    """``p2pmega ui --no-open``; on exit SIGINT must stop it cleanly, with nothing but the URL on stdout."""
    data_dir = tmp_path_factory.mktemp("ui") / "client"
    proc = subprocess.Popen(
        [*P2PMEGA, "ui", "--no-open", "--data-dir", str(data_dir)],
        env=net.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # blocks until the app listens (or the process died)
        if not url.startswith("http://127.0.0.1:"):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"p2pmega ui did not start: {url!r} {err[-2000:]}")
        parts = urlsplit(url)
        assert parts.port is not None
        token = parts.query.removeprefix("token=")
        yield RunningUI(url, "127.0.0.1", parts.port, token, data_dir, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=UI_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
            raise
    assert proc.returncode == 0, err
    assert out == "", "stdout carries the URL and nothing else"
    assert "Traceback" not in err
    assert not list((data_dir / "ui").glob("run-*")), "the app left its files behind"


def _request(
    ui: RunningUI, method: str, path: str, *, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(ui.host, ui.port, timeout=30)
    conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers or {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_the_app_refuses_requests_without_the_token_or_from_a_foreign_host(ui: RunningUI) -> None:
    own = f"{ui.host}:{ui.port}"
    cookie = f"p2pmega-ui-{ui.port}={ui.token}"
    assert _request(ui, "GET", "/").status == 403
    assert _request(ui, "GET", "/api/files").status == 403
    assert _request(ui, "GET", "/static/app.js").status == 403
    assert _request(ui, "GET", "/?token=" + "A" * len(ui.token)).status == 403
    assert _request(ui, "GET", "/", headers={"Cookie": f"p2pmega-ui-{ui.port}=wrong"}).status == 403
    # DNS rebinding: the right token (even the right cookie) under another name is refused.
    rebound = {"Host": f"attacker.example:{ui.port}"}
    assert _request(ui, "GET", f"/?token={ui.token}", headers=rebound).status == 403
    assert _request(ui, "GET", "/api/files", headers={**rebound, "Cookie": cookie}).status == 403
    assert (
        _request(ui, "GET", "/", headers={"Host": f"{ui.host}:1", "Cookie": cookie}).status == 403
    )
    # A page of another site posting with the user's cookie (were it sent) is refused by its Origin.
    for origin in ("http://attacker.example", "null"):
        posted = _request(
            ui, "POST", "/api/fetch", headers={"Cookie": cookie, "Origin": origin, "Host": own}
        )
        assert posted.status == 403
    assert _request(ui, "POST", "/api/fetch", headers={"Cookie": cookie}).status == 403

    first = _request(ui, "GET", f"/?token={ui.token}")
    assert first.status == 200
    set_cookie = first.getheader("Set-Cookie") or ""
    assert set_cookie.startswith(f"p2pmega-ui-{ui.port}={ui.token};")
    assert "HttpOnly" in set_cookie
    assert "SameSite=Strict" in set_cookie
    page = _request(ui, "GET", "/", headers={"Cookie": cookie, "Origin": "http://attacker.example"})
    assert page.status == 200
    assert page.getheader("Content-Security-Policy", "").startswith("default-src 'self'")
    assert not [h for h, _ in page.getheaders() if h.lower().startswith("access-control-")]
    assert (
        _request(ui, "GET", "/", headers={"Host": f"localhost:{ui.port}", "Cookie": cookie}).status
        == 200
    )


def test_an_upload_over_the_limit_is_refused_before_a_byte_is_stored(ui: RunningUI) -> None:
    conn = http.client.HTTPConnection(ui.host, ui.port, timeout=30)
    own = f"http://{ui.host}:{ui.port}"
    cookie = f"p2pmega-ui-{ui.port}={ui.token}"
    conn.putrequest("POST", "/api/share?name=huge.bin")
    for header, value in (("Cookie", cookie), ("Origin", own), ("Content-Length", str(9 * 10**9))):
        conn.putheader(header, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 413
    assert "over this app's limit of 8,000,000,000" in body
    assert not [p for p in (ui.data_dir / "ui").rglob("*") if p.is_file() and p.name != "open.html"]


def _chromium_or_skip() -> None:
    if CHROMIUM.exists():
        return
    message = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set P2PMEGA_CHROMIUM)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs it (.ci/run): a missing browser must not pass as a skip
    pytest.skip(message)


@contextlib.contextmanager
def _chromium(pw: Playwright, tmp_path: Path) -> Iterator[BrowserContext]:
    browser = pw.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"),
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        accept_downloads=True,
        viewport={"width": 1200, "height": 900},
    )
    try:
        yield browser
    finally:
        browser.close()


def _udp_ports(pid: int) -> set[int]:
    """The local ports of the UDP sockets process ``pid`` holds: a DHT node's (the app has no other UDP)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("udp", "udp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = (
                    line.split()
                )  # sl local_address rem_address st queues tr retrnsmt uid timeout inode
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _state_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / SHARES_DIR).glob("*.json"))


def test_the_page_shares_fetches_and_lists_my_files(
    net: RunningTestnet, ui: RunningUI, tmp_path: Path
) -> None:
    _chromium_or_skip()
    from playwright.sync_api import Dialog, expect, sync_playwright

    picked = tmp_path / "holiday photos.bin"
    picked.write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    by_cli = tmp_path / "Bericht für März.txt"
    by_cli.write_bytes(os.urandom(300_000))
    shared = run("share", str(by_cli), "--data-dir", str(ui.data_dir), env=net.env)
    assert shared.returncode == 0, shared.stderr
    cli_link = shared.stdout.strip()

    cli_state = state_path(ui.data_dir, by_cli.resolve())
    assert _state_files(ui.data_dir) == [cli_state], "share keeps its state (with the key)"
    folder = tmp_path / "a folder"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "x.txt").write_bytes(b"in a folder")
    shared_folder = run("share", str(folder), "--data-dir", str(tmp_path / "cli"), env=net.env)
    assert shared_folder.returncode == 0, shared_folder.stderr
    folder_link = shared_folder.stdout.strip()

    with sync_playwright() as pw, _chromium(pw, tmp_path) as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda m: errors.append(f"{m.text} {m.location}") if m.type == "error" else None,
        )  # a CSP violation or a missing file shows up here
        # As `p2pmega ui` opens it: a private file redirecting to the URL (a cross-site navigation, so the
        # SameSite=Strict cookie must be set and used by the app's own pages).
        (opener,) = (ui.data_dir / "ui").glob("run-*/open.html")
        assert ui.url in opener.read_text("utf-8")
        page.goto(opener.as_uri())
        page.wait_for_url(f"http://{ui.host}:{ui.port}/")
        expect(page.locator("h1")).to_have_text("p2pmega")
        assert urlsplit(page.url).query == "", "the token left the address bar"
        # The app runs one client node from start to end: one DHT socket, the same before and after a share
        # and a fetch (a node per action would show none while idle, or a new port each time). Idle: once the
        # page's first check of my files is over.
        expect(page.locator("#files-table td.health.checking")).to_have_count(
            0, timeout=STEP_TIMEOUT_MS
        )
        node_ports = _udp_ports(ui.pid)
        assert len(node_ports) == 1, node_ports

        # Share: pick a file; the link appears; the CLI fetches the same bytes.
        page.set_input_files("#share-file", str(picked))
        link_box = page.locator("#share-jobs input.link")
        expect(link_box).to_have_value(
            re.compile(r"^magnet:\?xt=urn:p2pmega:"), timeout=STEP_TIMEOUT_MS
        )
        link = link_box.input_value()
        expect(page.locator("#share-jobs .job")).to_contain_text("Chunks by country")
        qr = page.locator("#share-jobs img.qr")
        expect(qr).to_be_visible()
        assert qr.evaluate("img => img.complete && img.naturalWidth > 0"), (
            "the QR code did not load"
        )
        # Each chunk's countries and jurisdiction blocs (the testnet's countries are in the shipped bloc table
        # or are blocs of their own).
        where = page.locator("#share-jobs .job li").first.text_content() or ""
        assert re.fullmatch(
            r"data 0: [A-Z]{2}(, [A-Z]{2})+ \(blocs: [A-Z-]+(, [A-Z-]+)*\)", where
        ), where
        assert _udp_ports(ui.pid) == node_ports
        # The upload is gone, so its share state would only keep its key on disk: the link list keeps the link.
        assert _state_files(ui.data_dir) == [cli_state]
        out = tmp_path / "fetched-by-cli.bin"
        fetched = run(
            "fetch", link, "-o", str(out), "--data-dir", str(tmp_path / "cli"), env=net.env
        )
        assert fetched.returncode == 0, fetched.stderr
        assert _sha256(out) == _sha256(picked)

        # Fetch: paste a link, press Enter; the browser downloads the same bytes under the file's name.
        with page.expect_download(timeout=STEP_TIMEOUT_MS) as download_info:
            page.fill("#fetch-link", cli_link)
            page.press("#fetch-link", "Enter")
        download = download_info.value
        assert download.failure() is None
        assert download.suggested_filename == by_cli.name
        assert _sha256(Path(download.path())) == _sha256(by_cli)
        expect(page.locator("#fetch-jobs .job.done")).to_have_count(1, timeout=STEP_TIMEOUT_MS)
        assert _udp_ports(ui.pid) == node_ports

        # A folder's link: the page says to use the CLI.
        page.fill("#fetch-link", folder_link)
        page.press("#fetch-link", "Enter")
        expect(page.locator("#fetch-jobs .error").first).to_contain_text(
            "this link is a folder: a browser saves single files only; fetch it with "
            "`p2pmega fetch LINK -o DIR`",
            timeout=STEP_TIMEOUT_MS,
        )

        # A malformed link: a clear message on the page, no stack trace.
        page.fill("#fetch-link", "magnet:?xt=urn:p2pmega:not-a-link")
        page.press("#fetch-link", "Enter")
        error = page.locator("#fetch-jobs .error").first
        expect(error).to_contain_text("link", timeout=STEP_TIMEOUT_MS)
        assert "Traceback" not in error.inner_text()

        # My files: both shares (page and CLI), each with its health.
        page.click("#files-refresh")
        rows = page.locator("#files-table tbody tr")
        expect(rows).to_have_count(2)
        expect(page.locator("#files-table td.health.healthy")).to_have_count(
            2, timeout=STEP_TIMEOUT_MS
        )
        names = rows.locator("td.name").all_inner_texts()
        assert sorted(names) == sorted([picked.name, by_cli.name])
        page.locator("#fetch-jobs .job.failed").evaluate_all(
            "nodes => nodes.forEach(n => n.remove())"
        )
        shot = page.screenshot(full_page=True)
        if target := os.environ.get("P2PMEGA_UI_SCREENSHOT"):
            Path(target).write_bytes(shot)

        # Keep alive renews every live holder's lease; forget takes a file off the list (after saying what stays).
        row = rows.filter(has_text=picked.name)
        row.locator("button.keep").click()
        expect(page.locator("#files-status")).to_have_text(
            re.compile(rf"^{re.escape(picked.name)}: renewed \d+ leases on its \d+ chunks$"),
            timeout=STEP_TIMEOUT_MS,
        )
        dialogs: list[str] = []

        def accept(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.once("dialog", accept)
        rows.filter(has_text=by_cli.name).locator("button.forget").click()
        expect(rows).to_have_count(1)
        assert "keep the encrypted chunks until their leases end" in dialogs[0]
        assert "its key is deleted from this computer's data dir" in dialogs[0]
        assert by_cli.name not in (ui.data_dir / "links.json").read_text("utf-8")
        assert _state_files(ui.data_dir) == [], "forget left the file's key in its share state"

        # Drag and drop onto the page shares too.
        page.evaluate(
            """() => {
                const data = new DataTransfer();
                data.items.add(new File(["dropped on the page"], "dropped.txt"));
                document.body.dispatchEvent(
                    new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
            }"""
        )
        dropped = page.locator("#share-jobs .job").first
        expect(dropped.locator("h3")).to_have_text("dropped.txt")
        expect(dropped.locator("input.link")).to_have_value(
            re.compile(r"^magnet:\?xt=urn:p2pmega:"), timeout=STEP_TIMEOUT_MS
        )
        assert errors == []
    # The decrypted copy was streamed to the browser, then removed from the data dir.
    assert not [p for p in (ui.data_dir / "ui").rglob("*") if p.is_file() and p.name != "open.html"]


MIB = 1 << 20
# 80 chunks of 2 MiB: ten times what a fetch holds at once (FETCH_CONCURRENCY = 8 chunks, plus their receive
# buffers), so a download that held the file would show.
BIG_BYTES = 160 * MIB
# What the app may add while it streams: 8 plaintext and 8 receive buffers of 2 MiB (32 MiB), the allocator's
# slack on top. Measured: +45 to +49 MiB for 64, 160 and 400 MiB files (+31, +65, +90 MiB before buffers were
# reused, which grew with the file).
STREAM_RSS_BOUND_BYTES = 64 * MIB


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _chunk_hex(formatted: str) -> str:
    return base64.b32decode(formatted.upper() + "=" * (-len(formatted) % 8)).hex()


def test_a_browser_download_streams_the_chunks_as_they_arrive(
    net: RunningTestnet, ui: RunningUI, tmp_path: Path
) -> None:
    """A big file downloads whole with the app's memory flat; a chunk no holder has cuts a download short.

    The second part is what shows the streaming: the browser's download starts before the fetch has every chunk,
    so a fetch that fails part way fails the download (a fetch to disk first would never start it).
    """
    _chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(BIG_BYTES // MIB):
            f.write(os.urandom(MIB))
    broken = tmp_path / "broken.bin"
    broken.write_bytes(os.urandom(10 * 2 * MIB + 5))
    cli_dir = str(tmp_path / "cli")
    shared_big = run("share", str(big), "--data-dir", cli_dir, env=net.env)
    shared_broken = run("share", str(broken), "--json", "--data-dir", cli_dir, env=net.env)
    assert shared_big.returncode == 0, shared_big.stderr
    assert shared_broken.returncode == 0, shared_broken.stderr
    doc = json.loads(shared_broken.stdout)
    (lost,) = [_chunk_hex(c["id"]) for c in doc["chunks"] if (c["kind"], c["index"]) == ("data", 6)]
    removed = [p for p in stored_chunk_files(net.base_dir) if p.name == lost]
    assert len(removed) >= 2
    for path in removed:
        path.unlink()

    with sync_playwright() as pw, _chromium(pw, tmp_path) as browser:
        page = browser.new_page()
        page.goto(ui.url)
        expect(page.locator("#files-table td.health.checking")).to_have_count(
            0, timeout=STEP_TIMEOUT_MS
        )
        # From here VmHWM is the peak of the download alone ("5" resets it: proc(5), /proc/pid/clear_refs).
        Path(f"/proc/{ui.pid}/clear_refs").write_text("5")
        before = _memory_kib(ui.pid)["VmRSS"] * 1024
        with page.expect_download(timeout=STEP_TIMEOUT_MS) as download_info:
            page.fill("#fetch-link", shared_big.stdout.strip())
            page.press("#fetch-link", "Enter")
            # Meanwhile my files are checked on the same node (concurrent actions share it).
            page.click("#files-refresh")
        download = download_info.value
        assert download.failure() is None
        assert _sha256(Path(download.path())) == _sha256(big)
        expect(page.locator("#fetch-jobs .job.done")).to_have_count(1, timeout=STEP_TIMEOUT_MS)
        expect(page.locator("#files-table td.health.healthy")).not_to_have_count(
            0, timeout=STEP_TIMEOUT_MS
        )
        expect(page.locator("#files-table td.health.checking")).to_have_count(0)
        peak = _memory_kib(ui.pid)["VmHWM"] * 1024
        # Reported for the record (shown with -s).
        os.write(
            2,
            f"\nui RSS before the download {before / MIB:.1f} MiB, peak during the {BIG_BYTES // MIB} MiB "
            f"download {peak / MIB:.1f} MiB (+{(peak - before) / MIB:.1f} MiB)\n".encode(),
        )
        assert peak - before < STREAM_RSS_BOUND_BYTES, (before, peak)

        with page.expect_download(timeout=STEP_TIMEOUT_MS) as download_info:
            page.fill("#fetch-link", doc["read_link"])
            page.press("#fetch-link", "Enter")
        cut = download_info.value
        assert cut.failure() is not None, "a download missing a chunk was saved as if whole"
        error = page.locator("#fetch-jobs .job.failed .error")
        expect(error).to_contain_text("chunk", timeout=STEP_TIMEOUT_MS)
        assert "Traceback" not in error.inner_text()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

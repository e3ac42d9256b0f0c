"""core.wire deadlines: the server's stall, rate and idle rules and the client's progress watchdog.

Time is a number these tests pass in (aioquic style): no event loop, no sleeps.
"""

from __future__ import annotations

import pytest

from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.wire import (
    ClientDeadlines,
    Expiry,
    FetchRequest,
    Role,
    ServerDeadlines,
    StoreRequest,
    Timeouts,
    TransferConnection,
)

LIMITS = Timeouts(stall_s=30.0, min_rate_bytes_s=4096, idle_s=60.0)
CID = chunk_id_of(b"x")


def server(now: float = 0.0) -> tuple[TransferConnection, ServerDeadlines]:
    deadlines = ServerDeadlines(LIMITS, now=now)
    return TransferConnection(role=Role.SERVER, deadlines=deadlines), deadlines


def expiry(conn: TransferConnection, now: float) -> Expiry | None:
    verdict = conn.handle_timer(now)
    return None if verdict is None else verdict.rule


def test_idle_connection_closes_after_idle_timeout() -> None:
    conn, _ = server(now=100.0)
    assert conn.next_deadline() == 160.0
    assert expiry(conn, 159.9) is None
    assert expiry(conn, 160.0) is Expiry.IDLE
    # A verdict is given once; afterwards no timer runs.
    assert conn.next_deadline() is None
    assert conn.handle_timer(200.0) is None


def test_activity_moves_the_idle_deadline() -> None:
    conn, deadlines = server()
    client = TransferConnection(role=Role.CLIENT)
    frame = b"".join(client.send(FetchRequest(1, CID)))
    conn.receive_data(frame)
    deadlines.received(len(frame), 10.0)
    conn.next_event()
    deadlines.request_arrived(1, 10.0)
    assert conn.next_deadline() == 40.0  # the request is due, idle does not run
    assert deadlines.reply_written(1, 15.0)
    assert conn.next_deadline() == 75.0
    assert expiry(conn, 74.0) is None
    assert expiry(conn, 75.0) is Expiry.IDLE


def test_unanswered_request_expires_after_stall_timeout() -> None:
    conn, deadlines = server()
    deadlines.request_arrived(7, 5.0)
    assert conn.next_deadline() == 35.0
    assert expiry(conn, 34.9) is None
    verdict = conn.handle_timer(35.0)
    assert verdict is not None
    assert verdict.rule is Expiry.REQUEST_UNANSWERED
    assert "request 7" in verdict.message


def store_frame(size: int) -> bytes:
    """A whole StoreRequest frame of ``size`` data bytes (tests hand its bytes over bit by bit)."""
    client = TransferConnection(role=Role.CLIENT)
    data = bytes(size)
    return b"".join(bytes(b) for b in client.send(StoreRequest(1, chunk_id_of(data), 60, data)))


def test_stalled_frame_expires_stall_timeout_after_its_last_byte() -> None:
    conn, deadlines = server()
    frame = store_frame(100_000)
    conn.receive_data(frame[:1000])
    deadlines.received(1000, 2.0)
    deadlines.waiting_for_data(conn.receiving_frame, 2.0)
    # No idle deadline while a frame is half there: the frame's own clocks run.
    assert conn.next_deadline() == 32.0
    conn.receive_data(frame[1000:2000])
    deadlines.received(1000, 20.0)
    assert conn.next_deadline() == pytest.approx(2.0 + 30.0 + 1000 / 4096)
    assert expiry(conn, 32.0) is None  # the rate floor allows 1000 bytes more time
    assert expiry(conn, 50.0) is Expiry.FRAME_STALLED


def test_trickling_frame_fails_the_rate_floor_after_the_grace() -> None:
    conn, deadlines = server()
    frame = store_frame(1_000_000)
    got, now = 0, 0.0
    verdict = None
    # 100 bytes every 10 s never stall (bytes keep coming) but average 10 bytes/s.
    while verdict is None and now < 1000:
        conn.receive_data(frame[got : got + 100])
        got += 100
        deadlines.received(100, now)
        deadlines.waiting_for_data(conn.receiving_frame, now)
        now += 10.0
        verdict = conn.handle_timer(now)
    assert verdict is not None
    assert verdict.rule is Expiry.FRAME_STALLED
    assert now == pytest.approx(40.0)  # first check past 30 s + 300 bytes / 4096 bytes/s


def test_slow_but_steady_frame_passes() -> None:
    conn, deadlines = server()
    frame = store_frame(1_000_000)
    got = 0
    for second in range(120):  # 8 KiB/s: twice the floor, for two minutes
        conn.receive_data(frame[got : got + 8192])
        got += 8192
        deadlines.received(8192, float(second))
        deadlines.waiting_for_data(conn.receiving_frame, float(second))
        assert conn.handle_timer(second + 0.5) is None


def test_time_spent_not_reading_is_not_the_senders_stall() -> None:
    conn, deadlines = server()
    deadlines.request_arrived(9, 0.0)  # the request whose slot we wait for
    frame = store_frame(100_000)
    conn.receive_data(frame[:1000])
    deadlines.received(1000, 0.0)
    deadlines.waiting_for_data(conn.receiving_frame, 0.0)
    deadlines.reading_paused(10.0)
    assert conn.next_deadline() == 30.0  # only the request's clock runs now
    assert deadlines.reply_written(9, 25.0)
    assert conn.next_deadline() is None  # blocked with a half frame: no clock at all
    assert conn.handle_timer(100.0) is None
    deadlines.reading_resumed(100.0)
    deadlines.waiting_for_data(conn.receiving_frame, 100.0)
    # 90 s of not reading moved the frame's start from 0 to 90 (its rate counts the bytes after
    # its first read); reading again is activity.
    assert conn.next_deadline() == 120.0
    conn.receive_data(frame[1000:5096])
    deadlines.received(4096, 110.0)
    assert conn.next_deadline() == 121.0


def test_unread_replies_expire_without_acknowledgements() -> None:
    conn, deadlines = server()
    deadlines.request_arrived(1, 0.0)
    deadlines.writing_paused(acked_bytes=500, now=1.0)
    assert not deadlines.reply_written(1, 1.0)
    assert conn.next_deadline() == 31.0
    deadlines.acknowledged(500, 31.0)  # no progress since the pause
    verdict = conn.handle_timer(31.0)
    assert verdict is not None
    assert verdict.rule is Expiry.REPLIES_UNREAD


def test_replies_read_steadily_survive_and_are_taken_on_resume() -> None:
    conn, deadlines = server()
    for request_id in (1, 2):
        deadlines.request_arrived(request_id, 0.0)
    deadlines.writing_paused(acked_bytes=0, now=0.0)
    assert not deadlines.reply_written(1, 0.0)
    assert not deadlines.reply_written(2, 0.0)
    for second in range(1, 100):
        deadlines.acknowledged(second * 8192, float(second))
        assert conn.handle_timer(float(second)) is None
    assert deadlines.writing_resumed(100.0) == [1, 2]
    assert conn.next_deadline() == 160.0  # idle from the moment the socket took them


def test_slow_acknowledgements_fail_the_rate_floor() -> None:
    conn, deadlines = server()
    deadlines.request_arrived(1, 0.0)
    deadlines.writing_paused(acked_bytes=0, now=0.0)
    deadlines.reply_written(1, 0.0)
    second = 0
    verdict = None
    while verdict is None:
        second += 1
        deadlines.acknowledged(second * 100, float(second))  # 100 bytes/s
        verdict = conn.handle_timer(float(second))
    assert verdict.rule is Expiry.REPLIES_UNREAD
    assert second == 31  # 30 s of grace plus 3100 bytes at 4096 bytes/s


def test_abandoned_replies_are_returned_once() -> None:
    _, deadlines = server()
    deadlines.request_arrived(3, 0.0)
    deadlines.writing_paused(acked_bytes=0, now=0.0)
    deadlines.reply_written(3, 0.0)
    assert deadlines.abandon_untaken() == [3]
    assert deadlines.abandon_untaken() == []


def test_client_watchdog_fails_after_idle_with_no_byte_moved() -> None:
    deadlines = ClientDeadlines(10.0, checks_per_timeout=4)
    client = TransferConnection(role=Role.CLIENT, deadlines=deadlines)
    assert client.next_deadline() is None  # nothing pending: no timer
    client.send(FetchRequest(1, CID))
    deadlines.request_sent(0.0, first=True)
    checks = []
    while (deadline := client.next_deadline()) is not None:
        verdict = client.handle_timer(deadline)
        checks.append(deadline)
        if verdict is not None:
            assert verdict.rule is Expiry.NO_PROGRESS
            assert verdict.message == "no data moved for 10s"
            break
    assert checks == [2.5, 5.0, 7.5, 10.0]


def test_client_watchdog_restarts_on_progress_and_stops_when_nothing_is_pending() -> None:
    deadlines = ClientDeadlines(10.0, checks_per_timeout=4)
    client = TransferConnection(role=Role.CLIENT, deadlines=deadlines)
    client.send(FetchRequest(1, CID))
    deadlines.request_sent(0.0, first=True)
    for now in (2.5, 5.0, 7.5, 10.0, 12.5, 15.0):
        if now == 7.5:
            deadlines.acknowledged(50, now)  # the pump polls before each check: bytes moved
        assert client.handle_timer(now) is None
    # Progress was seen at the 7.5 s sample, so the request fails 10 s after that.
    assert client.handle_timer(17.5) is not None

    deadlines = ClientDeadlines(10.0)
    client = TransferConnection(role=Role.CLIENT, deadlines=deadlines)
    deadlines.request_sent(0.0, first=True)  # its reply came before the first check
    assert client.handle_timer(2.5) is None
    assert client.next_deadline() is None


def test_early_timer_does_nothing() -> None:
    deadlines = ClientDeadlines(10.0)
    client = TransferConnection(role=Role.CLIENT, deadlines=deadlines)
    client.send(FetchRequest(1, CID))
    deadlines.request_sent(0.0, first=True)
    assert client.handle_timer(1.0) is None
    assert client.next_deadline() == 2.5


def test_deadlines_must_fit_the_role() -> None:
    with pytest.raises(ValueError, match="ClientDeadlines"):
        TransferConnection(role=Role.CLIENT, deadlines=ServerDeadlines(LIMITS, now=0.0))
    with pytest.raises(ValueError, match="ServerDeadlines"):
        TransferConnection(role=Role.SERVER, deadlines=ClientDeadlines(1.0))
    with pytest.raises(ValueError, match="positive"):
        Timeouts(stall_s=0, min_rate_bytes_s=1, idle_s=1)
    assert TransferConnection(role=Role.SERVER).next_deadline() is None
    assert TransferConnection(role=Role.SERVER).handle_timer(1e9) is None

"""The timeouts of a transfer connection as a function of time: `now` is a parameter, never read.

A pump reports what happened and when (bytes in, a request, a reply taken by the socket, reading or
writing paused), arms one timer for next_deadline() and calls handle_timer(now) when it fires
(aioquic style). Every rule measures progress, not size; the reasons are in docs/PROTOCOL.md
("Slow links").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """A server's timeout rules (ServerLimits carries the defaults and their reasons).

    Attributes:
        stall_s: A started frame must receive bytes, a paused socket must get reply bytes
            acknowledged, and a request must be answered, at least this often.
        min_rate_bytes_s: After a grace of ``stall_s``, a frame (and replies waiting for a paused
            socket) must average this rate.
        idle_s: A connection with no frame and no request in flight is closed after this long.
    """

    stall_s: float
    min_rate_bytes_s: int
    idle_s: float

    def __post_init__(self) -> None:
        if self.stall_s <= 0 or self.min_rate_bytes_s <= 0 or self.idle_s <= 0:
            raise ValueError("timeouts and rates must be positive")


class Expiry(enum.Enum):
    """Which rule a connection broke; IDLE closes it politely, the others abort it."""

    FRAME_STALLED = "frame stalled"
    REPLIES_UNREAD = "replies unread"
    REQUEST_UNANSWERED = "request unanswered"
    IDLE = "idle"
    NO_PROGRESS = "no progress"  # a client's requests moved no data


@dataclass(frozen=True)
class TimedOut:
    """handle_timer()'s verdict: the connection broke ``rule``; ``message`` is for the log."""

    rule: Expiry
    message: str


class ServerDeadlines:
    """The deadlines of one server connection, from the events its pump reports.

    - a started frame must receive bytes at least every ``stall_s``, and from its first byte on at
      an average of ``min_rate_bytes_s`` after a grace of ``stall_s``;
    - a request must be answered within ``stall_s`` of its arrival, and while replies wait for the
      socket, the peer must acknowledge bytes at least every ``stall_s`` and at
      ``min_rate_bytes_s`` on average (same grace) since the socket stopped taking them;
    - with no frame and no request in flight, the connection is closed after ``idle_s``.

    Time the server itself stopped reading (no free slot) does not count against the sender.
    """

    def __init__(self, timeouts: Timeouts, *, now: float) -> None:
        """Start the clocks of a connection opened at ``now`` (loop seconds)."""
        self.timeouts = timeouts
        self._expired = False
        self._last_activity = now
        # Receiving: bytes so far, and when the current frame started and how many had come then.
        self._received = 0
        self._frame_started: float | None = None
        self._frame_base = 0
        self._blocked_at: float | None = None
        # Requests by id, with their arrival, until the socket took their reply; of those, the
        # ones whose reply waits in a paused socket.
        self._started: dict[int, float] = {}
        self._untaken: list[int] = []
        # Sending while the socket is paused: bytes acknowledged when last told, when that count
        # last grew, and when the pause started and how many were acknowledged then.
        self._write_paused = False
        self._acked = 0
        self._acked_at = 0.0
        self._paused_at = 0.0
        self._paused_base = 0

    @property
    def frame_started(self) -> float | None:
        """When the frame being received started arriving (its first wait for more bytes); None if it came whole."""
        return self._frame_started

    @property
    def write_paused(self) -> bool:
        """True while replies wait for the socket: the pump reports acknowledged bytes then."""
        return self._write_paused

    # -- what happened -------------------------------------------------------------------------------

    def received(self, nbytes: int, now: float) -> None:
        """``nbytes`` arrived from the peer."""
        self._received += nbytes
        self._last_activity = now

    def waiting_for_data(self, receiving_frame: bool, now: float) -> None:
        """Parsing stopped for want of bytes; ``receiving_frame`` if part of a frame is buffered.

        A frame's clocks start here, at the first wait for its rest, after its first bytes came.
        """
        if not receiving_frame:
            self._frame_started = None
        elif self._frame_started is None:
            self._frame_started = now
            self._frame_base = self._received

    def request_arrived(self, request_id: int, now: float) -> None:
        """A whole request was parsed: its reply is due within ``stall_s``."""
        self._frame_started = None
        self._started[request_id] = now

    def reading_paused(self, now: float) -> None:
        """The pump stopped reading (no free slot): the sender's clocks stop."""
        if self._blocked_at is None:
            self._blocked_at = now

    def reading_resumed(self, now: float) -> None:
        """The pump reads again: the time it did not read is not the sender's stall."""
        if self._blocked_at is None:
            return
        self._last_activity = now
        if self._frame_started is not None:
            self._frame_started += now - self._blocked_at
        self._blocked_at = None

    def reply_written(self, request_id: int, now: float) -> bool:
        """The reply to ``request_id`` was written; True if the socket took it (not paused)."""
        if self._write_paused:
            self._untaken.append(request_id)
            return False
        self.reply_taken(request_id, now)
        return True

    def reply_taken(self, request_id: int, now: float) -> None:
        """The socket took the reply to ``request_id``, or the request is gone."""
        self._last_activity = now
        self._started.pop(request_id, None)

    def abandon_untaken(self) -> list[int]:
        """The socket is gone: the requests whose replies it never took (they need nothing more)."""
        untaken, self._untaken = self._untaken, []
        for request_id in untaken:
            self._started.pop(request_id, None)
        return untaken

    def forget(self, request_id: int) -> None:
        """``request_id`` needs no reply any more (the connection is going)."""
        self._started.pop(request_id, None)

    def writing_paused(self, acked_bytes: int, now: float) -> None:
        """The socket stopped taking writes; ``acked_bytes`` of ours were acknowledged so far."""
        self._write_paused = True
        self._paused_at = self._acked_at = now
        self._paused_base = self._acked = acked_bytes

    def writing_resumed(self, now: float) -> list[int]:
        """The socket takes writes again. Returns the requests whose replies it took meanwhile."""
        self._write_paused = False
        untaken, self._untaken = self._untaken, []
        for request_id in untaken:
            self.reply_taken(request_id, now)
        return untaken

    def acknowledged(self, acked_bytes: int, now: float) -> None:
        """``acked_bytes`` of ours are acknowledged by now (polled while writing is paused)."""
        if acked_bytes > self._acked:
            self._acked, self._acked_at = acked_bytes, now

    # -- when ----------------------------------------------------------------------------------------

    def _frame_deadline(self) -> float | None:
        if self._frame_started is None or self._blocked_at is not None:
            return None
        t = self.timeouts
        got = self._received - self._frame_base
        return min(
            self._last_activity + t.stall_s,
            self._frame_started + t.stall_s + got / t.min_rate_bytes_s,
        )

    def _send_deadline(self) -> float | None:
        if not self._untaken:
            return None
        t = self.timeouts
        progress = (self._acked - self._paused_base) / t.min_rate_bytes_s
        return min(self._acked_at + t.stall_s, self._paused_at + t.stall_s + progress)

    def _oldest_unanswered(self) -> tuple[int, float] | None:
        untaken = self._untaken
        for request_id, arrived in self._started.items():
            if request_id not in untaken:
                return request_id, arrived + self.timeouts.stall_s
        return None

    def _idle_deadline(self, receiving_frame: bool) -> float | None:
        if self._started or receiving_frame:
            return None
        return self._last_activity + self.timeouts.idle_s

    def next_deadline(self, receiving_frame: bool) -> float | None:
        """When handle_timer() must run next (None: no clock runs, e.g. blocked on slots).

        A send deadline uses the acknowledged count last told, so it may come early: then
        handle_timer() finds progress and the next deadline is later.
        """
        if self._expired:
            return None
        oldest = self._oldest_unanswered()
        deadlines = [
            d
            for d in (
                self._frame_deadline(),
                self._send_deadline(),
                oldest[1] if oldest else None,
                self._idle_deadline(receiving_frame),
            )
            if d is not None
        ]
        return min(deadlines, default=None)

    def handle_timer(self, now: float, receiving_frame: bool) -> TimedOut | None:
        """Check every rule at ``now``; the first one broken ends the connection for good.

        Returns:
            None while every rule holds, else what broke (no later call reports anything).
        """
        if self._expired:
            return None
        verdict = self._check(now, receiving_frame)
        self._expired = verdict is not None
        return verdict

    def _check(self, now: float, receiving_frame: bool) -> TimedOut | None:
        t = self.timeouts
        frame = self._frame_deadline()
        if frame is not None and now >= frame:
            return TimedOut(
                Expiry.FRAME_STALLED,
                f"a frame stalled or came slower than {t.min_rate_bytes_s} bytes/s",
            )
        send = self._send_deadline()
        if send is not None and now >= send:
            return TimedOut(
                Expiry.REPLIES_UNREAD,
                f"replies not read, or slower than {t.min_rate_bytes_s} bytes/s",
            )
        oldest = self._oldest_unanswered()
        if oldest is not None and now >= oldest[1]:
            return TimedOut(
                Expiry.REQUEST_UNANSWERED,
                f"request {oldest[0]} not answered in {t.stall_s:.1f}s",
            )
        idle = self._idle_deadline(receiving_frame)
        if idle is not None and now >= idle:
            return TimedOut(Expiry.IDLE, f"idle for {t.idle_s:.1f}s")
        return None


class ClientDeadlines:
    """The progress watchdog of one client connection.

    While requests are pending, the bytes the holder acknowledged plus the bytes it sent us must
    grow at least once every ``idle_s``, however large the request. Progress is sampled
    ``checks_per_timeout`` times per ``idle_s``, so a stalled connection fails between 1 and
    1 + 1/checks_per_timeout timeouts after its last byte moved: a slow link is slow, not dead.
    """

    def __init__(self, idle_s: float, *, checks_per_timeout: int = 4) -> None:
        """Watch a connection whose requests fail after ``idle_s`` with no byte moved.

        Raises:
            ValueError: ``idle_s`` is not positive or ``checks_per_timeout`` below 1.
        """
        if idle_s <= 0 or checks_per_timeout < 1:
            raise ValueError("idle_s must be positive and checks_per_timeout at least 1")
        self.idle_s = idle_s
        self._interval_s = idle_s / checks_per_timeout
        self._received = 0
        self._acked = 0
        self._moved_at_check = 0
        self._progress_at = 0.0
        self._next_check: float | None = None
        self._expired = False

    def received(self, nbytes: int, now: float) -> None:
        """``nbytes`` arrived from the holder."""
        self._received += nbytes

    def acknowledged(self, acked_bytes: int, now: float) -> None:
        """``acked_bytes`` of ours are acknowledged by now (polled by the pump)."""
        self._acked = acked_bytes

    def request_sent(self, now: float, *, first: bool) -> None:
        """A request went out; ``first`` if none was pending (time idle in a pool is no stall)."""
        if first:
            self._progress_at = now
            self._moved_at_check = self._received + self._acked
        if self._next_check is None:
            self._next_check = now + self._interval_s

    def next_deadline(self) -> float | None:
        """When handle_timer() must run next; None while no request is pending."""
        return None if self._expired else self._next_check

    def handle_timer(self, now: float, *, pending: bool) -> TimedOut | None:
        """Sample progress at ``now``; ``pending`` if requests still wait for replies.

        Returns:
            None while data moves (or nothing is pending), else the verdict, once.
        """
        if self._expired or self._next_check is None or now < self._next_check:
            return None
        self._next_check = None
        if not pending:
            return None  # the next request starts the clock again
        moved = self._received + self._acked
        if moved != self._moved_at_check:
            self._moved_at_check = moved
            self._progress_at = now
        elif now - self._progress_at >= self.idle_s:
            self._expired = True
            return TimedOut(Expiry.NO_PROGRESS, f"no data moved for {self.idle_s:g}s")
        self._next_check = now + self._interval_s
        return None

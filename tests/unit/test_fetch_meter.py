"""A fetch's meter of one holder (core/fetch_meter.py): its rate from bytes still arriving, and its requests' ends."""

from __future__ import annotations

import pytest

from p2pmega.core.fetch_meter import MEASURE_S, PRIOR_RATE_BYTES_S, HolderMeter, Sent

CHUNK = 2 << 20


def test_a_slow_holder_is_measured_before_its_first_chunk_arrives() -> None:
    meter = HolderMeter(busy_mark=0.0)
    request = Sent(size=CHUNK, started=0.0, expected_s=0.0)
    meter.requests.append(request)
    assert not meter.account(0.05, received=60_000)
    assert meter.rate_bytes_s == PRIOR_RATE_BYTES_S, "not measured yet: the optimistic prior"
    assert meter.account(MEASURE_S + 0.05, received=190_000)
    assert meter.measured
    assert meter.rate_bytes_s == pytest.approx(190_000 / (MEASURE_S + 0.05))
    assert meter.ends(0.15)[request] == pytest.approx(0.15 + (CHUNK - 190_000) / meter.rate_bytes_s)


def test_bytes_received_while_idle_do_not_count() -> None:
    meter = HolderMeter(busy_mark=0.0)
    meter.account(1.0, received=5_000)  # a has() reply before any fetch
    request = Sent(size=CHUNK, started=1.0, expected_s=0.0)
    meter.requests.append(request)
    meter.account(1.2, received=5_000 + 250_000)
    assert meter.rate_bytes_s == pytest.approx(250_000 / 0.2)


def test_progress_is_credited_in_the_order_asked_and_moved_requests_leave_the_load() -> None:
    meter = HolderMeter(busy_mark=0.0)
    first = Sent(size=CHUNK, started=0.0, expected_s=0.0)
    second = Sent(size=CHUNK, started=0.0, expected_s=0.0)
    meter.requests += [first, second]
    meter.account(MEASURE_S, received=CHUNK // 2)
    rate = meter.rate_bytes_s
    ends = meter.ends(MEASURE_S)
    assert ends[first] == pytest.approx(MEASURE_S + (CHUNK // 2) / rate)
    assert ends[second] == pytest.approx(MEASURE_S + (CHUNK + CHUNK // 2) / rate)
    first.moved = True
    assert meter.kept() == 1
    assert meter.load_s(MEASURE_S) == pytest.approx((CHUNK + CHUNK // 2) / rate)
    meter.remove(first)  # cancelled: what arrived of it is lost
    assert meter.progress_bytes == 0
    assert meter.ends(MEASURE_S)[second] == pytest.approx(MEASURE_S + CHUNK / rate)


def test_a_request_far_past_its_expected_time_counts_as_taking_as_long_again() -> None:
    meter = HolderMeter(busy_mark=0.0)
    request = Sent(size=CHUNK, started=0.0, expected_s=0.1)
    meter.requests.append(request)
    meter.account(0.5, received=CHUNK - 1000)
    assert meter.ends(0.5)[request] == pytest.approx(1.0), "0.5 s in, 5x its expected 0.1 s"


def test_a_client_that_forgot_the_holder_counts_from_zero_again() -> None:
    meter = HolderMeter(busy_mark=0.0, received_mark=1_000_000)
    meter.requests.append(Sent(size=CHUNK, started=0.0, expected_s=0.0))
    meter.account(MEASURE_S, received=20_000)
    assert meter.delivered_bytes == 20_000

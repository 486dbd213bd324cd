"""The scrub's pure parts: its rate, its pace, and the one file check verify, scrub and reports share."""

from __future__ import annotations

import hashlib
import threading

import blake3
import pytest
from hypothesis import given, strategies as st

from odst.replicator.integrity import check_file
from odst.replicator.scrub import BURST_S, Pace, ScrubStopped, ScrubState, scrub_rate

MiB = 1 << 20
WEEK = 7 * 86400


@given(size=st.integers(0, 1 << 50), period=st.integers(1, 10 * WEEK),
       floor=st.integers(1, 1 << 30), extra=st.integers(0, 1 << 30))
def test_rate_is_size_over_period_within_floor_and_ceiling(size, period, floor, extra):
    ceiling = floor + extra
    rate = scrub_rate(size, period, floor, ceiling)
    assert floor <= rate <= ceiling
    if floor <= size / period <= ceiling:
        assert rate == pytest.approx(size / period)


def test_rate_examples():
    assert scrub_rate(10 * (1 << 40), WEEK, 4 * MiB, 64 * MiB) == pytest.approx(10 * (1 << 40) / WEEK)  # 10 TiB: ~18 MB/s
    assert scrub_rate(1 << 30, WEEK, 4 * MiB, 64 * MiB) == 4 * MiB  # a small store: the floor
    assert scrub_rate(1 << 50, WEEK, 4 * MiB, 64 * MiB) == 64 * MiB  # beyond the ceiling: the pass takes longer


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> bool:
        self.slept.append(s)
        self.now += s
        return False


def test_pace_holds_the_rate():
    t = FakeTime()
    pace = Pace(1000, clock=t.clock, sleep=t.sleep)
    for _ in range(10):
        pace(500)
    assert pace.bytes == 5000
    assert sum(t.slept) == pytest.approx(5.0)  # 5000 bytes at 1000 B/s, read instantly


def test_pace_lends_at_most_a_burst_of_idle_time():
    t = FakeTime()
    pace = Pace(1000, clock=t.clock, sleep=t.sleep)
    t.now += 3600  # idle for an hour: no hour of credit
    pace(3000)
    assert sum(t.slept) == pytest.approx(3.0 - BURST_S)


def test_pace_stops_when_asked():
    stop = threading.Event()
    pace = Pace(1 << 30, stop)
    pace(10)
    stop.set()
    with pytest.raises(ScrubStopped):
        pace(10)


def test_check_file_ok_damaged_missing(tmp_path):
    data = bytes(range(256)) * 9000
    path = tmp_path / "p.pkg"
    path.write_bytes(data)
    sha1, b3 = hashlib.sha1(data).hexdigest(), blake3.blake3(data).hexdigest()
    assert check_file(path, len(data), sha1, b3) == ("ok", "", len(data))
    seen = []
    assert check_file(path, len(data), sha1, b3, pace=seen.append)[0] == "ok"
    assert sum(seen) == len(data)
    flipped = bytearray(data)
    flipped[12345] ^= 1
    path.write_bytes(flipped)
    status, reason, n = check_file(path, len(data), sha1, b3)
    assert status == "damaged" and "bit rot" in reason and n == len(data)
    path.unlink()
    assert check_file(path, len(data), sha1, b3)[0] == "missing"


def test_state_survives_a_round_trip_and_ignores_unknown_fields(tmp_path):
    path = tmp_path / "scrub.json"
    ScrubState(cursor="m.pkg", passes=3, bytes_total=42).save(path)
    path.write_text(path.read_text()[:-1] + ', "from_the_future": 1}')
    state = ScrubState.load(path)
    assert (state.cursor, state.passes, state.bytes_total) == ("m.pkg", 3, 42)
    assert ScrubState.load(tmp_path / "none.json") is None

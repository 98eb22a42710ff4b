"""drivers/gnss.py against a real gpsd fed by gpsfake with the RAV4 minute's real NMEA."""
from __future__ import annotations

import threading

import pytest

from drivers.core.backoff import Backoff
from drivers.gnss import GnssReader, fix_from_tpv, parse_time_ms
from scripts.testbed.gps import BareGpsd, GpsFake, free_port, needs_gpsd, reference_rows, wait_until, with_fix_lost
from scripts.testbed.wait import wait_until

pytestmark = needs_gpsd


class Recorder:
    def __init__(self):
        self.fixes, self.states, self.times = [], [], []
        self.lock = threading.Lock()

    def fix(self, f):
        with self.lock:
            self.fixes.append(f)

    def state(self, s):
        with self.lock:
            self.states.append(s)


def _reader(rec, port, **kw):
    kw.setdefault("clock_synced", lambda: True)
    return GnssReader(rec.fix, port=port, on_state=rec.state, backoff=Backoff(0.1, 0.5), **kw)


def test_every_fix_of_the_real_log_matches_the_reference(tmp_path):
    fake = GpsFake(tmp_path).start(cycle=0.1)
    rec = Recorder()
    r = _reader(rec, fake.port)
    r.start()
    try:
        assert fake.wait_exit(90) is not None, "gpsfake did not finish"
        by_time = {}
        for f in rec.fixes:
            by_time.setdefault(f.gnss_ms, f)
        ref = reference_rows()
        matched = 0
        for row in ref:
            f = by_time.get(parse_time_ms(row["utc_iso"]))
            if f is None:
                continue
            matched += 1
            assert f.lat == pytest.approx(float(row["lat_deg"]), abs=1e-7)
            assert f.lon == pytest.approx(float(row["lon_deg"]), abs=1e-7)
            assert f.speed == pytest.approx(float(row["speed_mps"]), abs=0.001)
            assert f.course == pytest.approx(float(row["course_deg"]), abs=0.01)
        # An external client may miss the first second of a gpsfake run (README): most must match.
        assert matched >= 20, (matched, rec.states, r.status())
        assert "fix" in rec.states
        # The log ends: gpsfake closes the receiver; the reader says so rather than going quiet.
        assert wait_until(lambda: r.state in ("no_receiver", "gpsd_unreachable", "no_fix"), 30)
    finally:
        r.stop()
        fake.stop()
    assert r.status()["state"] == "stopped"


def test_loss_of_fix_is_reported(tmp_path):
    fake = GpsFake(tmp_path).start(with_fix_lost(tmp_path / "tunnel.nmea", keep_fixes=12, void=6), cycle=0.1)
    rec = Recorder()
    r = _reader(rec, fake.port)
    r.start()
    try:
        assert wait_until(lambda: "fix" in rec.states, 60), (rec.states, r.status())
        assert wait_until(lambda: "no_fix" in rec.states[rec.states.index("fix"):], 60), rec.states
        # No position was made up from the void epochs (the 12 kept fixes end at 16:15:12).
        assert all(f.gnss_ms <= parse_time_ms("2018-08-02T16:15:12.000Z") for f in rec.fixes if f.gnss_ms)
    finally:
        r.stop()
        fake.stop()


def test_gpsd_restart_is_survived_and_counted(tmp_path):
    port = free_port()
    rec = Recorder()
    r = _reader(rec, port)
    r.start()
    try:
        # No gpsd yet: reported, retried.
        assert wait_until(lambda: "gpsd_unreachable" in rec.states, 20), rec.states
        first = GpsFake(tmp_path / "a", port).start(cycle=0.1)
        assert wait_until(lambda: rec.fixes, 60), (rec.states, r.status())
        first.wait_exit(60)
        first.stop()
        n = len(rec.fixes)
        second = GpsFake(tmp_path / "b", port).start(cycle=0.1)
        try:
            assert wait_until(lambda: len(rec.fixes) > n, 60), (rec.states, r.status())
            assert r.status()["reconnects"] >= 1
        finally:
            second.stop()
    finally:
        r.stop()


def test_gpsd_without_a_receiver_is_reported(tmp_path):
    gpsd = BareGpsd(tmp_path)
    rec = Recorder()
    r = _reader(rec, gpsd.port)
    r.start()
    try:
        assert wait_until(lambda: r.state == "no_receiver", 30), (rec.states, r.status())
        assert rec.fixes == []
    finally:
        r.stop()
        gpsd.stop()


def test_stop_closes_the_gpsd_connection_at_once(tmp_path):
    fake = GpsFake(tmp_path).start(cycle=0.5)
    rec = Recorder()
    r = _reader(rec, fake.port)
    r.start()
    try:
        assert wait_until(lambda: rec.fixes, 60)
        r.stop()
        assert not r.running
        n = len(rec.fixes)
        fake.wait_exit(2)   # fixes keep coming from gpsd meanwhile (one per second)
        assert len(rec.fixes) == n, "fixes kept arriving after stop()"
    finally:
        r.stop()
        fake.stop()


def test_a_fix_sets_the_time_while_the_clock_is_not_synchronised(tmp_path):
    """The receiver's time goes to ``on_time`` only while the clock is not synchronised and only
    when plausible. The 2018 log is implausible for the default threshold (2025): here the
    threshold is moved so that the real log exercises the path."""
    fake = GpsFake(tmp_path).start(cycle=0.1)
    rec = Recorder()
    synced = threading.Event()
    got = []

    def on_time(ms):
        got.append(ms)
        synced.set()

    r = GnssReader(rec.fix, port=fake.port, on_time=on_time, clock_synced=synced.is_set,
                   plausible_after_ms=parse_time_ms("2018-01-01T00:00:00Z"), backoff=Backoff(0.1, 0.5))
    default = GnssReader(rec.fix, port=fake.port)   # default threshold: 2018 is implausible
    r.start()
    try:
        assert wait_until(lambda: got, 60)
        n = len(rec.fixes)
        assert wait_until(lambda: len(rec.fixes) >= n + 6, 60)
        assert len(got) == 1, "the time was set again after the clock was synchronised"
        assert parse_time_ms("2018-08-02T16:14:50Z") <= got[0] <= parse_time_ms("2018-08-02T16:15:48Z")
    finally:
        r.stop()
        fake.stop()
    calls = []
    default._on_time = calls.append
    default._clock_synced = lambda: False
    default._learn_time({"class": "TPV", "mode": 3, "time": "2018-08-02T16:14:50.000Z"})
    assert calls == [], "an implausible receiver time (2018 < 2025) must not set the clock"


def test_tpv_without_position_is_not_a_fix():
    assert fix_from_tpv({"class": "TPV", "mode": 1}, 0) is None
    assert fix_from_tpv({"class": "TPV", "mode": 3, "lat": 91.0, "lon": 0.0}, 0) is None
    f = fix_from_tpv({"class": "TPV", "mode": 3, "lat": 1.5, "lon": 2.5, "eph": 4.2, "track": 361.0}, 5)
    assert (f.prec_m, f.course, f.t_ms) == (4.2, 1.0, 5)

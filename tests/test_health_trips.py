"""Trips: start/end, distance, duration and fuel on constructed traces with exact answers and on
the real RAV4 minute (comma2k19), whose full-rate wheel speeds give the reference distance."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agent.cloud import schemas
from agent.health.trips import TripDetector, TripThresholds
from scripts.testbed.shared_data import SHARED_DATA

RAV4 = SHARED_DATA / "comma2k19_rav4/reference_wheelspeed_speed.csv"
T0 = 1_750_000_000_000


def _detector(**kw):
    events: list[dict] = []
    det = TripDetector(events.append, thresholds=TripThresholds(**kw), odometer_km=lambda: None)
    return det, events


def test_constant_speed_trip_has_exact_distance_duration_and_maf_fuel():
    det, events = _detector(end_after_s=60)
    # 0..100 s at 36 km/h (= 10 m/s: 1.000 km), engine at 2000 rpm, MAF 10 g/s; 1 Hz samples.
    for s in range(0, 101):
        t = T0 + s * 1000
        det.feed("rpm", t, 2000)
        det.feed("speed", t, 36.0)
        det.feed("maf", t, 10.0)
    # Engine off: rpm 0 and speed 0 for a while, then silence.
    for s in range(101, 120):
        det.feed("rpm", T0 + s * 1000, 0)
        det.feed("speed", T0 + s * 1000, 0)
    assert [e["type"] for e in events] == ["trip_start"]
    assert events[0]["ts"] == T0
    det.tick(T0 + 100_000 + 59_000)
    assert len(events) == 1  # not yet: end_after_s is 60
    det.tick(T0 + 100_000 + 61_000)
    end = events[-1]
    schemas.validate("event", events[0])
    schemas.validate("event", end)
    assert end["type"] == "trip_end" and end["ts"] == T0 + 100_000
    assert end["duration_s"] == 100.0
    # 1.000 km at 36 km/h plus the ramp down 36 -> 0 in the last second (5 m).
    assert end["distance_km"] == pytest.approx(1.005, abs=1e-9)
    # 10 g/s for 100 s = 1000 g air; /14.7 AFR = 68.03 g fuel; /745 g/L = 0.0913 L.
    assert end["fuel_l"] == pytest.approx(1000 / 14.7 / 745, abs=1e-3)


def test_fuel_rate_preferred_over_maf():
    det, events = _detector(end_after_s=30)
    for s in range(0, 3601, 10):  # one hour at 7.2 L/h, MAF also present
        t = T0 + s * 1000
        det.feed("maf", t, 30.0)
        det.feed("fuel_rate", t, 7.2)
        det.feed("rpm", t, 1500)
    det.tick(T0 + 3_700_000)
    assert events[-1]["type"] == "trip_end"
    assert events[-1]["fuel_l"] == pytest.approx(7.2, rel=1e-9)


def test_short_blip_is_not_a_trip_and_gaps_are_not_integrated():
    det, events = _detector(min_duration_s=10, end_after_s=120, max_gap_s=10)
    det.feed("rpm", T0, 900)
    det.feed("rpm", T0 + 5000, 900)
    det.tick(T0 + 60_000)
    assert events == []  # 5 s of engine: never announced, never closed
    # A trip with a 60 s hole in the speed samples: the hole is not counted as distance.
    for s in list(range(0, 20)) + list(range(80, 100)):
        det.feed("speed", T0 + 100_000 + s * 1000, 72.0)
    det.tick(T0 + 400_000)
    end = events[-1]
    assert end["type"] == "trip_end"
    assert end["distance_km"] == pytest.approx(2 * 19 * 20 / 1000)  # 2 x 19 s at 20 m/s
    assert "fuel_l" not in end
    assert [e["type"] for e in events] == ["trip_start", "trip_end"]


def test_odometer_carried_when_known():
    km = [1000.0]
    events: list[dict] = []
    det = TripDetector(events.append, thresholds=TripThresholds(end_after_s=5), odometer_km=lambda: km[0])
    for s in range(0, 31):
        det.feed("speed", T0 + s * 1000, 36.0)
    km[0] = 1000.3
    det.tick(T0 + 40_000)
    assert events[0]["odometer_km"] == 1000.0 and events[-1]["odometer_km"] == 1000.3


def test_real_rav4_minute_polled_at_1_hz_matches_the_full_rate_distance():
    rows = [(float(r["t_s"]), float(r["speed_mps_mean_of_wheels"])) for r in csv.DictReader(RAV4.open())]
    truth_km = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(rows, rows[1:])) / 1000
    assert truth_km == pytest.approx(1.0038, abs=1e-3)  # 4,974 wheel-speed samples at ~83 Hz
    det, events = _detector(end_after_s=30)
    t0 = rows[0][0]
    j = 0
    for k in range(0, 61):  # what a 1 Hz OBD poll of SPEED would see (km/h)
        while j < len(rows) - 1 and rows[j][0] - t0 < k:
            j += 1
        det.feed("speed", T0 + int((rows[j][0] - t0) * 1000), rows[j][1] * 3.6)
    det.tick(T0 + 200_000)
    end = events[-1]
    assert end["type"] == "trip_end"
    assert end["distance_km"] == pytest.approx(truth_km, rel=0.01)
    assert end["duration_s"] == pytest.approx(60, abs=0.1)


def test_agent_reports_a_trip_of_the_emulated_car(fleet):
    """End to end: the ELM327 emulator's engine and speed, polled by the real agent, become
    trip_start and trip_end events at the cloud once the car stops."""
    import time

    from agent import settings
    from agent.compose import build
    from scripts.testbed.wait import wait_until
    from scripts.vehicle_sim.elm_emulator import ElmEmulator

    def event(type_):
        return fleet.console.wait_for(lambda r: r.get("kind") == "event" and r["body"]["type"] == type_, 60)

    with ElmEmulator("car") as emu:
        toml = fleet.device("trip-0001", obd_port=emu.port)
        agent = build(settings.load(toml))
        agent.start()
        try:
            assert agent.link.wait_connected(30)
            fleet.console.publish("trip-0001", "config", {
                "version": 1, "upload": {"interval_s": 1},
                "obd": {"pids": [{"name": "rpm", "pid": "RPM", "period_s": 0.5},
                                 {"name": "speed", "pid": "SPEED", "period_s": 0.5}], "dtc_period_s": 600},
                "can": {"signals": [], "raw": {"enabled": False, "ids": []}},
                "health": {"trips": {"min_duration_s": 2, "end_after_s": 3}}})
            assert wait_until(lambda: agent.config.get("version") == 1)
            start = event("trip_start")
            assert start, "no trip_start"
            schemas.validate("event", start["body"])
            # The engine stops and the car stands still.
            emu.set_answer("RPM", "41 0C 00 00")
            emu.set_answer("SPEED", "41 0D 00")
            end = event("trip_end")
            assert end, "no trip_end"
            schemas.validate("event", end["body"])
            assert end["body"]["duration_s"] >= 2 and end["body"]["distance_km"] >= 0
            assert agent.health.snapshot()["trip"]["trips"] == 1
        finally:
            agent.stop()

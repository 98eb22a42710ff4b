"""Harsh braking / acceleration from speed, and the consent gate (PROTOCOL §6)."""
from __future__ import annotations

import csv
from pathlib import Path

from agent.cloud import schemas
from agent.health.driving import DrivingThresholds, HarshEventDetector, driving_behaviour_allowed
from scripts.testbed.shared_data import SHARED_DATA

T0 = 1_750_000_000_000
DAY = 86_400_000
RAV4 = SHARED_DATA / "comma2k19_rav4/reference_wheelspeed_speed.csv"


def _run(trace, **kw):
    det = HarshEventDetector(DrivingThresholds(**kw))
    out = [det.feed(T0 + int(t * 1000), v) for t, v in trace]
    return [e for e in out if e] + ([e] if (e := det._close()) else [])


def test_emergency_stop_is_one_harsh_braking_episode():
    # 90 km/h steady, then 90 -> 0 in 4 s (6.25 m/s²), then standing.
    trace = [(t, 90.0) for t in range(0, 10)] + [(10 + i, 90.0 - 22.5 * i) for i in range(0, 5)] \
        + [(t, 0.0) for t in range(15, 20)]
    events = _run(trace)
    assert len(events) == 1
    e = events[0]
    schemas.validate("event", e)
    assert e["kind"] == "harsh_braking" and e["ts"] == T0 + 10_000
    assert e["detail"] == {"peak_ms2": 6.25, "from_kmh": 90.0, "to_kmh": 0.0, "duration_s": 4.0}


def test_gentle_driving_and_thresholds():
    # 0 -> 100 km/h in 12 s: 2.31 m/s², below the 3.0 default; above a 2.0 threshold.
    trace = [(i, 100 / 12 * i) for i in range(0, 13)]
    assert _run(trace) == []
    events = _run(trace, harsh_accel_ms2=2.0)
    assert [e["kind"] for e in events] == ["harsh_acceleration"]
    assert events[0]["detail"]["peak_ms2"] == 2.31


def test_samples_too_far_apart_say_nothing():
    assert _run([(0, 100.0), (5, 0.0)]) == []  # 5 s gap: not a measurement of a stop


def test_real_highway_minute_has_no_harsh_event():
    rows = [(float(r["t_s"]), float(r["speed_mps_mean_of_wheels"]) * 3.6) for r in csv.DictReader(RAV4.open())]
    t0 = rows[0][0]
    trace, j = [], 0
    for k in range(0, 61):
        while j < len(rows) - 1 and rows[j][0] - t0 < k:
            j += 1
        trace.append((rows[j][0] - t0, rows[j][1]))
    assert _run(trace) == []  # the steepest 1 s change in that minute is 2.2 m/s² of braking


def test_consent_gate():
    now = T0
    assert not driving_behaviour_allowed({}, now)
    assert not driving_behaviour_allowed({"privacy": {"driving_behaviour": {"mode": "off"}}}, now)
    on = {"mode": "on", "consent_id": "c1", "granted_at": now - DAY, "until": now + DAY}
    assert driving_behaviour_allowed({"privacy": {"driving_behaviour": on}}, now)
    assert not driving_behaviour_allowed({"privacy": {"driving_behaviour": on}}, now + 2 * DAY)  # expired
    assert not driving_behaviour_allowed({"privacy": {"driving_behaviour": {**on, "until": None}}}, now)


def test_monitor_sends_driving_events_only_with_consent(tmp_path):
    from agent.health.monitor import HealthMonitor
    from drivers.core.model import Sample
    from agent.outbox.store import Store

    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    config = {"version": 1, "obd": {"pids": [{"name": "vehicle.speed", "pid": "SPEED", "period_s": 1}]}}
    mon = HealthMonitor(store=store, emit_event=events.append, config=lambda: config, clock=lambda: T0)
    stop = [(t, 90.0) for t in range(0, 5)] + [(5 + i, 90.0 - 22.5 * i) for i in range(0, 5)] + [(10, 0.0), (11, 0.0)]

    def drive(offset_s):
        mon.process([Sample("vehicle.speed", "km/h", T0 + (offset_s + t) * 1000, v) for t, v in stop])

    try:
        drive(0)
        assert [e for e in events if e["type"] == "health"] == []  # off by default
        config["privacy"] = {"driving_behaviour": {"mode": "on", "consent_id": "c1", "granted_at": T0 - DAY,
                                                   "until": T0 + DAY}}
        drive(100)
        harsh = [e for e in events if e["type"] == "health"]
        assert [e["kind"] for e in harsh] == ["harsh_braking"] and harsh[0]["ts"] == T0 + 105_000
        assert mon.snapshot()["driving"] == {"harsh_braking": 1, "harsh_acceleration": 0}
        config["privacy"]["driving_behaviour"]["mode"] = "off"  # withdrawn
        drive(200)
        assert len([e for e in events if e["type"] == "health"]) == 1
        assert mon.snapshot()["driving"] == "off (no owner consent)"
    finally:
        store.close()

"""12 V battery: resting voltage and crank dip measured at each engine start, the trend over days,
and the health events they produce — on constructed traces whose answers are known."""
from __future__ import annotations

import pytest

from agent.cloud import schemas
from agent.health.battery12v import BatteryThresholds, StartDetector, StartReading, assess, trend
from agent.health.monitor import HealthMonitor
from drivers.core.model import Sample
from agent.outbox.store import Store

T0 = 1_750_000_000_000
DAY = 86_400_000


def start_trace(t0: int, rest_v: float, dip_v: float, hz: int = 10):
    """60 s parked with the ignition on at ``rest_v``, a 0.6 s crank at ``dip_v`` from t0+60 s, then
    running at 14.2 V; rpm at 1 Hz (0, then 250 while cranking, then 800)."""
    out = []
    for i in range(0, 75 * hz):
        t = t0 + i * 1000 // hz
        s = i / hz
        v = rest_v if s < 60 else dip_v if s < 60.6 else 14.2
        out.append(("voltage", t, v))
        if i % hz == 0:
            out.append(("rpm", t, 0 if s < 60 else 250 if s < 61 else 800))
    return out


def _measure(trace):
    det = StartDetector()
    return [r for role, t, v in trace if (r := det.feed(role, t, v))]


@pytest.mark.parametrize("rest, dip, level", [(12.6, 10.2, "ok"), (12.1, 9.2, "warn"), (11.8, 8.0, "critical"),
                                              (12.5, 9.4, "warn")])
def test_start_measured_and_assessed(rest, dip, level):
    readings = _measure(start_trace(T0, rest, dip))
    assert readings == [StartReading(ts=T0 + 60_000, rest_v=rest, crank_min_v=dip)]
    got, reasons = assess(readings[0], None, BatteryThresholds())
    assert got == level
    assert (reasons == []) == (level == "ok")


def test_no_start_without_an_engine_off_first():
    # The agent came up with the engine already running: no "start" to measure.
    trace = [("rpm", T0 + i * 1000, 800) for i in range(30)] + [("voltage", T0 + i * 1000, 14.1) for i in range(30)]
    assert _measure(sorted(trace, key=lambda x: x[1])) == []


def test_trend_warns_days_ahead_of_a_flat_battery():
    t = BatteryThresholds()
    history = [(T0 + d * DAY, 12.6 - 0.05 * d) for d in range(10)]  # -0.35 V per week
    info = trend(history, T0 + 9 * DAY, t)
    assert info["v_per_week"] == pytest.approx(-0.35)
    assert info["fitted_now_v"] == pytest.approx(12.15)
    assert info["days_to_critical"] == pytest.approx(5.0)  # (12.15 - 11.9) / 0.05
    level, reasons = assess(StartReading(T0 + 9 * DAY, 12.15, 10.0), info, t)
    assert level == "warn" and any("per week" in r for r in reasons)
    # A steady battery, or too few points, says nothing.
    assert trend([(T0 + d * DAY, 12.6) for d in range(10)], T0 + 9 * DAY, t)["v_per_week"] == 0
    assert trend(history[:3], T0 + 9 * DAY, t) is None


def test_monitor_emits_battery_event_with_the_trend(tmp_path):
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    config = {"version": 1, "obd": {"pids": [{"name": "adapter.v", "pid": "ELM_VOLTAGE", "period_s": 0.1},
                                             {"name": "engine.rpm", "pid": "RPM", "period_s": 1}]},
              "health": {"battery_12v": {"trend_min_points": 4}}}
    now = [T0]
    mon = HealthMonitor(store=store, emit_event=events.append, config=lambda: config, clock=lambda: now[0])
    unit = {"voltage": "V", "rpm": "rpm"}
    name = {"voltage": "adapter.v", "rpm": "engine.rpm"}
    for day in range(6):  # a healthy crank each morning, resting voltage falling 0.06 V a day
        t0 = T0 + day * DAY
        now[0] = t0
        mon.process([Sample(name[r], unit[r], t, v) for r, t, v in start_trace(t0, 12.55 - 0.06 * day, 10.5)])
    try:
        health = [e for e in events if e["type"] == "health"]
        # Days 3, 4, 5 (4+ points over 3+ days): the trend warns while every level is still fine.
        assert [(e["ts"] - T0) // DAY for e in health] == [3, 4, 5]
        assert {e["level"] for e in health} == {"warn"}
        for e in health:
            schemas.validate("event", e)
            assert e["kind"] == "battery_12v" and "trend" in e["detail"]
        assert health[-1]["detail"]["reasons"] == [
            "resting voltage falling 0.42 V per week, 6 days to 11.9 V"]
        assert health[-1]["detail"]["trend"]["v_per_week"] == pytest.approx(-0.42)
        assert store.query("SELECT count(*) FROM health_battery")[0][0] == 6
        assert mon.snapshot()["battery_12v"]["rest_v"] == pytest.approx(12.25)
    finally:
        store.close()

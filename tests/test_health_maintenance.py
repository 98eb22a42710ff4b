"""Maintenance due by distance and time since the last service record of each kind."""
from __future__ import annotations

from agent.cloud import schemas
from agent.health import maintenance
from agent.health.monitor import META_ODOMETER, HealthMonitor
from agent.outbox.store import Store

T0 = 1_750_000_000_000
DAY = 86_400_000
SECTION = {"items": {"oil_change": {"km": 15000, "days": 365}, "brake_fluid": {"days": 730}},
           "ahead_km": 1000, "ahead_days": 30}


def _rec(km, ts, h="h1"):
    return {"odometer_km": km, "ts": ts, "hash": h}


def test_due_by_distance_and_by_time():
    last = {"oil_change": _rec(10_000, T0), "brake_fluid": _rec(10_000, T0)}
    by_kind = lambda odo, now: {d.kind: d for d in maintenance.due(SECTION, last, odo, now)}
    d = by_kind(20_000, T0 + 100 * DAY)
    assert (d["oil_change"].level, d["oil_change"].due_in_km, d["oil_change"].due_in_days) == ("ok", 5000, 265)
    d = by_kind(24_100, T0 + 100 * DAY)
    assert (d["oil_change"].level, d["oil_change"].due_in_km) == ("warn", 900)
    d = by_kind(12_000, T0 + 340 * DAY)
    assert (d["oil_change"].level, d["oil_change"].due_in_days) == ("warn", 25)
    d = by_kind(25_100, T0 + 100 * DAY)
    assert (d["oil_change"].level, d["oil_change"].due_in_km) == ("critical", -100)
    assert (d["brake_fluid"].level, d["brake_fluid"].due_in_days) == ("ok", 630)
    # Unknown odometer: time alone decides.
    assert by_kind(None, T0 + 100 * DAY)["oil_change"].due_in_km is None
    # Never serviced: no base to count from.
    assert maintenance.due(SECTION, {}, 50_000, T0)[0].level == "unknown"


def test_monitor_tells_once_per_level_and_starts_over_after_a_service(tmp_path):
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    now = [T0]
    config = {"version": 1, "obd": {"pids": []}, "health": {"maintenance": SECTION}}
    mon = HealthMonitor(store=store, emit_event=events.append, config=lambda: config, clock=lambda: now[0])
    try:
        mon.service_log.append("b-1", 10_000, ["oil_change", "brake_fluid"], "anna", ts=T0)
        assert mon.odometer_km() == 10_000
        store.set_meta(META_ODOMETER, {"km": 24_200, "ts": T0 + 50 * DAY})
        now[0] = T0 + 60 * DAY
        sent = mon.check_maintenance()
        assert [(e["detail"]["item"], e["level"], e["detail"]["due_in_km"]) for e in sent] == [("oil_change", "warn", 800)]
        schemas.validate("event", sent[0])
        assert mon.check_maintenance() == []  # told already
        store.set_meta(META_ODOMETER, {"km": 25_050, "ts": T0 + 70 * DAY})
        assert [e["level"] for e in mon.check_maintenance()] == ["critical"]
        assert mon.check_maintenance() == []
        # Oil changed: the count starts over from the new record.
        now[0] = T0 + 71 * DAY
        mon.service_log.append("b-2", 25_100, ["Oil_Change"], "ben", ts=now[0])
        assert mon.odometer_km() == 25_100
        assert mon.check_maintenance() == []
        snap = {d["kind"]: d for d in mon.snapshot()["maintenance"]}
        assert snap["oil_change"]["due_in_km"] == 15_000 and snap["oil_change"]["level"] == "ok"
        assert events == [e for e in events if e["kind"] == "maintenance_due"] and len(events) == 2
    finally:
        store.close()

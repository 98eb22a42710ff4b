"""The traction-battery trend and warning on constructed SOH histories with known answers.

Histories are built the way a BMS reports: a true linear decline, several readings a day with
noise, a temperature term (seasonal and daily), state-of-charge wander, single odd readings
and recalibration steps that shift every later reading. The true crossing of the threshold is
known in closed form, so the first warning can be checked to fall 25–35 days before it. The
store is the real one (SQLite), time is simulated (no sleeping).
"""
from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from agent.health.traction_battery import (DAY_MS, Settings, TractionBatteryHealth, fit_trend,
                                           format_battery_report, theil_sen)
from agent.cloud.schemas import validate
from agent.outbox.store import Store

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def history(*, days: int, soh0: float, per_year: float, steps: dict[int, float] | None = None,
            outliers: int = 6, noise: float = 0.35, temp_coef: float = 0.02,
            per_day: int = 4, seed: int = 1, start_day: int = 0):
    """[(t_ms, soh, odometer_km, temp_c)] and a function ``reading(day)`` = the noiseless
    reported SOH at the mean temperature on that day (true decline + recalibration offsets)."""
    rng = random.Random(seed)
    steps = steps or {}

    def offset(day: float) -> float:
        return sum(v for d, v in steps.items() if day >= d)

    def reading(day: float) -> float:
        return soh0 + per_year * day / 365.0 + offset(day)

    odd_days = set(rng.sample(range(start_day, start_day + days), outliers)) if outliers else set()
    rows = []
    for day in range(start_day, start_day + days):
        if rng.random() < 0.15:
            continue  # car not used that day
        for k in range(per_day):
            hour = rng.uniform(6, 22)
            d = day + hour / 24.0
            temp = 12 + 8 * math.sin(2 * math.pi * (d - 100) / 365) + 4 * math.sin(2 * math.pi * (hour - 9) / 24)
            soc = rng.uniform(20, 95)
            soh = reading(d) + temp_coef * (temp - 12) + 0.004 * (soc - 60) + rng.gauss(0, noise)
            if day in odd_days and k == 0:
                soh += rng.choice((-5.0, 4.0))
            rows.append((T0 + int(d * DAY_MS), round(soh, 1), 20000 + 45 * d, temp))
    return rows, reading


def first_warning_day(rows, settings: Settings, until_day: int, from_day: int = 0):
    """Runs the evaluation once per simulated day; the first day a SOH warning is raised."""
    for day in range(from_day, until_day):
        now = T0 + day * DAY_MS + 23 * 3600 * 1000
        visible = [r for r in rows if r[0] <= now]
        trend = fit_trend(visible, now, settings)
        from agent.health.traction_battery import assess_soh
        level, reason, detail = assess_soh(trend, now, settings)
        if level is not None:
            return day, level, detail
    return None


@pytest.mark.parametrize("seed, steps", [(1, {}), (2, {90: 1.5, 200: -1.2}), (3, {150: -2.0}),
                                        (4, {60: 2.5})])
def test_warning_first_appears_25_to_35_days_before_the_crossing(seed, steps) -> None:
    settings = Settings()
    rows, reading = history(days=540, soh0=79.0, per_year=-9.0, steps=steps, seed=seed)
    crossing = next(d / 10 for d in range(0, 5400) if reading(d / 10) <= settings.threshold_pct)
    found = first_warning_day(rows, settings, until_day=int(crossing) + 5, from_day=int(crossing) - 90)
    assert found is not None, "no warning before the crossing"
    day, level, detail = found
    lead = crossing - day
    assert level == "warn"
    assert 25 <= lead <= 35, f"first warning {lead:.1f} days before the crossing (day {crossing})"
    projected = (detail["projected_ms"] - T0) / DAY_MS
    assert abs(projected - crossing) <= 7, (projected, crossing)
    assert detail["trend_pct_per_month"] == pytest.approx(-9.0 / 12, rel=0.2)
    assert detail["trend_pct_per_1000km"] == pytest.approx(-9.0 / 365 / 45 * 1000, rel=0.2)
    assert 0.5 < detail["confidence"] <= 1.0


def test_no_warning_in_the_months_before() -> None:
    """Checked every day from the start: nothing until ~30 days before the crossing."""
    rows, reading = history(days=480, soh0=78.0, per_year=-8.0, steps={120: 1.5}, seed=7)
    crossing = next(d / 10 for d in range(0, 4800) if reading(d / 10) <= 70.0)
    found = first_warning_day(rows, Settings(), until_day=int(crossing) + 2, from_day=0)
    assert found is not None
    assert crossing - found[0] <= 35


def test_recalibration_steps_do_not_move_the_trend() -> None:
    rows, _ = history(days=180, soh0=90.0, per_year=-6.0, steps={60: 3.0, 120: -2.5}, seed=5)
    now = T0 + 180 * DAY_MS
    trend = fit_trend(rows, now, Settings())
    assert trend.status == "ok"
    assert trend.slope_per_day * 365 == pytest.approx(-6.0, rel=0.15)
    assert len(trend.steps) == 2 and all(abs(s - T0 // DAY_MS - d) <= 3 for s, d in zip(trend.steps, (60, 120)))
    # the plain Theil–Sen over the same daily data is pulled off by the steps
    naive = theil_sen([r[0] / DAY_MS for r in rows[::3]], [r[1] for r in rows[::3]]) * 365
    assert abs(naive + 6.0) > abs(trend.slope_per_day * 365 + 6.0)


def test_single_odd_readings_do_not_cut_the_series() -> None:
    rows, _ = history(days=120, soh0=90.0, per_year=-5.0, outliers=12, seed=9)
    trend = fit_trend(rows, T0 + 120 * DAY_MS, Settings())
    assert trend.steps == ()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_a_healthy_battery_never_warns(seed, tmp_path: Path) -> None:
    rows, _ = history(days=730, soh0=97.0, per_year=-1.5, steps={200: 1.0, 500: -1.5}, seed=seed)
    settings = Settings()
    for day in range(40, 730, 3):
        now = T0 + day * DAY_MS
        trend = fit_trend([r for r in rows if r[0] <= now], now, settings)
        from agent.health.traction_battery import assess_soh
        assert assess_soh(trend, now, settings)[0] is None, day


def test_too_little_history_gives_no_warning_and_the_report_says_so(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    health = TractionBatteryHealth(store, events.append, clock=lambda: T0 + 20 * DAY_MS)
    rows, _ = history(days=20, soh0=71.0, per_year=-30.0, outliers=0, seed=3)  # steep, but 20 days
    health.add_many_soh("KNDC3DLC5N5000001", rows)
    assert health.evaluate("KNDC3DLC5N5000001") == []
    report = health.report()
    assert report["trend"]["status"] == "insufficient"
    text = format_battery_report(report)
    assert "not enough history" in text and "No SOH warning is possible yet" in text
    assert re.search(r"SOH readings on 1[0-9] days over 19 days;", text), text   # a few days have none
    assert "at least 30 days over 45 days" in text, text


def test_a_first_days_report_says_one_day_and_shows_units(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    health = TractionBatteryHealth(store, clock=lambda: T0 + DAY_MS // 2)
    health.add_many_soh("KNDC3DLC5N5000001", [(T0, 96.0, 20000.0, 15.0), (T0 + 3_600_000, 96.0, 20010.0, 15.0)])
    report = health.report(latest={"ev.soh": 96.0, "ev.aux_v": 12.6, "ev.batt_t_max_no": 3.0},
                           units={"ev.soh": "%", "ev.aux_v": "V", "ev.batt_t_max_no": "", "ev.pack_v": "V"})
    assert report["units"] == {"ev.soh": "%", "ev.aux_v": "V", "ev.batt_t_max_no": ""}
    lines = format_battery_report(report).splitlines()
    assert "  ev.aux_v               12.6 V" in lines and "  ev.soh                 96 %" in lines, lines
    assert "  ev.batt_t_max_no       3" in lines, lines
    assert any("SOH readings on 1 day over 0 days;" in line for line in lines), lines


def test_events_through_the_store_warn_then_critical(tmp_path: Path) -> None:
    """The component end to end: readings stored, one warn event when the projection enters
    the window (valid PROTOCOL event), no repeat while it stays, critical once crossed."""
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    now = [T0]
    health = TractionBatteryHealth(store, events.append, clock=lambda: now[0])
    rows, reading = history(days=400, soh0=78.0, per_year=-8.0, seed=21)
    crossing = next(d / 10 for d in range(0, 4000) if reading(d / 10) <= 70.0)
    vin = "KNDC3DLC5N5000001"
    for day in range(0, 400, 2):
        now[0] = T0 + day * DAY_MS
        health.add_many_soh(vin, [r for r in rows if now[0] - 2 * DAY_MS < r[0] <= now[0]])
        health.evaluate(vin)
    warns = [e for e in events if e["level"] == "warn"]
    crit = [e for e in events if e["level"] == "critical"]
    assert len(warns) == 1 and len(crit) == 1, [(e["level"], e["detail"]["reason"]) for e in events]
    for e in events:
        validate("event", e)
        assert e["kind"] == "traction_battery" and e["detail"]["vehicle"] == vin
    lead = crossing - (warns[0]["ts"] - T0) / DAY_MS
    assert 23 <= lead <= 37  # evaluated every 2nd day here
    d = warns[0]["detail"]
    assert d["reason"] == "soh_projection" and d["threshold_pct"] == 70.0
    assert {"projected_date", "trend_pct_per_month", "trend_pct_per_1000km", "confidence"} <= set(d)
    assert (crit[0]["ts"] - T0) / DAY_MS >= crossing - 3
    text = format_battery_report(health.report(vin))
    assert "soh_below_threshold" in text and "%/month" in text


def test_growing_cell_spread_at_rest_warns_and_a_spread_under_load_does_not(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    health = TractionBatteryHealth(store, events.append)
    vin = "WVGZZZE2ZMP000001"
    for day in range(0, 100):
        t = T0 + day * DAY_MS
        spread = 0.015 + (0.050 * (day - 60) / 40 if day > 60 else 0.0)   # grows to 65 mV
        for h in (8, 12, 18):
            health.add_cells(vin, t + h * 3_600_000, 3.80 - spread, 3.80, current_a=0.5)
            health.add_cells(vin, t + h * 3_600_000 + 60_000, 3.60, 3.80, current_a=-120.0)  # load: ignored
        if day in (50, 99):
            health.evaluate(vin, t + 23 * 3_600_000)
    assert [(e["level"], e["detail"]["reason"]) for e in events] == [("warn", "cell_spread")]
    assert events[0]["detail"]["spread_mv"] > 50
    validate("event", events[0])


def test_a_cell_out_of_range_warns(tmp_path: Path) -> None:
    store = Store(tmp_path / "agent.db")
    events: list[dict] = []
    health = TractionBatteryHealth(store, events.append)
    health.observe("KMHKM81", T0, {"ev.cell_v_min": 2.31, "ev.cell_v_max": 3.9, "ev.pack_i": -40.0})
    assert [(e["level"], e["detail"]["reason"]) for e in events] == [("warn", "cell_out_of_range")]


def test_apply_config_sets_the_threshold_and_reports_bad_values(tmp_path: Path) -> None:
    health = TractionBatteryHealth(Store(tmp_path / "agent.db"))
    assert health.apply_config({"ev": {"profile": "auto", "period_s": 60, "soh_threshold_pct": 75}}) == []
    assert health.settings.threshold_pct == 75
    problems = health.apply_config({"ev": {"profile": "auto", "period_s": 60, "warn_days": "soon"}})
    assert problems and "warn_days" in problems[0]

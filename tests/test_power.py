"""Power management (agent/device/power.py, agent/device/vehicle_state.py).

The MCU is the simulator (firmware_bridge/sim.py) over its real pty through firmware_bridge's
McuLink; the power manager runs on the simulator's clock, so hours of parking take
milliseconds (``sim.advance``) and nothing sleeps. Without an MCU the 12 V comes from the
ELM327 emulator's ``ATRV`` and the CAN silence from a python-can virtual bus through
drivers/can.py's CanReader. The hooks the agent provides are recorded in :class:`Car`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import can
import jsonschema
import obd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud import schemas
from drivers.core.model import Frame
from agent.device.power import PowerHooks, PowerManager, PowerSettings, format_status
from agent.device.vehicle_state import (
    BusActivity, Evidence, Thresholds, VehicleState, VoltageTrend, decide, is_diagnostic)
from drivers.can import CanReader
from firmware_bridge.link import McuLink
from firmware_bridge.messages import MsgType, Sleep
from scripts.vehicle_sim.elm_emulator import ElmEmulator
from firmware_bridge.sim import McuSimulator, make_image
from scripts.testbed.wait import wait_until

pytestmark = pytest.mark.timeout(120)

ON, SETTLING, PARKED, CHARGING, SLEEPING = (
    VehicleState.ON, VehicleState.SETTLING, VehicleState.PARKED, VehicleState.CHARGING,
    VehicleState.SLEEPING)


class Car:
    """The agent's side of the hooks: records what the power manager asked for, in order."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.calls: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.bus = BusActivity(clock)
        self.alive = True
        self.volts: Callable[[], float | None] = lambda: None
        self.has_can = True

    def hooks(self) -> PowerHooks:
        return PowerHooks(
            stop_vehicle_requests=lambda: self.calls.append("stop"),
            resume_vehicle_requests=lambda: self.calls.append("resume"),
            flush=self._flush, emit_event=self.events.append,
            shutdown=lambda: self.calls.append("shutdown"),
            can_activity=lambda: self.bus.quiet_for() if self.has_can else None,
            supply_voltage=lambda: self.volts(), alive=lambda: self.alive)

    def _flush(self, timeout_s: float) -> bool:
        assert timeout_s > 0
        self.calls.append("flush")
        return True

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "health" and e["kind"] == kind]

    def check_events(self) -> None:
        for body in self.events:
            schemas.validate("event", body)


def run(pm: PowerManager, advance: Callable[[float], None], seconds: float, *,
        car: Car | None = None, step_s: float = 5.0) -> list[VehicleState | None]:
    """Simulated time passes in ``step_s`` slices, a decision after each; with ``car`` the
    car's bus carries broadcast traffic meanwhile. Returns the states seen."""
    seen = []
    t = 0.0
    while t < seconds:
        d = min(step_s, seconds - t)
        advance(d)
        t += d
        if car is not None:
            car.bus.note()
        seen.append(pm.step())
    return seen


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def sim(key: Ed25519PrivateKey) -> Iterator[McuSimulator]:
    with McuSimulator(key.public_key(), supply_v=12.6, ignition=True) as s:
        yield s


@pytest.fixture
def managers() -> Iterator[list[PowerManager]]:
    made: list[PowerManager] = []
    yield made
    for pm in made:
        pm.stop()


def settings_for(sim: McuSimulator, **kw: Any) -> PowerSettings:
    return PowerSettings(mcu_port=sim.port, mcu_timeout_s=1.0, **kw)


def manager(sim: McuSimulator, car: Car, managers: list[PowerManager],
            **kw: Any) -> PowerManager:
    pm = PowerManager.from_settings(settings_for(sim, **kw), hooks=car.hooks(), clock=sim.now)
    managers.append(pm)
    return pm


# --- the whole ignition cycle -------------------------------------------------------------------

def test_ignition_cycle_drive_off_flush_sleep_wake_on_timer_check_in_sleep(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, ignition_poll_s=3600)  # ignition must come by event
    s = pm.settings

    # on: the MCU reports the ignition on; polling may start; the MCU is configured
    car.bus.note()
    assert pm.step() is ON
    assert car.calls == ["resume"] and pm.vehicle_awake()
    assert sim.watchdog_timeout_s == s.watchdog_s
    assert [p.payload for p in sim.received(MsgType.SET_SUPPLY_REPORT)] == [
        s.supply_report_s.to_bytes(2, "little")]

    # drive ten minutes: alternator charging, the bus busy, the watchdog kicked
    sim.set_supply_voltage(14.2)
    kicks = len(sim.received(MsgType.WDT_KICK))
    assert set(run(pm, sim.advance, 600, car=car)) == {ON}
    assert len(sim.received(MsgType.WDT_KICK)) - kicks >= 600 / s.kick_s - 2
    assert sim.power_log == [] and car.calls == ["resume"]

    # ignition off: requests stop at once (the event, not the hour-long poll, tells us)
    sim.set_ignition(False)
    wait_until(lambda: pm.step() is SETTLING)
    assert car.calls == ["resume", "stop"] and not pm.vehicle_awake()
    sim.set_supply_voltage(12.7)

    # the car's ECUs wind down for 20 s: still settling, nothing sent to the MCU but queries
    assert set(run(pm, sim.advance, 20, car=car)) == {SETTLING}
    assert not sim.received(MsgType.SLEEP)

    # the bus falls silent: parked; after the grace period: flush, SLEEP, shutdown
    states = run(pm, sim.advance, 60)
    assert PARKED in states and states[-1] is SLEEPING
    assert states.index(PARKED) < states.index(SLEEPING)
    assert car.calls == ["resume", "stop", "flush", "shutdown"]
    [sleep] = sim.received(MsgType.SLEEP)
    assert Sleep.parse(sleep.payload) == Sleep(s.sleep_check_in_s, s.power_off_delay_s)
    [announce] = car.of_kind("dongle_power")
    assert announce["level"] == "info" and announce["detail"]["reason"] == "ignition_off"
    assert pm.status()["state"] == "sleeping"

    # the OS halts; the MCU cuts the power; the process is gone
    sim.advance(s.power_off_delay_s + 1)
    assert [(e.action, e.reason) for e in sim.power_log] == [("cut", "sleep")]
    pm.stop()

    # the wake timer fires: power back, a fresh agent starts and checks in
    sim.advance(s.sleep_check_in_s)
    assert [(e.action, e.reason) for e in sim.power_log][-1] == ("restore", "timer")
    car2 = Car(sim.now)
    pm2 = manager(sim, car2, managers)
    assert pm2.step() is SETTLING  # ignition off, bus not yet observed long enough
    assert pm2.status()["check_in"] and pm2.status()["mcu"]["wake_reason"] == "timer"
    assert sim.watchdog_timeout_s == s.watchdog_s  # re-armed after the power-up
    states = run(pm2, sim.advance, s.check_in_s + 5)
    assert PARKED in states and states[-1] is SLEEPING
    # the check-in never talked to the vehicle
    assert car2.calls == ["stop", "flush", "shutdown"]
    assert car2.of_kind("dongle_power")[0]["detail"]["reason"] == "check_in"
    assert len(sim.received(MsgType.SLEEP)) == 2
    sim.advance(s.power_off_delay_s + 1)
    assert [(e.action, e.reason) for e in sim.power_log] == [
        ("cut", "sleep"), ("restore", "timer"), ("cut", "sleep")]

    # the driver comes back: the MCU powers the dongle on ignition
    sim.set_ignition(True)
    assert sim.power_log[-1].reason == "ignition"
    car3 = Car(sim.now)
    pm3 = manager(sim, car3, managers)
    car3.bus.note()
    assert pm3.step() is ON and car3.calls == ["resume"] and not pm3.status()["check_in"]
    for c in (car, car2, car3):
        c.check_events()


def test_thread_follows_mcu_events(sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, ignition_poll_s=3600, tick_s=30)  # only events wake it
    car.bus.note()
    pm.start()
    wait_until(lambda: pm.state is ON)
    sim.set_ignition(False)
    wait_until(lambda: pm.state is SETTLING)
    sim.set_ignition(True)
    wait_until(lambda: pm.state is ON)
    pm.stop()
    assert car.calls == ["resume", "stop", "resume"]


def test_lost_ignition_event_is_caught_by_the_poll(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    link = McuLink(sim.port, on_event=lambda e: None, timeout_s=1.0)  # every event is lost
    pm = PowerManager(link, hooks=car.hooks(), clock=sim.now,
                      settings=settings_for(sim, ignition_poll_s=5))
    managers.append(pm)
    car.bus.note()
    assert pm.step() is ON
    sim.set_ignition(False)
    car.bus.note()
    assert pm.step() is ON  # the event went nowhere and the poll is not due
    sim.advance(5)
    car.bus.note()
    assert pm.step() is SETTLING
    assert car.calls == ["resume", "stop"]


# --- low battery --------------------------------------------------------------------------------

def test_low_battery_cut_sends_critical_health_and_sleeps_without_timer(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    sim.set_ignition(False)
    sim.set_supply_voltage(12.5)
    car = Car(sim.now)
    pm = manager(sim, car, managers, grace_s=36000, max_settle_s=36000)  # no normal sleep
    assert set(run(pm, sim.advance, 40)) >= {PARKED}

    # one sample (a glitch) and a short dip are not "sustained"
    sim.set_supply_voltage(10.9)
    run(pm, sim.advance, 5)
    sim.set_supply_voltage(12.5)
    run(pm, sim.advance, 30)
    sim.set_supply_voltage(11.6)
    run(pm, sim.advance, 45)
    assert car.of_kind("battery_12v") == [] and pm.state is PARKED

    # sustained below 11.8 V: critical event, flush, SLEEP with no wake timer, shutdown
    states = run(pm, sim.advance, 30)
    assert states[-1] is SLEEPING
    [ev] = car.of_kind("battery_12v")
    assert ev["level"] == "critical" and ev["detail"]["action"] == "sleep"
    assert ev["detail"]["supply_v"] == pytest.approx(11.6)
    assert ev["detail"]["threshold_v"] == 11.8 and ev["detail"]["below_for_s"] >= 60
    assert car.calls[-2:] == ["flush", "shutdown"] and "resume" not in car.calls
    [sleep] = sim.received(MsgType.SLEEP)
    assert Sleep.parse(sleep.payload).wake_after_s == 0
    car.check_events()

    # the MCU cuts the Pi and no timer brings it back: only the ignition does
    sim.advance(pm.settings.power_off_delay_s + 1)
    sim.advance(30 * 24 * 3600)
    assert [(e.action, e.reason) for e in sim.power_log] == [("cut", "sleep")]
    sim.set_ignition(True)
    assert sim.power_log[-1].reason == "ignition"


def test_low_battery_is_not_cut_while_the_ignition_is_on(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers)
    sim.set_supply_voltage(11.2)  # a failing alternator: the driver needs the car now
    assert set(run(pm, sim.advance, 300, car=car)) == {ON}
    assert car.of_kind("battery_12v") == [] and not sim.received(MsgType.SLEEP)


def test_weak_battery_warns_once_while_parked(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    sim.set_ignition(False)
    sim.set_supply_voltage(12.0)
    car = Car(sim.now)
    pm = manager(sim, car, managers, grace_s=36000, max_settle_s=36000)
    run(pm, sim.advance, 600)
    [ev] = car.of_kind("battery_12v")
    assert ev["level"] == "warn" and pm.state is PARKED
    car.check_events()


# --- what "parked" needs ------------------------------------------------------------------------

def test_parked_needs_ignition_off_and_bus_silence(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, max_settle_s=1200)
    # ignition on, bus silent (e.g. a gateway that forwards nothing): still on
    assert set(run(pm, sim.advance, 300)) == {ON}
    assert car.calls == ["resume"]
    # ignition off, the car's bus stays awake (alarm, infotainment): settling, never parked
    sim.set_ignition(False)
    assert set(run(pm, sim.advance, 1100, car=car)) == {SETTLING}
    assert not sim.received(MsgType.SLEEP) and car.calls == ["resume", "stop"]
    # ... unless it never ends: the dongle sleeps anyway after max_settle_s
    states = run(pm, sim.advance, 200, car=car)
    assert states[-1] is SLEEPING and PARKED not in states
    assert car.of_kind("dongle_power")[0]["detail"]["reason"] == "settle_timeout"


def test_smart_alternator_and_dc_dc_voltages_do_not_fake_ignition(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, grace_s=36000, max_settle_s=36000)
    # driving with a smart alternator: 12.3-12.6 V most of the time, 14.8 V bursts on overrun
    profile = [12.4, 12.3, 12.6, 14.8, 14.8, 12.5, 12.3, 12.4, 14.7, 12.6] * 6
    for v in profile:
        sim.set_supply_voltage(v)
        assert run(pm, sim.advance, 5, car=car) == [ON]
    # ignition off with the 12 V held at 14.6 V (EV DC-DC, battery maintainer), bus asleep
    sim.set_ignition(False)
    sim.set_supply_voltage(14.6)
    states = run(pm, sim.advance, 600)
    assert ON not in states and states[-1] is PARKED
    assert car.calls == ["resume", "stop"] and not pm.vehicle_awake()


def test_charging_keeps_the_car_awake_for_readers(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    sim.set_ignition(False)
    sim.set_supply_voltage(14.1)  # EV on the charger: DC-DC on, bus awake
    car = Car(sim.now)
    pm = manager(sim, car, managers)
    states = run(pm, sim.advance, 120, car=car)
    assert states[0] is SETTLING and states[-1] is CHARGING
    assert pm.vehicle_awake() and car.calls == ["stop", "resume"]
    assert not sim.received(MsgType.SLEEP)  # charging: stay awake
    # charging ends: DC-DC off, bus asleep: requests stop, then the dongle sleeps
    sim.set_supply_voltage(12.8)
    states = run(pm, sim.advance, 60)
    assert states[-1] is SLEEPING and car.calls == ["stop", "resume", "stop", "flush", "shutdown"]


# --- the MCU watchdog ---------------------------------------------------------------------------

def test_watchdog_is_kicked_only_while_the_agent_loops_live(
        sim: McuSimulator, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, watchdog_s=60, kick_s=10)
    run(pm, sim.advance, 600, car=car)
    assert sim.power_log == []
    car.alive = False  # a wedged main loop: no more kicks, the MCU power-cycles the Pi
    run(pm, sim.advance, 65, car=car)
    assert [(e.action, e.reason) for e in sim.power_log][:1] == [("cut", "watchdog")]


def test_watchdog_and_supply_report_reapplied_after_mcu_reset(
        sim: McuSimulator, key: Ed25519PrivateKey, managers: list[PowerManager]) -> None:
    car = Car(sim.now)
    pm = manager(sim, car, managers, watchdog_s=90, kick_s=30, supply_report_s=7)
    car.bus.note()
    assert pm.step() is ON and sim.watchdog_timeout_s == 90
    assert pm.mcu is not None
    image = make_image("1.1.0", 2048)
    assert pm.mcu.update_firmware(image, key.sign(image), trial_s=30) == "1.1.0"
    assert sim.watchdog_timeout_s == 300  # the reset brought back the boot default ...
    wait_until(lambda: (pm.step(), sim.watchdog_timeout_s == 90)[1])  # ... McuBooted fixes it
    assert sim.received(MsgType.SET_SUPPLY_REPORT)[-1].payload == (7).to_bytes(2, "little")
    assert pm.status()["mcu"]["firmware"] == "1.1.0"


def test_clean_stop_relaxes_the_watchdog(sim: McuSimulator, managers: list[PowerManager]) -> None:
    pm = manager(sim, Car(sim.now), managers)
    pm.step()
    pm.stop()
    assert sim.watchdog_timeout_s == pm.settings.stop_watchdog_s


# --- without an MCU -----------------------------------------------------------------------------

class SimClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture(scope="module")
def elm() -> Iterator[tuple[ElmEmulator, obd.OBD]]:
    with ElmEmulator("car") as emu:
        for _ in range(3):  # a loaded machine can make python-OBD's first handshake time out
            conn = obd.OBD(emu.port, fast=False, timeout=5.0)
            if conn.status() == obd.OBDStatus.CAR_CONNECTED:
                break
            conn.close()
            time.sleep(1)
        assert conn.status() == obd.OBDStatus.CAR_CONNECTED
        yield emu, conn
        conn.close()


def elm_volts(conn: obd.OBD) -> float | None:
    """The ELM327's ATRV (the adapter's own reading of pin 16; nothing goes on the bus)."""
    r = conn.query(obd.commands.ELM_VOLTAGE, force=True)
    return None if r.is_null() else float(r.value.magnitude)


def test_without_mcu_parked_comes_from_can_silence_and_elm327_voltage(
        elm: tuple[ElmEmulator, obd.OBD], caplog: pytest.LogCaptureFixture) -> None:
    emu, conn = elm
    emu.set_answer_xml("AT_R_VOLT", "<writeln>12.6V</writeln>")
    clock = SimClock()
    car = Car(clock)
    car.volts = lambda: elm_volts(conn)
    channel = f"power-{uuid.uuid4().hex}"
    vehicle = can.Bus(interface="virtual", channel=channel)
    reader = CanReader({"can0": can.Bus(interface="virtual", channel=channel)},
                       car.bus.note_frames)
    reader.start()
    pm = PowerManager(None, hooks=car.hooks(), clock=clock,
                      settings=PowerSettings(probe_interval_s=36000, probe_after_s=36000))

    def talk(can_id: int) -> None:
        before = car.bus.batches
        vehicle.send(can.Message(arbitration_id=can_id, data=b"\x01\x02", is_extended_id=False))
        if not is_diagnostic(can_id, False):
            wait_until(lambda: car.bus.batches > before)

    try:
        with caplog.at_level(logging.INFO, logger="agent.device.power"):
            talk(0x3E9)  # the car's own broadcast: awake
            assert pm.step() is ON and car.calls == ["resume"]
            for _ in range(20):  # 100 s of traffic
                clock.advance(5)
                talk(0x3E9)
                assert pm.step() is ON
            # the car goes quiet; only answers to diagnostic requests remain (ours)
            states = []
            for _ in range(10):
                clock.advance(5)
                vehicle.send(can.Message(arbitration_id=0x7E8, data=b"\x04\x41\x0c\x00\x00",
                                         is_extended_id=False))
                states.append(pm.step())
            wait_until(lambda: reader.delivered >= 31)  # 21 broadcast + 10 diagnostic frames
            assert states[-1] is PARKED and pm.step() is PARKED
            assert car.calls == ["resume", "stop"] and not pm.vehicle_awake()
            assert pm.status()["supply_v"] == pytest.approx(12.6)
            assert pm.status()["mcu"] is None

            # the battery sags while parked: critical event and a halt (no MCU to cut power)
            emu.set_answer_xml("AT_R_VOLT", "<writeln>11.5V</writeln>")
            for _ in range(16):
                clock.advance(5)
                pm.step()
        assert pm.state is SLEEPING
        [ev] = car.of_kind("battery_12v")
        assert ev["level"] == "critical" and ev["detail"]["action"] == "halt"
        assert ev["detail"]["source"] == "elm327"
        assert car.calls == ["resume", "stop", "flush", "shutdown"]
        no_mcu = [r for r in caplog.records if "no MCU: no sleep control" in r.getMessage()]
        assert len(no_mcu) == 1  # logged once, not once per step
        car.check_events()
    finally:
        emu.clear_answer("AT_R_VOLT")
        reader.stop()
        vehicle.shutdown()


def test_without_ignition_a_probe_lets_the_car_sleep_and_resumes_if_it_does_not() -> None:
    clock = SimClock()
    car = Car(clock)
    car.volts = lambda: 12.5  # not charging: could be parked, or a smart alternator
    pm = PowerManager(None, hooks=car.hooks(), clock=clock,
                      settings=PowerSettings(probe_after_s=120, probe_s=90,
                                             probe_interval_s=600))
    # the bus stays busy through the probe: the car really is on -> requests resume
    states = run(pm, clock.advance, 300, car=car)
    assert SETTLING in states and states[-1] is ON
    assert car.calls == ["resume", "stop", "resume"]
    assert set(run(pm, clock.advance, 400, car=car)) == {ON}  # no new probe before 600 s
    # next probe: this time the car was only kept awake by us and falls silent
    states = run(pm, clock.advance, 200)
    assert states[-1] is PARKED and car.calls[-1] == "stop"
    # a smart alternator charging hard (>= charge_v) is never probed
    car2 = Car(clock)
    car2.volts = lambda: 14.4
    pm2 = PowerManager(None, hooks=car2.hooks(), clock=clock,
                       settings=PowerSettings(probe_after_s=120, probe_s=90))
    assert set(run(pm2, clock.advance, 1000, car=car2)) == {ON}
    assert car2.calls == ["resume"]


def test_mcu_port_missing_degrades_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = SimClock()
    car = Car(clock)
    car.volts = lambda: 12.6
    pm = PowerManager.from_settings(PowerSettings(mcu_port="/nonexistent/ttyMCU", mcu_retry_s=30),
                                    hooks=car.hooks(), clock=clock)
    with caplog.at_level(logging.WARNING, logger="agent.device.power"):
        states = run(pm, clock.advance, 100, car=car) + run(pm, clock.advance, 600)
    assert states[0] is ON and states[-1] is PARKED
    assert "shutdown" not in car.calls and car.calls == ["resume", "stop"]
    down = [r for r in caplog.records if "MCU link unavailable" in r.getMessage()]
    assert len(down) == 1
    pm.stop()


def test_mcu_lost_mid_run_degrades_and_logs_once(
        key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture,
        managers: list[PowerManager]) -> None:
    sim = McuSimulator(key.public_key(), ignition=True).start()
    car = Car(sim.now)
    pm = manager(sim, car, managers, mcu_retry_s=30)
    car.bus.note()
    assert pm.step() is ON
    sim.stop()  # the UART goes away (e.g. the MCU board browns out)
    with caplog.at_level(logging.WARNING, logger="agent.device.power"):
        states = run(pm, sim.advance, 60, car=car)
    assert set(states) == {ON} and pm.status()["mcu"]["connected"] is False
    assert len([r for r in caplog.records if "MCU link unavailable" in r.getMessage()]) == 1
    assert "shutdown" not in car.calls and pm.vehicle_awake()


# --- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("ev", "state"), [
    (Evidence(True, 999.0, 0.0), ON),            # ignition on wins over a silent bus
    (Evidence(False, 0.0, 0.0), SETTLING),       # off, bus awake
    (Evidence(False, 0.0, 600.0), CHARGING),     # off, bus awake, 12 V held high
    (Evidence(False, 31.0, 600.0), PARKED),      # off, bus silent: a maintainer is no "on"
    (Evidence(False, None, 0.0), PARKED),        # off, no CAN at all
    (Evidence(None, 31.0, 600.0), PARKED),       # no MCU: the bus decides
    (Evidence(None, 1.0, 0.0), ON),
    (Evidence(None, None, 600.0), ON),           # neither: only a charging voltage says "on"
    (Evidence(None, None, 0.0), VehicleState.UNKNOWN),
])
def test_decide(ev: Evidence, state: VehicleState) -> None:
    assert decide(ev, Thresholds(bus_quiet_s=30, charge_v=13.2, charge_detect_s=60)) is state


def test_voltage_trend_sustained_means_several_readings_over_time() -> None:
    vt = VoltageTrend()  # the default the power manager uses: at least 3 readings
    vt.add(0, 11.0)
    vt.add(100, 11.0)  # two readings 100 s apart: not enough readings
    assert vt.below_for(11.8) == 0
    vt.add(110, 11.1)
    assert vt.below_for(11.8) == 110
    vt.add(120, 12.4)  # back above: the run is over
    assert vt.below_for(11.8) == 0 and vt.latest == 12.4
    for bad in (float("nan"), "12", None, 99.0, -1.0):
        assert not vt.add(130, bad)  # type: ignore[arg-type]
    assert vt.latest == 12.4
    for t in range(130, 200, 10):
        vt.add(t, 12.4 - (t - 130) / 3600)
    assert vt.slope_v_per_h(span_s=60) == pytest.approx(-1.0, rel=0.01)  # the ramp only


def test_bus_activity_ignores_diagnostic_traffic() -> None:
    clock = SimClock()
    act = BusActivity(clock)
    clock.advance(40)
    assert act.quiet_for() == 40 and not act.seen
    diag = [Frame("can0", 0, i, False, b"") for i in (0x7DF, 0x7E0, 0x7E8, 0x7EF)] + \
           [Frame("can0", 0, i, True, b"") for i in (0x18DB33F1, 0x18DAF110, 0x18DA10F1)]
    act.note_frames(diag)
    assert act.quiet_for() == 40
    act.note_frames(diag + [Frame("can0", 0, 0x18FEF100, True, b"")])  # J1939-style broadcast
    assert act.quiet_for() == 0 and act.seen
    assert not is_diagnostic(0x7DE, False) and not is_diagnostic(0x7F0, False)


def test_status_formatting_and_hook_failures_are_survived(
        sim: McuSimulator, managers: list[PowerManager], caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_: object) -> None:
        raise RuntimeError("hook broke")

    car = Car(sim.now)
    hooks = car.hooks()
    hooks.resume_vehicle_requests = boom
    hooks.can_activity = lambda: "soon"  # type: ignore[assignment,return-value]
    pm = PowerManager.from_settings(settings_for(sim), hooks=hooks, clock=sim.now)
    managers.append(pm)
    with caplog.at_level(logging.ERROR, logger="agent.device.power"):
        assert pm.step() is ON  # no CAN (bad hook answer), ignition on
    assert "power hook resume_vehicle_requests failed" in caplog.text
    text = format_status(pm.status())
    assert "vehicle: on" in text and "CAN: no CAN" in text and "12 V: 12.60 V" in text
    assert "MCU: connected" in text and "firmware 1.0.0" in text
    assert format_status({}).startswith("vehicle: undecided")

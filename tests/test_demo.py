"""The demo as a newcomer runs it: ``python -m scripts.demo`` for a bounded time, twice on one run
directory, and what its console printed (the README's sample output is of such a run).

The car is the vehicle twin, so what the cloud receives has known answers: the VIN, the freeze
frame of ``--dtc P0301`` (the car 2 s after its engine started), OBD speed agreeing with CAN
wheel speed, numbers at their signal's resolution, and on the second run no re-install, the
seq going on, the odometer a loop further and the retained config's ``duplicate`` ack explained.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.technician.resolution import decimals, signal_resolutions, text as show
from scripts.demo import DBC, DEMO_CONFIG
from scripts.refcloud.console import EXPLAIN_DUPLICATE, EXPLAIN_DUPLICATE_ACK
from scripts.testbed.shared_data import RAV4_LOG
from scripts.vehicle_sim.drive import Car, Drive
from scripts.vehicle_sim.ecu import DETECT_AFTER_S

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not RAV4_LOG.exists(), reason="the RAV4 recording is not here")]

ROOT = Path(__file__).resolve().parents[1]
SIGNAL = re.compile(r"([\w.]+)=(-?[0-9.]+)([^\s(]*) \(n=\d+\)")
SEQ = re.compile(r"^\[demo-0001\] seq=(\d+) ")


def run_demo(run_dir: Path, seconds: float, *args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "scripts.demo", "--run-dir", str(run_dir),
                        "--seconds", str(seconds), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=seconds + 240)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.rstrip().endswith("demo: stopped"), r.stdout[-2000:]
    return r.stdout.splitlines()


def telemetry(lines: list[str]) -> list[dict[str, tuple[str, str]]]:
    """Each telemetry line's ``{signal: (value text, unit)}`` (the last value of each)."""
    return [{m[0]: (m[1], m[2]) for m in SIGNAL.findall(line)} for line in lines if " telemetry " in line]


def seqs(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := SEQ.match(line))]


def test_the_demo_car_is_one_car_and_the_console_reads_plainly(tmp_path):
    run_dir = tmp_path / "demo"
    first = run_demo(run_dir, 75, "--dtc", "P0301")
    text = "\n".join(first)
    drive = Drive(Car(name="demo-0001"))
    vin = drive.car.vin

    assert not any(line.startswith("kid_") for line in first)
    assert sum("installed as a slot" in line for line in first) == 1
    assert f"VIN {vin}" in text and "parked, key on in" in text

    (vehicle,) = [line for line in first if " event vehicle: " in line]
    assert f'"vin": "{vin}"' in vehicle and '"vin_valid": true' in vehicle

    # the code as an ECU stores it: once the engine has run 2 s, with the car of that moment
    (dtc,) = [line for line in first if " event dtc: " in line]
    stored_at = drive.at(drive.phase["warm_idle"].start + DETECT_AFTER_S)
    assert "MIL on; P0301 stored, permanent (Cylinder 1 Misfire Detected)" in dtc
    rpm = show(round(stored_at.rpm * 4) / 4, 0.25)    # PID 0C: quarters of an rpm
    assert f"RPM={rpm}rpm " in dtc and "SPEED=0km/h " in dtc and "RUN_TIME=2s" in dtc
    assert f"COOLANT_TEMP={round(stored_at.coolant_c)}degC" in dtc

    assert re.search(r" event trip_start at \d\d:\d\d:\d\d: \(odometer unknown\)$", text, re.M)
    assert "{}" not in text

    # numbers at their signal's resolution (the DBC's scale, python-OBD's step)
    steps = signal_resolutions(DEMO_CONFIG, [DBC])
    batches = telemetry(first)
    shown = [(name, value) for b in batches for name, (value, _) in b.items()]
    assert {name for name, _ in shown} >= set(steps) - {"fuel.level"}
    for name, value in shown:
        places = len(value.split(".")[1]) if "." in value else 0
        assert places <= decimals(steps[name]), (name, value)

    # one car: OBD speed and CAN wheel speed of the same 5 s upload agree
    moving = [b for b in batches if "vehicle.speed" in b and "can.wheel_speed_fl" in b
              and float(b["vehicle.speed"][0]) > 10]
    assert len(moving) >= 3, batches
    for b in moving:
        assert abs(float(b["vehicle.speed"][0]) - float(b["can.wheel_speed_fl"][0])) < 8, b

    # every duplicate on screen comes after the line that explains it, once
    for why, mark in ((EXPLAIN_DUPLICATE, "(duplicate, ignored)"), (EXPLAIN_DUPLICATE_ACK, '"status": "duplicate"')):
        marked = [i for i, line in enumerate(first) if mark in line]
        assert first.count(why) == (1 if marked else 0)
        if marked:
            assert first.index(why) == marked[0] - 1

    second = run_demo(run_dir, 25)
    text2 = "\n".join(second)
    assert not any("installed as a slot" in line or "first run" in line for line in second)
    assert min(seqs(second)) > max(seqs(first))            # the device's seq goes on
    odometer = [float(m.replace(",", "")) for m in re.findall(r"odometer ([0-9,.]+) km", text + text2)]
    assert odometer[1] == pytest.approx(odometer[0] + drive.loop_distance_km, abs=0.11)
    assert "kept until cleared" in text2                    # the ECU kept P0301
    # the retained config comes again at the connect: acked duplicate, and said why, once
    acks = [i for i, line in enumerate(second) if '"status": "duplicate"' in line]
    assert acks and second.count(EXPLAIN_DUPLICATE_ACK) == 1
    assert second.index(EXPLAIN_DUPLICATE_ACK) == acks[0] - 1
    assert "(the last status, held by the broker)" in text2

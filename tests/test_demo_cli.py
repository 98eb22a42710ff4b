"""The technician's commands against the real demo (scripts/demo.py in a subprocess, as
docs/technician.md walks through it): `dongle logs` finds the demo's log without --file, and
`dongle live` shows numbers at the resolution of each signal."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.testbed.wait import wait_until
from tests.support.shown import assert_shown_at_resolution

REPO = Path(__file__).resolve().parent.parent
DONGLE = Path(sys.executable).parent / "dongle"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    out = open(run / "demo.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.demo", "--run-dir", str(run), "--seconds", "600"],
                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    toml = run / "devices" / "demo-0001" / "agent.toml"
    try:
        wait_until(lambda: "dongle-agent for demo-0001 started" in (run / "demo.out").read_text()
                   or proc.poll() is not None, 180, what="the demo's agent to start")
        assert proc.poll() is None, (run / "demo.out").read_text()
        wait_until(lambda: (toml.parent / "agent.sock").exists(), 60, what="the agent's control socket")
        yield toml
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def dongle(toml: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(DONGLE), *argv, "--config", str(toml)], capture_output=True, text=True, timeout=60)


def test_dongle_logs_finds_the_demos_log(demo):
    def started():
        r = dongle(demo, "logs", "-n", "500", "--json")
        if r.returncode != 0:
            return None
        doc = json.loads(r.stdout)
        return doc if any("starting as demo-0001" in line for line in doc["lines"]) else None

    doc = wait_until(started, 60, interval=0.5, what="the agent's start in `dongle logs`")
    assert doc["ok"] is True and doc["source"] == "file" and doc["path"] == str(demo.parent / "agent.log")
    r = dongle(demo, "logs", "-n", "3")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr


def test_live_numbers_are_rounded_to_each_signals_resolution(demo):
    """The RAV4 replay's CAN signals at their DBC scale (wheel speeds 0.01 km/h, with an offset of
    -67.67 that leaves float noise), the OBD PIDs at python-OBD's (load 100/255 %)."""
    def live():
        r = dongle(demo, "live", "--once", "--json")
        sig = {s["name"]: s for s in json.loads(r.stdout)["signals"]} if r.returncode == 0 else {}
        return sig if {"can.wheel_speed_fl", "engine.load"} <= set(sig) else None

    sig = wait_until(live, 90, interval=0.5, what="CAN and OBD signals in `dongle live`")
    assert sig["can.wheel_speed_fl"]["resolution"] == 0.01 and sig["can.wheel_speed_fl"]["unit"] == "km/h"
    assert sig["engine.load"]["resolution"] == pytest.approx(100 / 255)
    assert sig["vehicle.speed"]["resolution"] == 1
    assert_shown_at_resolution(sig.values())
    r = dongle(demo, "live", "--once")
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[2:]}
    assert len(rows["can.wheel_speed_fl"].partition(".")[2]) == 2, rows
    assert "." not in rows["vehicle.speed"], rows

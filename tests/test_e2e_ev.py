"""Issue 9's end-to-end: a simulated EV (scripts/vehicle_sim/ev_ecu_sim.py, UDS over can-isotp) read by real
dongle-agent processes over both transports — python-can (udp_multicast bus) and an ELM327 (the
simulator's pty front end) — with the ev.* signals arriving at the reference console."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("msgpack")


@pytest.fixture
def ev_sim(tmp_path):
    group = f"239.75.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = random.randrange(20000, 60000)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.vehicle_sim.ev_ecu_sim", "--profile", "hyundai_egmp",
                             "--interface", "udp_multicast", "--channel", group, "--port", str(port), "--elm"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp_path / "ev_sim.log", "w"), text=True)
    pty = proc.stdout.readline().strip()
    assert pty.startswith("/dev/"), (tmp_path / "ev_sim.log").read_text()
    yield group, port, pty
    proc.terminate()
    proc.wait(10)


EV_CONFIG = {"version": 1, "upload": {"interval_s": 1},
             "obd": {"pids": [], "dtc_period_s": 600},
             "can": {"signals": [], "raw": {"enabled": False, "ids": []}},
             "ev": {"profile": "hyundai_egmp", "period_s": 2}}


@pytest.mark.parametrize("transport", ["can", "elm327"])
def test_ev_signals_reach_the_console(fleet, ev_sim, transport):
    group, port, pty = ev_sim
    dev = f"ev-{transport}"
    bus = (f'[[can.buses]]\nname = "ev"\ninterface = "udp_multicast"\nchannel = "{group}"\nport = {port}\n')
    ev = ('[ev]\ntransport = "can"\nbus = "ev"\n' if transport == "can"
          else f'[ev]\ntransport = "elm327"\nport = "{pty}"\n')
    toml = fleet.device(dev, extra_toml=(bus if transport == "can" else "") + ev)
    agent = fleet.agent(toml)
    c = fleet.console
    assert c.wait_for(lambda r: r.get("topic") == "status" and r["dev"] == dev, 60), agent.log_text()
    seq, _ = c.publish(dev, "config", EV_CONFIG)
    ack = c.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == dev and r["body"]["ref_seq"] == seq, 60)
    assert ack and ack["body"]["status"] == "applied", (ack, agent.log_text()[-2000:])

    def ev_telemetry(r):
        return (r.get("kind") == "telemetry" and r["dev"] == dev
                and {"ev.soc_bms", "ev.soh"} <= {s["name"] for s in r["body"]["signals"]})
    rec = c.wait_for(ev_telemetry, 90)
    assert rec, agent.log_text()[-3000:]
    sig = {s["name"]: s for s in rec["body"]["signals"]}
    assert 20 <= sig["ev.soc_bms"]["v"][-1] <= 90 and sig["ev.soc_bms"]["unit"] == "%"
    assert 90 <= sig["ev.soh"]["v"][-1] <= 97

    # The technician at the car: `dongle battery` through the running agent's control socket.
    out = subprocess.run([str(Path(sys.executable).parent / "dongle"), "--config", str(toml), "battery", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report.get("available") is not False, report
    # the readings with the profile's units, as the text shows them
    assert report["units"]["ev.soh"] == "%" and report["units"]["ev.pack_v"] == "V", report["units"]
    from agent.health.traction_battery import format_battery_report
    shown = {line.split()[0]: line.split()[1:] for line in format_battery_report(report).splitlines()
             if line.startswith("  ev.")}
    assert shown["ev.soh"][-1] == "%" and shown["ev.pack_v"][-1] == "V", shown
    assert agent.terminate() == 0

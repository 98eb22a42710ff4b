"""End to end on a real SocketCAN stack: frames sent on vcan0 with can-utils' cansend arrive
decoded (and raw) at the reference cloud console, through a real dongle-agent process, a real
Mosquitto and the real `socketcan` interface. Runs in the CAN VM (make test-socketcan)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cantools
import pytest

ROOT = Path(__file__).resolve().parents[2]
DBC = ROOT / "config" / "dbc" / "toyota_new_mc_pt_generated.dbc"
DEV = "vcan-0001"

pytestmark = pytest.mark.skipif(not shutil.which("cansend"), reason="can-utils (cansend) not installed")


def test_cansend_frames_arrive_decoded_at_the_console(channel, fleet):
    bus = f'[[can.buses]]\nname = "can0"\ninterface = "socketcan"\nchannel = "{channel}"\ndbc = "{DBC}"\n'
    toml = fleet.device(DEV, extra_toml=bus)
    agent = fleet.agent(toml)
    c = fleet.console
    assert c.wait_for(lambda r: r.get("topic") == "status" and r["dev"] == DEV, 60), agent.log_text()
    seq, _ = c.publish(DEV, "config", {
        "version": 1, "upload": {"interval_s": 1},
        "obd": {"pids": [], "dtc_period_s": 600},
        "can": {"signals": [{"name": "wheel.fl", "message": "WHEEL_SPEEDS", "signal": "WHEEL_SPEED_FL",
                             "period_s": 0.01}],
                "raw": {"enabled": True, "ids": [0xAA]}}})
    assert c.wait_for(lambda r: r.get("kind") == "ack" and r["body"]["ref_seq"] == seq, 60), agent.log_text()

    db = cantools.database.load_file(str(DBC), strict=False)
    msg = db.get_message_by_name("WHEEL_SPEEDS")
    data = msg.encode({"WHEEL_SPEED_FL": 50.0, "WHEEL_SPEED_FR": 50.0, "WHEEL_SPEED_RL": 50.0,
                       "WHEEL_SPEED_RR": 50.0})
    for _ in range(3):
        subprocess.run(["cansend", channel, f"{msg.frame_id:03X}#{data.hex().upper()}"], check=True)

    def decoded(r):
        return (r.get("kind") == "telemetry" and r["dev"] == DEV
                and any(s["name"] == "wheel.fl" for s in r["body"]["signals"]))
    rec = c.wait_for(decoded, 60)
    assert rec, agent.log_text()[-3000:]
    sig = next(s for s in rec["body"]["signals"] if s["name"] == "wheel.fl")
    assert sig["unit"] == "km/h" and abs(sig["v"][0] - 50.0) < 0.01
    frames = rec["body"]["frames"][0]
    assert frames["bus"] == "can0" and frames["id"][0] == 0xAA and frames["data"][0] == data
    assert agent.terminate() == 0

"""The foundation's vertical slice, end to end with real peers only:

ELM327-emulator (pty) → python-OBD → dongle-agent daemon → SQLite → sealed envelope →
Mosquitto over mutual TLS → the reference cloud console, which verifies and opens it.
"""
from __future__ import annotations

import time

import pytest

from agent.cloud.cloudconfig import default_config
from scripts.vehicle_sim.elm_emulator import ElmEmulator

DEV = "e2e-0001"


def _live(console) -> None:
    """The shipped default config (its PIDs), uploading every 2 s instead of every 5 minutes:
    what a cloud sends when it wants live data. Retained, so a restarted agent gets it too."""
    doc = default_config()
    doc["version"], doc["upload"] = 1, {"interval_s": 2}
    console.publish(DEV, "config", doc)


@pytest.fixture
def emulator(tmp_path):
    emu = ElmEmulator("car", workdir=tmp_path / "elm", link=str(tmp_path / "obd-port"))
    emu.start()
    yield emu
    emu.stop()


def _telemetry(rec, name=None):
    if rec.get("kind") != "telemetry" or rec.get("dev") != DEV:
        return False
    return name is None or any(s["name"] == name for s in rec["body"]["signals"])


def _last_value(rec, name):
    for s in rec["body"]["signals"]:
        if s["name"] == name:
            return s["v"][-1], s["unit"]
    return None


def test_obd_values_reach_the_cloud_verified_and_track_the_car(fleet, emulator, tmp_path):
    emulator.set_answer("RPM", "41 0C 13 24")          # 1225 rpm (public decoding vector)
    emulator.set_answer("SPEED", "41 0D 14")           # 20 km/h
    toml = fleet.device(DEV, obd_port=str(tmp_path / "obd-port"))
    agent = fleet.agent(toml)
    c = fleet.console

    online = c.wait_for(lambda r: r.get("topic") == "status" and r["dev"] == DEV
                        and r["status"].get("state") == "online", 60)
    assert online, agent.log_text()
    # PROTOCOL rev 1.1: the status also says which form of frame times the device sends
    assert set(online["status"]) == {"state", "ts", "agent", "config_version", "frame_t"}
    assert online["status"]["frame_t"] in ("t", "dt")
    assert online["status"]["config_version"] == 0
    _live(c)

    vehicle = c.wait_for(lambda r: r.get("kind") == "event" and r["body"]["type"] == "vehicle", 60)
    assert vehicle and vehicle["body"]["protocol"].startswith("ISO 15765-4"), agent.log_text()

    rec = c.wait_for(lambda r: _telemetry(r, "engine.rpm") and _last_value(r, "engine.rpm")[0] == 1225, 60)
    assert rec, agent.log_text()
    assert _last_value(rec, "engine.rpm") == (1225, "rpm")
    assert _last_value(rec, "vehicle.speed") == (20, "km/h")
    names = {s["name"] for s in rec["body"]["signals"]}
    assert names == {"engine.rpm", "vehicle.speed", "engine.coolant_temp", "engine.load"}
    for s in rec["body"]["signals"]:
        assert len(s["t"]) == len(s["v"]) and all(t >= 0 for t in s["t"])

    # The car changes: the cloud follows.
    emulator.set_answer("RPM", "41 0C 0F A0")          # 1000 rpm
    assert c.wait_for(lambda r: _telemetry(r, "engine.rpm") and _last_value(r, "engine.rpm")[0] == 1000, 60)
    assert agent.terminate() == 0
    assert not any(r.get("rejected") for r in c.records), [r for r in c.records if r.get("rejected")]


def test_kill_shows_offline_and_restart_continues_seq(fleet, emulator, tmp_path):
    toml = fleet.device(DEV, obd_port=str(tmp_path / "obd-port"))
    c = fleet.console
    _live(c)
    agent = fleet.agent(toml)
    assert c.wait_for(lambda r: _telemetry(r), 60), agent.log_text()
    time.sleep(5)  # let a few more envelopes out (upload every 2 s)
    agent.kill()   # SIGKILL: no DISCONNECT, the broker publishes the will
    offline = c.wait_for(lambda r: r.get("topic") == "status" and r["status"].get("state") == "offline", 90)
    assert offline, "the will (offline status) did not arrive"
    seen_before = sorted(r["seq"] for r in c.records if r.get("dev") == DEV and "seq" in r)

    agent2 = fleet.agent(toml)
    first_new = c.wait_for(lambda r: r.get("dev") == DEV and r.get("seq", 0) > max(seen_before), 60)
    assert first_new, agent2.log_text()
    assert c.wait_for(lambda r: r.get("dev") == DEV and r.get("seq", 0) > first_new["seq"] + 1, 60)
    assert agent2.terminate() == 0

    fresh = [r["seq"] for r in c.records if r.get("dev") == DEV and "seq" in r and not r["duplicate"]]
    assert len(fresh) == len(set(fresh)), "a seq was reused"
    assert fleet.console.ledger.missing(DEV) == [], "a seq was skipped"
    # The envelopes in flight when the agent was killed are re-sent with their own seq (duplicates,
    # deduplicated by the cloud) — never re-sealed under a new one.
    assert sorted(set(fresh)) == list(range(1, max(fresh) + 1))


def test_unreachable_adapter_and_broker_are_retried_without_losing_samples(fleet, tmp_path):
    toml = fleet.device(DEV, obd_port=str(tmp_path / "no-such-port"))
    agent = fleet.agent(toml)
    c = fleet.console
    assert c.wait_for(lambda r: r.get("topic") == "status" and r["status"].get("state") == "online", 60)
    time.sleep(3)
    assert agent.alive(), agent.log_text()
    assert "no-such-port" in agent.log_text()
    assert agent.terminate() == 0

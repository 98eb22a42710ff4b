"""Issue 20 item 2: downlink effects never run inside the store's transaction or on paho's thread.

Through the real path: the agent built by agent.compose.build (in-process, so its store can be
read) or the real ``dongle-agent`` daemon, the real Mosquitto with TLS and ACLs, the reference
console as the cloud, the ELM327-emulator as the vehicle and gpsfake feeding a real gpsd.

- a cloud ``read_dtc`` while the DTC set changes is acked ``accepted`` and answered by a ``dtc``
  event (it used to wait 10 s for the OBD poller while holding the store lock the poller needed,
  then ack ``failed``);
- a consent withdrawal by config leaves none of the deleted position ciphertexts in any byte of
  the data directory (the checkpoint used to run inside the open transaction and fail);
- the VIN is in no byte of the data directory, not even while its ``vehicle`` event is queued;
- a downlink message queued when the agent dies is processed once after the restart (the
  broker's PUBACK waits for the commit), and the network thread never waits for the store.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from agent import settings
from agent.compose import build
from scripts.testbed.gps import needs_gpsd
from scripts.testbed.wait import wait_until
from scripts.vehicle_sim.elm_emulator import ElmEmulator
from tests.support.privacy import config, consent, make_agent

pytestmark = pytest.mark.timeout(240)


def data_bytes(data_dir: Path) -> bytes:
    """Every byte of every file in the agent's data directory (database, WAL, journal, ...)."""
    return b"".join(p.read_bytes() for p in sorted(Path(data_dir).iterdir()) if p.is_file())


def acks(console, dev, kind="command"):
    return [r["body"] for r in list(console.records) if r.get("dev") == dev and r.get("kind") == "ack"
            and r["body"]["ref_kind"] == kind]


def wait_ack(console, dev, kind, seq, timeout=30.0) -> dict:
    rec = console.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "ack"
                           and r["body"]["ref_kind"] == kind and r["body"]["ref_seq"] == seq, timeout)
    assert rec, f"no ack for {kind} seq={seq}"
    return rec["body"]


def events(console, dev, type_):
    return [r["body"] for r in list(console.records) if r.get("dev") == dev and r.get("kind") == "event"
            and r["body"].get("type") == type_]


@pytest.fixture
def emu(tmp_path):
    with ElmEmulator("car", workdir=tmp_path / "elm", link=str(tmp_path / "obd")) as e:
        yield e


@pytest.fixture
def obd_agent(fleet, emu, tmp_path):
    dev = "dle-0001"
    agent = build(settings.load(fleet.device(dev, obd_port=emu.port)))
    agent.start()
    try:
        assert agent.link.wait_connected(30)
        wait_until(lambda: agent.obd.status()["connected"], 60, what="the OBD poller connected")
        yield dev, agent
    finally:
        agent.stop()


def test_read_dtc_while_the_dtc_set_changes_is_accepted_and_answered_by_a_dtc_event(fleet, emu, obd_agent):
    dev, agent = obd_agent
    c = fleet.console
    # Samples flowing (the ingest must not stall either); DTCs read on request only.
    seq, _ = c.publish(dev, "config", {"version": 1, "upload": {"interval_s": 1},
                                       "obd": {"pids": [{"name": "rpm", "pid": "RPM", "period_s": 0.2}],
                                               "dtc_period_s": 3600},
                                       "can": {"signals": [], "raw": {"enabled": False, "ids": []}}})
    assert wait_ack(c, dev, "config", seq)["status"] == "applied"
    emu.set_dtcs(stored=["P0301"], pending=["P0171"])   # the set changes: the poller reports it
    seq, _ = c.publish(dev, "command", {"op": "read_dtc", "request_id": "rd-1"})
    ack = wait_ack(c, dev, "command", seq)
    assert ack["status"] == "accepted", ack
    assert ack["result"] == {"request_id": "rd-1"}
    result = c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                        and r["body"].get("type") == "dtc" and r["body"].get("ref_seq") == seq, 30)
    assert result, "no dtc event answered the read_dtc"
    body = result["body"]
    assert body["request_id"] == "rd-1"
    assert {(x["code"], x["state"]) for x in body["codes"]} == {("P0301", "stored"), ("P0171", "pending")}
    assert body["mil"] is True
    # The poller's own change report went through too (it needed the store while the command ran).
    assert any("ref_seq" not in e and {x["code"] for x in e["codes"]} == {"P0301", "P0171"}
               for e in events(c, dev, "dtc"))
    # One ack, and the samples kept coming after the read.
    assert [a["ref_seq"] for a in acks(c, dev)] == [seq]
    n = agent.obd.status()["samples"]
    wait_until(lambda: agent.obd.status()["samples"] > n + 3, 30, what="samples after the read")


def test_read_dtc_with_no_answer_is_reported_by_an_event(fleet, emu, obd_agent):
    dev, agent = obd_agent
    c = fleet.console
    # The car stops answering every DTC request (PID 01 01 and modes 03, 07, 0A).
    for name in ("STATUS", "GET_DTC", "SHOW_DIAG_TC", "GET_CURRENT_DTC", "SHOW_PENDING_TC", "UNKNOWN_0A"):
        emu.set_answer_xml(name, "<writeln>NO DATA</writeln>")
    seq, _ = c.publish(dev, "command", {"op": "read_dtc", "request_id": "rd-2"})
    assert wait_ack(c, dev, "command", seq)["status"] == "accepted"
    rec = c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                     and r["body"].get("type") == "health" and r["body"].get("kind") == "dtc_read", 60)
    assert rec, "no event said the read failed"
    detail = rec["body"]["detail"]
    assert detail["ref_seq"] == seq and detail["request_id"] == "rd-2" and "did not answer" in detail["reason"]
    assert not [e for e in events(c, dev, "dtc") if e.get("ref_seq") == seq]


def test_the_vin_is_in_no_byte_of_the_data_directory(fleet, obd_agent):
    dev, agent = obd_agent
    rec = fleet.console.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                                 and r["body"].get("type") == "vehicle", 60)
    assert rec and rec["body"].get("vin"), "the vehicle event with the emulator's VIN"
    vin = rec["body"]["vin"].encode()
    assert agent.identity.last()["vin"] == rec["body"]["vin"]   # kept, encrypted
    assert vin not in data_bytes(agent.settings.data_dir), "the VIN is on flash in clear"


def test_a_queued_vehicle_event_is_encrypted_until_sealed(fleet, tmp_path):
    """With the uplink held back, the ``vehicle`` event waits in the store: not in clear."""
    dev = "dle-0002"
    agent = build(settings.load(fleet.device(dev)))
    try:
        vin = "WP0ZZZ99ZTS392124"
        agent.identity.on_vehicle({"vin": vin, "protocol": "ISO 15765-4 (CAN 11/500)", "ecus": ["7E8"]})
        assert agent.store.counts()["events"] == 1
        assert vin.encode() not in data_bytes(agent.settings.data_dir)
        agent.start()      # then sealed and sent as ever
        rec = fleet.console.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                                     and r["body"].get("type") == "vehicle", 30)
        assert rec and rec["body"]["vin"] == vin and rec["body"]["vin_valid"] is True
    finally:
        agent.stop()


@pytest.fixture
def positions(fleet, gps, tmp_path):
    """An agent collecting precise positions, uploads an hour apart so they pile up unsent:
    ``(dev, agent, ciphertexts of three or more stored positions)``."""
    dev = "dle-0003"
    agent = make_agent(fleet, dev, gpsd_port=gps.port, sock_dir=tmp_path / "ctl")
    agent.start()
    try:
        assert agent.link.wait_connected(30)
        seq, _ = fleet.console.publish(dev, "config", config(1, location=consent("precise"), interval_s=3600))
        assert wait_ack(fleet.console, dev, "config", seq)["status"] == "applied"
        rows = wait_until(lambda: (r := agent.store.query("SELECT blob FROM location_positions")) and len(r) >= 3 and r,
                          60, what="three stored positions")
        blobs = [bytes(b) for (b,) in rows]
        assert any(b in data_bytes(agent.settings.data_dir) for b in blobs)   # the scan sees them
        yield dev, agent, blobs
    finally:
        agent.stop()


def gone_within_10_s(agent, blobs, what: str) -> None:
    wait_until(lambda: not any(b in data_bytes(agent.settings.data_dir) for b in blobs), 10,
               what=f"the {what} positions gone from every file of the data directory")


@needs_gpsd
def test_withdrawn_positions_are_in_no_byte_of_the_data_directory_within_10_s(fleet, positions):
    dev, agent, blobs = positions
    c = fleet.console
    seq, _ = c.publish(dev, "config", config(2, location={"mode": "off"}, interval_s=3600))
    gone_within_10_s(agent, blobs, "withdrawn")
    ack = wait_ack(c, dev, "config", seq)
    assert ack["status"] == "applied" and ack["config_version"] == 2
    assert agent.store.query("SELECT count(*) FROM location_positions")[0][0] == 0
    assert agent.privacy.errors == 0, agent.privacy.last_error
    ev = c.wait_for(lambda r: r.get("dev") == dev and r.get("kind") == "event"
                    and r["body"].get("type") == "privacy" and r["body"]["state"] == "withdrawn", 30)
    assert ev and ev["body"]["deleted"] >= 3 and ev["body"]["by"] == "config"


@needs_gpsd
def test_delete_data_leaves_no_deleted_position_in_the_data_directory(fleet, positions):
    dev, agent, blobs = positions
    seq, _ = fleet.console.publish(dev, "command", {"op": "delete_data", "categories": ["location"],
                                                    "request_id": "d-1"})
    ack = wait_ack(fleet.console, dev, "command", seq)
    assert ack["status"] == "done" and ack["result"]["deleted"]["location"] >= 3
    gone_within_10_s(agent, blobs, "deleted")
    assert agent.privacy.errors == 0, agent.privacy.last_error


def test_the_network_thread_never_waits_for_the_store(fleet, tmp_path):
    """The store busy (here: held by the test): downlink is queued, the link stays responsive,
    overflow beyond the bound is counted; when the store frees up everything queued is processed
    once, and what overflowed comes back from the broker in the next session."""
    from agent.cloud import downlink as downlink_mod

    dev = "dle-0005"
    agent = build(settings.load(fleet.device(dev, extra_toml="[uplink]\nmax_inflight = 8\n")))
    agent.start()
    c = fleet.console
    try:
        assert agent.link.wait_connected(30)
        wait_until(lambda: agent.store.counts()["outbox"] == 0 and agent.link.inflight == 0, 30,
                   what="nothing in flight")
        received = agent.link.stats["messages_received"]
        n = downlink_mod.QUEUE_MAX + 5
        with agent.store.batch():    # the store is busy: the downlink worker waits
            seqs = [c.publish(dev, "command", {"op": "ping", "request_id": f"p{i}"})[0] for i in range(3)]
            wait_until(lambda: agent.link.stats["messages_received"] == received + 3, 30, what="three received")
            wait_until(lambda: agent.downlink.status()["queued"] >= 2, 30, what="queued (one in hand)")
            # QoS 0 has no redelivery: a flood of it overflows the bound and is dropped, counted.
            for i in range(n):
                c.client.publish(f"dongle/v1/{dev}/down/command", b"qos0 flood", qos=0)
            wait_until(lambda: agent.link.stats["messages_received"] >= received + 3 + n, 30,
                       what="the network thread reading on while the store is busy")
            assert agent.downlink.status()["overflow"] >= n - downlink_mod.QUEUE_MAX
            assert agent.link.connected
        for s in seqs:
            assert wait_ack(c, dev, "command", s)["status"] == "done"
        assert sorted(a["ref_seq"] for a in acks(c, dev)) == sorted(seqs)
    finally:
        agent.stop()


def test_a_message_queued_when_the_agent_dies_is_processed_once_after_restart(fleet, tmp_path):
    dev = "dle-0006"
    toml = fleet.device(dev)
    db = settings.load(toml).db_path
    c = fleet.console
    proc = fleet.agent(toml)
    assert c.wait_for(lambda r: r.get("topic") == "status" and r["dev"] == dev
                      and r["status"]["state"] == "online", 60)
    seq, _ = c.publish(dev, "command", {"op": "ping", "request_id": "before"})
    assert wait_ack(c, dev, "command", seq)["status"] == "done"
    # Another writer holds the database: the agent's downlink worker cannot commit.
    blocker = sqlite3.connect(db, timeout=30, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        seq2, _ = c.publish(dev, "command", {"op": "ping", "request_id": "queued"})
        wait_until(lambda: "downlink: queued down/command" in proc.log_text(), 30, what="the command queued")
        proc.kill()                 # power cut: the queued command was never processed
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not [a for a in acks(c, dev) if a["ref_seq"] == seq2]
    proc = fleet.agent(toml)
    try:
        ack = wait_ack(c, dev, "command", seq2, timeout=60)
        assert ack["status"] == "done" and ack["result"] == {"request_id": "queued"}
        # Exactly once: no second ack for either command, even after another restart.
        assert proc.terminate() == 0
        proc = fleet.agent(toml)
        seq3, _ = c.publish(dev, "command", {"op": "ping", "request_id": "after"})
        assert wait_ack(c, dev, "command", seq3, timeout=60)["status"] == "done"
        assert sorted(a["ref_seq"] for a in acks(c, dev)) == [seq, seq2, seq3]
    finally:
        if proc.alive():
            proc.terminate()

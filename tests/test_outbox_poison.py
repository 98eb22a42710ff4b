"""No input blocks the outbox (issue 20 item 1): frames the protocol cannot carry are dropped where
they enter and counted; a stored row that cannot be sealed is set aside (quarantine) with an
explaining event while everything else flows on; a property test over frames and sample values.

Through the real path: python-can's slcan driver on a pty and a real ``dongle-agent`` daemon, the
real broker and the reference console; the property test through python-can's virtual bus, the
agent's reader, pipeline, ingest, store and uplink, every envelope opened and checked against
config/schemas/telemetry.json.
"""
from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import can
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from agent.cloud import protocol, schemas
from agent.cloud.keys import key_id
from agent.outbox.ingest import Ingest
from agent.outbox.store import Store
from agent.outbox.telemetry import wire_value
from agent.outbox.uplink import Sealer, Uplink
from agent.vehicle.can_pipeline import CanPipeline
from drivers.core.model import Sample
from scripts.refcloud.console import frames as console_frames
from scripts.testbed.wait import wait_until
from scripts.vehicle_sim.slcan_pty import SlcanPty

GOOD_ID = 0x123
CONFIG = {"version": 1, "upload": {"interval_s": 1}, "obd": {"pids": [], "dtc_period_s": 600},
          "can": {"signals": [], "raw": {"enabled": True, "ids": []}}}


def _dongle(toml: Path, *argv: str) -> dict:
    exe = Path(sys.executable).parent / "dongle"
    r = subprocess.run([str(exe), "--config", str(toml), *argv, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_out_of_spec_slcan_frames_are_dropped_counted_and_the_rest_reaches_the_cloud(fleet, tmp_path):
    """A cheap adapter delivers an 11-bit id above 0x7FF, a 29-bit id above 0x1FFFFFFF and nine data
    bytes on a classic frame (which raw capture stored and sealing then refused, halting every
    uplink for good): each is dropped where it enters and counted on its bus; every good frame,
    before and after them, reaches the cloud; ``dongle status`` shows the counts."""
    adapter = SlcanPty()
    sock = Path(f"/tmp/dgl-{uuid.uuid4().hex[:8]}.sock")
    dev = "poison-0001"
    toml = fleet.device(dev, control={"socket": str(sock)},
                        extra_toml=f'[[can.buses]]\nname = "slcan0"\ninterface = "slcan"\nchannel = "{adapter.port}"\n')
    c = fleet.console
    c.publish(dev, "config", CONFIG)
    agent = fleet.agent(toml)
    try:
        assert wait_until(lambda: b"O\r" in adapter.heard, 60, what="the driver opening the channel"), \
            agent.log_text()[-3000:]
        assert c.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == dev, 60), agent.log_text()[-3000:]
        bad = ["tFFF10A",                           # 11-bit id 0xFFF
               "T3FFFFFFF1AA",                      # 29-bit id 0x3FFFFFFF
               "t1239" + "11" * 9]                  # DLC 9 on a classic frame: nine bytes
        sent = 0
        for k in range(3):
            for _ in range(5):
                adapter.send(f"t{GOOD_ID:03X}2{sent:04X}")
                sent += 1
            adapter.send(bad[k])
        for _ in range(5):
            adapter.send(f"t{GOOD_ID:03X}2{sent:04X}")
            sent += 1

        def counters() -> list[int]:
            got = []
            for r in list(c.records):
                if r.get("kind") == "telemetry" and r["dev"] == dev and not r["duplicate"]:
                    got += [int.from_bytes(d, "big") for _, _, i, _, d in console_frames(r["body"]) if i == GOOD_ID]
            return sorted(got)

        assert wait_until(lambda: len(counters()) >= sent, 60, what="every good frame at the cloud"), \
            agent.log_text()[-3000:]
        assert counters() == list(range(sent))
        assert not [r for r in c.records if r.get("rejected")]
        bus = wait_until(lambda: (b := _dongle(toml, "status")["buses"]["slcan0"])["invalid"] == 3 and b, 30)
        assert bus["frames"] == sent and bus["errors"] == 0 and bus["unparsable"] == 0
        text = subprocess.run([str(Path(sys.executable).parent / "dongle"), "--config", str(toml), "status"],
                              capture_output=True, text=True, timeout=60).stdout
        assert "3 invalid" in text
    finally:
        agent.terminate()
        adapter.close()


SCHEMA_2 = """
CREATE TABLE samples (id INTEGER PRIMARY KEY, name TEXT, unit TEXT, t_ms INTEGER, value REAL);
CREATE TABLE frames (id INTEGER PRIMARY KEY, bus TEXT, t_us INTEGER, can_id INTEGER, ext INTEGER, data BLOB);
CREATE TABLE events (id INTEGER PRIMARY KEY, ts INTEGER, body BLOB);
CREATE TABLE outbox (seq INTEGER PRIMARY KEY, suffix TEXT, payload BLOB, priority INTEGER, created_ms INTEGER,
                     content TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE downlink_seq (kind TEXT PRIMARY KEY, seq INTEGER);
CREATE TABLE configs (version INTEGER PRIMARY KEY, doc TEXT, applied_ms INTEGER);
INSERT INTO meta VALUES ('schema_version', '2');
INSERT INTO meta VALUES ('uplink_seq', '41');
"""


def test_rows_that_cannot_be_sealed_are_quarantined_and_everything_else_flows_on(fleet):
    """The store an agent before this fix left behind: raw capture stored a frame with an 11-bit id
    of 0xFFF, and sealing failed on it at every retry, across restarts; a NaN stored as NULL and a
    sample without a name did the same. The agent of today sets those rows aside with a ``health``
    event (kind ``quarantine``) and sends everything else: the good frames and samples, the event
    that waited behind them, and numbers on from the persisted seq."""
    import cbor2
    dev = "poison-0002"
    toml = fleet.device(dev)
    db = toml.parent / "data" / "agent.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    now = int(time.time() * 1000) - 60_000
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_2)
    conn.executemany("INSERT INTO frames(bus, t_us, can_id, ext, data) VALUES (?,?,?,?,?)",
                     [("can0", (now + i) * 1000, 0x100 + i % 4, 0, bytes([i, 0xAB])) for i in range(50)]
                     + [("can0", (now + 50) * 1000, 0xFFF, 0, b"\x0a")]
                     + [("can0", (now + 60 + i) * 1000, 0x18DAF110, 1, bytes([i])) for i in range(10)])
    conn.executemany("INSERT INTO samples(name, unit, t_ms, value) VALUES (?,?,?,?)",
                     [("rpm", "rpm", now + i, 800.0 + i) for i in range(20)]
                     + [("rpm", "rpm", now + 20, None), ("", "rpm", now + 21, 5.0)])
    conn.execute("INSERT INTO events(ts, body) VALUES (?, ?)",
                 (now, cbor2.dumps({"type": "trip_start", "ts": now})))
    conn.commit()
    conn.close()
    c = fleet.console
    c.publish(dev, "config", CONFIG)
    agent = fleet.agent(toml)
    try:
        def telemetry():
            return [r for r in list(c.records) if r.get("kind") == "telemetry" and r["dev"] == dev]

        def sent_frames():
            return sorted((i, d) for r in telemetry() for _, _, i, _, d in console_frames(r["body"]))

        assert wait_until(lambda: len(sent_frames()) >= 60, 60, what="the good frames"), agent.log_text()[-3000:]
        want = sorted([(0x100 + i % 4, bytes([i, 0xAB])) for i in range(50)] + [(0x18DAF110, bytes([i])) for i in range(10)])
        assert sent_frames() == want
        rpm = sorted(v for r in telemetry() for s in r["body"]["signals"] if s["name"] == "rpm" for v in s["v"])
        assert rpm == [800 + i for i in range(20)]
        trip = c.wait_for(lambda r: r.get("kind") == "event" and r["dev"] == dev and r["body"]["type"] == "trip_start", 30)
        assert trip and trip["seq"] > 41
        def quarantined():
            return [r["body"] for r in list(c.records) if r.get("kind") == "event" and r["dev"] == dev
                    and r["body"]["type"] == "health" and r["body"]["kind"] == "quarantine"]
        # one event per table set aside; they come in separate envelopes, either first
        quarantine = wait_until(lambda: len(quarantined()) >= 2 and quarantined(), 30, what="both quarantine events")
        for body in quarantine:
            schemas.validate("event", body)
        assert sorted((b["detail"]["table"], b["detail"]["rows"]) for b in quarantine) == [("frames", 1), ("samples", 2)]
        assert not [r for r in c.records if r.get("rejected")]
        assert c.ledger.missing(dev) == [s for s in range(1, 42)]   # the earlier agent's seqs: never seen here
    finally:
        assert agent.terminate() == 0
    conn = sqlite3.connect(db)
    kept = conn.execute("SELECT source, count(*) FROM quarantine GROUP BY source ORDER BY source").fetchall()
    left = conn.execute("SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM frames)").fetchone()
    conn.close()
    assert kept == [("frames", 1), ("samples", 2)] and left == (0, 0)


# --------------------------------------------------------------------------------------------
# Property: whatever a bus and the drivers deliver, the outbox never blocks
# --------------------------------------------------------------------------------------------

class _Outbox:
    """The agent's CAN path on a python-can virtual bus, with the keys to open what it seals."""

    def __init__(self, tmp: Path):
        self.sign = Ed25519PrivateKey.generate()
        self.cloud = X25519PrivateKey.generate()
        self.channel = f"prop-{uuid.uuid4().hex}"
        self.store = Store(tmp / "agent.db")
        self.ingest = Ingest(self.store)
        self.uplink = Uplink(self.store, type("Offline", (), {"connected": False})(),
                             Sealer("prop-0001", self.sign, self.cloud.public_key()), interval_s=lambda: 1)
        self.pipe = CanPipeline([{"name": "can0", "interface": "virtual", "channel": self.channel}],
                                {"signals": [], "raw": {"enabled": True, "ids": []}},
                                put_samples=self.ingest.put_samples, put_frames=self.ingest.put_frames)
        self.pipe.start()
        self.tx = can.Bus(interface="virtual", channel=self.channel)
        self.seen = 0

    def close(self) -> None:
        self.tx.shutdown()
        self.pipe.stop()
        self.store.close()

    def opened(self):
        items = [i for i in self.store.outbox_items(10_000) if i.seq > self.seen]
        self.seen = max([self.seen] + [i.seq for i in items])
        trusted = {key_id(self.sign.public_key()): self.sign.public_key()}
        return [protocol.open_envelope(i.payload, expected_dev="prop-0001",
                                       expected_kind="telemetry" if i.suffix == "up/telemetry" else "event",
                                       trusted_signers=trusted, recipient_key=self.cloud, now_ms=None,
                                       last_seq=None) for i in items]


@pytest.fixture(scope="module")
def outbox(tmp_path_factory):
    o = _Outbox(tmp_path_factory.mktemp("prop"))
    yield o
    o.close()


_frame = hs.builds(
    lambda can_id, ext, fd, data: can.Message(arbitration_id=can_id, is_extended_id=ext, is_fd=fd, data=data,
                                              check=False),
    hs.one_of(hs.integers(0, 0x7FF), hs.integers(0x800, 0x1FFFFFFF), hs.integers(0x20000000, 2**32 - 1)),
    hs.booleans(), hs.booleans(), hs.binary(max_size=72))
_value = hs.one_of(hs.floats(allow_nan=True, allow_infinity=True), hs.integers(-2**70, 2**70),
                   hs.booleans(), hs.text(max_size=4), hs.none())


def _valid(m: can.Message) -> bool:
    return m.arbitration_id <= (0x1FFFFFFF if m.is_extended_id else 0x7FF) and len(m.data) <= (64 if m.is_fd else 8)


def _carried(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=hs.lists(_frame, max_size=40), values=hs.lists(_value, max_size=20))
def test_no_frame_or_sample_value_blocks_the_outbox(outbox, msgs, values):
    o = outbox
    before = o.pipe.status()["buses"]["can0"]
    t0 = int(time.time() * 1000)
    for m in msgs:
        o.tx.send(m)
    expect_frames = [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in msgs if _valid(m)]

    def arrived():
        st = o.pipe.status()["buses"]["can0"]
        return (st["frames"] - before["frames"] == len(expect_frames)
                and st["invalid"] - before["invalid"] == len(msgs) - len(expect_frames)
                and o.pipe.reader.delivered == st["frames"])
    wait_until(arrived, 20, what="every frame received or counted invalid")
    o.ingest.put_samples([Sample("v", "", t0 + i, v) for i, v in enumerate(values)])
    o.ingest.flush()
    o.uplink.seal_telemetry()
    assert o.store.counts()["frames"] == 0 and o.store.counts()["samples"] == 0   # nothing stuck
    got_frames, got_values = [], []
    for env in o.opened():
        schemas.validate(env.header["kind"], env.body)                              # every body valid
        if env.header["kind"] == "telemetry":
            got_frames += [(i, e, d) for _, _, i, e, d in console_frames(env.body)]
            got_values += [v for s in env.body["signals"] for v in s["v"]]
    assert sorted(got_frames) == sorted(expect_frames)
    # values as the wire carries them: whole numbers as integers, others as the nearest float32
    assert sorted(got_values) == sorted(wire_value(float(v)) for v in values if _carried(v))

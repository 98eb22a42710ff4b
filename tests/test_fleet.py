"""The fleet simulator (scripts/refcloud/fleet.py) and the reference ingest (scripts/refcloud/ingest.py)
on real brokers: every envelope a device had acknowledged by the broker is in the ingest's
database exactly once, counted by ``(dev, seq)``, through a broker restart that makes every
device reconnect at once; competing consumers share the work; a stale device gets its config
from the ingest and acks it; bad envelopes are kept as rejects and change nothing else.

Small fleets here (CI time); the thousand-device figures are bench/bench_fleet.py's.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from agent.cloud import keys, protocol
from scripts.refcloud import fleet, ingest
from scripts.testbed.mosquitto import LocalBroker
from scripts.testbed.wait import wait_until
from tests.conftest import MqttPeer, Pki

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

N = 20          # devices of the Mosquitto test
N_RABBIT = 10   # and of the RabbitMQ one (others: the cloud's downlink seq is per database)


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Path:
    """N provisioned devices, the cloud keys and the console certificate, on the tests' CA."""
    run = tmp_path_factory.mktemp("fleet")
    (run / "ca").symlink_to(pki.ca.directory)
    fleet.provision_fleet(run, N + N_RABBIT)
    return run


def start_fleet(run: Path, broker: object, tmp: Path, *, count: int, seconds: float, first: int = 0,
                protocol_version: str = "5", config: str = "default") -> tuple[subprocess.Popen, Path, Path]:
    status, report = tmp / "fleet-status.json", tmp / "fleet-report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.refcloud.fleet", "run", "--run-dir", str(run),
         "--broker", f"{broker.host}:{broker.port}", "--first", str(first), "--count", str(count),  # type: ignore[attr-defined]
         "--config", config, "--duration", str(seconds), "--drain-s", "20",
         "--protocol", protocol_version, "--status", str(status), "--report", str(report)],
        stdout=open(tmp / "fleet.log", "wb"), stderr=subprocess.STDOUT)
    return proc, status, report


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def acked_pairs(report: dict) -> set[tuple[str, int]]:
    return {(dev, s) for dev, ranges in report["acked_seqs"].items() for a, b in ranges
            for s in range(a, b + 1)}


@pytest.fixture
def consumers(fleet_dir: Path, tmp_path: Path) -> Iterator[Callable[..., list[ingest.Ingest]]]:
    """``consumers(broker, n, **Ingest kwargs)``: n ingest consumers, each on its own thread,
    one SQLite database (``tmp_path / "ingest.db"``)."""
    running: list[tuple[ingest.Ingest, threading.Thread]] = []

    def start(broker: object, n: int, **kwargs: object) -> list[ingest.Ingest]:
        made = []
        for i in range(n):
            c = ingest.Ingest(fleet_dir, ingest.SqliteSink(tmp_path / "ingest.db"),
                              host=broker.host, port=broker.port,  # type: ignore[attr-defined]
                              client_id=f"ingest-{tmp_path.name[-20:]}-{i}", **kwargs)  # type: ignore[arg-type]
            t = threading.Thread(target=c.run, daemon=True)
            t.start()
            running.append((c, t))
            made.append(c)
        for c in made:
            assert c.connected.wait(30)
        return made

    yield start
    for c, t in running:
        c.stop()
        t.join(10)
        c.sink.close()


def stored(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT dev, seq FROM envelopes").fetchall()


def test_every_acknowledged_envelope_is_stored_once_through_a_broker_restart_with_two_consumers(
        fleet_dir: Path, broker: LocalBroker, pki: Pki, peers: Callable[..., MqttPeer],
        consumers: Callable[..., list[ingest.Ingest]], tmp_path: Path) -> None:
    live = {**fleet.CONFIGS["live"], "version": 41}
    pair = consumers(broker, 2, desired_config=live)

    # Bad input first: kept as rejects with their reason, nothing else changes.
    forger = peers(broker, pki.cloud, client_id="cloud-forger")
    stranger = Ed25519PrivateKey.generate()
    cloud_enc = keys.load_public_key(fleet_dir / "cloud" / "cloud_enc.pub", X25519PublicKey)
    forged = protocol.seal("event", {"type": "trip_start", "ts": 1}, dev="sim-000000", seq=999_999,
                           signer=stranger, recipient=cloud_enc)
    ghost = protocol.seal("event", {"type": "trip_start", "ts": 1}, dev="ghost-0001", seq=1,
                          signer=stranger, recipient=cloud_enc)
    for topic, payload in [("dongle/v1/sim-000000/up/telemetry", b"\x83not cbor"),
                           ("dongle/v1/sim-000000/up/event", forged),
                           ("dongle/v1/ghost-0001/up/event", ghost)]:
        assert not forger.publish(topic, payload).is_failure
    wait_until(lambda: sum(c.stats.rejected for c in pair) == 3, what="three rejects")
    reasons = {k for c in pair for k in c.stats.reasons}
    assert reasons == {protocol.MALFORMED, protocol.UNKNOWN_SIGNER, "unknown_device"}

    proc, status, report_path = start_fleet(fleet_dir, broker, tmp_path, count=N, seconds=14)
    try:
        wait_until(lambda: read_json(status).get("states", {}).get("online") == N
                   and read_json(status).get("configs_applied") == N, timeout=60,
                   what="every device online, on the live config the ingest sent")
        wait_until(lambda: read_json(status).get("acked", 0) >= 3 * N, what="some uplink")
        broker.restart()   # every device loses the broker at once, and comes back by itself
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    report = read_json(report_path)
    assert report["lost"] == N and len(report["reconnects"]) == N
    assert not report["unacked"]
    acked = acked_pairs(report)
    assert len(acked) == report["acked"] >= 4 * N   # trip_start, the config ack, telemetry every 5 s
    db = tmp_path / "ingest.db"
    wait_until(lambda: set(stored(db)) >= acked, timeout=30, what="every acknowledged (dev, seq) stored")
    rows = stored(db)
    assert len(rows) == len(set(rows)) == len(acked)   # once each, nothing else (rejects apart)
    assert all(c.stats.stored > 0 for c in pair)       # the shared subscription split the work
    written = sum(c.stats.stored for c in pair)
    assert written == len(acked)
    with sqlite3.connect(db) as con:
        acks = con.execute("SELECT count(*) FROM envelopes WHERE kind='ack'").fetchone()[0]
        assert con.execute("SELECT count(*) FROM rejects").fetchone()[0] == 3
    assert acks >= N   # each device acked the config it was sent (applied; duplicates later)


def test_the_same_on_rabbitmq_with_one_consumer_and_no_retained_downlink(
        fleet_dir: Path, rabbitmq_broker: object, consumers: Callable[..., list[ingest.Ingest]],
        tmp_path: Path) -> None:
    count = N_RABBIT
    rabbitmq_broker.add_device(*fleet.device_ids(count, first=N))  # type: ignore[attr-defined]
    live = {**fleet.CONFIGS["live"], "version": 42}
    (one,) = consumers(rabbitmq_broker, 1, protocol_version="3.1.1", desired_config=live,
                       retain_downlink=False)
    proc, status, report_path = start_fleet(fleet_dir, rabbitmq_broker, tmp_path, count=count,
                                            first=N, seconds=10, protocol_version="3.1.1")
    try:
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    report = read_json(report_path)
    assert report["configs_applied"] == count and not report["unacked"]
    acked = acked_pairs(report)
    db = tmp_path / "ingest.db"
    wait_until(lambda: set(stored(db)) >= acked, timeout=30, what="every acknowledged (dev, seq) stored")
    assert len(stored(db)) == len(acked) and one.stats.stored == len(acked)


def test_the_sink_writes_a_seq_once_and_counts_downlink_per_device(tmp_path: Path) -> None:
    sink = ingest.SqliteSink(tmp_path / "s.db")
    row = ingest.Row("car-0001", 7, "event", 1, 2, {"type": "trip_start", "ts": 1})
    assert sink.write([row], []) == [True]
    assert sink.write([row, ingest.Row("car-0001", 8, "event", 1, 2, {})], []) == [False, True]
    assert [sink.next_down_seq("car-0001") for _ in range(3)] == [1, 2, 3]
    assert sink.next_down_seq("car-0002") == 1
    sink.close()


def test_a_simulated_day_drives_twice_and_checks_in_while_parked() -> None:
    import random
    start = 1_767_225_600_000   # a midnight (UTC)
    day = fleet.Day(random.Random(3), start)
    minutes = [start + m * 60_000 for m in range(24 * 60)]
    driving = sum(day.driving(t) for t in minutes)
    awake = sum(day.awake(t) for t in minutes)
    assert driving == 2 * 45
    # driving + a minute of grace after each drive + 90 s check-ins every 6 h asleep
    assert 2 * 46 < awake <= 2 * 46 + 6 * 2


def test_a_vehicle_reads_four_pids_a_second_with_one_stamp() -> None:
    import random
    samples = fleet.Vehicle(random.Random(1)).samples(1_000_500, 1_010_500)
    assert len(samples) == 40 and {s.t_ms for s in samples[:4]} == {1_001_000}
    assert {s.name for s in samples} == {"engine.rpm", "vehicle.speed", "engine.coolant_temp", "engine.load"}

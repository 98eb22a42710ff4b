"""A reference ingest a backend can start from: competing consumers of the fleet's uplink that
verify, decrypt, deduplicate on ``(dev, seq)`` and store, and answer with signed downlink.

Start several (one process each: the work is CPU, Python's is one core per process): they share
the load through an MQTT 5 shared subscription (``$share/<group>/dongle/v1/+/up/#``; Mosquitto),
each message to one of them. On RabbitMQ 3.10 (MQTT 3.1.1 only, no shared subscriptions) one
consumer subscribes plainly; competing consumers there would be AMQP consumers of one quorum
queue bound to ``amq.topic`` with ``dongle.v1.*.up.#`` (docs/protocol.md §2.7 row 3; not here).

What one consumer does with a message (docs/protocol.md §9, "Checklist for backend
implementers"):

1. the topic names the device and the kind; ``status`` (plain JSON) updates the device's
   presence and may trigger downlink (below);
2. :func:`agent.cloud.protocol.open_envelope`, the agent's own receiver checks, with the
   device's registered signing key as the only trusted signer and the cloud's X25519 key; the
   body's schema is then checked column by column for telemetry
   (``scripts.refcloud.telemetry_check.validate_telemetry``: the same rules as JSON Schema, ~60× faster on
   a 1,200-sample body) and with JSON Schema for the other kinds;
3. a batch of such rows goes to the :class:`Sink` in one transaction, ``(dev, seq)`` unique: a
   duplicate delivery is counted, never written twice; rejected envelopes are kept, raw, with
   their reason;
4. only then are the MQTT PUBACKs sent (paho's manual acknowledgement): a consumer that dies
   before its commit gets the messages again (at least once into the sink, exactly once in it).

Downlink: the cloud must not rely on retained downlink on every broker (RabbitMQ: §2.7 rows
4–5), so a device whose ``online`` status reports a ``config_version`` below the desired
config's gets it published again (sealed with ``agent.cloud.protocol.seal``, the per-device
downlink ``seq`` from the sink, shared by all consumers).

    python -m scripts.refcloud.ingest --run-dir DIR --broker HOST:PORT --db FILE
        [--group ingest] [--client-id ingest-1] [--protocol 5|3.1.1] [--desired-config FILE]
        [--batch 64] [--status FILE] [--duration S]

``--run-dir`` is devenv's layout (``ca/``, ``cloud/`` with the cloud keys and the console's TLS
certificate, ``devices/<id>/registration.json``), as scripts/refcloud/fleet.py makes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cbor2
import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cloud import keys, protocol, schemas, topics
from scripts.refcloud.telemetry_check import validate_telemetry
from drivers.core.clock import Clock
from scripts.refcloud.console import Registry

log = logging.getLogger("ingest")

now_ms = Clock().now_ms

SESSION_EXPIRY_S = 7 * 86400
RECEIVE_MAXIMUM = 256   # MQTT 5: PUBLISHes in flight to one consumer (the broker's cap applies too)


# --------------------------------------------------------------------------------------------
# Rows and the sink
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One accepted uplink envelope: who, which, when, and its body (decoded)."""

    dev: str
    seq: int
    kind: str
    sealed_ms: int
    received_ms: int
    body: dict


@dataclass(frozen=True)
class Reject:
    dev: str
    topic: str
    reason: str
    detail: str
    received_ms: int
    payload: bytes


class Sink(Protocol):
    """Where the ingest writes. Any database will do; ``(dev, seq)`` must be unique in it."""

    def write(self, rows: Sequence[Row], rejects: Sequence[Reject]) -> list[bool]:
        """Stores rows and rejects in one transaction; for each row, True if it was new."""

    def presence(self, dev: str, status: dict) -> None:
        """Records a device's latest ``status``."""

    def next_down_seq(self, dev: str) -> int:
        """The next downlink ``seq`` for ``dev`` (persisted, shared by all consumers)."""

    def close(self) -> None: ...


class SqliteSink:
    """The reference sink: one SQLite file (WAL), shareable by consumer processes."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS envelopes(dev TEXT, seq INTEGER, kind TEXT, sealed_ms INTEGER,
                received_ms INTEGER, body BLOB, PRIMARY KEY(dev, seq)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS rejects(dev TEXT, topic TEXT, reason TEXT, detail TEXT,
                received_ms INTEGER, payload BLOB);
            CREATE TABLE IF NOT EXISTS presence(dev TEXT PRIMARY KEY, state TEXT, ts INTEGER,
                config_version INTEGER, received_ms INTEGER);
            CREATE TABLE IF NOT EXISTS down_seq(dev TEXT PRIMARY KEY, seq INTEGER);
        """)
        self._lock = threading.Lock()

    def write(self, rows: Sequence[Row], rejects: Sequence[Reject]) -> list[bool]:
        fresh = []
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for r in rows:
                    cur = self.db.execute("INSERT OR IGNORE INTO envelopes VALUES (?,?,?,?,?,?)",
                                          (r.dev, r.seq, r.kind, r.sealed_ms, r.received_ms,
                                           cbor2.dumps(r.body)))
                    fresh.append(cur.rowcount == 1)
                self.db.executemany("INSERT INTO rejects VALUES (?,?,?,?,?,?)",
                                    [(j.dev, j.topic, j.reason, j.detail, j.received_ms, j.payload)
                                     for j in rejects])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return fresh

    def presence(self, dev: str, status: dict) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO presence VALUES (?,?,?,?,?)",
                            (dev, str(status.get("state")), status.get("ts"),
                             status.get("config_version"), now_ms()))

    def next_down_seq(self, dev: str) -> int:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT seq FROM down_seq WHERE dev=?", (dev,)).fetchone()
            seq = (row[0] if row else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO down_seq VALUES (?,?)", (dev, seq))
            self.db.execute("COMMIT")
            return seq

    def close(self) -> None:
        self.db.close()


# --------------------------------------------------------------------------------------------
# The receiver: PROTOCOL §3 checks, transport-free
# --------------------------------------------------------------------------------------------

def check_body(kind: str, body: dict) -> None:
    """The body's schema (the last receiver check): column by column for telemetry."""
    if kind == "telemetry":
        validate_telemetry(body)
    else:
        schemas.validate(kind, body)


class Receiver:
    def __init__(self, registry: Registry, enc_key: X25519PrivateKey):
        self.registry = registry
        self.enc_key = enc_key

    def open(self, dev: str, suffix: str, payload: bytes) -> Row | Reject:
        received = now_ms()
        kind = topics.UPLINK.get(suffix)
        reg = self.registry.get(dev) if protocol.valid_device_id(dev) else None
        if kind is None or reg is None:
            return Reject(dev, suffix, "unknown_device" if kind else "unknown_topic", "", received, payload)
        signers, _ = reg
        try:
            opened = protocol.open_envelope(payload, expected_dev=dev, expected_kind=kind,
                                            trusted_signers=signers, recipient_key=self.enc_key,
                                            now_ms=received, last_seq=None, check_schema=False)
            check_body(kind, opened.body)
        except protocol.Rejected as e:
            return Reject(dev, suffix, e.reason, str(e)[:500], received, payload)
        except schemas.SchemaError as e:
            return Reject(dev, suffix, protocol.SCHEMA, e.message[:500], received, payload)
        h = opened.header
        return Row(dev, h["seq"], kind, h["ts"], received, opened.body)


# --------------------------------------------------------------------------------------------
# One consumer on MQTT
# --------------------------------------------------------------------------------------------

@dataclass
class Stats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    statuses: int = 0
    downlink_sent: int = 0
    batches: int = 0
    connects: int = 0
    sink_wall_s: float = 0.0     # time spent in Sink.write (a slow disk shows here, not in CPU)
    reasons: dict[str, int] = field(default_factory=dict)


class Ingest:
    def __init__(self, run_dir: Path, sink: Sink, *, host: str, port: int, client_id: str,
                 group: str = "ingest", protocol_version: str = "5", batch: int = 64,
                 batch_wait_s: float = 0.02, desired_config: dict | None = None,
                 retain_downlink: bool = True):
        cloud = Path(run_dir) / "cloud"
        self.sink = sink
        self.receiver = Receiver(Registry(Path(run_dir) / "devices"),
                                 keys.load_private_key(cloud / "cloud_enc.key", X25519PrivateKey))
        self.sign_key = keys.load_private_key(cloud / "cloud_sign.key", Ed25519PrivateKey)
        self.stats = Stats()
        self.batch, self.batch_wait_s = batch, batch_wait_s
        self.desired = desired_config
        self.retain_downlink = retain_downlink
        self._offered: dict[str, int] = {}   # dev -> config version last published to it
        self._pending: list[tuple[int, int, Row | Reject]] = []   # (mid, qos, row)
        self._first_at = 0.0
        self._v5 = protocol_version == "5"
        share = f"$share/{group}/" if self._v5 and group else ""
        self.filters = [f"{share}{topics.ROOT}/+/up/#", f"{share}{topics.ROOT}/+/{topics.STATUS}"]
        self.host, self.port = host, port
        self.connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
                                  clean_session=None if self._v5 else False, manual_ack=True)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(Path(run_dir) / "ca" / "ca.pem"))
        ctx.load_cert_chain(str(cloud / "console.crt"), str(cloud / "console.key"))
        self.client.tls_set_context(ctx)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self._stop = threading.Event()

    # -- the loop -------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] = lambda: False, every_second: Callable[[], None] = lambda: None) -> None:
        """Connects (and reconnects) and consumes until ``until()`` or :meth:`stop`."""
        next_tick = time.monotonic() + 1
        while not (self._stop.is_set() or until()):
            if not self.connected.is_set() and self.client.socket() is None:
                self._connect()
                continue
            rc = self.client.loop(0.01)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self.client.socket() is None:
                self._pending.clear()   # not acknowledged: the broker delivers them again
                time.sleep(0.5)
            if self._pending and (len(self._pending) >= self.batch
                                  or time.monotonic() - self._first_at >= self.batch_wait_s):
                self.flush()
            if time.monotonic() >= next_tick:
                next_tick += 1
                every_second()
        self.flush()
        self.client.disconnect()

    def stop(self) -> None:
        self._stop.set()

    def _connect(self) -> None:
        try:
            if self._v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                props.ReceiveMaximum = RECEIVE_MAXIMUM
                self.client.connect(self.host, self.port, 30, clean_start=False, properties=props)
            else:
                self.client.connect(self.host, self.port, 30)
        except (OSError, ValueError) as e:
            log.warning("ingest: cannot connect to %s:%d: %s", self.host, self.port, e)
            time.sleep(1.0)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("ingest: broker refused: %s", reason)
            return
        self.stats.connects += 1
        client.subscribe([(f, 1) for f in self.filters])
        self.connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or "/".join(parts[:2]) != topics.ROOT:
            client.ack(msg.mid, msg.qos)
            return
        dev, suffix = parts[2], "/".join(parts[3:])
        if suffix == topics.STATUS:
            self._status(dev, bytes(msg.payload))
            client.ack(msg.mid, msg.qos)
            return
        self.stats.received += 1
        if not self._pending:
            self._first_at = time.monotonic()
        self._pending.append((msg.mid, msg.qos, self.receiver.open(dev, suffix, bytes(msg.payload))))

    def flush(self) -> None:
        """Writes the pending rows in one transaction, then acknowledges their messages."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = [r for _, _, r in pending if isinstance(r, Row)]
        rejects = [r for _, _, r in pending if isinstance(r, Reject)]
        t0 = time.monotonic()
        fresh = self.sink.write(rows, rejects)
        self.stats.sink_wall_s += time.monotonic() - t0
        self.stats.batches += 1
        self.stats.stored += sum(fresh)
        self.stats.duplicates += len(fresh) - sum(fresh)
        for j in rejects:
            self.stats.reasons[j.reason] = self.stats.reasons.get(j.reason, 0) + 1
            log.warning("ingest: rejected %s/%s: %s %s", j.dev, j.topic, j.reason, j.detail[:200])
        # counted after their reasons, so a reader that sees the count also sees why
        self.stats.rejected += len(rejects)
        for mid, qos, _ in pending:
            self.client.ack(mid, qos)

    # -- status and downlink --------------------------------------------------------------
    def _status(self, dev: str, payload: bytes) -> None:
        self.stats.statuses += 1
        try:
            status = json.loads(payload) if payload else {}
        except ValueError:
            return
        if not isinstance(status, dict) or self.receiver.registry.get(dev) is None:
            return
        self.sink.presence(dev, status)
        desired = self.desired
        if (desired and status.get("state") == "online"
                and int(status.get("config_version") or 0) < desired["version"]
                and self._offered.get(dev) != desired["version"]):
            self.send(dev, "config", desired)
            self._offered[dev] = desired["version"]

    def send(self, dev: str, kind: str, body: dict) -> int:
        """Seals ``body`` for ``dev`` and publishes it (QoS 1; config/release retained where
        ``retain_downlink``). Returns its downlink seq."""
        _, enc_pub = self.receiver.registry.get(dev)
        seq = self.sink.next_down_seq(dev)
        env = protocol.seal(kind, body, dev=dev, seq=seq, signer=self.sign_key, recipient=enc_pub)
        retain = self.retain_downlink and kind in topics.RETAINED_DOWNLINK
        self.client.publish(topics.prefix(dev) + topics.TOPIC_OF[kind], env, qos=1, retain=retain)
        self.stats.downlink_sent += 1
        return seq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.refcloud.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--broker", required=True, help="HOST:PORT")
    parser.add_argument("--db", type=Path, required=True, help="the SQLite sink")
    parser.add_argument("--group", default="ingest", help="shared-subscription group (MQTT 5)")
    parser.add_argument("--client-id", default=f"ingest-{os.getpid()}")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--desired-config", type=Path, help="config body every device should run")
    parser.add_argument("--no-retain", action="store_true", help="publish config without retain (RabbitMQ)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--status", type=Path, help="rewritten every second: counters and CPU (JSON)")
    parser.add_argument("--duration", type=float, default=0, help="stop after S seconds (0: on SIGTERM)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.broker.rpartition(":")
    desired = json.loads(args.desired_config.read_text()) if args.desired_config else None
    ingest = Ingest(args.run_dir, SqliteSink(args.db), host=host, port=int(port), client_id=args.client_id,
                    group=args.group, protocol_version=args.protocol, batch=args.batch,
                    desired_config=desired, retain_downlink=not args.no_retain)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ingest.stop())
    t0, cpu0 = time.monotonic(), time.process_time()

    def write_status() -> None:
        if args.status:
            tmp = args.status.with_name(args.status.name + ".tmp")
            tmp.write_text(json.dumps({"t": time.monotonic(), "cpu_s": time.process_time() - cpu0,
                                       "connected": ingest.connected.is_set(), **ingest.stats.__dict__}))
            os.replace(tmp, args.status)

    end = t0 + args.duration if args.duration else float("inf")
    ingest.run(lambda: time.monotonic() >= end, write_status)
    write_status()
    ingest.sink.close()
    log.info("ingest: %s", ingest.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

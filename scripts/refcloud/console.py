"""A minimal reference cloud backend for development, tests and the demo.

It holds the cloud keys, subscribes to the fleet's uplink, verifies and opens every envelope
with the same receiver checks a production backend must make (PROTOCOL §3), deduplicates on
``(dev, seq)`` (persisted), reports gaps, and prints decoded telemetry and events live. It can
also seal and publish downlink (config, booking, command, release) with its own persisted seq.

    python -m scripts.refcloud.console listen --run-dir DIR [--jsonl FILE]
    python -m scripts.refcloud.console publish --run-dir DIR --device ID KIND BODY.json
    python -m scripts.refcloud.console release VERSION [--broken] [--device ID] [--run-dir DIR]

``release`` builds VERSION of the agent from this checkout into the run directory's TUF
repository (scripts/testbed/updates.py; ``--broken``: a release that crashes on start), with a delta
from the version the device reports, and publishes the signed ``down/release`` for it; then it
shows the device's ``update`` events until the release is good (exit 0), rolled back or
rejected (exit 3).

``--run-dir`` is the layout the demo creates (see scripts/demo.py): ``broker.json`` (host,
port, ca), ``cloud/`` (cloud keys and the console's TLS client certificate), ``devices/<id>/``
(each device's ``registration.json`` from ``dongle provision``).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from agent.cloud import keys, protocol, topics
from agent.outbox.telemetry import frame_times
from drivers.core.clock import Clock
from drivers.core.text import safe_text as _safe

now_ms = Clock().now_ms

log = logging.getLogger("cloud_console")

PREFIX_ROOT = topics.ROOT


class Registry:
    """Devices known to the cloud: id → trusted device signing keys and its X25519 key."""

    def __init__(self, devices_dir: Path):
        self.devices_dir = devices_dir
        self._cache: dict[str, tuple[dict, object]] = {}

    def get(self, dev: str):
        if dev not in self._cache:
            reg_path = self.devices_dir / dev / "registration.json"
            if not reg_path.is_file():
                return None
            reg = json.loads(reg_path.read_text())
            sign_pub = serialization.load_pem_public_key(reg["device_sign_pub"].encode())
            enc_pub = serialization.load_pem_public_key(reg["device_enc_pub"].encode())
            self._cache[dev] = ({keys.key_id(sign_pub): sign_pub}, enc_pub)
        return self._cache[dev]

    def forget(self, dev: str) -> None:
        self._cache.pop(dev, None)

    def drop(self, dev: str) -> None:
        """The device was wiped: stop trusting its keys until it is provisioned again (its
        registration is kept aside as ``registration.wiped-<ms>.json`` for the record)."""
        reg = self.devices_dir / dev / "registration.json"
        if reg.is_file():
            reg.rename(reg.with_name(f"registration.wiped-{now_ms()}.json"))
        self.forget(dev)


class Ledger:
    """The console's durable state: uplink (dev, seq) seen, and its own downlink seq per device.

    What was seen is kept per console (``console``: the demo's is ``"demo"``, ``listen``'s
    ``"listen"``, the release tool's ``"release"``): two consoles on one run directory each
    show every envelope once, and mark as duplicates only what reached *them* before. The
    downlink seq and the configs the cloud sent are one per run directory (the device refuses
    a seq it has seen)."""

    def __init__(self, path: Path, console: str = "console"):
        self.console = console
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen_by(console TEXT, dev TEXT, seq INTEGER, kind TEXT, "
                        "ts INTEGER, PRIMARY KEY(console, dev, seq))")
        self.db.execute("CREATE TABLE IF NOT EXISTS down_seq(dev TEXT PRIMARY KEY, seq INTEGER)")
        self.db.execute("CREATE TABLE IF NOT EXISTS evicted(dev TEXT, from_seq INTEGER, to_seq INTEGER)")
        self.db.execute("CREATE TABLE IF NOT EXISTS sent_config(dev TEXT PRIMARY KEY, body TEXT)")
        self.lock = threading.Lock()

    def first_time(self, dev: str, seq: int, kind: str) -> bool:
        with self.lock:
            try:
                self.db.execute("INSERT INTO seen_by VALUES (?,?,?,?,?)",
                                (self.console, dev, seq, kind, now_ms()))
                return True
            except sqlite3.IntegrityError:
                return False

    def record_eviction(self, dev: str, from_seq: int, to_seq: int) -> None:
        with self.lock:
            self.db.execute("INSERT INTO evicted VALUES (?,?,?)", (dev, from_seq, to_seq))

    def missing(self, dev: str) -> list[int]:
        """Seqs below the highest seen that never arrived and that no ``buffer_evicted`` event
        explains: data loss (or envelopes still on their way — events overtake telemetry)."""
        with self.lock:
            rows = [r[0] for r in self.db.execute(
                "SELECT seq FROM seen_by WHERE console=? AND dev=? ORDER BY seq", (self.console, dev))]
            explained = self.db.execute("SELECT from_seq, to_seq FROM evicted WHERE dev=?", (dev,)).fetchall()
        if not rows:
            return []
        have = set(rows)
        return [s for s in range(1, rows[-1] + 1)
                if s not in have and not any(a <= s <= b for a, b in explained)]

    def devices(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT dev FROM seen_by WHERE console=?",
                                                  (self.console,))]

    def next_down_seq(self, dev: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT seq FROM down_seq WHERE dev=?", (dev,)).fetchone()
            seq = (row[0] if row else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO down_seq VALUES (?, ?)", (dev, seq))
            return seq

    def record_config(self, dev: str, body: dict) -> None:
        """The last config the cloud sent ``dev`` (what its telemetry's signals are)."""
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO sent_config VALUES (?, ?)", (dev, json.dumps(body)))

    def config(self, dev: str) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT body FROM sent_config WHERE dev=?", (dev,)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            return None


#: One line each, shown the first time a console shows what they explain.
EXPLAIN_DUPLICATE = ("cloud: \"duplicate, ignored\": the device sent this envelope again (MQTT QoS 1 resends "
                     "what the broker had not acknowledged when the link or the agent last stopped); the "
                     "cloud has it already, by (device, seq), and keeps the first copy")
EXPLAIN_DUPLICATE_ACK = ("cloud: an ack \"duplicate\": the broker keeps the cloud's last config and release "
                         "for each device (MQTT retained messages) and hands them over again whenever the "
                         "device subscribes; the device has them already and says so")


class Screen:
    """The lines a person reads on one console: each record's line and, the first time this
    console shows something that needs it, the one line that explains it."""

    def __init__(self):
        self._explained: set[str] = set()

    def lines(self, rec: dict, resolutions: dict[str, float] | None = None) -> list[str]:
        out = []
        body = rec.get("body") or {}
        if rec.get("duplicate"):
            why = "duplicate", EXPLAIN_DUPLICATE
        elif rec.get("kind") == "ack" and body.get("status") == "duplicate":
            why = "duplicate_ack", EXPLAIN_DUPLICATE_ACK
        else:
            why = None
        if why and why[0] not in self._explained:
            self._explained.add(why[0])
            out.append(why[1])
        out.append(format_record(rec, resolutions))
        return out


class CloudConsole:
    """``on_record(rec)`` gets every record; ``on_line(text)`` the lines a person reads: each
    record formatted (numbers at their signal's resolution: the device's config as this cloud
    sent it, and ``dbc_paths`` for its CAN signals), and the first time something needs it, the
    one line that explains it (a duplicate, a ``duplicate`` ack). ``name``: whose dedup state
    this is (:class:`Ledger`)."""

    def __init__(self, run_dir: Path, *, on_record: Callable[[dict], None] | None = None,
                 on_line: Callable[[str], None] | None = None, name: str = "console",
                 dbc_paths: Iterable[str | Path] = (), protocol_version: str = "5"):
        self.run_dir = Path(run_dir)
        broker = json.loads((self.run_dir / "broker.json").read_text())
        self.host, self.port, self.ca_file = broker["host"], broker["port"], broker["ca_file"]
        cloud = self.run_dir / "cloud"
        self.sign_key = keys.load_private_key(cloud / "cloud_sign.key", Ed25519PrivateKey)
        self.enc_key = keys.load_private_key(cloud / "cloud_enc.key", X25519PrivateKey)
        self.registry = Registry(self.run_dir / "devices")
        self.ledger = Ledger(cloud / "console.db", console=name)
        self.on_record = on_record or (lambda r: None)
        self.on_line = on_line
        self._dbc_paths = list(dbc_paths)
        self._resolutions: dict[str, dict[str, float]] = {}
        self.screen = Screen()
        self.records: list[dict] = []
        self._records_lock = threading.Lock()
        self.connected = threading.Event()
        v5 = protocol_version == "5"
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-console-{id(self)}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.client.tls_set(ca_certs=self.ca_file, certfile=str(cloud / "console.crt"),
                            keyfile=str(cloud / "console.key"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(1, 10)

    # -- connection -----------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.error("console: broker refused the connection: %s", reason_code)
            return
        client.subscribe([(f"{PREFIX_ROOT}/+/up/#", 1), (f"{PREFIX_ROOT}/+/status", 1)])
        self.connected.set()

    # -- uplink ---------------------------------------------------------------------------
    def _record(self, rec: dict) -> None:
        with self._records_lock:
            self.records.append(rec)
        self.on_record(rec)
        if self.on_line is not None:
            for line in self.lines(rec):
                self.on_line(line)

    def lines(self, rec: dict) -> list[str]:
        """What a person sees of ``rec`` on this console (:class:`Screen`)."""
        return self.screen.lines(rec, self.resolutions(rec["dev"]) if rec.get("kind") == "telemetry" else None)

    def resolutions(self, dev: str) -> dict[str, float]:
        """``{signal: resolution}`` of ``dev``'s telemetry, from the config this cloud sent it."""
        if dev not in self._resolutions:
            from agent.technician.resolution import signal_resolutions
            self._resolutions[dev] = signal_resolutions(self.ledger.config(dev) or {}, self._dbc_paths)
        return self._resolutions[dev]

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 4 or "/".join(parts[:2]) != PREFIX_ROOT:
            return
        dev, suffix = parts[2], "/".join(parts[3:])
        try:
            self.handle(dev, suffix, msg.payload, retained=bool(msg.retain))
        except Exception:  # a console must survive anything a device sends
            log.exception("console: failed to handle a message on %s", msg.topic)

    def handle(self, dev: str, suffix: str, payload: bytes, *, retained: bool = False) -> None:
        if suffix == "status":
            try:
                status = json.loads(payload) if payload else {}
            except ValueError:
                status = {"invalid": payload[:100].hex()}
            self._record({"dev": dev, "topic": "status", "status": status, "retained": retained})
            return
        kind = protocol.TOPIC_KINDS.get(suffix)
        reg = self.registry.get(dev)
        if kind is None or reg is None:
            self._record({"dev": dev, "topic": suffix, "rejected": "unknown device or topic"})
            return
        signers, _ = reg
        try:
            opened = protocol.open_envelope(
                payload, expected_dev=dev, expected_kind=kind, trusted_signers=signers,
                recipient_key=self.enc_key, now_ms=now_ms(), last_seq=None)
        except protocol.Rejected as e:
            self._record({"dev": dev, "topic": suffix, "rejected": e.reason, "detail": str(e)})
            return
        seq = opened.header["seq"]
        fresh = self.ledger.first_time(dev, seq, kind)
        body = opened.body
        if fresh and kind == "event" and body.get("type") == "device_wiped":
            self.registry.drop(dev)
        if fresh and kind == "event" and body.get("type") == "buffer_evicted" \
                and isinstance(body.get("from_seq"), int) and isinstance(body.get("to_seq"), int):
            self.ledger.record_eviction(dev, body["from_seq"], body["to_seq"])
        self._record({"dev": dev, "topic": suffix, "kind": kind, "seq": seq, "duplicate": not fresh,
                      "header": opened.header, "body": opened.body})

    # -- downlink -------------------------------------------------------------------------
    def publish(self, dev: str, kind: str, body: dict, *, exp_ms: int | None = None,
                seq: int | None = None) -> tuple[int, bytes]:
        """Seals ``body`` for ``dev`` and publishes it on its downlink topic. Returns (seq, envelope)."""
        reg = self.registry.get(dev)
        if reg is None:
            raise KeyError(f"unknown device {dev}")
        _, enc_pub = reg
        seq = seq if seq is not None else self.ledger.next_down_seq(dev)
        env = protocol.seal(kind, body, dev=dev, seq=seq, signer=self.sign_key, recipient=enc_pub,
                            exp_ms=exp_ms)
        self.publish_raw(dev, f"down/{kind}", env, retain=kind in ("config", "release"))
        if kind == "config":
            self.ledger.record_config(dev, body)
            self._resolutions.pop(dev, None)
        return seq, env

    def publish_raw(self, dev: str, suffix: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(f"{PREFIX_ROOT}/{dev}/{suffix}", payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict | None:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            with self._records_lock:
                batch = self.records[seen:]
                seen = len(self.records)
            for rec in batch:
                if predicate(rec):
                    return rec
            time.sleep(0.05)
        return None


def frames(body: dict) -> list[tuple[str, int, int, bool, bytes]]:
    """The raw frames of a telemetry body as ``(bus, t_us since the epoch, id, ext, data)``, in
    the body's order, whichever form of frame times each list carries (``t``, or PROTOCOL rev 1.1
    ``dt``: the first the offset from ``t0``, each later one the step from the previous)."""
    t0_us = int(body.get("t0", 0)) * 1000
    out = []
    for g in body.get("frames", ()):
        out += [(g["bus"], t0_us + t, i, e, d) for t, i, e, d in zip(frame_times(g), g["id"], g["ext"], g["data"])]
    return out


def _clock_time(ts_ms) -> str:
    """``HH:MM:SS`` (local time) of a device timestamp, or ``?``."""
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, (int, float)):
        return "?"
    try:
        return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))
    except (OverflowError, OSError, ValueError):
        return "?"


def _dtc_text(body: dict) -> str:
    """``MIL on; P0301 stored, permanent (Cylinder 1 Misfire Detected); freeze frame (P0301):
    RPM=1174.5rpm SPEED=0km/h ...``: a ``dtc`` event for people (values at python-OBD's
    resolution of each PID)."""
    from agent.technician.resolution import pid_step, text as show
    states: dict[str, list[str]] = {}
    desc: dict[str, str] = {}
    for c in body["codes"]:
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            states.setdefault(c["code"], []).append(str(c.get("state")))
            desc.setdefault(c["code"], str(c.get("desc") or ""))
    codes = "; ".join(f"{code} {', '.join(st)}" + (f" ({desc[code]})" if desc[code] else "")
                      for code, st in states.items()) or "no trouble codes"
    text = f"MIL {'on' if body.get('mil') else 'off'}; {codes}"
    freeze = body.get("freeze")
    if isinstance(freeze, dict) and isinstance(freeze.get("values"), dict):
        values = []
        for name, v in freeze["values"].items():
            if isinstance(v, dict) and isinstance(v.get("value"), (int, float)):
                res = pid_step(name)
                values.append(f"{name}={show(v['value'], res)}{v.get('unit') or ''}")
        text += f"; freeze frame ({freeze.get('code')}): " + " ".join(values)
    return _safe(text, 600)


def _snapshot_text(detail: dict) -> str:
    """The ``report`` command's snapshot for people: trips, engine starts and the last one's
    battery readings, odometer, trouble codes, maintenance (the rest is in the JSON)."""
    health = detail.get("health") if isinstance(detail.get("health"), dict) else {}
    parts = []
    trip = health.get("trip") if isinstance(health.get("trip"), dict) else {}
    if trip:
        parts.append(f"trips {trip.get('trips')}" + (" (in a trip)" if trip.get("in_trip") else ""))
    if "engine_starts" in health:
        parts.append(f"engine starts {health['engine_starts']}")
    battery = health.get("battery_12v") if isinstance(health.get("battery_12v"), dict) else {}
    if battery.get("ts") is not None:
        volts = ", ".join(f"{label} {battery[k]:.2f} V" for k, label in (("rest_v", "resting"), ("crank_min_v", "cranking"))
                          if isinstance(battery.get(k), (int, float)))
        parts.append(f"last start {_clock_time(battery['ts'])}: {volts or 'not measured'} ({battery.get('level')})")
    elif battery:
        parts.append(f"battery {battery.get('level')}")
    odometer = health.get("odometer_km")
    parts.append(f"odometer {odometer:,.1f} km" if isinstance(odometer, (int, float)) else "odometer unknown")
    dtc = health.get("dtc") if isinstance(health.get("dtc"), dict) else {}
    if dtc:
        codes = ", ".join(f"{c.get('code')} {c.get('state')}" for c in dtc.get("codes") or [] if isinstance(c, dict))
        parts.append(f"trouble codes {codes or 'none'} ({dtc.get('severity')})")
    for d in health.get("maintenance") or []:
        if isinstance(d, dict):
            left = f", {d['due_in_km']:,.0f} km left" if isinstance(d.get("due_in_km"), (int, float)) else ""
            parts.append(f"{d.get('kind')} {d.get('level')}{left}")
    return _safe("; ".join(parts), 600)


def format_record(rec: dict, resolutions: dict[str, float] | None = None) -> str:
    """One line for a record. Telemetry values are shown at their signal's resolution
    (``resolutions``: ``{name: step}``, agent/technician/resolution.py), else at 6 digits."""
    from agent.technician.resolution import text as show
    dev = _safe(rec["dev"], 64)
    if rec.get("topic") == "status":
        st = rec["status"]
        # a retained status is the last one the broker holds, from before this console connected
        last = " (the last status, held by the broker)" if rec.get("retained") else ""
        return (f"[{dev}] status   {_safe(st.get('state'))} agent={_safe(st.get('agent'))} "
                f"config_version={st.get('config_version')} frame_t={_safe(st.get('frame_t', 't'))}{last}")
    if "rejected" in rec:
        return f"[{dev}] REJECTED {rec['topic']}: {rec['rejected']} {_safe(rec.get('detail', ''))}"
    dup = " (duplicate, ignored)" if rec["duplicate"] else ""
    body, kind, seq = rec["body"], rec["kind"], rec["seq"]
    resolutions = resolutions or {}
    if kind == "telemetry":
        parts = [f"{_safe(s['name'], 40)}={show(s['v'][-1], resolutions.get(s['name']))}"
                 f"{_safe(s['unit'], 10)} (n={len(s['v'])})"
                 for s in body.get("signals", []) if s["v"]]
        rows = frames(body)
        if rows:
            span = (max(r[1] for r in rows) - min(r[1] for r in rows)) / 1e6
            parts.append(f"frames={len(rows)} over {span:.1f} s")
        return f"[{dev}] seq={seq:<6} telemetry  " + "  ".join(parts) + dup
    if kind == "event":
        etype = body.get("type")
        fields = {k: v for k, v in body.items() if k not in ("type", "ts")}
        text = _safe(json.dumps(fields, default=str), 300) if fields else ""
        if etype == "health" and body.get("kind") == "snapshot" and isinstance(body.get("detail"), dict):
            return f"[{dev}] seq={seq:<6} event health snapshot: {_snapshot_text(body['detail'])}{dup}"
        if etype == "dtc" and isinstance(body.get("codes"), list):
            return f"[{dev}] seq={seq:<6} event dtc: {_dtc_text(body)}{dup}"
        if etype in ("trip_start", "trip_end"):
            # the trip's own moments: its first and last sample that showed the car in use
            when = f" at {_clock_time(body.get('ts'))}"
            if "odometer_km" not in fields:
                text = f"{text} (odometer unknown)" if text else "(odometer unknown)"
            return f"[{dev}] seq={seq:<6} event {_safe(etype)}{when}: {text}{dup}"
        return f"[{dev}] seq={seq:<6} event {_safe(etype)}: {text or '{}'}{dup}"
    return f"[{dev}] seq={seq:<6} {kind}: {_safe(json.dumps(body, default=str), 300)}{dup}"


def _ranges(seqs: list[int]) -> str:
    out, start, prev = [], None, None
    for s in seqs + [None]:
        if start is None:
            start = prev = s
        elif s is not None and s == prev + 1:
            prev = s
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = s
    return ", ".join(out)


def _cmd_listen(args) -> int:
    out = open(args.jsonl, "a") if args.jsonl else None

    def write(rec: dict) -> None:
        if out:
            out.write(json.dumps(rec, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)) + "\n")
            out.flush()

    console = CloudConsole(Path(args.run_dir), on_record=write, on_line=lambda line: print(line, flush=True),
                           name="listen", dbc_paths=args.dbc)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    console.start()
    print(f"cloud console: listening on {console.host}:{console.port} for {PREFIX_ROOT}/+/up/#", flush=True)
    reported: dict[str, list[int]] = {}
    while not stop.wait(30):
        for dev in console.ledger.devices():
            # Report a gap once it has lasted a whole round (envelopes overtake each other briefly).
            gaps = console.ledger.missing(dev)
            lasting = [s for s in gaps if s in reported.get(dev, [])]
            if lasting:
                print(f"[{_safe(dev, 64)}] GAP: seq {_ranges(lasting)} missing and not explained by an eviction",
                      flush=True)
            reported[dev] = gaps
    console.stop()
    return 0


def _cmd_publish(args) -> int:
    body = json.loads(Path(args.body).read_text()) if args.body != "-" else json.load(sys.stdin)
    console = CloudConsole(Path(args.run_dir))
    console.start()
    if not console.connected.wait(15):
        print("cloud console: cannot reach the broker", file=sys.stderr)
        return 1
    seq, _ = console.publish(args.device, args.kind, body)
    print(f"published {args.kind} seq={seq} to {args.device}")
    console.stop()
    return 0


def reported_version(console: CloudConsole, dev: str, timeout: float = 5.0) -> str | None:
    """The agent version in the device's latest (retained) status, if it arrives in time."""
    def latest() -> str | None:
        with console._records_lock:
            for rec in reversed(console.records):
                if rec.get("dev") == dev and rec.get("topic") == "status":
                    return rec["status"].get("agent")
        return None
    deadline = time.monotonic() + timeout
    while (v := latest()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return v


def release(console: CloudConsole, dev: str, version: str, *, broken: bool = False,
            counter: int | None = None, delta_from: str | None = None,
            repo: Path | None = None, keys: Path | None = None, url: str | None = None,
            parked: bool = False, min_supply_v: float = 0) -> tuple[int, dict]:
    """Builds agent ``version`` into the run directory's repository and publishes the signed
    ``down/release`` for ``dev``. ``delta_from`` defaults to the version the device reports.
    Returns (downlink seq, release body)."""
    from scripts.testbed import updates as demo_update

    url = url or demo_update.repository_url(console.run_dir)
    if delta_from is None:
        delta_from = reported_version(console, dev)
    built = demo_update.build_release(console.run_dir, version, counter=counter, broken=broken,
                                      delta_from=delta_from, repo=repo, keys=keys)
    body = built.body(url, parked=parked, min_supply_v=min_supply_v)
    seq, _ = console.publish(dev, "release", body)
    return seq, body


def _default_device(run_dir: Path) -> str:
    devices = sorted(p.name for p in (run_dir / "devices").glob("*") if p.is_dir())
    return devices[0] if len(devices) == 1 else "demo-0001"


def _cmd_release(args) -> int:
    run_dir = Path(args.run_dir)
    dev = args.device or _default_device(run_dir)
    done = threading.Event()
    outcome: dict = {}

    def concerns(rec: dict) -> tuple[dict, bool, bool] | None:
        """(body, is this release's ack, is its update event) for this device's records."""
        if rec.get("dev") != dev:
            return None
        body = rec.get("body") or {}
        is_ack = rec.get("kind") == "ack" and body.get("ref_kind") == "release"
        is_update = (rec.get("kind") == "event" and body.get("type") == "update"
                     and body.get("to") == args.version)
        return body, is_ack, is_update

    def show(rec: dict) -> None:
        c = concerns(rec)
        if c is None:
            return
        _, is_ack, is_update = c
        if is_ack or is_update or rec.get("topic") == "status":
            print(format_record(rec), flush=True)
        check(rec)

    def check(rec: dict) -> None:
        c = concerns(rec)
        if c is None:
            return
        body, is_ack, is_update = c
        if is_ack and body.get("ref_seq") == outcome.get("seq") \
                and body.get("status") in ("rejected", "failed"):
            outcome["state"] = body.get("status")
            done.set()
        if is_update and body.get("state") in ("good", "rolled_back", "rejected"):
            outcome["state"] = body["state"]
            done.set()

    console = CloudConsole(run_dir, on_record=show, name="release")
    console.start()
    try:
        if not console.connected.wait(15):
            print("cloud console: cannot reach the broker", file=sys.stderr)
            return 1
        try:
            seq, body = release(console, dev, args.version, broken=args.broken,
                                counter=args.counter, delta_from=args.delta_from,
                                repo=Path(args.repo) if args.repo else None,
                                keys=Path(args.keys) if args.keys else None, url=args.url,
                                parked=args.parked, min_supply_v=args.min_supply_v)
        except (OSError, ValueError, KeyError) as e:
            print(f"cloud console: release failed: {e}", file=sys.stderr)
            return 1
        outcome["seq"] = seq
        with console._records_lock:
            early = list(console.records)   # an answer may have come before seq was known
        for rec in early:
            check(rec)
        how = f"delta from {body['delta_from']}" if body.get("delta_from") else "full bundle"
        print(f"published release agent {args.version} (counter {body['release_counter']}, "
              f"{how}{', broken on purpose' if args.broken else ''}) seq={seq} to {dev}",
              flush=True)
        if args.wait <= 0:
            return 0
        if not done.wait(args.wait):
            print(f"cloud console: no outcome within {args.wait:g} s (the release may still be "
                  "waiting for its conditions: see `dongle status`)", flush=True)
            return 1
        print(f"release {args.version}: {outcome['state']}", flush=True)
        return 0 if outcome["state"] == "good" else 3
    finally:
        console.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud_console", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("listen", help="show everything the fleet sends, verified and decrypted")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--jsonl", help="also append every record to this JSON Lines file")
    p.add_argument("--dbc", action="append", default=[], metavar="FILE",
                   help="show the CAN signals of the configs this cloud sent at their DBC resolution")
    p.set_defaults(func=_cmd_listen)
    p = sub.add_parser("publish", help="seal and publish one downlink message")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("kind", choices=sorted(protocol.DOWNLINK_KINDS))
    p.add_argument("body", help="JSON file with the body, or - for stdin")
    p.set_defaults(func=_cmd_publish)
    p = sub.add_parser("release", help="build an agent release from this checkout and send it")
    p.add_argument("version")
    p.add_argument("--run-dir", default=str(Path(__file__).resolve().parents[2] / "run" / "demo"))
    p.add_argument("--device", help="device id (default: the run directory's only device)")
    p.add_argument("--broken", action="store_true", help="a release that crashes on start")
    p.add_argument("--counter", type=int, help="release_counter (default: one above the highest)")
    p.add_argument("--delta-from", help="build the delta from this version (default: the "
                   "version the device reports)")
    p.add_argument("--repo", help="TUF repository directory (default: RUN_DIR/tuf)")
    p.add_argument("--keys", help="its keys (default: RUN_DIR/tuf-keys)")
    p.add_argument("--url", help="the repository's https URL (default: from RUN_DIR/tuf.json)")
    p.add_argument("--parked", action="store_true", help="condition: install only when parked")
    p.add_argument("--min-supply-v", type=float, default=0.0,
                   help="condition: 12 V supply at least this (default 0: none)")
    p.add_argument("--wait", type=float, default=300.0,
                   help="show update events until good/rolled_back/rejected, at most this long "
                        "(0: do not wait)")
    p.set_defaults(func=_cmd_release)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    if not __package__:   # run as scripts/refcloud/console.py: make the `scripts` package importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())

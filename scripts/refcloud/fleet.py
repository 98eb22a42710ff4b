"""A fleet of simulated dongles for load tests of the cloud side: a thousand or more devices, each
with its own keys and TLS certificate, sealing real envelopes with the agent's own code.

What is the agent's and what is simulated:

- provisioning is ``agent.cloud.provision.provision`` and the DevCA's ``sign_csr``, exactly as
  for a real device (scripts/testbed/devenv.py), into the same run-directory layout
  (``ca/``, ``cloud/``, ``devices/<id>/``), cached: a fleet is made once per run directory and
  reused by later runs;
- telemetry bodies are ``agent.outbox.telemetry.telemetry_body`` over ``Sample`` rows, sealed by
  ``agent.outbox.uplink.Sealer`` (zstd ``TELEMETRY_ZSTD``, HPKE, Ed25519) with one uplink ``seq``
  counter per device (persisted between runs); events and acks by the same ``Sealer``;
- the upload interval is ``agent.outbox.uplink.upload_policy`` of the config in force
  (``config/default_config.json``: 300 s driving, 3600 s parked; or ``live``: 5 s), and a
  config the cloud sends is opened with ``agent.cloud.protocol.open_envelope``, applied and
  acked, with the ``status`` republished (``agent.cloud.mqtt.status_payload``);
- the MQTT behaviour is MqttLink's: persistent session (clean start false, 7-day expiry on
  MQTT 5), retained ``status`` and will, QoS 1, an envelope kept until its PUBACK and published
  again after every reconnect, and the broker list with its backoff
  (``agent.cloud.mqtt.BrokerList``, ``drivers.core.backoff.Backoff`` 1–300 s).

Simulated: the vehicle (four OBD PIDs at 1 Hz, a random walk with OBD's quantisation; trips with
``trip_start``/``trip_end``), the day (``--mode day``: two 45-minute drives a day, the dongle
asleep while parked and awake 90 s every 6 h, as power management does; ``--mode driving``:
every device drives all the time, for load), and the clock: ``--time-scale S`` runs the
devices' clock S times faster than real time (what they seal, the sample stamps and the
upload intervals); the transport (keepalive, backoff, timeouts) stays in real time.

One process runs many devices on one ``selectors`` loop (paho's ``loop_read``/``loop_write``/
``loop_misc``; no thread per device); the bench (bench/bench_fleet.py) starts a few.

    python -m scripts.refcloud.fleet provision --run-dir DIR --devices 1000
    python -m scripts.refcloud.fleet run --run-dir DIR --broker 127.0.0.1:8883[,HOST:PORT...]
        [--first 0 --count 250] [--config default|live] [--mode driving|day] [--time-scale 60]
        [--duration 120] [--protocol 5|3.1.1] [--status FILE] [--report FILE]

``run`` stops after ``--duration`` s or on SIGTERM/SIGINT: it stops sealing, gives the outboxes
``--drain-s`` to empty, disconnects gracefully and writes the report (JSON: counts, the acked
``seq`` ranges per device, reconnections, TCP bytes).
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import os
import random
import resource
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.cloud import cloudconfig, keys, protocol, topics
from agent.cloud import provision as provision_mod
from agent.cloud.mqtt import BrokerList, status_payload
from agent.outbox.telemetry import telemetry_body
from agent.outbox.uplink import Sealer, upload_policy
from drivers.core.backoff import Backoff
from drivers.core.model import Sample
from scripts.testbed import devenv
from scripts.testbed.devca import DevCA

log = logging.getLogger("fleet")

AGENT_VERSION = "fleet-sim"
KEEPALIVE_S = 30
SESSION_EXPIRY_S = 7 * 86400
CONNACK_TIMEOUT_S = 20.0
STABLE_AFTER_S = 60.0
CLOSE_TIMEOUT_S = 5.0
MAX_INFLIGHT = 10            # uplink.max_inflight 8 + the two status messages
DRIVE_S = 45 * 60            # --mode day: two drives a day ...
GRACE_S = 60                 # ... awake this long after each (power.grace_s) ...
CHECK_IN_EVERY_S = 6 * 3600  # ... and for CHECK_IN_S every 6 h while parked
CHECK_IN_S = 90
DAY_MS = 86_400_000

#: The configs a fleet can run: the shipped default, and one asking for live data every 5 s.
CONFIGS: dict[str, dict] = {"default": cloudconfig.default_config()}
CONFIGS["live"] = {**CONFIGS["default"], "version": 0, "upload": {"interval_s": 5}}


def device_ids(count: int, first: int = 0, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(first, first + count)]


def provision_fleet(run_dir: Path, count: int, prefix: str = "sim") -> tuple[DevCA, list[str]]:
    """CA, cloud keys and console certificate (devenv.make_cloud), then ``count`` devices, each
    provisioned like a real one and its CSR signed by the CA. Devices already there are kept."""
    ca = devenv.make_cloud(run_dir)
    cloud = run_dir / "cloud"
    ids = device_ids(count, prefix=prefix)
    made = 0
    for dev in ids:
        ddir = run_dir / "devices" / dev
        if (ddir / "tls.crt").exists():
            continue
        if not (ddir / "device_sign.key").exists():
            provision_mod.provision(dev, cloud / "cloud_sign.pub", cloud / "cloud_enc.pub", ddir)
        ca.sign_csr(ddir / "tls.csr", ddir / "tls.crt")
        made += 1
    log.info("fleet: %d devices in %s (%d new)", len(ids), run_dir, made)
    return ca, ids


# --------------------------------------------------------------------------------------------
# Time, the vehicle, the day
# --------------------------------------------------------------------------------------------

class SimClock:
    """The devices' clock: ``scale`` times real time from ``start_ms``."""

    def __init__(self, scale: float, start_ms: int | None = None):
        self.scale = float(scale)
        self.start_ms = int(time.time() * 1000) if start_ms is None else start_ms
        self._m0 = time.monotonic()

    def now_ms(self) -> int:
        return self.start_ms + int((time.monotonic() - self._m0) * 1000 * self.scale)

    def wall_at(self, sim_ms: int) -> float:
        """The monotonic time at which the simulated clock reads ``sim_ms``."""
        return self._m0 + (sim_ms - self.start_ms) / 1000 / self.scale


class Vehicle:
    """Four OBD PIDs at 1 Hz (the default config's), read as one request: one stamp per second."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self.rpm, self.speed, self.coolant, self.load = 850.0, 0.0, 40.0, 20.0
        self.odometer_km = rng.uniform(5_000, 150_000)

    def samples(self, t_from_ms: int, t_to_ms: int) -> list[Sample]:
        out: list[Sample] = []
        r = self._rng
        t = -(-t_from_ms // 1000) * 1000  # whole seconds in [t_from, t_to)
        while t < t_to_ms:
            self.speed = min(140.0, max(0.0, self.speed + r.uniform(-1.5, 1.5)))
            self.rpm = min(4500.0, max(700.0, 800 + self.speed * 22 + r.uniform(-25, 25)))
            self.coolant = self.coolant + 0.05 if self.coolant < 90 else 90 + r.choice((-1, 0, 0, 0, 0, 1))
            self.load = min(100.0, max(0.0, self.load + r.uniform(-2, 2)))
            self.odometer_km += self.speed / 3600
            out += [Sample("engine.rpm", "rpm", t, round(self.rpm * 4) / 4),
                    Sample("vehicle.speed", "km/h", t, round(self.speed)),
                    Sample("engine.coolant_temp", "degC", t, round(self.coolant)),
                    Sample("engine.load", "%", t, round(self.load * 2.55) / 2.55)]
            t += 1000
        return out


class Day:
    """``--mode day``: when this device drives and when its dongle is awake (sim ms)."""

    def __init__(self, rng: random.Random, start_ms: int):
        self._rng = rng
        self._day0 = start_ms - start_ms % DAY_MS
        self._days: dict[int, list[tuple[int, int]]] = {}
        self._first_ms = start_ms

    def drives(self, day: int) -> list[tuple[int, int]]:
        if day not in self._days:
            r = random.Random(self._rng.random() + day)
            base = self._day0 + day * DAY_MS
            morning = base + int(r.uniform(6.5, 9) * 3600_000)
            evening = base + int(r.uniform(16, 19.5) * 3600_000)
            self._days[day] = [(morning, morning + DRIVE_S * 1000), (evening, evening + DRIVE_S * 1000)]
        return self._days[day]

    def driving(self, now_ms: int) -> bool:
        day = (now_ms - self._day0) // DAY_MS
        return any(a <= now_ms < b for a, b in self.drives(day))

    def awake(self, now_ms: int) -> bool:
        """Driving, in the grace after a drive, or in a check-in: 90 s every 6 h of sleep."""
        day = (now_ms - self._day0) // DAY_MS
        drives = self.drives(day - 1) + self.drives(day)
        if any(a <= now_ms < b + GRACE_S * 1000 for a, b in drives):
            return True
        ends = [b + GRACE_S * 1000 for a, b in drives if b <= now_ms]
        asleep_since = max(ends) if ends else self._first_ms
        since = now_ms - asleep_since
        every = CHECK_IN_EVERY_S * 1000
        return since >= every and since % every < CHECK_IN_S * 1000


# --------------------------------------------------------------------------------------------
# One simulated dongle
# --------------------------------------------------------------------------------------------

_TCP_INFO = getattr(socket, "TCP_INFO", 11)


def tcp_bytes(sock: Any) -> tuple[int, int, int, int] | None:
    """(bytes sent and acknowledged, bytes received, segments out, segments in) of a TCP socket,
    from Linux's tcp_info (``tcpi_bytes_acked`` at offset 120, ``tcpi_bytes_received`` at 128,
    ``tcpi_segs_out``/``_in`` at 136/140); None where it cannot be read."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 144)
    except (OSError, AttributeError):
        return None
    if len(raw) < 144:
        return None
    acked, received = struct.unpack_from("QQ", raw, 120)
    segs_out, segs_in = struct.unpack_from("II", raw, 136)
    return acked, received, segs_out, segs_in


@dataclass
class Counts:
    sealed: dict[str, int] = field(default_factory=lambda: {"telemetry": 0, "event": 0, "ack": 0})
    samples: int = 0
    published: int = 0
    acked: int = 0
    payload_bytes: int = 0        # envelopes + status, as PUBLISH payloads
    topic_bytes: int = 0
    connects: int = 0
    connect_failures: int = 0
    lost: int = 0                 # sessions that ended without us asking
    sleeps: int = 0
    downlink: int = 0
    downlink_rejected: int = 0
    configs_applied: int = 0
    tcp: list[int] = field(default_factory=lambda: [0, 0, 0, 0])   # sent, received, segs out, in


class SimDevice:
    def __init__(self, dev: str, ddir: Path, *, cloud_sign: Ed25519PublicKey, cloud_enc: X25519PublicKey,
                 endpoints: Sequence[tuple[str, int]], ca_file: Path, config: dict, clock: SimClock,
                 mode: str, v5: bool, counts: Counts, rng: random.Random):
        self.id = dev
        self.dir = ddir
        self.prefix = topics.prefix(dev)
        self.clock = clock
        self.mode = mode
        self.v5 = v5
        self.counts = counts
        self.sealer = Sealer(dev, keys.load_private_key(ddir / "device_sign.key", Ed25519PrivateKey),
                             cloud_enc, clock=clock.now_ms)
        self._enc_key = keys.load_private_key(ddir / "device_enc.key", X25519PrivateKey)
        self._trusted = keys.trusted_signers([cloud_sign])
        self.ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(str(ddir / "tls.crt"), str(ddir / "tls.key"))
        self.brokers = BrokerList(dev, endpoints, Backoff(1.0, 300.0, rng=random.Random(rng.random())))
        state = self._load_state()
        self.seq: int = state.get("seq", 0)
        self.down_seq: dict[str, int] = state.get("down", {})
        self.config = config   # the run's; one the cloud sends replaces it for the run
        self.vehicle = Vehicle(random.Random(rng.random()))
        self.day = Day(random.Random(rng.random()), clock.now_ms()) if mode == "day" else None
        self.outbox: dict[int, tuple[str, bytes]] = {}
        self.acked: list[int] = []
        self.client: paho.Client | None = None
        self.state = "asleep"      # asleep | waiting | connecting | online | closing
        self.next_attempt = 0.0
        self.connect_started = 0.0
        self.connected_at = 0.0
        self.lost_at: float | None = None
        self.reconnects: list[tuple[float, float]] = []  # (lost at, back at), monotonic
        self.generating = True
        self.driving = False
        self.last_upload_ms = clock.now_ms()
        self._inflight: dict[int, int] = {}   # mid -> seq
        self._close_mid: int | None = None
        self._close_deadline = 0.0
        self._tcp_last: tuple[int, int, int, int] | None = None
        self._stable = False
        self._sleepy_since: float | None = None
        self.last_error: str | None = None
        self.loop: FleetLoop | None = None

    # -- persistence (the uplink seq is never reused, as on a device) --------------------------

    def _load_state(self) -> dict:
        try:
            return json.loads((self.dir / "sim_state.json").read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self) -> None:
        tmp = self.dir / "sim_state.json.tmp"
        tmp.write_text(json.dumps({"seq": self.seq, "down": self.down_seq}))
        os.replace(tmp, self.dir / "sim_state.json")

    # -- what the device decides ------------------------------------------------------------

    def should_be_awake(self, now_ms: int) -> bool:
        return True if self.day is None else self.day.awake(now_ms)

    def tick(self, now: float) -> float:
        """Runs whatever is due; returns when to be called next (monotonic)."""
        sim = self.clock.now_ms()
        next_upload = now + 0.25
        if self.generating:
            next_upload = self._vehicle(sim)
            want = self.should_be_awake(sim)
        else:
            want = bool(self.outbox)     # draining: only to deliver what is left
        if want:
            self._sleepy_since = None
        elif self._sleepy_since is None:
            self._sleepy_since = now
        if self.state == "asleep" and want:
            self.state, self.next_attempt = "waiting", now
        if self.state == "waiting" and now >= self.next_attempt:
            self._connect(now)
        elif self.state == "connecting" and now - self.connect_started > CONNACK_TIMEOUT_S:
            self._drop("no CONNACK within 20 s")
        elif self.state == "online":
            if not self._stable and now - self.connected_at >= STABLE_AFTER_S:
                self._stable = True
                self.brokers.stable()
            # Before sleeping the outbox is flushed (at most power.flush_timeout_s, 30 s).
            if not want and (not self.outbox or now - (self._sleepy_since or now) > 30):
                self._close(now)
        elif self.state == "closing" and now >= self._close_deadline:
            self._disconnect()
        due = min(now + 0.25, next_upload)
        if self.state == "waiting":
            due = min(due, self.next_attempt)
        return max(due, now + 0.001)

    def _vehicle(self, sim: int) -> float:
        """Trips, samples and sealing at the upload interval; returns when the next upload is
        due (monotonic), so envelopes carry one interval's samples at any time scale."""
        driving = True if self.day is None else self.day.driving(sim)
        if driving and not self.driving:
            self.last_upload_ms = sim
            self._event({"type": "trip_start", "ts": sim, "odometer_km": round(self.vehicle.odometer_km, 1)})
            self._trip_start = sim
            self._trip_km = self.vehicle.odometer_km
        state = "driving" if driving else "parked"
        interval_ms = upload_policy(self.config, state).interval_s * 1000
        if (driving or self.driving) and (sim - self.last_upload_ms >= interval_ms or not driving):
            self._telemetry(self.last_upload_ms, sim)
            self.last_upload_ms = sim
        if self.driving and not driving:
            self._event({"type": "trip_end", "ts": sim, "odometer_km": round(self.vehicle.odometer_km, 1),
                         "distance_km": round(self.vehicle.odometer_km - self._trip_km, 2),
                         "duration_s": round((sim - self._trip_start) / 1000)})
        self.driving = driving
        return self.clock.wall_at(self.last_upload_ms + int(interval_ms)) if driving else time.monotonic() + 0.25

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _seal(self, kind: str, suffix: str, body: dict) -> None:
        seq = self._next_seq()
        self.outbox[seq] = (suffix, self.sealer.seal(kind, body, seq))
        self.counts.sealed[kind] += 1
        if self.state == "online":
            self._publish(seq)

    def _telemetry(self, t_from: int, t_to: int) -> None:
        samples = self.vehicle.samples(t_from, t_to)
        if samples:
            self.counts.samples += len(samples)
            self._seal("telemetry", "up/telemetry", telemetry_body(samples, []))

    def _event(self, body: dict) -> None:
        self._seal("event", "up/event", body)

    # -- MQTT --------------------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        host, port = self.brokers.current
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.id,
                        protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                        clean_session=None if self.v5 else False)
        c.tls_set_context(self.ctx)
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.will_set(self.prefix + topics.STATUS, self._status("offline"), qos=1, retain=True)
        c.on_connect, c.on_disconnect = self._on_connect, self._on_disconnect
        c.on_publish, c.on_message = self._on_publish, self._on_message
        self.client = c
        self.connect_started = now
        try:
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                rc = c.connect(host, port, KEEPALIVE_S, clean_start=False, properties=props)
            else:
                rc = c.connect(host, port, KEEPALIVE_S)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self._failed(f"connect failed: {e}")
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._failed(f"connect failed: {paho.error_string(rc)}")
            return
        self.state = "connecting"
        self._tcp_last = None
        assert self.loop is not None
        self.loop.watch(self)

    def _status(self, state: str) -> bytes:
        return status_payload(state, AGENT_VERSION, int(self.config.get("version", 0)),  # type: ignore[arg-type]
                              ts_ms=self.clock.now_ms())

    def _publish(self, seq: int) -> None:
        suffix, payload = self.outbox[seq]
        info = self.client.publish(self.prefix + suffix, payload, qos=1)  # type: ignore[union-attr]
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:  # else it goes again after the reconnect
            self._inflight[info.mid] = seq
            self.counts.published += 1
            self.counts.payload_bytes += len(payload)
            self.counts.topic_bytes += len(self.prefix) + len(suffix)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:   # the broker closes the connection: on_disconnect follows
            self.last_error = f"CONNACK refused: {reason}"
            return
        now = time.monotonic()
        self.state, self.connected_at, self._stable = "online", now, False
        self.counts.connects += 1
        if self.lost_at is not None:
            self.reconnects.append((self.lost_at, now))
            self.lost_at = None
        self._inflight.clear()
        client.subscribe(self.prefix + "down/#", qos=1)
        status = self._status("online")
        client.publish(self.prefix + topics.STATUS, status, qos=1, retain=True)
        self.counts.payload_bytes += len(status)
        for seq in sorted(self.outbox):   # everything not yet acknowledged, again
            self._publish(seq)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self.client or self.state == "asleep":
            return
        self._account_tcp()
        if self.state == "closing":
            self.state = "asleep"
            self.counts.sleeps += 1
        elif self.state in ("online", "connecting"):
            self._failed(f"disconnected: {reason}", lost=self.state == "online")

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if mid == self._close_mid:
            client.disconnect()
            return
        seq = self._inflight.pop(mid, None)
        if seq is None or getattr(reason, "is_failure", False):
            return
        if self.outbox.pop(seq, None) is not None:
            self.acked.append(seq)
            self.counts.acked += 1

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        suffix = msg.topic[len(self.prefix):]
        kind = topics.DOWNLINK.get(suffix)
        if kind is None:
            return
        self.counts.downlink += 1
        try:
            opened = protocol.open_envelope(bytes(msg.payload), expected_dev=self.id, expected_kind=kind,
                                            trusted_signers=self._trusted, recipient_key=self._enc_key,
                                            now_ms=None, last_seq=self.down_seq.get(kind))
        except protocol.Rejected as e:
            self.counts.downlink_rejected += 1
            if e.authenticated:
                status = "duplicate" if e.reason == protocol.DUPLICATE else "rejected"
                self._ack(kind, e.header["seq"], status,  # type: ignore[index]
                          None if status == "duplicate" else f"{e.reason}: {e}"[:500])
            return
        self.down_seq[kind] = opened.seq
        body = opened.body
        if kind == "config":
            if body["version"] <= int(self.config.get("version", 0)):
                self._ack(kind, opened.seq, "duplicate", config_version=int(self.config.get("version", 0)))
                return
            self.config = body
            self.counts.configs_applied += 1
            self._ack(kind, opened.seq, "applied", config_version=body["version"])
            status = self._status("online")
            client.publish(self.prefix + topics.STATUS, status, qos=1, retain=True)
        elif kind == "command" and body.get("op") == "ping":
            self._ack(kind, opened.seq, "done", result={"request_id": body["request_id"]}
                      if "request_id" in body else None)
        else:
            self._ack(kind, opened.seq, "rejected", f"{kind} is not supported by this simulator")

    def _ack(self, kind: str, seq: int, status: str, reason: str | None = None, *,
             config_version: int | None = None, result: dict | None = None) -> None:
        body: dict[str, Any] = {"ref_kind": kind, "ref_seq": seq, "status": status}
        if reason:
            body["reason"] = reason
        if config_version is not None:
            body["config_version"] = config_version
        if result:
            body["result"] = result
        self._seal("ack", "up/ack", body)

    def _close(self, now: float) -> None:
        """Going to sleep: the offline status, its PUBACK, DISCONNECT (as MqttLink.stop)."""
        self.state = "closing"
        self._close_deadline = now + CLOSE_TIMEOUT_S
        info = self.client.publish(self.prefix + topics.STATUS, self._status("offline"), qos=1,  # type: ignore[union-attr]
                                   retain=True)
        self._close_mid = info.mid

    def _disconnect(self) -> None:
        """Ends the connection now (a close that timed out, or the end of the run)."""
        if self.state == "closing":
            self.counts.sleeps += 1
        self.state = "asleep"   # on_disconnect, called from inside disconnect(), ignores it
        if self.client is not None:
            self._account_tcp()
            if self.client.socket() is not None:
                self.client.disconnect()
            self._sock_closed()

    def _drop(self, reason: str) -> None:
        sock = self.client.socket() if self.client else None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self._sock_closed()
        self._failed(reason)

    def _sock_closed(self) -> None:
        if self.loop is not None:
            self.loop.unwatch(self)

    def _failed(self, reason: str, *, lost: bool = False) -> None:
        self._sock_closed()
        now = time.monotonic()
        if lost:
            self.counts.lost += 1
            self.lost_at = now
        elif self.state == "connecting" or self.state == "waiting":
            self.counts.connect_failures += 1
        self.last_error = reason
        delay = self.brokers.failed()
        self.state, self.next_attempt = "waiting", now + (delay or 0.0)

    def _account_tcp(self) -> None:
        sock = self.client.socket() if self.client else None
        now = tcp_bytes(sock) if sock is not None else None
        if now is not None:
            self._tcp_last = now
        if self._tcp_last is not None:
            for i, v in enumerate(self._tcp_last):
                self.counts.tcp[i] += v
            self._tcp_last = None

    def sample_tcp(self) -> None:
        sock = self.client.socket() if self.client else None
        if sock is not None:
            self._tcp_last = tcp_bytes(sock) or self._tcp_last


# --------------------------------------------------------------------------------------------
# Many devices, one loop
# --------------------------------------------------------------------------------------------

class FleetLoop:
    def __init__(self, devices: list[SimDevice]):
        self.devices = devices
        self.sel = selectors.DefaultSelector()
        self._watched: dict[int, Any] = {}   # id(device) -> its registered socket
        for d in devices:
            d.loop = self

    def watch(self, dev: SimDevice) -> None:
        sock = dev.client.socket()  # type: ignore[union-attr]
        if sock is None:
            return
        self.unwatch(dev)
        self.sel.register(sock, selectors.EVENT_READ, dev)
        self._watched[id(dev)] = sock
        self._after_io(dev)

    def unwatch(self, dev: SimDevice) -> None:
        sock = self._watched.pop(id(dev), None)
        if sock is not None:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _after_io(self, dev: SimDevice) -> None:
        c = dev.client
        sock = self._watched.get(id(dev))
        if c is None or sock is None:
            return
        if c.socket() is None:   # paho closed it (connection lost): callbacks already ran
            self.unwatch(dev)
            return
        if c.want_write():
            c.loop_write()
        if c.socket() is None:
            self.unwatch(dev)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.want_write() else 0)
        if self.sel.get_key(sock).events != want:
            self.sel.modify(sock, want, dev)

    def run(self, until: Callable[[], bool], on_second: Callable[[], None] = lambda: None) -> None:
        heap = [(time.monotonic() + i * 0.001, i) for i in range(len(self.devices))]
        heapq.heapify(heap)
        next_misc = time.monotonic() + 1.0
        while not until():
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, i = heapq.heappop(heap)
                dev = self.devices[i]
                try:
                    due = dev.tick(now)
                except Exception:
                    log.exception("fleet: %s: tick failed", dev.id)
                    due = now + 1.0
                heapq.heappush(heap, (due, i))
                self._after_io(dev)
            timeout = max(0.0, min(0.05, (heap[0][0] - time.monotonic()) if heap else 0.05))
            for key, mask in self.sel.select(timeout):
                dev = key.data
                c = dev.client
                if c is None:
                    continue
                if mask & selectors.EVENT_READ:
                    c.loop_read()
                    sock = c.socket()
                    while sock is not None and getattr(sock, "pending", lambda: 0)():
                        c.loop_read()
                        sock = c.socket()
                if mask & selectors.EVENT_WRITE and c.socket() is not None:
                    c.loop_write()
                self._after_io(dev)
            if time.monotonic() >= next_misc:
                next_misc += 1.0
                for dev in self.devices:
                    if dev.client is not None and id(dev) in self._watched:
                        dev.client.loop_misc()
                        dev.sample_tcp()
                        self._after_io(dev)
                on_second()


def _ranges(seqs: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def run(run_dir: Path, endpoints: list[tuple[str, int]], *, first: int, count: int, config: str,
        mode: str, time_scale: float, duration: float, protocol_version: str, drain_s: float,
        status_path: Path | None, report_path: Path | None, seed: int = 1,
        prefix: str = "sim") -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # 3 descriptors per paho client
    cloud = run_dir / "cloud"
    cloud_sign = keys.load_public_key(cloud / "cloud_sign.pub", Ed25519PublicKey)
    cloud_enc = keys.load_public_key(cloud / "cloud_enc.pub", X25519PublicKey)
    ca_file = run_dir / "ca" / "ca.pem"
    clock = SimClock(time_scale)
    counts = Counts()
    rng = random.Random(seed * 1_000_003 + first)
    t_load = time.monotonic()
    devices = [SimDevice(dev, run_dir / "devices" / dev, cloud_sign=cloud_sign, cloud_enc=cloud_enc,
                         endpoints=endpoints, ca_file=ca_file, config=CONFIGS[config], clock=clock,
                         mode=mode, v5=protocol_version == "5", counts=counts, rng=rng)
               for dev in device_ids(count, first, prefix)]
    log.info("fleet: %d devices loaded in %.1f s; %s config, %s mode, time x%g", len(devices),
             time.monotonic() - t_load, config, mode, time_scale)
    loop = FleetLoop(devices)
    stop = {"at": time.monotonic() + duration, "asked": False}

    def ask_stop(*_: Any) -> None:
        stop["asked"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, ask_stop)
    t0 = time.monotonic()
    cpu0 = time.process_time()

    def snapshot() -> dict:
        states: dict[str, int] = {}
        for d in devices:
            states[d.state] = states.get(d.state, 0) + 1
        return {"t": time.monotonic(), "elapsed_s": time.monotonic() - t0, "states": states,
                "outbox": sum(len(d.outbox) for d in devices), "cpu_s": time.process_time() - cpu0,
                "sim_ms": clock.now_ms(), **{k: v for k, v in counts.__dict__.items()}}

    def write_status() -> None:
        if status_path is not None:
            tmp = status_path.with_name(status_path.name + ".tmp")
            tmp.write_text(json.dumps(snapshot()))
            os.replace(tmp, status_path)

    loop.run(lambda: stop["asked"] or time.monotonic() >= stop["at"], write_status)
    sim_generating_s = (clock.now_ms() - clock.start_ms) / 1000
    # Drain: no new data; what is in the outboxes goes out; then everyone goes to sleep.
    for d in devices:
        d.generating = False
    deadline = time.monotonic() + drain_s
    loop.run(lambda: time.monotonic() >= deadline or not any(d.outbox for d in devices), write_status)
    for d in devices:
        if d.state == "online":
            d._close(time.monotonic())
    deadline = time.monotonic() + CLOSE_TIMEOUT_S + 1
    loop.run(lambda: time.monotonic() >= deadline or all(d.state in ("asleep", "waiting") for d in devices),
             write_status)
    for d in devices:
        if d.state != "asleep":
            d._disconnect()
        d.save_state()
    report = snapshot()
    report.update({
        "devices": len(devices), "config": config, "mode": mode, "time_scale": time_scale,
        "sim_elapsed_s": (clock.now_ms() - clock.start_ms) / 1000, "sim_generating_s": sim_generating_s,
        "acked_seqs": {d.id: _ranges(d.acked) for d in devices},
        "unacked": {d.id: sorted(d.outbox) for d in devices if d.outbox},
        "reconnects": [r for d in devices for r in d.reconnects],
        "last_seq": {d.id: d.seq for d in devices},
    })
    write_status()
    if report_path is not None:
        report_path.write_text(json.dumps(report))
    return report


def _endpoints(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        host, _, port = part.strip().rpartition(":")
        out.append((host, int(port)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.refcloud.fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="make (or complete) a fleet in a run directory")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--devices", type=int, required=True)
    p = sub.add_parser("run", help="run devices [first, first+count) against a broker")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--broker", required=True, help="HOST:PORT[,HOST:PORT...] (the broker list)")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--config", choices=sorted(CONFIGS), default="default")
    p.add_argument("--mode", choices=("driving", "day"), default="driving")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--drain-s", type=float, default=30.0)
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--status", type=Path, help="rewritten every second: counts and states (JSON)")
    p.add_argument("--report", type=Path, help="the final report (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("agent").setLevel(logging.WARNING)
    if args.cmd == "provision":
        provision_fleet(args.run_dir, args.devices)
        return 0
    report = run(args.run_dir, _endpoints(args.broker), first=args.first, count=args.count,
                 config=args.config, mode=args.mode, time_scale=args.time_scale, duration=args.duration,
                 protocol_version=args.protocol, drain_s=args.drain_s, status_path=args.status,
                 report_path=args.report, seed=args.seed)
    log.info("fleet: done: %s", {k: report[k] for k in ("sealed", "published", "acked", "connects", "lost")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The MQTT transport to the cloud broker (PROTOCOL §2): mutual TLS, persistent session, status.

:class:`MqttLink` owns one paho-mqtt client and one network thread that runs our own loop:
connect → process traffic → on any failure move on → try again. paho's own reconnect logic
(``loop_forever``/``loop_start``) is not used, so that every kind of failure (DNS, refused TCP,
TLS, certificate, CONNACK refusal, lost connection) goes through the same policy:

- The link knows a list of broker endpoints (the nodes of a cluster, or the addresses of a
  load balancer; one endpoint is a list of one). A device starts at the position given by a
  hash of its id (:func:`start_index`), so a fleet spreads over the nodes, and stays on an
  endpoint that works.
- After every failed attempt or ended session it moves to the next endpoint, at once while
  the current round has endpoints it has not tried; only when a whole round failed does it
  wait ``Backoff.next()`` (capped, jittered). A connection that stays up ``stable_after_s``
  resets both the round and the backoff, so a broker that accepts and then drops the
  connection does not cause a tight loop.
- :meth:`MqttLink.reconnect_to` (a cloud config moving the device) ends the session cleanly
  and tries the new endpoint at once, with a fresh backoff.

Threading: :meth:`publish` may be called from any thread. ``on_message(suffix, payload, ack)``
runs on the network thread and must only hand the message on (to a queue); ``on_ack`` and
``on_connection`` run on the network thread too, outside paho's locks. All three must return
quickly and never wait for the store.

Downlink acknowledgement (QoS 1). paho runs with manual acks: the broker gets our PUBACK only
when the application calls the ``ack`` it was given with the message, i.e. once the message is
durably handled (agent/cloud/downlink.py). A message never acked — dropped, or in hand when the
agent died — stays unacknowledged in the broker's session and is delivered again after the next
connect (MQTT 3.1.1 §4.4, MQTT 5 §4.4). ``ack`` sends the PUBACK only in the session that
delivered the message: packet ids are per session, and a late PUBACK in the next session could
acknowledge a different message under the same id (that session redelivers the message itself,
with its own id). The link announces a Receive Maximum (MQTT 5, ``receive_maximum``), so the
broker has at most that many QoS 1 messages unacknowledged at once.

The clock and TLS. A Pi has no RTC: after a boot the system clock may be months behind until
NTP answers (fake-hwclock restores the last shutdown's time), and OpenSSL would refuse every
certificate as "not yet valid", keeping a device offline exactly when it should report. With a
``clock`` (drivers.core.clock.Clock) that is not synchronised, the link checks the broker
certificate's dates against what it trusts instead: OpenSSL's time check is off
(``X509_V_FLAG_NO_CHECK_TIME``; signatures, chain and host name are still verified), and a
certificate that expired before the newest time known to have passed (the clock's floor, from
TUF metadata and signed downlink) is refused after the handshake. Once synchronised, OpenSSL
checks the dates itself again.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.cloud import topics
from drivers.core.backoff import Backoff

log = logging.getLogger(__name__)

_LOOP_S = 0.2             # longest paho.loop() wait: how fast stop() is noticed
_CONNACK_TIMEOUT_S = 20.0  # TCP/TLS up but no CONNACK: give up on this attempt
_STOP_ACK_SHARE = 0.6     # share of stop()'s timeout spent waiting for the offline status PUBACK
_NO_CHECK_TIME = 0x200000  # OpenSSL X509_V_FLAG_NO_CHECK_TIME (not in ssl.VerifyFlags)


#: A broker endpoint: (host, port).
Endpoint = tuple[str, int]


def start_index(device_id: str, count: int) -> int:
    """Where ``device_id`` starts in a list of ``count`` endpoints: the same place every time
    for one device, spread evenly over a fleet (SHA-256 of the id, modulo ``count``)."""
    if count < 1:
        raise ValueError("no endpoints")
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") % count


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BrokerList:
    """Which broker endpoint to try next, and when (the policy of the module docstring).

    Not thread-safe: its owner serialises calls (MqttLink under its state lock). Also used by
    the fleet simulator (scripts/refcloud/fleet.py), so simulated dongles reconnect exactly as
    the agent does.
    """

    def __init__(self, device_id: str, endpoints: Sequence[Endpoint], backoff: Backoff):
        home = [(str(h), int(p)) for h, p in endpoints]
        if not home:
            raise ValueError("endpoints must not be empty")
        self.home: tuple[Endpoint, ...] = tuple(home)   # the configured list
        self.endpoints: list[Endpoint] = list(home)     # the list in use (home, or the cloud's)
        self.index = start_index(device_id, len(home))
        self.backoff = backoff
        self.round_failures = 0  # failed attempts/sessions since the round began
        self.moves = 0           # times a failure moved the device to another endpoint

    @property
    def current(self) -> Endpoint:
        return self.endpoints[self.index]

    def failed(self) -> float | None:
        """After a failed attempt or an ended session: moves to the next endpoint; returns how
        long to wait before trying it (None: at once, the round has endpoints left to try)."""
        before = self.current
        self.index = (self.index + 1) % len(self.endpoints)
        if self.current != before:
            self.moves += 1
        self.round_failures += 1
        if self.round_failures < len(self.endpoints):
            return None
        self.round_failures = 0
        return self.backoff.next()

    def stable(self) -> None:
        """The connection proved stable: a fresh round and backoff for the next failure."""
        self.round_failures = 0
        self.backoff.reset()

    def move_to(self, target: Endpoint) -> None:
        """A move asked for (a cloud config): an endpoint of the configured list brings the
        whole list back, starting there; any other is used alone. A fresh round and backoff."""
        target = (str(target[0]), int(target[1]))
        if target in self.home:
            self.endpoints, self.index = list(self.home), self.home.index(target)
        else:
            self.endpoints, self.index = [target], 0
        self.stable()


@dataclass(slots=True)
class _Pending:
    topic: str
    on_ack: Callable[[], None] | None


def status_payload(state: Literal["online", "offline"], agent_version: str, config_version: int,
                   ts_ms: int | None = None, frame_t: str | None = None) -> bytes:
    """The retained ``status`` document of PROTOCOL §2, compact JSON, keys in protocol order;
    ``frame_t`` (rev 1.1): the form of raw frame times the device sends, ``"t"`` or ``"dt"``."""
    doc = {"state": state, "ts": time.time_ns() // 1_000_000 if ts_ms is None else ts_ms, "agent": agent_version,
           "config_version": config_version}
    if frame_t is not None:
        doc["frame_t"] = frame_t
    return json.dumps(doc, separators=(",", ":")).encode()


class MqttLink:
    """The device's MQTT session. Give the broker as ``endpoints`` (a list of (host, port),
    tried as the module docstring says) or as ``host`` and ``port`` (a list of one)."""

    def __init__(self, *, device_id: str, host: str | None = None, port: int | None = None,
                 endpoints: Sequence[Endpoint] | None = None, ca_file: str | Any,
                 cert_file: str | Any, key_file: str | Any,
                 topic_prefix: str = topics.PREFIX_TEMPLATE,
                 protocol: Literal["5", "3.1.1"] = "5", keepalive_s: int = 30,
                 session_expiry_s: int = 7 * 86400, backoff: Backoff | None = None,
                 stable_after_s: float = 60.0, agent_version: str,
                 config_version: Callable[[], int],
                 on_message: Callable[[str, bytes, Callable[[], None]], None] | None = None,
                 on_connection: Callable[[bool], None] | None = None,
                 max_inflight: int = 20, receive_maximum: int | None = None,
                 frame_t: str | None = None, clock: Any = None):
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', not {protocol!r}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if endpoints is None:
            if host is None or port is None:
                raise ValueError("give endpoints, or host and port")
            endpoints = [(host, port)]
        elif host is not None or port is not None:
            raise ValueError("give endpoints or host and port, not both")
        self.device_id = device_id
        self._backoff = backoff or Backoff(1.0, 300.0)
        self._brokers = BrokerList(device_id, endpoints, self._backoff)  # under _state_lock
        self._ca_file, self._cert_file, self._key_file = str(ca_file), str(cert_file), str(key_file)
        self.prefix = topics.prefix(device_id, topic_prefix)
        self._v5 = protocol == "5"
        self._keepalive_s = int(keepalive_s)
        self._session_expiry_s = int(session_expiry_s)
        self._stable_after_s = float(stable_after_s)
        self._agent_version = agent_version
        self._frame_t = frame_t
        self._config_version = config_version
        self._on_message = on_message
        self._on_connection = on_connection
        self._max_inflight = int(max_inflight)
        self._receive_maximum = receive_maximum
        self._tag = f"mqtt {device_id}"

        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                                   protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
                                   clean_session=None if self._v5 else False, manual_ack=True)
        # Room for the two status messages on top of the application's bound.
        self._client.max_inflight_messages_set(self._max_inflight + 2)
        self._client.on_connect = self._on_connect_cb
        self._client.on_disconnect = self._on_disconnect_cb
        self._client.on_publish = self._on_publish_cb
        self._client.on_subscribe = self._on_subscribe_cb
        self._client.on_message = self._on_message_cb
        self._client.on_log = self._on_log_cb
        # Only the network thread may touch the TLS socket: an SSL object is not safe for a read
        # in one thread and a write in another ("[SSL: BAD_LENGTH]"). With a write-registration
        # callback set, paho's publish() from any thread only queues the packet and wakes the
        # network thread's select() through its socket pair; loop() then writes it.
        self._client.on_socket_register_write = lambda client, userdata, sock: None
        self._tls_ready = False
        self._tls_ctx: ssl.SSLContext | None = None
        self._clock = clock           # None: the system clock is always right (OpenSSL checks)
        self._tls_by_floor: bool | None = None   # last mode, to log a change once

        self._thread: threading.Thread | None = None
        self._stop_evt = threading.Event()
        self._switches = 0       # reconnect_to() calls so far (under _state_lock), ...
        self._switches_seen = 0  # ... and how many of them the network thread has taken
        self._stop_timeout = 5.0
        self._connected_evt = threading.Event()
        self._pub_lock = threading.Lock()    # serialises application publishes (inflight bound)
        self._state_lock = threading.Lock()  # guards _pending / _early_acks / _stats; never held
        #                                      while calling into paho or user code
        self._pending: dict[int, _Pending] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()
        # The session a received message belongs to (bumped before every connect, under
        # _ack_lock, so that a PUBACK is only ever sent in the session that delivered it).
        self._ack_lock = threading.Lock()
        self._session_no = 0
        self._connected_at = 0.0
        self._sub_mid: int | None = None   # our SUBSCRIBE of this session, until its SUBACK
        self._announced = False            # on_connection(True) told for this session
        self._stable = False
        self._refusal: str | None = None
        self._paho_error: str | None = None
        self._disconnect_reason: str | None = None
        self._stats: dict[str, Any] = {"connect_attempts": 0, "connects": 0, "disconnects": 0,
                                       "last_error": None, "published": 0, "acked": 0,
                                       "publish_errors": 0, "messages_received": 0}

    # -- public API --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop_evt.clear()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.device_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publishes the retained offline status (if connected), disconnects, joins the thread."""
        thread = self._thread
        if thread is None:
            return
        self._stop_timeout = timeout
        self._stop_evt.set()
        thread.join(timeout + 1.0)
        if thread.is_alive():
            log.error("%s: network thread did not stop within %.1f s", self._tag, timeout)
        else:
            self._thread = None

    def reconnect_to(self, host: str, port: int) -> None:
        """Moves the link to another broker endpoint: the current session ends cleanly (offline
        status published there) and the next attempt, made at once and with a fresh backoff,
        goes to ``host:port``. An endpoint of the configured list brings the whole list back
        (starting there); any other one is used alone (a broker the cloud chose)."""
        target = (str(host), int(port))
        with self._state_lock:
            self._brokers.move_to(target)
            self._switches += 1
        log.info("%s: switching to %s", self._tag, format_endpoint(target))

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint of the current (or next) attempt."""
        with self._state_lock:
            return self._brokers.current

    @property
    def endpoints(self) -> list[Endpoint]:
        """The endpoints in use, in the order they are tried."""
        with self._state_lock:
            return list(self._brokers.endpoints)

    @property
    def host(self) -> str:
        return self.endpoint[0]

    @property
    def port(self) -> int:
        return self.endpoint[1]

    @property
    def connected(self) -> bool:
        return self._connected_evt.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_evt.wait(timeout)

    @property
    def inflight(self) -> int:
        """Publishes sent (or queued in the session) and not yet acknowledged by the broker."""
        with self._state_lock:
            return len(self._pending)

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected,
                "endpoints": [format_endpoint(e) for e in self.endpoints], **self.stats}

    def apply_config(self, doc: dict) -> list[str]:
        return []   # a new endpoint is the config applier's (agent/cloud/config_apply.py)

    @property
    def stats(self) -> dict[str, Any]:
        with self._state_lock:
            out = dict(self._stats)
            out["inflight"] = len(self._pending)
            out["endpoint"] = format_endpoint(self._brokers.current)
            out["endpoint_moves"] = self._brokers.moves
        out["connected"] = self.connected
        out["stable"] = self.connected and self._stable
        out["backoff_failures"] = self._backoff.failures
        return out

    def publish(self, suffix: str, payload: bytes,
                on_ack: Callable[[], None] | None = None) -> bool:
        """Publishes ``payload`` to ``prefix + suffix``, QoS 1, not retained.

        Returns False, queueing nothing, when not connected or when ``max_inflight`` publishes
        already await their PUBACK. ``on_ack`` runs once the broker acknowledges with a success
        reason code; a refusal (MQTT 5, e.g. 0x87 not authorized) is logged and ``on_ack`` is
        not called. A True return means the message belongs to the session: if the connection
        drops first, paho sends it again after reconnecting.
        """
        if not self._connected_evt.is_set():
            return False
        with self._pub_lock:
            if self.inflight >= self._max_inflight:
                log.debug("%s: %d publishes in flight, refusing more", self._tag,
                          self._max_inflight)
                return False
            return self._send(suffix, payload, retain=False, on_ack=on_ack) is not None

    def publish_status(self) -> bool:
        """Publishes the retained ``online`` status (also done on every connect)."""
        if not self._connected_evt.is_set():
            return False
        return self._send("status", self._status("online"), retain=True, on_ack=None) is not None

    # -- network thread ----------------------------------------------------------------------

    def _run(self) -> None:
        log.info("%s: starting (MQTT %s), endpoints %s", self._tag, "5" if self._v5 else "3.1.1",
                 ", ".join(format_endpoint(e) for e in self.endpoints))
        try:
            while not self._stop_evt.is_set():
                self._take_switch()
                try:
                    reason = self._session()
                except Exception as e:  # a bug or paho surprise must not end the thread
                    log.exception("%s: unexpected error", self._tag)
                    reason = f"unexpected error: {e!r}"
                    self._abort_socket()
                self._set_disconnected()
                self._run_deferred()
                if self._stop_evt.is_set():
                    break
                if self._switch_pending():
                    continue  # reconnect_to(): taken at the top, no backoff
                delay = self._after_failure(reason)
                if delay is None:
                    continue  # the next endpoint of this round, at once
                deadline = time.monotonic() + delay
                while not (self._stop_evt.is_set() or self._switch_pending()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stop_evt.wait(min(left, 0.25))
        finally:
            self._set_disconnected()
            self._run_deferred()
            log.info("%s: stopped", self._tag)

    def _switch_pending(self) -> bool:
        with self._state_lock:
            return self._switches != self._switches_seen

    def _take_switch(self) -> None:
        """Takes a reconnect_to() made since the last attempt (its fresh round and backoff are
        already in place, also when it came during a backoff wait)."""
        with self._state_lock:
            self._switches_seen = self._switches

    def _after_failure(self, reason: str) -> float | None:
        """After a failed attempt or an ended session: the next endpoint, and how long to wait
        first (None: at once)."""
        with self._state_lock:
            failed = self._brokers.current
            delay = self._brokers.failed()
            nxt, several = self._brokers.current, len(self._brokers.endpoints) > 1
            self._stats["last_error"] = reason
        if delay is None:
            log.warning("%s: %s: %s; trying %s at once", self._tag, format_endpoint(failed),
                        reason, format_endpoint(nxt))
        else:
            log.warning("%s: %s: %s; %s; retry %d in %.2f s", self._tag, format_endpoint(failed),
                        reason, "every endpoint failed" if several else "failed",
                        self._backoff.failures, delay)
        return delay

    def _session(self) -> str:
        """One connection attempt and, if it succeeds, its whole life. Returns why it ended
        (the return value is unused when it ended because of stop())."""
        with self._state_lock:
            self._stats["connect_attempts"] += 1
            host, port = self._brokers.current
        self._refusal = self._paho_error = self._disconnect_reason = None
        with self._ack_lock:
            self._session_no += 1   # acks of the last session's messages are void from here
        try:
            self._ensure_tls()
            by_floor = self._set_tls_time_check()
            self._client.will_set(self.prefix + "status", self._status("offline"), qos=1,
                                  retain=True)
            if self._v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self._session_expiry_s
                if self._receive_maximum:
                    props.ReceiveMaximum = int(self._receive_maximum)
                rc = self._client.connect(host, port, self._keepalive_s,
                                          clean_start=False, properties=props)
            else:
                rc = self._client.connect(host, port, self._keepalive_s)
        except ssl.SSLError as e:
            self._abort_socket()
            return f"TLS failure: {e}"
        except OSError as e:  # DNS (gaierror), refused, unreachable, timeout, missing files
            self._abort_socket()
            return f"connect failed: {e}"
        except ValueError as e:
            self._abort_socket()
            return f"connect failed: {e}"
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:  # e.g. the TLS alert came with our CONNECT
            self._abort_socket()
            return self._failure_reason(rc)
        if by_floor and (expired := self._expired_by_floor()):
            self._abort_socket()
            return expired

        started = time.monotonic()
        while True:
            if self._stop_evt.is_set() or self._switch_pending():
                self._graceful_disconnect()
                return "stopped" if self._stop_evt.is_set() else "endpoint changed"
            rc = self._client.loop(_LOOP_S)
            self._run_deferred()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return self._failure_reason(rc)
            now = time.monotonic()
            if self._connected_evt.is_set():
                if not self._stable and now - self._connected_at >= self._stable_after_s:
                    self._stable = True
                    with self._state_lock:
                        self._brokers.stable()
                    log.debug("%s: connection stable, backoff reset", self._tag)
            elif now - started > _CONNACK_TIMEOUT_S:
                self._abort_socket()
                return f"no CONNACK and SUBACK within {_CONNACK_TIMEOUT_S:.0f} s"

    def _ensure_tls(self) -> None:
        # Built on the first attempt rather than in __init__, so that missing or unreadable
        # certificate files are a logged, retried failure instead of a crash at start-up.
        if self._tls_ready:
            return
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self._ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._cert_file, self._key_file)
        self._client.tls_set_context(ctx)
        self._tls_ctx = ctx
        self._tls_ready = True

    def _set_tls_time_check(self) -> bool:
        """OpenSSL checks the certificates' dates while the clock is synchronised; otherwise
        they are checked against the floor after the handshake (module docstring). True for
        the latter. Applies to the next connection (the context is read at wrap time)."""
        ctx = self._tls_ctx
        by_floor = self._clock is not None and not self._clock.is_synced()
        flags = int(ctx.verify_flags)
        ctx.verify_flags = (flags | _NO_CHECK_TIME) if by_floor else (flags & ~_NO_CHECK_TIME)
        if by_floor != self._tls_by_floor:
            self._tls_by_floor = by_floor
            if by_floor:
                log.warning("%s: the system clock is not synchronised: the broker certificate's "
                            "dates are checked against the newest trusted time (%s), not the clock",
                            self._tag, _utc(self._clock.not_before_ms()))
            elif self._clock is not None:
                log.info("%s: the system clock is synchronised: TLS checks certificate dates", self._tag)
        return by_floor

    def _expired_by_floor(self) -> str | None:
        """Why the broker's certificate is refused by the floor (expired before a time known to
        have passed), or None."""
        sock = self._client.socket()
        try:
            cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            not_after_ms = int(ssl.cert_time_to_seconds(cert["notAfter"]) * 1000) if cert else None
        except (ValueError, KeyError, OSError) as e:
            return f"TLS failure: the broker's certificate dates are unreadable ({e})"
        if not_after_ms is None:
            return "TLS failure: no broker certificate to check"
        floor = self._clock.not_before_ms()
        if not_after_ms < floor:
            return (f"TLS failure: the broker's certificate expired {_utc(not_after_ms)}, before the "
                    f"newest trusted time {_utc(floor)} (the system clock is not synchronised)")
        return None

    def _failure_reason(self, rc: MQTTErrorCode) -> str:
        if self._refusal:
            return self._refusal
        if self._paho_error:
            return self._paho_error
        if self._disconnect_reason:
            return self._disconnect_reason
        return f"connection lost: {paho.error_string(rc)}"

    def _graceful_disconnect(self) -> None:
        if not self._connected_evt.is_set():
            self._abort_socket()
            return
        info = self._send("status", self._status("offline"), retain=True, on_ack=None)
        deadline = time.monotonic() + self._stop_timeout * _STOP_ACK_SHARE
        while info is not None and not info.is_published() and time.monotonic() < deadline:
            if self._client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._run_deferred()
        if info is not None and info.is_published():
            self._client.disconnect()  # normal disconnect: the broker discards the will
            log.info("%s: disconnected (offline status published)", self._tag)
        elif self._v5:
            # The offline status did not make it: let the broker publish the will instead.
            self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT,
                                                          "Disconnect with will message"))
            log.warning("%s: offline status not acknowledged; disconnected with will", self._tag)
        else:
            self._abort_socket()  # no DISCONNECT: the broker publishes the will
            log.warning("%s: offline status not acknowledged; dropped the connection", self._tag)
        for _ in range(10):  # flush the DISCONNECT
            if self._client.socket() is None or self._client.loop(0.05):
                break
        self._abort_socket()

    def _abort_socket(self) -> None:
        """Closes the socket without DISCONNECT (the broker will publish the will)."""
        sock = self._client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self._connected_evt.clear()

    def _set_disconnected(self) -> None:
        """End of a session: if it had a CONNACK, count it; if on_connection(True) was told,
        tell it False."""
        self._connected_evt.clear()
        self._sub_mid = None
        if self._connected_at:
            self._connected_at = 0.0
            with self._state_lock:
                self._stats["disconnects"] += 1
        if self._announced:
            self._announced = False
            self._deferred.append(lambda: self._notify_connection(False))

    def _run_deferred(self) -> None:
        while self._deferred:
            fn = self._deferred.popleft()
            try:
                fn()
            except Exception:
                log.exception("%s: callback failed", self._tag)

    def _notify_connection(self, up: bool) -> None:
        if self._on_connection is not None:
            self._on_connection(up)

    # -- publishing helpers ------------------------------------------------------------------

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        try:
            version = int(self._config_version())
        except Exception:
            log.exception("%s: config_version() failed; reporting 0", self._tag)
            version = 0
        return status_payload(state, self._agent_version, version, frame_t=self._frame_t)

    def _send(self, suffix: str, payload: bytes, *, retain: bool,
              on_ack: Callable[[], None] | None) -> paho.MQTTMessageInfo | None:
        """Publishes QoS 1 and tracks the mid until its PUBACK; None if paho refused it."""
        topic = self.prefix + suffix
        try:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
        except (ValueError, TypeError) as e:
            log.error("%s: cannot publish to %s: %s", self._tag, topic, e)
            return None
        # NO_CONN: the connection dropped under us, but paho keeps the message in the session
        # and sends it again after reconnecting, so it is tracked like any other.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("%s: publish to %s failed: %s", self._tag, topic,
                      paho.error_string(info.rc))
            return None
        pending = _Pending(topic, on_ack)
        with self._state_lock:
            self._stats["published"] += 1
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = pending
        if early is not None:  # PUBACK processed before we could register the mid
            self._deferred.append(lambda: self._complete(pending, early))
        return info

    def _complete(self, pending: _Pending, reason: ReasonCode) -> None:
        if reason.is_failure:
            with self._state_lock:
                self._stats["publish_errors"] += 1
            log.error("%s: broker refused publish to %s: %s (0x%02x)", self._tag, pending.topic,
                      reason, reason.value)
            return
        with self._state_lock:
            self._stats["acked"] += 1
        if pending.on_ack is not None:
            pending.on_ack()

    # -- paho callbacks (network thread, inside paho's locks: no user code here but on_message)

    def _on_connect_cb(self, client: paho.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            self._refusal = f"CONNACK refused: {reason_code} (0x{reason_code.value:02x})"
            return
        self._connected_at = time.monotonic()
        self._stable = False
        with self._state_lock:
            self._stats["connects"] += 1
        log.info("%s: connected to %s (session present: %s)", self._tag,
                 format_endpoint(self.endpoint), bool(flags.session_present))
        # Connected (publish() accepts, on_connection(True) runs) once the broker has confirmed
        # the subscription: downlink the cloud sends from then on cannot miss it.
        self._sub_mid = client.subscribe(self.prefix + "down/#", qos=1)[1]
        self._send("status", self._status("online"), retain=True, on_ack=None)

    def _on_disconnect_cb(self, client: paho.Client, userdata: Any, flags: Any,
                          reason_code: ReasonCode | None, properties: Any) -> None:
        self._connected_evt.clear()
        if reason_code is not None and reason_code.value != 0:
            self._disconnect_reason = f"disconnected: {reason_code}"

    def _on_publish_cb(self, client: paho.Client, userdata: Any, mid: int,
                       reason_code: ReasonCode, properties: Any) -> None:
        with self._state_lock:
            pending = self._pending.pop(mid, None)
            if pending is None:
                self._early_acks[mid] = reason_code
                return
        self._deferred.append(lambda: self._complete(pending, reason_code))

    def _on_subscribe_cb(self, client: paho.Client, userdata: Any, mid: int,
                         reason_codes: list[ReasonCode], properties: Any) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.error("%s: subscription to %sdown/# refused: %s", self._tag, self.prefix, rc)
        if mid == self._sub_mid:
            self._sub_mid = None
            self._announced = True
            self._connected_evt.set()  # after the status, so it is already counted in .inflight
            self._deferred.append(lambda: self._notify_connection(True))

    def _on_message_cb(self, client: paho.Client, userdata: Any,
                       message: paho.MQTTMessage) -> None:
        topic = message.topic
        if not topic.startswith(self.prefix):
            log.warning("%s: ignoring message on foreign topic %s", self._tag, topic)
            return
        with self._state_lock:
            self._stats["messages_received"] += 1
        if self._on_message is None:
            self._ack_message(self._session_no, message.mid, message.qos)
            return
        session, mid, qos = self._session_no, message.mid, message.qos
        try:
            self._on_message(topic[len(self.prefix):], bytes(message.payload),
                             lambda: self._ack_message(session, mid, qos))
        except Exception:  # not acknowledged: the broker delivers it again in the next session
            log.exception("%s: on_message failed for %s", self._tag, topic)

    def _ack_message(self, session: int, mid: int, qos: int) -> None:
        """The PUBACK for a received message (any thread), if its session is still the current
        one; otherwise the broker redelivers the message in the session that is."""
        if qos == 0:
            return
        with self._ack_lock:
            if session != self._session_no:
                log.debug("%s: message %d of an earlier session not acknowledged", self._tag, mid)
                return
            self._client.ack(mid, qos)

    def _on_log_cb(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING):
            if self._paho_error is None:  # the first error of an attempt is the root cause
                self._paho_error = buf
            log.debug("%s: paho: %s", self._tag, buf)


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))

"""The MQTT transport to the cloud broker (PROTOCOL §2): mutual TLS, persistent session, status.

:class:`MqttLink` owns one paho-mqtt client and one network thread that runs our own loop:
connect → process traffic → on any failure wait ``Backoff.next()`` → try again. paho's own
reconnect logic (``loop_forever``/``loop_start``) is not used, so that every kind of failure
(DNS, refused TCP, TLS, certificate, CONNACK refusal, lost connection) goes through the same
capped, jittered backoff and the backoff is reset only once a connection has stayed up for
``stable_after_s``.

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
"""
from __future__ import annotations

import collections
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
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
    def __init__(self, *, device_id: str, host: str, port: int, ca_file: str | Any,
                 cert_file: str | Any, key_file: str | Any,
                 topic_prefix: str = topics.PREFIX_TEMPLATE,
                 protocol: Literal["5", "3.1.1"] = "5", keepalive_s: int = 30,
                 session_expiry_s: int = 7 * 86400, backoff: Backoff | None = None,
                 stable_after_s: float = 60.0, agent_version: str,
                 config_version: Callable[[], int],
                 on_message: Callable[[str, bytes, Callable[[], None]], None] | None = None,
                 on_connection: Callable[[bool], None] | None = None,
                 max_inflight: int = 20, receive_maximum: int | None = None,
                 frame_t: str | None = None):
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', not {protocol!r}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.device_id = device_id
        self.host, self.port = host, int(port)
        self._ca_file, self._cert_file, self._key_file = str(ca_file), str(cert_file), str(key_file)
        self.prefix = topics.prefix(device_id, topic_prefix)
        self._v5 = protocol == "5"
        self._keepalive_s = int(keepalive_s)
        self._session_expiry_s = int(session_expiry_s)
        self._backoff = backoff or Backoff(1.0, 300.0)
        self._stable_after_s = float(stable_after_s)
        self._agent_version = agent_version
        self._frame_t = frame_t
        self._config_version = config_version
        self._on_message = on_message
        self._on_connection = on_connection
        self._max_inflight = int(max_inflight)
        self._receive_maximum = receive_maximum
        self._tag = f"mqtt {device_id}@{host}:{port}"

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

        self._thread: threading.Thread | None = None
        self._stop_evt = threading.Event()
        self._switch_evt = threading.Event()  # reconnect_to(): end the session, retry at once
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
        status published there) and the next attempt, made at once, goes to ``host:port``."""
        with self._state_lock:
            self.host, self.port = host, int(port)
        self._switch_evt.set()
        log.info("%s: switching to %s:%d", self._tag, host, port)

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
        return {"connected": self.connected, "endpoint": f"{self.host}:{self.port}", **self.stats}

    def apply_config(self, doc: dict) -> list[str]:
        return []   # a new endpoint is the config applier's (agent/cloud/config_apply.py)

    @property
    def stats(self) -> dict[str, Any]:
        with self._state_lock:
            out = dict(self._stats)
            out["inflight"] = len(self._pending)
        out["connected"] = self.connected
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
        log.info("%s: starting (MQTT %s)", self._tag, "5" if self._v5 else "3.1.1")
        try:
            while not self._stop_evt.is_set():
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
                if self._switch_evt.is_set():
                    self._switch_evt.clear()
                    self._backoff.reset()
                    continue
                delay = self._backoff.next()
                with self._state_lock:
                    self._stats["last_error"] = reason
                log.warning("%s: %s; retry %d in %.2f s", self._tag, reason,
                            self._backoff.failures, delay)
                deadline = time.monotonic() + delay
                while not (self._stop_evt.is_set() or self._switch_evt.is_set()):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stop_evt.wait(min(left, 0.25))
        finally:
            self._set_disconnected()
            self._run_deferred()
            log.info("%s: stopped", self._tag)

    def _session(self) -> str:
        """One connection attempt and, if it succeeds, its whole life. Returns why it ended
        (the return value is unused when it ended because of stop())."""
        with self._state_lock:
            self._stats["connect_attempts"] += 1
        self._switch_evt.clear()  # this attempt already goes to the newest endpoint
        self._refusal = self._paho_error = self._disconnect_reason = None
        with self._ack_lock:
            self._session_no += 1   # acks of the last session's messages are void from here
        try:
            self._ensure_tls()
            self._client.will_set(self.prefix + "status", self._status("offline"), qos=1,
                                  retain=True)
            if self._v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self._session_expiry_s
                if self._receive_maximum:
                    props.ReceiveMaximum = int(self._receive_maximum)
                rc = self._client.connect(self.host, self.port, self._keepalive_s,
                                          clean_start=False, properties=props)
            else:
                rc = self._client.connect(self.host, self.port, self._keepalive_s)
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

        started = time.monotonic()
        while True:
            if self._stop_evt.is_set() or self._switch_evt.is_set():
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
                    self._backoff.reset()
                    log.debug("%s: connection stable, backoff reset", self._tag)
            elif now - started > _CONNACK_TIMEOUT_S:
                self._abort_socket()
                return f"no CONNACK within {_CONNACK_TIMEOUT_S:.0f} s"

    def _ensure_tls(self) -> None:
        # Built on the first attempt rather than in __init__, so that missing or unreadable
        # certificate files are a logged, retried failure instead of a crash at start-up.
        if self._tls_ready:
            return
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self._ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._cert_file, self._key_file)
        self._client.tls_set_context(ctx)
        self._tls_ready = True

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
        """End of a session: if it had been connected, count it and tell on_connection."""
        self._connected_evt.clear()
        if self._connected_at:
            self._connected_at = 0.0
            with self._state_lock:
                self._stats["disconnects"] += 1
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
        log.info("%s: connected (session present: %s)", self._tag, bool(flags.session_present))
        client.subscribe(self.prefix + "down/#", qos=1)
        self._send("status", self._status("online"), retain=True, on_ack=None)
        self._connected_evt.set()  # after the status, so it is already counted in .inflight
        self._deferred.append(lambda: self._notify_connection(True))

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

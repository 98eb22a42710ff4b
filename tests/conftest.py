"""Shared fixtures. Each section says what it provides; add new sections at the end.

MQTT / PKI (real mosquitto, real certificates; see scripts/testbed/devca.py and scripts/testbed/mosquitto.py):

- ``pki`` (session): a :class:`Pki` — a DevCA in a tmp dir and a ``cloud-console`` client
  certificate. ``pki.device(device_id)`` returns a device certificate made the way a device
  gets one (P-256 key and CSR generated here, signed by ``DevCA.sign_csr``).
- ``broker`` (function): a started :class:`scripts.testbed.mosquitto.LocalBroker` (mutual TLS,
  ACL, persistence) on a free loopback port, stopped afterwards. Its log is ``broker.log_path``.
- ``any_broker`` (function, parametrised): ``broker`` or the session's RabbitMQ node (below),
  for the end-to-end tests that must hold on both; ``admitted(broker, name)`` gives a device id
  unique to the test and broker, already let in (RabbitMQ needs a user per device).
- ``peers`` (function): a factory of :class:`MqttPeer`, a plain paho client used as the test's
  other end (the cloud, or a misbehaving device), on any broker or cluster node; all are closed
  afterwards. ``mqtt_peer`` is the same bound to ``broker``; ``cloud_peer`` one such peer,
  connected as ``cloud-console``.
- ``links`` (function): a factory of the agent's own :class:`agent.cloud.mqtt.MqttLink` in a
  :class:`Harness`, on any broker (its MQTT version by default); ``make_link`` is the same bound
  to ``broker``. All are stopped afterwards.
"""
from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.cloud.mqtt import MqttLink
from drivers.core.backoff import Backoff
from scripts.testbed.devca import DevCA

# Collects every outbound body the suite produces and checks it against docs/privacy.md.
pytest_plugins = ["tests.support.inventory"]
from scripts.testbed.mosquitto import LocalBroker

CLOUD_USER = "cloud-console"
PREFIX = "dongle/v1"
AGENT = "1.2.3-test"     # the agent version links report in their status
CONFIG_VERSION = 7       # ... and the config version


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


def make_device_cert(ca: DevCA, device_id: str, out_dir: Path) -> ClientCert:
    """What provisioning does: a P-256 key and a CSR with CN = device id, signed by the CA."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    key_path, csr_path, cert_path = (out_dir / f"{device_id}.key", out_dir / f"{device_id}.csr",
                                     out_dir / f"{device_id}.pem")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    ca.sign_csr(csr_path, cert_path)
    return ClientCert(cert_path, key_path)


@dataclass
class Pki:
    ca: DevCA
    directory: Path
    cloud: ClientCert
    _devices: dict[str, ClientCert] = field(default_factory=dict)

    def device(self, device_id: str) -> ClientCert:
        """A device certificate for ``device_id`` (made once per test session)."""
        if device_id not in self._devices:
            self._devices[device_id] = make_device_cert(self.ca, device_id,
                                                        self.directory / "devices")
        return self._devices[device_id]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = DevCA(directory / "ca")
    cert, key = ca.issue_client(CLOUD_USER, directory / "cloud")
    return Pki(ca, directory, ClientCert(cert, key))


# --------------------------------------------------------------------------------------------
# Broker and MQTT peers
# --------------------------------------------------------------------------------------------

@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[LocalBroker]:
    b = LocalBroker(tmp_path / "broker", pki.ca, cloud_users=(CLOUD_USER,))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


def mqtt_version(target: object) -> str:
    """The MQTT version to speak to a broker or cluster node: "5", or "3.1.1" where that is all
    it has (``mqtt_protocol`` on RabbitMQ's broker classes)."""
    return getattr(target, "mqtt_protocol", "5")


class MqttPeer:
    """A plain paho client on its own loop thread, with blocking helpers for tests.

    Not the agent's code: it is the other end (cloud console, or a device doing what it should
    not). Messages land in ``self.messages`` (a queue of :class:`Received`). ``broker`` is
    anything with ``host``, ``port`` and ``ca_file`` (a broker, a cluster node's endpoint);
    ``protocol`` defaults to what it speaks (:func:`mqtt_version`).
    """

    def __init__(self, broker: object, cert: ClientCert | None, *, client_id: str,
                 protocol: int | None = None, ca_file: Path | None = None):
        if protocol is None:
            protocol = paho.MQTTv311 if mqtt_version(broker) == "3.1.1" else paho.MQTTv5
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connack: queue.Queue[ReasonCode | None] = queue.Queue()  # None: failed
        self._acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, reconnect_on_failure=False)
        ctx = ssl.create_default_context(cafile=str(ca_file or broker.ca_file))
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.client.tls_set_context(ctx)
        self.client.on_connect = lambda c, u, f, rc, p: self._connack.put(rc)
        self.client.on_connect_fail = lambda c, u: self._connack.put(None)
        self.client.on_disconnect = lambda c, u, f, rc, p: self._connack.put(None)
        self.client.on_message = lambda c, u, m: self.messages.put(
            Received(m.topic, bytes(m.payload), bool(m.retain)))
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self._broker = broker

    def connect(self, timeout: float = 10.0) -> bool:
        """True once CONNACK says success; False on refusal, TLS failure or timeout."""
        try:
            self.client.connect(self._broker.host, self._broker.port, keepalive=30)
        except (OSError, ValueError):
            return False
        self.client.loop_start()
        try:
            rc = self._connack.get(timeout=timeout)
        except queue.Empty:
            return False
        return rc is not None and not rc.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[ReasonCode]:
        info = self.client.subscribe(topic, qos=1)
        return self._wait_ack(info[1], timeout)  # type: ignore[return-value]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                timeout: float = 10.0) -> ReasonCode:
        """QoS 1 publish; returns the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, paho.error_string(info.rc)
        return self._wait_ack(info.mid, timeout)  # type: ignore[return-value]

    def expect(self, match: Callable[[Received], bool] | str, timeout: float = 15.0) -> Received:
        """The next message matching ``match`` (a topic or a predicate); others are skipped."""
        pred = (lambda m: m.topic == match) if isinstance(match, str) else match
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if pred(msg):
                return msg
        raise AssertionError(f"no matching message within {timeout} s")

    def _wait_ack(self, mid: int, timeout: float) -> ReasonCode | list[ReasonCode]:
        with self._acked:
            if not self._acked.wait_for(lambda: mid in self._acks, timeout):
                raise AssertionError(f"no acknowledgement for mid {mid} within {timeout} s")
            return self._acks.pop(mid)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, rc: ReasonCode,
                    props: object) -> None:
        with self._acked:
            self._acks[mid] = rc
            self._acked.notify_all()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      rcs: list[ReasonCode], props: object) -> None:
        with self._acked:
            self._acks[mid] = rcs  # type: ignore[assignment]
            self._acked.notify_all()


@pytest.fixture
def peers() -> Iterator[Callable[..., MqttPeer]]:
    """``peers(broker_or_endpoint, cert, client_id=..., protocol=None, connect=True,
    ca_file=None)`` -> a connected MqttPeer."""
    made: list[MqttPeer] = []

    def make(target: object, cert: ClientCert | None, *, client_id: str,
             protocol: int | None = None, connect: bool = True,
             ca_file: Path | None = None) -> MqttPeer:
        peer = MqttPeer(target, cert, client_id=client_id, protocol=protocol, ca_file=ca_file)
        made.append(peer)
        if connect:
            assert peer.connect(), f"{client_id} could not connect to the broker"
        return peer

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def mqtt_peer(broker: LocalBroker, peers: Callable[..., MqttPeer]) -> Callable[..., MqttPeer]:
    """``mqtt_peer(cert, client_id=..., protocol=..., connect=True)``: ``peers`` on ``broker``."""
    return lambda cert, **kw: peers(broker, cert, **kw)


@pytest.fixture
def cloud_peer(pki: Pki, mqtt_peer: Callable[..., MqttPeer]) -> MqttPeer:
    """The cloud side: connected as cloud-console (readwrite on the whole prefix)."""
    return mqtt_peer(pki.cloud, client_id="cloud-test")


def fast_backoff(seed: int = 1) -> Backoff:
    return Backoff(0.05, 0.5, rng=random.Random(seed))


@dataclass
class Harness:
    """An MqttLink made by ``links``; downlink it receives lands in ``received``."""

    link: MqttLink
    received: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    connection_events: list[bool] = field(default_factory=list)

    def expect(self, suffix: str, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got_suffix, payload = self.received.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if got_suffix == suffix:
                return payload
        raise AssertionError(f"no message on {suffix} within {timeout} s")


@pytest.fixture
def links(pki: Pki) -> Iterator[Callable[..., Harness]]:
    """``links(target, device_id, start=True, cert=None, port=None, **MqttLink kwargs)``: the
    agent's link on ``target`` (a broker or cluster node; ``port`` overrides its port; an
    ``endpoints=[...]`` kwarg replaces both), speaking the target's MQTT version unless
    ``protocol`` is given, with a fast backoff unless ``backoff`` is. Received downlink goes to
    ``Harness.received`` unless ``on_message`` is given; ``on_connection`` is called besides
    recording ``Harness.connection_events``."""
    made: list[Harness] = []

    def make(target: object, device: str, *, start: bool = True, cert: ClientCert | None = None,
             port: int | None = None, on_connection: Callable[[bool], None] | None = None,
             **kwargs: object) -> Harness:
        cert = cert or pki.device(device)
        kwargs.setdefault("backoff", fast_backoff())
        kwargs.setdefault("protocol", mqtt_version(target))
        kwargs.setdefault("ca_file", target.ca_file)  # type: ignore[attr-defined]
        if "endpoints" not in kwargs:
            kwargs["host"] = target.host  # type: ignore[attr-defined]
            kwargs["port"] = port or target.port  # type: ignore[attr-defined]
        harness: Harness
        on_message = kwargs.pop("on_message", None) or (lambda s, p, ack: (harness.received.put((s, p)), ack()))

        def connection(up: bool) -> None:
            harness.connection_events.append(up)
            if on_connection is not None:
                on_connection(up)

        link = MqttLink(device_id=device, cert_file=cert.cert, key_file=cert.key,
                        agent_version=AGENT, config_version=lambda: CONFIG_VERSION,
                        on_message=on_message, on_connection=connection,
                        **kwargs)  # type: ignore[arg-type]
        harness = Harness(link)
        made.append(harness)
        if start:
            link.start()
        return harness

    yield make
    for h in made:
        h.link.stop(timeout=2.0)


@pytest.fixture
def make_link(broker: LocalBroker, links: Callable[..., Harness]) -> Callable[..., Harness]:
    """``make_link(device_id, **links kwargs)``: ``links`` on ``broker``."""
    return lambda device, **kw: links(broker, device, **kw)


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def any_broker(request: pytest.FixtureRequest) -> object:
    """Mosquitto (fresh per test) or the session's RabbitMQ node (shared: use ``admitted``).
    Parametrise it indirectly to pick (``"mosquitto"``/``"rabbitmq"``)."""
    return request.getfixturevalue("broker" if request.param == "mosquitto" else "rabbitmq_broker")


def is_rabbitmq(broker: object) -> bool:
    return type(broker).__name__.startswith("Rabbit")


def admitted(broker: object, name: str) -> str:
    """A device id unique to this test and broker kind, already let in by the broker."""
    dev = f"{name}-{'rmq' if is_rabbitmq(broker) else 'mosq'}"
    broker.add_device(dev)  # type: ignore[attr-defined]
    return dev


def status_of(payload: bytes) -> dict:
    return json.loads(payload)


def online(topic: str) -> Callable[[Received], bool]:
    """Matches the device's ``online`` status on ``topic``."""
    return lambda m: m.topic == topic and status_of(m.payload)["state"] == "online"


def offline(topic: str) -> Callable[[Received], bool]:
    return lambda m: m.topic == topic and status_of(m.payload)["state"] == "offline"


def leave_a_session(target: object, dev: str, pki: Pki, peers: Callable[..., MqttPeer],
                    links: Callable[..., Harness], **link_kwargs: object) -> MqttPeer:
    """The device connects (subscribing its down/#) and stops: its session now waits for
    downlink. Returns the cloud peer, which saw it come and go."""
    status = f"{PREFIX}/{dev}/status"
    cloud = peers(target, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(status)
    first = links(target, dev, **link_kwargs)
    cloud.expect(online(status))  # subscribed to down/# by now: the session holds it
    first.link.stop()
    cloud.expect(offline(status))
    return cloud


# --------------------------------------------------------------------------------------------
# A whole local fleet: CA, broker, cloud console and real `dongle-agent` processes
# --------------------------------------------------------------------------------------------

class AgentProcess:
    """A real ``dongle-agent`` daemon in a subprocess, as systemd would run it."""

    def __init__(self, toml: Path, log_path: Path):
        self.toml, self.log_path = toml, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        exe = Path(sys.executable).parent / "dongle-agent"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen([str(exe), "--config", str(self.toml), "--log-level", "DEBUG"],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Fleet:
    """scripts/testbed/devenv.py's layout in a temp dir, with the broker running and a console listening."""

    def __init__(self, run_dir: Path):
        from scripts.testbed import devenv
        from scripts.refcloud.console import CloudConsole
        self.devenv = devenv
        self.run_dir = run_dir
        self.ca = devenv.make_cloud(run_dir)
        self.broker = devenv.start_broker(run_dir, self.ca)
        self.console = CloudConsole(run_dir)
        self.console.start()
        assert self.console.connected.wait(15), "console could not connect"
        self.agents: list[AgentProcess] = []

    def device(self, device_id: str, **kw) -> Path:
        return self.devenv.make_device(self.run_dir, self.ca, device_id, broker_port=self.broker.port, **kw)

    def agent(self, toml: Path) -> AgentProcess:
        a = AgentProcess(toml, toml.parent / "agent.log").start()
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            if a.alive():
                a.kill()
        self.console.stop()
        self.broker.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet")
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def gps(tmp_path: Path):
    """gpsd fed by gpsfake with the real drive's minute of NMEA, looping (a receiver that keeps
    its fix for as long as a test runs); a test using it needs ``needs_gpsd``'s skip."""
    from scripts.testbed.gps import GpsFake
    fake = GpsFake(tmp_path / "gps").start(cycle=0.25, once=False)
    try:
        yield fake
    finally:
        fake.stop()


# --------------------------------------------------------------------------------------------
# RabbitMQ, the clustering broker (scripts/testbed/rabbitmq.py): same TLS identity and ACL as
# the Mosquitto above, MQTT 3.1.1 only. Shared because a node takes seconds to start (a
# cluster ~15 s): tests sharing one use distinct device ids (``admitted``). Skipped where
# rabbitmq-server is not installed.
#
# - ``rabbitmq_broker`` (session): a started RabbitBroker (classic session queues), used by
#   ``any_broker`` in several modules.
# - ``rabbitmq_cluster`` (module): a started three-node RabbitCluster (quorum session queues).
# Both need ``broker.add_device(id)`` before a device can connect (LocalBroker's is a no-op).
# --------------------------------------------------------------------------------------------

def _rabbitmq_or_skip():
    from scripts.testbed import rabbitmq
    reason = rabbitmq.missing_reason()
    if reason:
        pytest.skip(f"RabbitMQ not available: {reason}")
    return rabbitmq


@pytest.fixture(scope="session")
def rabbitmq_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[object]:
    rabbitmq = _rabbitmq_or_skip()
    b = rabbitmq.RabbitBroker(tmp_path_factory.mktemp("rabbitmq"), pki.ca,
                              cloud_users=(CLOUD_USER,))
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def rabbitmq_cluster(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[object]:
    rabbitmq = _rabbitmq_or_skip()
    c = rabbitmq.RabbitCluster(tmp_path_factory.mktemp("rabbitmq-cluster"), pki.ca,
                               cloud_users=(CLOUD_USER,))
    c.start()
    try:
        yield c
    finally:
        c.stop()

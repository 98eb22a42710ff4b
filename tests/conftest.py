"""Shared fixtures. Each section says what it provides; add new sections at the end.

MQTT / PKI (real mosquitto, real certificates; see scripts/testbed/devca.py and scripts/testbed/mosquitto.py):

- ``pki`` (session): a :class:`Pki` — a DevCA in a tmp dir and a ``cloud-console`` client
  certificate. ``pki.device(device_id)`` returns a device certificate made the way a device
  gets one (P-256 key and CSR generated here, signed by ``DevCA.sign_csr``).
- ``broker`` (function): a started :class:`scripts.local_broker.LocalBroker` (mutual TLS, ACL,
  persistence) on a free loopback port, stopped afterwards. Its log is ``broker.log_path``.
- ``mqtt_peer`` (function): a factory of :class:`MqttPeer`, a plain paho client used as the
  test's other end (the cloud, or a misbehaving device); all are closed afterwards.
  ``cloud_peer`` is one such peer, connected as ``cloud-console``.
"""
from __future__ import annotations

import queue
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

from scripts.testbed.devca import DevCA

# Collects every outbound body the suite produces and checks it against docs/privacy.md.
pytest_plugins = ["tests.support.inventory"]
from scripts.testbed.mosquitto import LocalBroker

CLOUD_USER = "cloud-console"


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


class MqttPeer:
    """A plain paho client on its own loop thread, with blocking helpers for tests.

    Not the agent's code: it is the other end (cloud console, or a device doing what it should
    not). Messages land in ``self.messages`` (a queue of :class:`Received`).
    """

    def __init__(self, broker: LocalBroker, cert: ClientCert | None, *, client_id: str,
                 protocol: int = paho.MQTTv5, ca_file: Path | None = None):
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
def mqtt_peer(broker: LocalBroker) -> Iterator[Callable[..., MqttPeer]]:
    """``mqtt_peer(cert, client_id=..., protocol=..., connect=True)`` -> MqttPeer."""
    peers: list[MqttPeer] = []

    def make(cert: ClientCert | None, *, client_id: str, protocol: int = paho.MQTTv5,
             connect: bool = True, ca_file: Path | None = None) -> MqttPeer:
        peer = MqttPeer(broker, cert, client_id=client_id, protocol=protocol, ca_file=ca_file)
        peers.append(peer)
        if connect:
            assert peer.connect(), f"{client_id} could not connect to the broker"
        return peer

    yield make
    for peer in peers:
        peer.close()


@pytest.fixture
def cloud_peer(pki: Pki, mqtt_peer: Callable[..., MqttPeer]) -> MqttPeer:
    """The cloud side: connected as cloud-console (readwrite on the whole prefix)."""
    return mqtt_peer(pki.cloud, client_id="cloud-test")


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


# --------------------------------------------------------------------------------------------
# RabbitMQ, the clustering broker (scripts/testbed/rabbitmq.py): same TLS identity and ACL as
# the Mosquitto above, MQTT 3.1.1 only. Module-scoped because a node takes seconds to start:
# tests sharing one use distinct device ids. Skipped where rabbitmq-server is not installed.
#
# - ``rabbitmq_broker`` (module): a started RabbitBroker (classic session queues).
# - ``rabbitmq_cluster`` (module): a started three-node RabbitCluster (quorum session queues).
# Both need ``broker.add_device(id)`` before a device can connect (LocalBroker's is a no-op).
# --------------------------------------------------------------------------------------------

def _rabbitmq_or_skip():
    from scripts.testbed import rabbitmq
    reason = rabbitmq.missing_reason()
    if reason:
        pytest.skip(f"RabbitMQ not available: {reason}")
    return rabbitmq


@pytest.fixture(scope="module")
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

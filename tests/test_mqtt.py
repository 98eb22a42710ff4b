"""agent/cloud/mqtt.py against a real mosquitto (scripts/testbed/mosquitto.py): TLS, ACL, status and will,
persistent session, MQTT 3.1.1, outages and backoff. No fakes: the other end is a paho client."""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drivers.core.backoff import Backoff
from drivers.core.clock import Clock

now_ms = Clock().now_ms
from agent.cloud.mqtt import MqttLink, status_payload
from scripts.testbed.devca import DevCA
from scripts.testbed.mosquitto import ENVELOPE_MAX, LocalBroker, free_port
from scripts.testbed.wait import wait_until
from tests.conftest import ClientCert, MqttPeer, Pki, make_device_cert

pytestmark = pytest.mark.timeout(90)

AGENT = "1.2.3-test"
CONFIG_VERSION = 7
PREFIX = "dongle/v1"


def fast_backoff(seed: int = 1) -> Backoff:
    return Backoff(0.05, 0.5, rng=random.Random(seed))


def status_of(msg_payload: bytes) -> dict:
    return json.loads(msg_payload)


@dataclass
class Harness:
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
def make_link(broker: LocalBroker, pki: Pki) -> Iterator[Callable[..., Harness]]:
    """``make_link(device_id, cert=..., port=..., start=True, **MqttLink kwargs)``; links are
    stopped afterwards. Received downlink goes to ``Harness.received`` unless ``on_message``
    is given."""
    made: list[Harness] = []

    def make(device_id: str, *, cert: ClientCert | None = None, port: int | None = None,
             start: bool = True, **kwargs: object) -> Harness:
        cert = cert or pki.device(device_id)
        kwargs.setdefault("backoff", fast_backoff())
        harness: Harness
        on_message = kwargs.pop("on_message", None) or (lambda s, p, ack: (harness.received.put((s, p)), ack()))
        link = MqttLink(device_id=device_id, host=broker.host, port=port or broker.port,
                        ca_file=kwargs.pop("ca_file", broker.ca_file), cert_file=cert.cert,
                        key_file=cert.key, agent_version=AGENT,
                        config_version=lambda: CONFIG_VERSION,
                        on_message=on_message,
                        on_connection=lambda up: harness.connection_events.append(up),
                        **kwargs)  # type: ignore[arg-type]
        harness = Harness(link)
        made.append(harness)
        if start:
            link.start()
        return harness

    yield make
    for h in made:
        h.link.stop(timeout=2.0)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA(tmp_path_factory.mktemp("foreign-ca"))


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------

def test_broker_requires_a_client_certificate_from_its_ca(
        pki: Pki, foreign_ca: DevCA, tmp_path: Path, mqtt_peer: Callable[..., MqttPeer]) -> None:
    no_cert = mqtt_peer(None, client_id="dev-nocert", connect=False)
    assert not no_cert.connect(timeout=10)

    forged = make_device_cert(foreign_ca, "dev-forged", tmp_path / "forged")
    assert not mqtt_peer(forged, client_id="dev-forged", connect=False).connect(timeout=10)

    # The same code path with a certificate from the broker's CA gets in.
    assert mqtt_peer(pki.device("dev-genuine"), client_id="dev-genuine", connect=False).connect()


def test_plain_tcp_without_tls_is_refused(broker: LocalBroker) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-plain",
                         protocol=paho.MQTTv5, reconnect_on_failure=False)
    connacks: list[object] = []
    client.on_connect = lambda c, u, f, rc, p: connacks.append(rc)
    try:
        client.connect(broker.host, broker.port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and client.loop(0.1) == paho.MQTT_ERR_SUCCESS:
            pass
    except OSError:
        pass
    finally:
        client.disconnect()
    assert connacks == []


# --------------------------------------------------------------------------------------------
# Status and will
# --------------------------------------------------------------------------------------------

def test_status_payload_is_compact_json_in_protocol_order() -> None:
    assert status_payload("online", "1.0", 4, ts_ms=1700000000123) == (
        b'{"state":"online","ts":1700000000123,"agent":"1.0","config_version":4}')
    assert status_payload("offline", "1.0", 4, ts_ms=1700000000123, frame_t="dt") == (
        b'{"state":"offline","ts":1700000000123,"agent":"1.0","config_version":4,"frame_t":"dt"}')


_CHILD = r"""
import json, logging, sys, time
from drivers.core.backoff import Backoff
from agent.cloud.mqtt import MqttLink
logging.basicConfig(level=logging.INFO)
args = json.loads(sys.argv[1])
link = MqttLink(**args, backoff=Backoff(0.05, 0.5), agent_version="child-9",
                config_version=lambda: 3)
link.start()
if not link.wait_connected(60):
    sys.exit(2)
time.sleep(300)  # until the test SIGKILLs us
"""


def test_online_status_is_retained_and_the_will_reports_an_abrupt_death(
        broker: LocalBroker, pki: Pki, cloud_peer: MqttPeer, mqtt_peer: Callable[..., MqttPeer],
        tmp_path: Path) -> None:
    device = "dev-will"
    topic = f"{PREFIX}/{device}/status"
    cloud_peer.subscribe(topic)
    cert = pki.device(device)
    args = {"device_id": device, "host": broker.host, "port": broker.port,
            "ca_file": str(broker.ca_file), "cert_file": str(cert.cert),
            "key_file": str(cert.key)}
    with open(tmp_path / "child.log", "wb") as child_log:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)],
                                 stdout=child_log, stderr=subprocess.STDOUT)
    try:
        online = cloud_peer.expect(lambda m: m.topic == topic and b'"online"' in m.payload, 30)
        doc = status_of(online.payload)
        assert list(doc) == ["state", "ts", "agent", "config_version"]
        assert doc["agent"] == "child-9" and doc["config_version"] == 3
        assert abs(doc["ts"] - now_ms()) < 600_000
        assert online.payload == json.dumps(doc, separators=(",", ":")).encode()

        late = mqtt_peer(pki.cloud, client_id="cloud-late")
        late.subscribe(topic)
        retained = late.expect(topic)
        assert retained.retain and status_of(retained.payload)["state"] == "online"

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        offline = cloud_peer.expect(lambda m: m.topic == topic and b'"offline"' in m.payload, 30)
        doc = status_of(offline.payload)
        assert doc["agent"] == "child-9" and doc["config_version"] == 3
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    later = mqtt_peer(pki.cloud, client_id="cloud-later")
    later.subscribe(topic)
    msg = later.expect(topic)
    assert msg.retain and status_of(msg.payload)["state"] == "offline"


def test_graceful_stop_publishes_offline(cloud_peer: MqttPeer,
                                         make_link: Callable[..., Harness]) -> None:
    device = "dev-grace"
    topic = f"{PREFIX}/{device}/status"
    cloud_peer.subscribe(topic)
    h = make_link(device)
    online = status_of(cloud_peer.expect(topic).payload)
    assert online["state"] == "online" and online["agent"] == AGENT
    assert online["config_version"] == CONFIG_VERSION

    h.link.stop()
    assert not h.link.connected
    offline = status_of(cloud_peer.expect(topic).payload)
    assert offline["state"] == "offline"
    assert offline["ts"] >= online["ts"]  # published at stop, not the will set at connect
    wait_until(lambda: h.connection_events == [True, False], what="connection events")


# --------------------------------------------------------------------------------------------
# ACL
# --------------------------------------------------------------------------------------------

def test_device_cannot_read_another_devices_downlink(
        pki: Pki, cloud_peer: MqttPeer, mqtt_peer: Callable[..., MqttPeer],
        make_link: Callable[..., Harness]) -> None:
    a, b = "dev-aaaa", "dev-bbbb"
    h_b = make_link(b)
    assert h_b.link.wait_connected(20)
    cloud_peer.subscribe(f"{PREFIX}/{b}/status")
    cloud_peer.expect(f"{PREFIX}/{b}/status")  # b's SUBSCRIBE was processed before its status

    spy = mqtt_peer(pki.device(a), client_id=f"{a}-spy")  # device a's certificate
    spy.subscribe(f"{PREFIX}/{b}/down/command")
    spy.subscribe(f"{PREFIX}/{a}/down/command")

    assert not cloud_peer.publish(f"{PREFIX}/{b}/down/command", b"for-b-only").is_failure
    assert h_b.expect("down/command") == b"for-b-only"
    # A later message to a's own topic is a barrier: anything of b's would have come first.
    cloud_peer.publish(f"{PREFIX}/{a}/down/command", b"barrier")
    seen = []
    spy.expect(lambda m: seen.append(m) or m.payload == b"barrier")
    assert [m.payload for m in seen] == [b"barrier"]


def test_device_cannot_publish_as_another_device(
        pki: Pki, cloud_peer: MqttPeer, make_link: Callable[..., Harness]) -> None:
    a, b = "dev-cccc", "dev-dddd"
    cloud_peer.subscribe(f"{PREFIX}/#")
    h_b = make_link(b)
    # Device a, misconfigured (or malicious) to use b's topics with its own certificate.
    h_a = make_link(a, cert=pki.device(a), topic_prefix=f"{PREFIX}/{b}/")
    assert h_a.link.wait_connected(20) and h_b.link.wait_connected(20)

    a_acks: list[int] = []
    # a's online status (to b's status topic) is refused first; wait for that before publishing.
    wait_until(lambda: h_a.link.stats["publish_errors"] >= 1, what="a's status refused")
    assert h_a.link.publish("up/telemetry", b"forged", on_ack=lambda: a_acks.append(1))
    wait_until(lambda: h_a.link.stats["publish_errors"] >= 2, what="PUBACK 0x87 for a")
    assert h_a.link.inflight == 0
    assert a_acks == []

    b_acks: list[int] = []
    assert h_b.link.publish("up/telemetry", b"genuine", on_ack=lambda: b_acks.append(1))
    seen = []
    cloud_peer.expect(lambda m: seen.append(m) or m.payload == b"genuine")
    assert b"forged" not in [m.payload for m in seen]
    wait_until(lambda: b_acks == [1], what="b's ack")
    # b's retained status is b's own, not a's refused one.
    statuses = [status_of(m.payload) for m in seen if m.topic == f"{PREFIX}/{b}/status"]
    assert statuses and all(s["state"] == "online" for s in statuses)


# --------------------------------------------------------------------------------------------
# Session, protocol versions, payload size, in-flight bound
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_downlink_sent_while_offline_arrives_on_reconnect_even_across_a_broker_restart(
        broker: LocalBroker, pki: Pki, cloud_peer: MqttPeer, mqtt_peer: Callable[..., MqttPeer],
        make_link: Callable[..., Harness], protocol: str) -> None:
    device = "dev-sess-" + protocol.replace(".", "")
    status = f"{PREFIX}/{device}/status"
    cloud_peer.subscribe(status)
    first = make_link(device, protocol=protocol)
    cloud_peer.expect(lambda m: m.topic == status and b'"online"' in m.payload)  # subscribed by now
    first.link.stop()
    cloud_peer.expect(lambda m: m.topic == status and b'"offline"' in m.payload)

    assert not cloud_peer.publish(f"{PREFIX}/{device}/down/command", b"while-away").is_failure
    broker.restart()  # the queued message must survive in the broker's persistence too

    second = make_link(device, protocol=protocol)
    assert second.expect("down/command", timeout=30) == b"while-away"


def test_mqtt_311_end_to_end(broker: LocalBroker, pki: Pki, cloud_peer: MqttPeer,
                             make_link: Callable[..., Harness]) -> None:
    device = "dev-v311"
    cloud_peer.subscribe(f"{PREFIX}/{device}/#")
    cloud_peer.publish(f"{PREFIX}/{device}/down/config", b"config-1", retain=True)
    h = make_link(device, protocol="3.1.1")
    assert h.expect("down/config") == b"config-1"  # retained by the cloud_peer, delivered on subscribe
    online = cloud_peer.expect(f"{PREFIX}/{device}/status")
    assert status_of(online.payload)["state"] == "online"

    acked: list[int] = []
    assert h.link.publish("up/telemetry", b"\x83envelope", on_ack=lambda: acked.append(1))
    got = cloud_peer.expect(f"{PREFIX}/{device}/up/telemetry")
    assert got.payload == b"\x83envelope" and not got.retain
    wait_until(lambda: acked == [1], what="on_ack")

    cloud_peer.publish(f"{PREFIX}/{device}/down/booking", b"booking-1")
    assert h.expect("down/booking") == b"booking-1"
    h.link.stop()
    assert status_of(cloud_peer.expect(f"{PREFIX}/{device}/status").payload)["state"] == "offline"


def test_largest_envelope_goes_through(cloud_peer: MqttPeer, make_link: Callable[..., Harness]) -> None:
    device = "dev-big"
    cloud_peer.subscribe(f"{PREFIX}/{device}/up/#")
    h = make_link(device)
    assert h.link.wait_connected(20)
    payload = random.Random(5).randbytes(ENVELOPE_MAX)
    acked: list[int] = []
    assert h.link.publish("up/telemetry", payload, on_ack=lambda: acked.append(1))
    assert cloud_peer.expect(f"{PREFIX}/{device}/up/telemetry").payload == payload
    wait_until(lambda: acked == [1], what="on_ack")
    cloud_peer.publish(f"{PREFIX}/{device}/down/config", payload)
    assert h.expect("down/config") == payload


def test_publish_refuses_when_not_connected_or_too_many_in_flight(
        broker: LocalBroker, make_link: Callable[..., Harness]) -> None:
    h = make_link("dev-inflight", start=False, max_inflight=3)
    assert h.link.publish("up/telemetry", b"early") is False
    assert h.link.inflight == 0

    h.link.start()
    assert h.link.wait_connected(20)
    wait_until(lambda: h.link.inflight == 0, what="online status acknowledged")
    acked: list[int] = []
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGSTOP)  # the broker stops acknowledging; TCP stays up
    try:
        for i in range(3):
            assert h.link.publish("up/telemetry", b"%d" % i, on_ack=lambda: acked.append(1))
        assert h.link.publish("up/telemetry", b"one too many") is False
        assert h.link.inflight == 3
        assert acked == []
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    wait_until(lambda: len(acked) == 3 and h.link.inflight == 0, what="acks after SIGCONT")


def test_exception_in_on_message_does_not_break_the_link(
        cloud_peer: MqttPeer, make_link: Callable[..., Harness]) -> None:
    device = "dev-raise"
    calls: list[bytes] = []
    handled: queue.Queue[bytes] = queue.Queue()

    def buggy_handler(suffix: str, payload: bytes, ack: Callable[[], None]) -> None:
        calls.append(payload)
        if payload == b"bad":
            raise RuntimeError("handler bug")
        handled.put(payload)
        ack()

    h = make_link(device, start=False, on_message=buggy_handler)
    cloud_peer.subscribe(f"{PREFIX}/{device}/status")
    h.link.start()
    cloud_peer.expect(f"{PREFIX}/{device}/status")  # its SUBSCRIBE was processed before its status
    cloud_peer.publish(f"{PREFIX}/{device}/down/command", b"bad")
    cloud_peer.publish(f"{PREFIX}/{device}/down/command", b"good")
    assert handled.get(timeout=20) == b"good"
    assert calls == [b"bad", b"good"] and h.link.connected


# --------------------------------------------------------------------------------------------
# Outages and backoff
# --------------------------------------------------------------------------------------------

def test_link_reconnects_by_itself_after_the_broker_is_killed_and_restarted(
        broker: LocalBroker, make_link: Callable[..., Harness]) -> None:
    patient = make_link("dev-outage", stable_after_s=3600.0)
    quick = make_link("dev-outage2", stable_after_s=0.2, backoff=fast_backoff(2))
    assert patient.link.wait_connected(20) and quick.link.wait_connected(20)

    broker.kill()
    wait_until(lambda: not patient.link.connected and not quick.link.connected,
               what="links noticing the outage")
    wait_until(lambda: patient.link.stats["connect_attempts"] >= 2, what="a failed retry")
    broker.restart()

    assert patient.link.wait_connected(30) and quick.link.wait_connected(30)
    assert patient.link.stats["connects"] == 2
    wait_until(lambda: patient.connection_events == [True, False, True], what="events")
    # Backoff is reset only once the connection has proved stable.
    assert patient.link.stats["backoff_failures"] >= 1
    wait_until(lambda: quick.link.stats["backoff_failures"] == 0, what="quick link's reset")

    acked: list[int] = []
    assert patient.link.publish("up/event", b"after-outage", on_ack=lambda: acked.append(1))
    wait_until(lambda: acked == [1], what="ack after reconnect")


def _allowed_attempts(seed: int, min_s: float, max_s: float, elapsed: float, n: int) -> int:
    """How many attempts a link can have started within ``elapsed`` s: the k-th attempt comes
    only after the k-1 waits the (seeded, hence reproducible) backoff drew before it."""
    replica = Backoff(min_s, max_s, rng=random.Random(seed))
    total, allowed = 0.0, 1
    for _ in range(n + 50):
        total += replica.next()
        if total > elapsed + 0.01:
            break
        allowed += 1
    return allowed


@pytest.mark.parametrize("failure", ["foreign-client-cert", "untrusted-broker", "closed-port"])
def test_failed_attempts_follow_the_backoff(
        failure: str, broker: LocalBroker, pki: Pki, foreign_ca: DevCA, tmp_path: Path,
        make_link: Callable[..., Harness]) -> None:
    seed, min_s, max_s = 1234, 0.05, 0.4
    device = "dev-retry"
    kwargs: dict[str, object] = {}
    if failure == "foreign-client-cert":
        kwargs["cert"] = make_device_cert(foreign_ca, device, tmp_path / "foreign")
        expect_reason = ("ssl", "tls")  # alert "unknown ca", or EOF if the broker hangs up first
    elif failure == "untrusted-broker":
        kwargs["ca_file"] = foreign_ca.ca_cert_path
        expect_reason = ("certificate verify failed",)
    else:
        kwargs["port"] = free_port()
        expect_reason = ("refused",)
    h = make_link(device, start=False, backoff=Backoff(min_s, max_s, rng=random.Random(seed)),
                  **kwargs)
    t0 = time.monotonic()
    h.link.start()
    wait_until(lambda: h.link.stats["connect_attempts"] >= 6, timeout=30, what="6 attempts")
    h.link.stop()
    elapsed = time.monotonic() - t0

    stats = h.link.stats
    attempts = stats["connect_attempts"]
    assert stats["connects"] == 0 and h.connection_events == []
    assert attempts <= _allowed_attempts(seed, min_s, max_s, elapsed, attempts)
    assert stats["backoff_failures"] in (attempts - 1, attempts)  # every failure backed off
    assert any(r in stats["last_error"].lower() for r in expect_reason), stats["last_error"]


# --------------------------------------------------------------------------------------------
# Development CA
# --------------------------------------------------------------------------------------------

def test_devca_signs_a_device_csr_keeping_its_cn_for_client_auth(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.device("dev-signed").cert.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-signed"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(pki.ca.certificate)


def test_devca_refuses_a_csr_whose_signature_does_not_verify(pki: Pki, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-honest")]))
           .sign(key, hashes.SHA256()))
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"dev-honest", b"dev-mallet")  # same length, signature now wrong
    assert tampered != der
    (tmp_path / "bad.csr").write_bytes(tampered)
    with pytest.raises(ValueError, match="signature"):
        pki.ca.sign_csr(tmp_path / "bad.csr", tmp_path / "bad.pem")
    assert not (tmp_path / "bad.pem").exists()


def test_devca_reuses_an_existing_ca_and_keeps_keys_private(pki: Pki) -> None:
    again = DevCA(pki.ca.directory)
    assert again.certificate == pki.ca.certificate
    assert (pki.ca.directory / "ca.key").stat().st_mode & 0o777 == 0o600
    assert pki.cloud.key.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------------------------
# Threads: the uplink publishes from its own thread while downlink arrives on the network thread
# --------------------------------------------------------------------------------------------

def test_publishing_from_many_threads_during_downlink_never_breaks_the_tls_session(
        make_link: Callable[..., Harness], cloud_peer: MqttPeer) -> None:
    """Regression: paho used to write the TLS socket from the publishing thread while the
    network thread read it, which broke the session with ``[SSL: BAD_LENGTH]``."""
    acked = []
    lock = threading.Lock()
    cloud_peer.subscribe(f"{PREFIX}/conc-0001/status")
    h = make_link("conc-0001", max_inflight=1000)
    assert h.link.wait_connected(10)
    cloud_peer.expect(f"{PREFIX}/conc-0001/status")  # subscribed to its downlink by now

    def pump(n: int) -> None:
        sent = 0
        while sent < n:
            if h.link.publish("up/telemetry", os.urandom(20000),
                              on_ack=lambda: (lock.acquire(), acked.append(1), lock.release())):
                sent += 1
            else:
                time.sleep(0.001)

    threads = [threading.Thread(target=pump, args=(150,)) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(150):
        cloud_peer.publish(f"{PREFIX}/conc-0001/down/command", os.urandom(60000))
    for t in threads:
        t.join(60)
    deadline = time.monotonic() + 30
    while len(acked) < 450 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(acked) == 450
    assert h.link.stats["disconnects"] == 0, h.link.stats["last_error"]
    got = 0
    while True:
        try:
            h.received.get(timeout=5 if got < 150 else 0.1)
            got += 1
        except queue.Empty:
            break
    assert got == 150

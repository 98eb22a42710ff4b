"""agent/cloud/mqtt.py against real brokers: TLS, ACL, status and will, persistent session,
MQTT 5 and 3.1.1, outages, backoff and the broker list. No fakes: the other end is a paho client.

The end-to-end tests PROTOCOL §2 needs from any broker (uplink, will and status, persistent
session and redelivery of downlink sent while offline, a broker restart) run on Mosquitto
(scripts/testbed/mosquitto.py) and on RabbitMQ (scripts/testbed/rabbitmq.py), through
``any_broker``; what only one of them does is tested on that one (RabbitMQ's differences:
tests/test_rabbitmq.py, docs/protocol.md §2.7).
"""
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
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cloud import protocol as envelope
from agent.cloud.mqtt import MqttLink, start_index, status_payload
from drivers.core.backoff import Backoff
from drivers.core.clock import Clock
from scripts.testbed.devca import DevCA
from scripts.testbed.mosquitto import LocalBroker, free_port
from scripts.testbed.wait import wait_until
from tests.conftest import (AGENT, CLOUD_USER, CONFIG_VERSION, PREFIX, Harness,
                            MqttPeer, Pki, admitted, fast_backoff, is_rabbitmq, leave_a_session,
                            make_device_cert, offline, online, status_of)

pytestmark = pytest.mark.timeout(120)

now_ms = Clock().now_ms

#: Each broker with each MQTT version it speaks (RabbitMQ 3.10: 3.1.1 only).
BROKERS_AND_PROTOCOLS = pytest.mark.parametrize(
    "any_broker, protocol", [("mosquitto", "5"), ("mosquitto", "3.1.1"), ("rabbitmq", "3.1.1")],
    indirect=["any_broker"])


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


def retained_copy(peers: Callable[..., MqttPeer], target: object, pki: Pki, topic: str,
                  name: str) -> object:
    """What a subscriber arriving now gets first on ``topic`` (the retained copy, if any)."""
    late = peers(target, pki.cloud, client_id=f"cloud-{name}")
    late.subscribe(topic)
    return late.expect(topic)


@pytest.mark.parametrize("any_broker", ["mosquitto", "rabbitmq"], indirect=True)
def test_status_is_retained_and_the_will_reports_an_abrupt_death(
        any_broker: object, pki: Pki, peers: Callable[..., MqttPeer], tmp_path: Path) -> None:
    dev = admitted(any_broker, "dev-will")
    topic = f"{PREFIX}/{dev}/status"
    cloud = peers(any_broker, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(topic)
    cert = pki.device(dev)
    args = {"device_id": dev, "host": any_broker.host, "port": any_broker.port,  # type: ignore[attr-defined]
            "ca_file": str(any_broker.ca_file), "cert_file": str(cert.cert),  # type: ignore[attr-defined]
            "key_file": str(cert.key), "protocol": "3.1.1" if is_rabbitmq(any_broker) else "5"}
    with open(tmp_path / "child.log", "wb") as child_log:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)],
                                 stdout=child_log, stderr=subprocess.STDOUT)
    try:
        up = cloud.expect(online(topic), 60)
        doc = status_of(up.payload)
        assert list(doc) == ["state", "ts", "agent", "config_version"]
        assert doc["agent"] == "child-9" and doc["config_version"] == 3
        assert abs(doc["ts"] - now_ms()) < 600_000
        assert up.payload == json.dumps(doc, separators=(",", ":")).encode()
        retained = retained_copy(peers, any_broker, pki, topic, f"late-{dev}")
        assert retained.retain and status_of(retained.payload)["state"] == "online"

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        will = cloud.expect(offline(topic), 60)  # the broker sees the socket close at once
        doc = status_of(will.payload)
        assert doc["agent"] == "child-9" and doc["config_version"] == 3
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    msg = retained_copy(peers, any_broker, pki, topic, f"later-{dev}")
    assert msg.retain and status_of(msg.payload)["state"] == "offline"


@pytest.mark.parametrize("any_broker", ["mosquitto", "rabbitmq"], indirect=True)
def test_graceful_stop_leaves_a_retained_offline_status(
        any_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    dev = admitted(any_broker, "dev-grace")
    topic = f"{PREFIX}/{dev}/status"
    cloud = peers(any_broker, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(topic)
    h = links(any_broker, dev)
    up = status_of(cloud.expect(online(topic)).payload)
    assert up["agent"] == AGENT and up["config_version"] == CONFIG_VERSION
    h.link.stop()
    assert not h.link.connected
    down = status_of(cloud.expect(offline(topic)).payload)
    assert down["ts"] >= up["ts"]  # published at stop, not the will set at connect
    assert down["config_version"] == CONFIG_VERSION
    wait_until(lambda: h.connection_events == [True, False], what="connection events")
    msg = retained_copy(peers, any_broker, pki, topic, f"later-{dev}")
    assert msg.retain and status_of(msg.payload) == down


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

@pytest.mark.parametrize("any_broker", ["mosquitto", "rabbitmq"], indirect=True)
def test_uplink_is_acknowledged_and_the_largest_envelopes_pass_both_ways(
        any_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    dev = admitted(any_broker, "dev-uplink")
    cloud = peers(any_broker, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(f"{PREFIX}/{dev}/#")
    h = links(any_broker, dev)
    cloud.expect(online(f"{PREFIX}/{dev}/status"))  # its SUBSCRIBE was processed before this
    assert h.link.wait_connected(20)   # the link publishes once its SUBACK is in, just after

    rng = random.Random(19)
    small, largest_up = b"\x83small", rng.randbytes(envelope.MAX_UPLINK)
    acked: list[str] = []
    assert h.link.publish("up/telemetry", small, on_ack=lambda: acked.append("small"))
    assert h.link.publish("up/event", largest_up, on_ack=lambda: acked.append("large"))
    got = cloud.expect(f"{PREFIX}/{dev}/up/telemetry")
    assert got.payload == small and not got.retain
    assert cloud.expect(f"{PREFIX}/{dev}/up/event").payload == largest_up
    wait_until(lambda: sorted(acked) == ["large", "small"], what="both PUBACKs")
    assert h.link.stats["publish_errors"] == 0

    largest_down = rng.randbytes(envelope.MAX_ENVELOPE)
    assert not cloud.publish(f"{PREFIX}/{dev}/down/command", largest_down).is_failure
    assert h.expect("down/command") == largest_down


@BROKERS_AND_PROTOCOLS
def test_downlink_sent_while_offline_arrives_on_reconnect_across_a_broker_restart(
        any_broker: object, protocol: str, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    dev = admitted(any_broker, "dev-sess-" + protocol.replace(".", ""))
    cloud = leave_a_session(any_broker, dev, pki, peers, links, protocol=protocol)
    assert not cloud.publish(f"{PREFIX}/{dev}/down/command", b"while-away").is_failure

    any_broker.restart()  # type: ignore[attr-defined]  # the queued message must survive it

    second = links(any_broker, dev, protocol=protocol)
    assert second.expect("down/command", timeout=60) == b"while-away"
    wait_until(lambda: second.link.stats["connects"] == 1, what="one connect")


@BROKERS_AND_PROTOCOLS
def test_retained_downlink_reaches_the_links_wildcard_subscription_on_mosquitto_only(
        any_broker: object, protocol: str, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    """PROTOCOL §2 has the cloud retain down/config and down/release; the link subscribes to
    down/#. RabbitMQ 3.10 delivers a retained message only to a subscription to that exact
    topic, never to one with a wildcard (docs/protocol.md §2.7 rows 4-5)."""
    dev = admitted(any_broker, "dev-retained-" + protocol.replace(".", ""))
    status = f"{PREFIX}/{dev}/status"
    cloud = peers(any_broker, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(status)
    assert not cloud.publish(f"{PREFIX}/{dev}/down/config", b"config-7", retain=True).is_failure

    h = links(any_broker, dev, protocol=protocol)
    cloud.expect(online(status))  # the link's SUBSCRIBE (and any retained delivery) came first
    cloud.publish(f"{PREFIX}/{dev}/down/command", b"barrier")
    seen = []
    while not seen or seen[-1] != ("down/command", b"barrier"):
        seen.append(h.received.get(timeout=30))
    expected = [] if is_rabbitmq(any_broker) else [("down/config", b"config-7")]
    assert seen == expected + [("down/command", b"barrier")]

    # An exact-topic subscription gets it on both (what an agent could add for config/release).
    spy = peers(any_broker, pki.device(dev), client_id=f"{dev}-exact")
    spy.subscribe(f"{PREFIX}/{dev}/down/config")
    got = spy.expect(f"{PREFIX}/{dev}/down/config")
    assert got.payload == b"config-7" and got.retain


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

@pytest.mark.parametrize("any_broker", ["mosquitto", "rabbitmq"], indirect=True)
def test_link_reconnects_by_itself_after_the_broker_is_killed_and_restarted(
        any_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    patient = links(any_broker, admitted(any_broker, "dev-outage"), stable_after_s=3600.0)
    quick = links(any_broker, admitted(any_broker, "dev-outage2"), stable_after_s=0.2,
                  backoff=fast_backoff(2))
    assert patient.link.wait_connected(30) and quick.link.wait_connected(30)

    any_broker.kill()  # type: ignore[attr-defined]
    wait_until(lambda: not patient.link.connected and not quick.link.connected,
               what="links noticing the outage")
    wait_until(lambda: patient.link.stats["connect_attempts"] >= 2, what="a failed retry")
    any_broker.restart()  # type: ignore[attr-defined]

    assert patient.link.wait_connected(60) and quick.link.wait_connected(60)
    assert patient.link.stats["connects"] == 2
    wait_until(lambda: patient.connection_events == [True, False, True], what="events")
    # Backoff is reset only once the connection has proved stable.
    assert patient.link.stats["backoff_failures"] >= 1
    wait_until(lambda: quick.link.stats["backoff_failures"] == 0, what="quick link's reset")

    dev = patient.link.device_id
    cloud = peers(any_broker, pki.cloud, client_id=f"cloud-{dev}")
    cloud.subscribe(f"{PREFIX}/{dev}/up/#")
    acked: list[int] = []
    assert patient.link.publish("up/event", b"after-outage", on_ack=lambda: acked.append(1))
    assert cloud.expect(f"{PREFIX}/{dev}/up/event").payload == b"after-outage"
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
# The broker list
# --------------------------------------------------------------------------------------------

def unstarted_link(device_id: str, endpoints: list[tuple[str, int]]) -> MqttLink:
    return MqttLink(device_id=device_id, endpoints=endpoints, ca_file="ca.pem",
                    cert_file="tls.crt", key_file="tls.key", agent_version=AGENT,
                    config_version=lambda: CONFIG_VERSION)


def in_trying_order(device_id: str, order: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The endpoint list that ``device_id`` tries in ``order`` (it starts at its hash index)."""
    first = start_index(device_id, len(order))
    return [order[(i - first) % len(order)] for i in range(len(order))]


def test_a_fleet_starts_spread_over_the_endpoints_and_a_device_always_at_its_own() -> None:
    nodes = [("mq1.example.com", 8883), ("mq2.example.com", 8883), ("mq3.example.com", 8883)]
    firsts = Counter(unstarted_link(f"car-{i:05d}", nodes).endpoint for i in range(1500))
    assert set(firsts) == set(nodes) and min(firsts.values()) > 450  # 500 each, within 10 %
    again = [unstarted_link(f"car-{i:05d}", nodes).endpoint for i in range(20)]
    assert again == [nodes[start_index(f"car-{i:05d}", 3)] for i in range(20)]


def test_reconnect_to_uses_a_cloud_chosen_broker_alone_and_a_configured_one_with_its_list() -> None:
    home = [("mq1", 8883), ("mq2", 8884), ("mq3", 8885)]
    link = unstarted_link("car-0001", home)
    link.reconnect_to("eu2.example.com", 8883)  # a config's link.broker_url
    assert link.endpoints == [("eu2.example.com", 8883)] and link.port == 8883
    link.reconnect_to("mq2", 8884)               # a rollback to the local settings
    assert link.endpoints == home and link.endpoint == ("mq2", 8884)
    assert link.status()["endpoints"] == ["mq1:8883", "mq2:8884", "mq3:8885"]
    assert link.stats["endpoint"] == "mq2:8884"


def test_the_next_endpoint_is_tried_at_once_while_the_round_has_untried_ones(
        broker: LocalBroker, make_link: Callable[..., Harness]) -> None:
    dev = "dev-round"
    dead = [(broker.host, free_port()), (broker.host, free_port())]
    live = (broker.host, broker.port)
    # A backoff of 30 s or more would show as a timeout here.
    h = make_link(dev, endpoints=in_trying_order(dev, dead + [live]), backoff=Backoff(30, 60))
    assert h.link.wait_connected(20)
    stats = h.link.stats
    assert (stats["connect_attempts"], stats["connects"], stats["backoff_failures"]) == (3, 1, 0)
    assert stats["endpoint"] == f"{broker.host}:{broker.port}" and stats["endpoint_moves"] == 2
    assert "refused" in stats["last_error"].lower()


def test_a_whole_round_of_failures_backs_off_once(broker: LocalBroker,
                                                  make_link: Callable[..., Harness]) -> None:
    dead = [(broker.host, free_port()), (broker.host, free_port())]
    h = make_link("dev-backoff-round", endpoints=dead,
                  backoff=Backoff(0.05, 0.4, rng=random.Random(7)))
    wait_until(lambda: h.link.stats["connect_attempts"] >= 6, timeout=30, what="6 attempts")
    h.link.stop()
    stats = h.link.stats
    assert stats["connects"] == 0
    assert stats["backoff_failures"] == stats["connect_attempts"] // 2  # one wait per round of 2


def test_a_lost_session_moves_to_the_next_endpoint_at_once_and_stays_while_it_works(
        broker: LocalBroker, pki: Pki, tmp_path: Path, peers: Callable[..., MqttPeer],
        make_link: Callable[..., Harness]) -> None:
    dev = "dev-failover"
    other = LocalBroker(tmp_path / "broker-2", pki.ca, cloud_users=(CLOUD_USER,))
    other.start()
    try:
        first, second = (broker.host, broker.port), (other.host, other.port)
        h = make_link(dev, endpoints=in_trying_order(dev, [first, second]),
                      backoff=Backoff(30, 60), stable_after_s=0.3)
        assert h.link.wait_connected(20) and h.link.endpoint == first
        cloud_2 = peers(other, pki.cloud, client_id="cloud-second")
        cloud_2.subscribe(f"{PREFIX}/{dev}/#")

        broker.kill()
        cloud_2.expect(online(f"{PREFIX}/{dev}/status"), 20)  # moved, without a 30 s backoff
        assert h.link.endpoint == second and h.link.stats["backoff_failures"] == 0

        broker.restart()
        peers(broker, pki.cloud, client_id="cloud-first")      # the first one is back ...
        assert h.link.wait_connected(20)   # still on the second: its SUBACK is in
        assert h.link.publish("up/event", b"still-here")
        assert cloud_2.expect(f"{PREFIX}/{dev}/up/event").payload == b"still-here"
        assert h.link.stats["connects"] == 2                     # ... and the link stayed
        wait_until(lambda: h.link.stats["stable"], what="the second connection proving stable")

        other.kill()  # a stable session ended: the next endpoint at once, a fresh round
        wait_until(lambda: h.link.stats["connects"] == 3, what="back on the first broker")
        assert h.link.endpoint == first and h.link.stats["backoff_failures"] == 0
    finally:
        other.stop()


def test_reconnect_to_during_a_backoff_wait_connects_at_once_with_a_fresh_backoff(
        broker: LocalBroker, make_link: Callable[..., Harness]) -> None:
    h = make_link("dev-switch-wait", port=free_port(), backoff=Backoff(20, 40))
    wait_until(lambda: h.link.stats["backoff_failures"] == 1, what="a 20-40 s backoff wait")
    h.link.reconnect_to(broker.host, broker.port)
    assert h.link.wait_connected(10)
    assert h.link.stats["backoff_failures"] == 0
    assert h.link.endpoints == [(broker.host, broker.port)]


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

"""RabbitMQ (scripts/testbed/rabbitmq.py), the clustering broker: where it differs from Mosquitto,
and the three-node cluster.

The end-to-end tests both brokers must pass (uplink, will and status, persistent session and
redelivery, a broker restart) are in tests/test_mqtt.py, parametrised over ``any_broker``.
Here: what RabbitMQ alone does (docs/protocol.md §2.7) — how the ACL refuses, QoS 2, session
queues, durability — and the cluster: retained messages per node, and a node lost under a
running agent, which moves to another node from its own broker list (``mqtt.urls``).
No fakes: the device side is MqttLink or the whole agent, the other side a plain paho client
or the reference console (scripts/refcloud/console.py).
"""
from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import settings
from agent.cloud import protocol
from agent.cloud.mqtt import start_index
from agent.compose import build
from drivers.core.clock import Clock
from scripts.refcloud.console import CloudConsole
from scripts.refcloud.keys import generate_cloud_keys
from scripts.testbed import devenv
from scripts.testbed.wait import wait_until
from tests.conftest import (PREFIX, Harness, MqttPeer, Pki, admitted, leave_a_session, online,
                            status_of)

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

now_ms = Clock().now_ms


def disconnected(peer: MqttPeer, timeout: float = 15.0) -> bool:
    """True once the broker has closed ``peer``'s connection (paho's on_disconnect)."""
    try:
        return peer._connack.get(timeout=timeout) is None
    except queue.Empty:
        return False


# --------------------------------------------------------------------------------------------
# RabbitMQ only: how it refuses, QoS 2, session queues, durability
# --------------------------------------------------------------------------------------------

def test_rabbitmq_answers_a_publish_to_another_devices_topic_by_closing_the_connection(
        rabbitmq_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    """Mosquitto drops it silently (3.1.1) or answers PUBACK 0x87 (MQTT 5) and keeps the
    connection; RabbitMQ sends no PUBACK, closes the connection and does not publish the will."""
    a, b = admitted(rabbitmq_broker, "dev-pub-a"), admitted(rabbitmq_broker, "dev-pub-b")
    cloud = peers(rabbitmq_broker, pki.cloud, client_id="cloud-pub")
    cloud.subscribe(f"{PREFIX}/{b}/#")
    cloud.subscribe(f"{PREFIX}/{a}/status")

    forger = peers(rabbitmq_broker, pki.device(a), client_id=a, connect=False)
    forger.client.will_set(f"{PREFIX}/{a}/status", b'{"state":"offline","will":true}', 1, True)
    assert forger.connect()
    info = forger.client.publish(f"{PREFIX}/{b}/up/telemetry", b"forged", qos=1)
    assert disconnected(forger), "the broker kept the connection"
    assert not info.is_published()
    forger.client.loop_stop()

    # Barriers: b's genuine publish, and a's own online status after the refusal. Anything the
    # refusal had let through (the forged message, a's will) would have come first.
    h_b = links(rabbitmq_broker, b)
    h_a = links(rabbitmq_broker, a)
    seen = []
    cloud.expect(lambda m: seen.append(m) or online(f"{PREFIX}/{a}/status")(m))
    assert h_b.link.wait_connected(20)   # the link publishes once its SUBACK is in
    assert h_b.link.publish("up/telemetry", b"genuine")
    cloud.expect(lambda m: seen.append(m) or m.payload == b"genuine")
    assert b"forged" not in [m.payload for m in seen]
    assert not [m for m in seen if m.topic == f"{PREFIX}/{a}/status" and b"will" in m.payload]
    wait_until(lambda: "closing due to an authorization failure"
               in rabbitmq_broker.log_text(), what="the broker's reason")  # type: ignore[attr-defined]
    assert h_a.link.connected


def test_rabbitmq_answers_a_subscription_to_another_devices_downlink_by_closing_the_connection(
        rabbitmq_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    """No SUBACK 0x80 as in MQTT 3.1.1 (Mosquitto grants it and then delivers nothing): the
    connection is closed. For the agent: a link whose topics the ACL does not allow never
    stays connected (it retries with backoff), instead of running without downlink."""
    a, b = admitted(rabbitmq_broker, "dev-sub-a"), admitted(rabbitmq_broker, "dev-sub-b")
    spy = peers(rabbitmq_broker, pki.device(a), client_id=f"{a}-spy")
    mid = spy.client.subscribe(f"{PREFIX}/{b}/down/#", qos=1)[1]
    assert disconnected(spy), "the broker kept the connection"
    with spy._acked:
        assert mid not in spy._acks  # no SUBACK came
    spy.client.loop_stop()
    own = peers(rabbitmq_broker, pki.device(a), client_id=f"{a}-own")
    assert [rc.value for rc in own.subscribe(f"{PREFIX}/{a}/down/#")] == [1]

    # The agent's own code with a's certificate and b's topics: connect, SUBSCRIBE, closed.
    h = links(rabbitmq_broker, a, cert=pki.device(a), topic_prefix=f"{PREFIX}/{b}/",
              stable_after_s=3600.0)
    wait_until(lambda: h.link.stats["connects"] >= 3, what="three short-lived connections")
    assert h.link.stats["disconnects"] >= 2 and h.link.stats["backoff_failures"] >= 2


def test_rabbitmq_grants_qos2_as_qos1(rabbitmq_broker: object, pki: Pki,
                                      peers: Callable[..., MqttPeer]) -> None:
    dev = admitted(rabbitmq_broker, "dev-qos2")
    cloud = peers(rabbitmq_broker, pki.cloud, client_id="cloud-qos2")
    mid = cloud.client.subscribe(f"{PREFIX}/{dev}/up/#", qos=2)[1]
    assert [rc.value for rc in cloud._wait_ack(mid, 10)] == [1]  # type: ignore[union-attr]

    device = peers(rabbitmq_broker, pki.device(dev), client_id=dev)
    info = device.client.publish(f"{PREFIX}/{dev}/up/event", b"exactly-once?", qos=2)
    got = cloud.expect(f"{PREFIX}/{dev}/up/event")
    assert got.payload == b"exactly-once?"
    info.wait_for_publish(10)  # RabbitMQ answered PUBACK (QoS 1), which paho takes as done
    assert info.is_published()


def test_rabbitmq_session_is_a_durable_queue_that_expires_with_the_agents_session(
        rabbitmq_broker: object, pki: Pki, links: Callable[..., Harness]) -> None:
    dev = admitted(rabbitmq_broker, "dev-queue")
    h = links(rabbitmq_broker, dev)
    assert h.link.wait_connected(30)
    name = f"mqtt-subscription-{dev}qos1"

    def row() -> list[str] | None:
        out = rabbitmq_broker.node.ctl("list_queues", "name", "durable", "type",  # type: ignore[attr-defined]
                                       "arguments", "--no-table-headers")
        return next((line.split("\t") for line in out.splitlines() if line.startswith(name)), None)

    wait_until(row, what=f"queue {name}")
    _, durable, qtype, arguments = row()  # type: ignore[misc]
    assert durable == "true" and qtype == "classic"
    assert "x-expires" in arguments and str(7 * 86400 * 1000) in arguments  # = MqttLink's default


def test_rabbitmq_keeps_a_confirmed_downlink_through_a_sigkill(
        rabbitmq_broker: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    """RabbitMQ acknowledges a QoS 1 publish to a durable queue only once it is on disk, so a
    crash right after the PUBACK loses nothing. (Mosquitto writes its persistence file every
    autosave_interval, 2 s here: a message queued less than that before a SIGKILL is lost.)"""
    dev = admitted(rabbitmq_broker, "dev-fsync")
    cloud = leave_a_session(rabbitmq_broker, dev, pki, peers, links)
    assert not cloud.publish(f"{PREFIX}/{dev}/down/command", b"confirmed").is_failure
    rabbitmq_broker.kill()  # type: ignore[attr-defined]  # at once, no graceful save
    rabbitmq_broker.restart()  # type: ignore[attr-defined]
    second = links(rabbitmq_broker, dev)
    assert second.expect("down/command", timeout=60) == b"confirmed"


# --------------------------------------------------------------------------------------------
# The three-node cluster
# --------------------------------------------------------------------------------------------

def test_cluster_retained_messages_are_kept_by_the_node_that_received_them(
        rabbitmq_cluster: object, pki: Pki, peers: Callable[..., MqttPeer],
        links: Callable[..., Harness]) -> None:
    """Routing is cluster-wide, the retained store is not (3.10: one store per node)."""
    dev = admitted(rabbitmq_cluster, "dev-retain-node")
    topic = f"{PREFIX}/{dev}/status"
    h = links(rabbitmq_cluster.node_endpoint(0), dev)
    live = peers(rabbitmq_cluster.node_endpoint(1), pki.cloud, client_id="cloud-live")
    live.subscribe(topic)
    assert h.link.wait_connected(30)
    assert live.expect(online(topic)).retain is False  # routed to node 1 at once

    same_node = peers(rabbitmq_cluster.node_endpoint(0), pki.cloud, client_id="cloud-node0")
    same_node.subscribe(topic)
    assert same_node.expect(topic).retain  # the retained copy, from node 0's store

    other_node = peers(rabbitmq_cluster.node_endpoint(2), pki.cloud, client_id="cloud-node2")
    other_node.subscribe(topic)
    assert h.link.publish_status()  # barrier: a retained copy would have come before this
    first = other_node.expect(topic)
    assert first.retain is False and status_of(first.payload)["state"] == "online"


def publish_until_acked(make_peer: Callable[[int], MqttPeer], topic: str, payload: bytes,
                        attempts: int = 10, pause_s: float = 0.3) -> int:
    """QoS 1 the way a backend must do it: a publish is sent once the PUBACK is in; if the
    connection dies first, connect again (after ``pause_s``) and resend. Returns the attempts
    it took."""
    for i in range(1, attempts + 1):
        peer = make_peer(i)
        try:
            if not peer.publish(topic, payload, timeout=10).is_failure:
                return i
        except AssertionError:  # no PUBACK: the broker closed the connection
            time.sleep(pause_s)
    raise AssertionError(f"no PUBACK for {topic} in {attempts} attempts")


def test_cluster_node_loss_under_a_running_agent_moves_it_to_another_node_and_loses_nothing(
        rabbitmq_cluster: object, pki: Pki, peers: Callable[..., MqttPeer],
        tmp_path: Path) -> None:
    """The whole agent (agent.compose.build), its settings listing the three nodes
    (``mqtt.urls``), streams real sealed events; the node it is connected to is SIGKILLed. It
    moves to another node by itself, its persistent session (a quorum queue) survives, a
    command sent while it is between nodes reaches it, and the reference console, counting
    ``(dev, seq)``, has every envelope the agent sealed."""
    cluster = rabbitmq_cluster
    run = tmp_path / "run"
    generate_cloud_keys(run / "cloud")
    dev = admitted(cluster, "dev-agent-failover")
    ports = [port for _, port in cluster.endpoints]  # type: ignore[attr-defined]
    toml = devenv.make_device(run, pki.ca, dev, broker_port=0, broker_ports=ports,
                              mqtt_protocol="3.1.1", backoff_max_s=2.0)
    victim_i = start_index(dev, 3)                # where the agent connects first
    cloud_i = (victim_i + 2) % 3                   # the console: a node that survives
    console_at = cluster.node_endpoint(cloud_i)  # type: ignore[attr-defined]
    (run / "broker.json").write_text(
        f'{{"host": "{console_at.host}", "port": {console_at.port}, "ca_file": "{console_at.ca_file}"}}')
    shutil.copy(pki.cloud.cert, run / "cloud" / "console.crt")
    shutil.copy(pki.cloud.key, run / "cloud" / "console.key")
    console = CloudConsole(run, protocol_version="3.1.1")
    console.start()
    agent = None
    try:
        assert console.connected.wait(30)
        agent = build(settings.load(toml))
        agent.start()
        assert agent.link.wait_connected(30)
        victim = cluster.node_at(agent.link.port)  # type: ignore[attr-defined]
        assert victim is cluster.nodes[victim_i]  # type: ignore[attr-defined]
        assert cluster.node_of_client(dev) is victim  # type: ignore[attr-defined]

        n = 150
        stop = threading.Event()

        def drive() -> None:  # trips start and end while the cluster loses a node
            for i in range(n):
                if stop.is_set():
                    return
                agent.emit_event({"type": "trip_start", "ts": now_ms(), "odometer_km": i})
                time.sleep(0.02)

        def seen() -> set[int]:
            return console.ledger.seen(dev)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        wait_until(lambda: len(seen()) >= n // 3, what="a third of the events at the cloud")
        victim.kill()
        wait_until(lambda: not agent.link.connected, what="the agent noticing the node's death")

        # A command sent while the device is between nodes waits in its session queue. The
        # sender resends until it has a PUBACK, as QoS 1 asks: 3.10 closes the connection of a
        # publisher whose first publish to a quorum queue finds its leader's node dead
        # (docs/protocol.md §2.7 row 16).
        _, enc_pub = console.registry.get(dev)
        ping = protocol.seal("command", {"op": "ping", "request_id": "between-nodes"}, dev=dev,
                             seq=1, signer=console.sign_key, recipient=enc_pub)
        attempts = publish_until_acked(
            lambda i: peers(console_at, pki.cloud, client_id=f"cloud-cmd-{i}"),
            f"{PREFIX}/{dev}/down/command", ping)

        assert agent.link.wait_connected(60), agent.link.stats
        survivor = cluster.node_of_client(dev)  # type: ignore[attr-defined]
        assert survivor is not None and survivor is not victim
        driver.join(60)
        ack = console.wait_for(lambda r: r.get("kind") == "ack" and r["dev"] == dev
                               and r["body"]["ref_kind"] == "command", 60)
        assert ack and ack["body"]["status"] == "done"
        wait_until(lambda: agent.store.counts()["events"] + agent.store.counts()["outbox"] == 0,
                   timeout=60, what="the agent's events sealed, sent and acknowledged")
        last = agent.store.last_uplink_seq
        assert last >= n + 1  # every event, and the ack, took a seq
        wait_until(lambda: seen() == set(range(1, last + 1)), timeout=60,
                   what=f"every (dev, seq) up to {last} at the cloud")
        with console._records_lock:
            duplicates = sum(1 for r in console.records if r.get("dev") == dev and r.get("duplicate"))
        stats = agent.link.stats
        assert stats["endpoint_moves"] >= 1 and stats["connects"] >= 2
        print(f"agent failover: {last} envelopes, all at the cloud, {duplicates} duplicate "
              f"deliveries (deduplicated by seq); command published in {attempts} attempt(s); "
              f"link {stats}")
    finally:
        if agent is not None:
            agent.stop()
        console.stop()
        for node in cluster.nodes:  # type: ignore[attr-defined]
            if not node.running:
                cluster.start_node(node)  # type: ignore[attr-defined]  # whole for later tests

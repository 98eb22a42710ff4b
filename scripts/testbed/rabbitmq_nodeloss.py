"""What happens to a device's persistent session when the RabbitMQ node holding its queue dies
(docs/protocol.md §2.7, rows 14–16). A manual experiment, not a test: it prints what it saw.

On a fresh three-node cluster (scripts/testbed/rabbitmq.py) with ``--queue-type``:

1. device ``dev-0001`` connects to node 1 (clean session false), subscribes to its ``down/#``
   and disconnects: its session queue now exists, led by node 1;
2. the cloud (on node 2) publishes ``before-kill`` (skipped with ``--first``);
3. node 1 is SIGKILLed; the cloud publishes ``during-election`` at once;
4. the cloud reconnects and publishes ``after-election``, again until it gets a PUBACK;
5. the device connects to node 0 and lists what it receives;
6. with ``--back``: node 1 is started again and the device, reconnected, lists what it gets.

    .venv/bin/python -m scripts.testbed.rabbitmq_nodeloss --queue-type quorum [--first] [--back]
"""
from __future__ import annotations

import argparse
import queue
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from scripts.testbed.devca import DevCA
from scripts.testbed.rabbitmq import RabbitCluster

DEVICE = "dev-0001"
DOWN = f"dongle/v1/{DEVICE}/down/command"


class Client:
    """A blocking paho client for the experiment (MQTT 3.1.1)."""

    def __init__(self, port: int, ca: Path, cert: Path, key: Path, client_id: str,
                 clean: bool = True):
        self.events: queue.Queue[tuple] = queue.Queue()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv311, clean_session=clean,
                             reconnect_on_failure=False)
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
        self.c.tls_set_context(ctx)
        self.c.on_connect = lambda c, u, f, rc, p: self.events.put(("connack", rc.value))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.events.put(("closed",))
        self.c.on_publish = lambda c, u, mid, rc, p: self.events.put(("puback", mid))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", mid))
        self.c.on_message = lambda c, u, m: self.events.put(("msg", bytes(m.payload)))
        self.c.connect("127.0.0.1", port, 30)
        self.c.loop_start()
        self.ok = self.wait("connack", 10) == ("connack", 0)

    def wait(self, kind: str, timeout: float) -> tuple | None:
        """The next event of ``kind`` (None on timeout or when the connection closed first)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if ev[0] == kind:
                return ev
            if ev[0] == "closed":
                return None
        return None

    def publish(self, topic: str, payload: bytes, timeout: float = 15.0) -> str:
        self.c.publish(topic, payload, qos=1)
        return "PUBACK" if self.wait("puback", timeout) else "no PUBACK (connection closed or timeout)"

    def messages(self, quiet_s: float = 8.0) -> list[bytes]:
        got = []
        while (ev := self.wait("msg", quiet_s)) is not None:
            got.append(ev[1])
        return got

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device_cert(ca: DevCA, out: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
           .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "dev.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    (out / "dev.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    (out / "dev.key").chmod(0o600)
    return ca.sign_csr(out / "dev.csr", out / "dev.pem"), out / "dev.key"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="quorum")
    parser.add_argument("--first", action="store_true",
                        help="no publish before the kill (the cloud's first publish meets it)")
    parser.add_argument("--back", action="store_true", help="then restart the dead node")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rabbitmq-nodeloss-"))
    try:
        ca = DevCA(work / "pki")
        cloud_cert = ca.issue_client("cloud-console", work / "cloud")
        dev_cert = device_cert(ca, work / "dev")
        cluster = RabbitCluster(work / "cluster", ca, devices=[DEVICE],
                                queue_type=args.queue_type)
        cluster.start()
        port = [p for _, p in cluster.endpoints]
        try:
            dev = Client(port[1], ca.ca_cert_path, *dev_cert, DEVICE, clean=False)
            dev.c.subscribe(f"dongle/v1/{DEVICE}/down/#", qos=1)
            print("1. device on node 1, subscribed:", bool(dev.wait("suback", 10)))
            dev.close()
            cloud = Client(port[2], ca.ca_cert_path, *cloud_cert, "cloud-a")
            if not args.first:
                print("2. before-kill:", cloud.publish(DOWN, b"before-kill"))
            cols = ["name", "type", "messages"] + (
                ["members", "leader"] if args.queue_type == "quorum" else ["pid"])
            print("   queue:", cluster.nodes[0].ctl("list_queues", *cols,
                                                    "--no-table-headers").strip())
            cluster.nodes[1].kill()
            t0 = time.monotonic()
            print("3. node 1 SIGKILLed; during-election:", cloud.publish(DOWN, b"during-election"),
                  f"({time.monotonic() - t0:.2f} s)")
            for attempt in range(1, 21):  # what a QoS 1 publisher does: reconnect, resend
                cloud2 = Client(port[2], ca.ca_cert_path, *cloud_cert, f"cloud-b{attempt}")
                result = cloud2.publish(DOWN, b"after-election")
                if result == "PUBACK":
                    break
                time.sleep(0.2)
            print(f"4. after-election: {result} at attempt {attempt}, "
                  f"{time.monotonic() - t0:.2f} s after the kill")
            dev = Client(port[0], ca.ca_cert_path, *dev_cert, DEVICE, clean=False)
            print("5. device on node 0: connected", dev.ok, "received", dev.messages())
            if args.back:
                dev.close()
                cluster.start_node(cluster.nodes[1])
                dev = Client(port[0], ca.ca_cert_path, *dev_cert, DEVICE, clean=False)
                print("6. node 1 back; device on node 0 received", dev.messages())
            log = cluster.nodes[2].log_text()
            print("   node 2 log has the plugin's unhandled basic.nack:",
                  "mqtt_unexpected_msg,{'basic.nack'" in log)
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

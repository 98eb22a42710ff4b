"""The running agent: wires drivers, store, uplink and MQTT link together and owns their lives.

Threads: the OBD poller, the ingest writer (group commit), the uplink, and the MQTT network
thread. Each is restartable on its own; a failure in one is logged and retried, never fatal to
the others.
"""
from __future__ import annotations

import logging
import threading
from importlib import metadata

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent import cloudconfig, keys
from agent.backoff import Backoff
from agent.clock import now_ms
from agent.ingest import Ingest
from agent.mqtt import MqttLink
from agent.settings import Settings
from agent.store import Store
from agent.uplink import Sealer, Uplink
from agent.vin import validate as validate_vin

log = logging.getLogger(__name__)


def agent_version() -> str:
    try:
        return metadata.version("dongle-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Agent:
    def __init__(self, settings: Settings):
        self.settings = settings
        s = settings.data
        self.device_id = settings.device_id
        self.version = agent_version()
        self.sign_key = keys.load_private_key(s["keys"]["sign_key"], Ed25519PrivateKey)
        self.enc_key = keys.load_private_key(s["keys"]["enc_key"], X25519PrivateKey)
        self.cloud_enc_pub = keys.load_public_key(s["keys"]["cloud_enc_pub"], X25519PublicKey)
        self.trusted_signers = {}
        for path in s["keys"]["cloud_sign_pubs"]:
            pub = keys.load_public_key(path, Ed25519PublicKey)
            self.trusted_signers[keys.key_id(pub)] = pub

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.data_dir / "agent.db")
        self.config = self.store.active_config() or cloudconfig.default_config()
        self._config_lock = threading.Lock()

        self.ingest = Ingest(self.store)
        host, port = settings.mqtt_host_port
        m = s["mqtt"]
        self.link = MqttLink(
            device_id=self.device_id, host=host, port=port, ca_file=m["ca_file"],
            cert_file=m["cert_file"], key_file=m["key_file"], topic_prefix=m["topic_prefix"],
            protocol=m["protocol"], keepalive_s=m["keepalive_s"],
            session_expiry_s=m["session_expiry_s"],
            backoff=Backoff(m["backoff_min_s"], m["backoff_max_s"]),
            agent_version=self.version, config_version=lambda: int(self.config.get("version", 0)),
            max_inflight=s["uplink"]["max_inflight"] + 2,  # room for status publishes
            on_message=self._on_downlink, on_connection=self._on_connection)
        self.uplink = Uplink(
            self.store, self.link, Sealer(self.device_id, self.sign_key, self.cloud_enc_pub),
            interval_s=lambda: cloudconfig.upload_interval_s(self.config),
            batch_max_samples=s["uplink"]["batch_max_samples"], max_inflight=s["uplink"]["max_inflight"])
        self.obd = None
        if s["obd"]["enabled"]:
            from drivers.obd import ObdPoller
            self.obd = ObdPoller(s["obd"]["port"], cloudconfig.obd_pids(self.config),
                                 self.ingest.put_samples, on_vehicle=self._on_vehicle)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        log.info("agent %s starting as %s (config version %s, next uplink seq %d)", self.version,
                 self.device_id, self.config.get("version"), self.store.last_uplink_seq + 1)
        self.ingest.start()
        self.uplink.start()
        self.link.start()
        if self.obd:
            self.obd.start()

    def stop(self) -> None:
        log.info("agent stopping")
        if self.obd:
            self.obd.stop()
        self.ingest.stop()
        self.uplink.stop()
        self.link.stop()
        self.store.close()
        log.info("agent stopped")

    # -- callbacks ------------------------------------------------------------------------
    def _on_connection(self, up: bool) -> None:
        self.uplink.on_connection(up)

    def _on_downlink(self, suffix: str, payload: bytes) -> None:
        log.info("downlink on %s (%d bytes) is not handled yet", suffix, len(payload))

    def _on_vehicle(self, info: dict) -> None:
        vin = info.get("vin")
        valid, reason = validate_vin(vin)
        if vin and not valid:
            log.warning("vehicle: VIN %r is not valid (%s); reported as such", vin, reason)
        seen = {"vin": vin, "protocol": info.get("protocol") or ""}
        if self.store.get_meta("vehicle") == seen:
            return
        self.store.set_meta("vehicle", seen)
        body = {"type": "vehicle", "ts": now_ms(), "vin_valid": valid,
                "protocol": seen["protocol"], "ecus": list(info.get("ecus", []))}
        if vin:
            body["vin"] = vin
        self.store.add_event(body)
        self.uplink.wake()

    def apply_config(self, doc: dict) -> dict:
        """Makes ``doc`` the active cloud config at run time, as a whole. Returns what did not apply."""
        with self._config_lock:
            self.store.save_config(doc)
            self.config = doc
            if self.obd:
                self.obd.apply_pids(cloudconfig.obd_pids(doc))
        self.link.publish_status()
        return {}

    def status(self) -> dict:
        return {
            "device_id": self.device_id, "agent": self.version,
            "config_version": self.config.get("version"),
            "broker": {"connected": self.link.connected, **getattr(self.link, "stats", {})},
            "obd": self.obd.status() if self.obd else None,
            "buffer": self.store.counts(), "uplink": self.uplink.status(),
            "last_uplink_seq": self.store.last_uplink_seq,
        }

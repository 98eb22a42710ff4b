"""The running agent: wires drivers, store, uplink, downlink and the MQTT link, and owns their lives.

Threads: the OBD poller, the CAN readers, the ingest writer (group commit), the uplink, the MQTT
network thread (which also runs downlink handling) and the supervisor (config probation,
watchdog). A failure in one is logged and retried, never fatal to the others.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from agent.cloud import cloudconfig, keys
from agent.device import systemd
from drivers.core.backoff import Backoff
from agent.cloud.bookings import Bookings
from drivers.core.clock import now_ms
from agent.cloud.commands import Commands
from agent.cloud.downlink import Downlink, Outcome
from agent.outbox.ingest import Ingest
from agent.cloud.mqtt import MqttLink
from agent.settings import Settings
from agent.outbox.store import Store
from agent.outbox.uplink import Sealer, Uplink
from drivers.core.vin import validate as validate_vin
from agent.version import agent_version

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, settings: Settings):
        self.settings = settings
        s = settings.data
        self.device_id = settings.device_id
        self.version = agent_version()
        self.sign_key = keys.load_private_key(s["keys"]["sign_key"], Ed25519PrivateKey)
        self.enc_key = keys.load_private_key(s["keys"]["enc_key"], X25519PrivateKey)
        self.cloud_enc_pub = keys.load_public_key(s["keys"]["cloud_enc_pub"], X25519PublicKey)
        self.trusted_signers = keys.trusted_signers(
            keys.load_public_key(p, Ed25519PublicKey) for p in s["keys"]["cloud_sign_pubs"])

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(settings.data_dir / "agent.db",
                           budget_bytes=int(s["store"]["budget_mb"] * 2**20))
        self.config = self.store.active_config() or cloudconfig.default_config()
        self._config_lock = threading.RLock()
        self._probation: dict | None = None
        self._stop = threading.Event()
        self.watchdog = systemd.Watchdog()

        self.ingest = Ingest(self.store, heartbeat=lambda: self.watchdog.beat("ingest"),
                             on_event=lambda: self.uplink.wake())
        host, port = self._endpoint(self.config)
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
        self.sealer = Sealer(self.device_id, self.sign_key, self.cloud_enc_pub)
        self.uplink = Uplink(
            self.store, self.link, self.sealer,
            config=lambda: self.config, vehicle_state=lambda: self.vehicle_state(),
            batch_max_samples=s["uplink"]["batch_max_samples"], max_inflight=s["uplink"]["max_inflight"],
            heartbeat=lambda: self.watchdog.beat("uplink"))

        self.obd = None
        if s["obd"]["enabled"]:
            from drivers.obd.reader import ObdPoller
            self.obd = ObdPoller(s["obd"]["port"], cloudconfig.obd_pids(self.config),
                                 self.ingest.put_samples, on_vehicle=self._on_vehicle,
                                 baudrate=s["obd"]["baudrate"] or None, timeout_s=s["obd"]["timeout_s"],
                                 on_dtc=self.emit_event, dtc_store=self.store,
                                 dtc_period_s=float(self.config.get("obd", {}).get("dtc_period_s", 60)))
        self.can = None
        if s["can"]["buses"]:
            from agent.vehicle.can_pipeline import CanPipeline
            self.can = CanPipeline(s["can"]["buses"], self.config.get("can"),
                                   put_samples=self.ingest.put_samples, put_frames=self.ingest.put_frames)

        self.bookings = Bookings(self.store)
        self.commands = Commands(self.store, read_dtc=self._read_dtc_now, snapshot=self.health_snapshot,
                                 delete_data=self._delete_data, wake_uplink=self.uplink.wake)
        self.downlink = Downlink(
            self.store, self.sealer.seal, device_id=self.device_id, recipient_key=self.enc_key,
            trusted_signers=lambda: self.trusted_signers,
            handlers={"config": self._handle_config, "booking": self.bookings.handle,
                      "command": self.commands.handle},
            on_ack=self.uplink.wake, config_version=lambda: int(self.config.get("version", 0)))
        self.components: list = []  # features attached by their own modules (start/stop/status)
        self.snapshot_parts: list = []  # (name, fn() -> dict) merged into health_snapshot()
        self.config_listeners: list = []   # fn(doc) -> problems, called on every applied config
        self.vehicle_listeners: list = []  # fn(info) on every vehicle (re)identification
        from agent import platform; platform.attach(self)
        from agent import technician; technician.attach(self)
        from agent.health import monitor; monitor.attach(self)
        from drivers import gpio; gpio.attach(self)
        from agent import owner_data; owner_data.attach(self)
        from agent.update import attach as _upd; _upd.attach(self)

    def add_component(self, name: str, component) -> None:
        """Attaches a feature with ``start()``, ``stop()`` and ``status() -> dict``; started and
        stopped with the agent, its status shown under ``name``."""
        self.components.append((name, component))

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        log.info("agent %s starting as %s (config version %s, next uplink seq %d)", self.version,
                 self.device_id, self.config.get("version"), self.store.last_uplink_seq + 1)
        for name in ("ingest", "uplink", "supervisor"):
            self.watchdog.register(name)
        self.ingest.start()
        self.uplink.start()
        self.link.start()
        if self.obd:
            self.obd.start()
        if self.can:
            self.can.start()
        for _, c in self.components:
            c.start()
        pending = self.store.get_meta("config_probation")
        if pending:  # the agent stopped while a link-moving config was on probation
            log.warning("resuming the probation of config v%s", pending["doc"]["version"])
            self._start_probation(pending["doc"], pending["previous"], pending["ref_seq"])
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        self.watchdog.start()
        systemd.notify_ready(f"device {self.device_id}, config v{self.config.get('version')}")

    def stop(self) -> None:
        log.info("agent stopping")
        systemd.notify_stopping()
        self._stop.set()
        for name, c in reversed(self.components):
            try:
                c.stop()
            except Exception:
                log.exception("stopping %s failed", name)
        if self.obd:
            self.obd.stop()
        if self.can:
            self.can.stop()
        self.ingest.stop()
        self.uplink.stop()
        self.link.stop()
        self.watchdog.stop()
        self.store.close()
        log.info("agent stopped")

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            self.watchdog.beat("supervisor")
            try:
                self._check_probation()
            except Exception:
                log.exception("supervisor: probation check failed")

    # -- callbacks ------------------------------------------------------------------------
    def _on_connection(self, up: bool) -> None:
        self.uplink.on_connection(up)

    def _on_downlink(self, suffix: str, payload: bytes) -> None:
        self.downlink.handle(suffix, payload)

    def emit_event(self, body: dict) -> None:
        """Queues an event durably and wakes the uplink (events go out ahead of telemetry)."""
        self.store.add_event(body)
        self.uplink.wake()

    def _on_vehicle(self, info: dict) -> None:
        for listener in self.vehicle_listeners:
            try:
                listener(info)
            except Exception:
                log.exception("vehicle listener failed")
        vin = info.get("vin")
        valid, reason = validate_vin(vin)
        if vin and not valid:
            log.warning("vehicle: VIN %r is not valid (%s); reported as such", vin, reason)
        profile = self.store.get_meta("ev_profile")
        seen = {"vin": vin, "protocol": info.get("protocol") or "", "profile": profile}
        if self._vehicle_meta() == seen:
            return
        self._vehicle_meta(seen)
        body = {"type": "vehicle", "ts": now_ms(), "vin_valid": valid,
                "protocol": seen["protocol"], "ecus": list(info.get("ecus", []))}
        if vin:
            body["vin"] = vin
        if profile:
            body["profile"] = profile
        self.emit_event(body)

    def _vehicle_meta(self, value: dict | None = None) -> dict | None:
        """The last vehicle seen (VIN included): identity data, so kept encrypted under the data
        key when the owner's-data feature holds one (a wipe destroys that key first)."""
        from agent.owner import datakey
        key = getattr(getattr(self, "owner_data", None), "datakey", None)
        if value is None:
            return datakey.get_secret_meta(self.store, key, "vehicle") if key else self.store.get_meta("vehicle")
        if key:
            datakey.put_secret_meta(self.store, key, "vehicle", value)
        else:
            self.store.set_meta("vehicle", value)
        return value

    def vehicle_state(self) -> str:
        """driving / parked / charging / ... from power management; "driving" without it."""
        power = getattr(self, "power", None)
        state = power.state if power is not None else None
        return str(state) if state is not None else "driving"

    def _read_dtc_now(self) -> dict | None:
        reader = getattr(self.obd, "read_dtcs_now", None)
        return reader(10.0) if reader else None

    def _delete_data(self, categories: list[str]) -> dict[str, int]:
        # PROTOCOL §4 delete_data / §6: what the device holds of these categories, sent or not.
        return self.owner_data.delete_data(categories)

    # -- configuration --------------------------------------------------------------------
    def _endpoint(self, doc: dict) -> tuple[str, int]:
        """The broker to use: the cloud config's ``link.broker_url`` if set, else the local one."""
        url = (doc.get("link") or {}).get("broker_url")
        if url:
            u = urlsplit(url)
            port = u.port  # raises ValueError when out of range
            return u.hostname or "", 8883 if port is None else port
        return self.settings.mqtt_host_port

    def apply_config(self, doc: dict) -> list[str]:
        """Makes ``doc`` the active cloud config at run time, as a whole: acquisition, upload
        interval, raw capture and the broker endpoint switch together. Returns what did not apply
        (e.g. a PID the car lacks, a DBC message that does not exist)."""
        problems: list[str] = []
        with self._config_lock:
            old_endpoint = self._endpoint(self.config)
            self.store.save_config(doc)
            self.config = doc
            if self.obd:
                problems += [f"obd: {p}" for p in self._apply_obd(doc)]
            if self.can:
                problems += [f"can: {p}" for p in self.can.apply_can_config(doc.get("can"))]
            for listener in self.config_listeners:
                problems += listener(doc) or []
            for name, c in self.components:
                applier = getattr(c, "apply_config", None)
                if applier is not None:
                    problems += [f"{name}: {p}" for p in (applier(doc) or [])]
            if self._endpoint(doc) != old_endpoint:
                self.link.reconnect_to(*self._endpoint(doc))
        self.uplink.wake()
        self.link.publish_status()
        return problems

    def _apply_obd(self, doc: dict) -> list[str]:
        applier = getattr(self.obd, "apply_config", None)
        if applier:
            return applier(doc)
        return self.obd.apply_pids(cloudconfig.obd_pids(doc))

    def _handle_config(self, opened) -> Outcome:
        doc = opened.body
        version, current = doc["version"], int(self.config.get("version", 0))
        if version == current:
            return Outcome("duplicate", config_version=current)
        if version < current:
            return Outcome("rejected", reason=f"version {version} is not newer than the active {current}",
                           config_version=current)
        try:
            endpoint = self._endpoint(doc)
            if not 0 < endpoint[1] < 65536:
                raise ValueError("port out of range")
        except ValueError as e:
            return Outcome("rejected", reason=f"link.broker_url: {e}", config_version=current)
        previous = copy.deepcopy(self.config)
        if endpoint != self._endpoint(previous):
            # The new document moves the link: acknowledge only once the device is connected with
            # it, or roll back to the last good document if it cannot be reached in time.
            self.store.save_config(doc)
            return Outcome("applied", config_version=version, send_ack=False,
                           after_commit=lambda: self._start_probation(doc, previous, opened.seq))
        problems = self.apply_config(doc)
        return Outcome("applied", config_version=version, result={"problems": problems} if problems else None)

    def _start_probation(self, doc: dict, previous: dict, ref_seq: int) -> None:
        timeout = self.settings.data["mqtt"]["config_rollback_s"]
        with self._config_lock:
            # Persisted: a restart during probation resumes it (and still acks exactly once).
            self.store.set_meta("config_probation", {"doc": doc, "previous": previous, "ref_seq": ref_seq})
            self._probation = {"doc": doc, "previous": previous, "ref_seq": ref_seq,
                               "deadline": time.monotonic() + timeout, "timeout": timeout,
                               "connects_before": self.link.stats["connects"]}
            problems = self.apply_config(doc)
            self._probation["problems"] = problems
        log.info("config v%s moves the broker link; on probation for %ss", doc["version"], timeout)

    def _check_probation(self) -> None:
        with self._config_lock:
            p = self._probation
            if p is None:
                return
            # Connected again after the switch: a session to the new endpoint has been accepted.
            if self.link.connected and self.link.stats["connects"] > p["connects_before"]:
                self._probation = None
                self.store.set_meta("config_probation", None)
                self.downlink.send_ack("config", p["ref_seq"], "applied", config_version=p["doc"]["version"],
                                       result={"problems": p["problems"]} if p["problems"] else None)
                log.info("config v%s: broker reachable, applied", p["doc"]["version"])
                return
            if time.monotonic() < p["deadline"]:
                return
            self._probation = None
            self.store.set_meta("config_probation", None)
            bad, good = p["doc"], p["previous"]
            log.error("config v%s: broker not reachable within %ss; rolling back to v%s",
                      bad["version"], p["timeout"], good.get("version"))
            self.apply_config(good)
            self.downlink.send_ack("config", p["ref_seq"], "failed", config_version=good.get("version", 0),
                                   reason=f"broker not reachable within {p['timeout']} s with config "
                                          f"v{bad['version']}; rolled back to v{good.get('version', 0)}")

    # -- reporting ------------------------------------------------------------------------
    def health_snapshot(self) -> dict:
        counts = self.store.counts()
        snap = {"agent": self.version, "config_version": int(self.config.get("version", 0)),
                "buffer": counts, "broker_connected": self.link.connected}
        if self.obd:
            st = self.obd.status()
            snap["obd"] = {k: st.get(k) for k in ("connected", "protocol", "errors", "last_error")}
        for name, part in self.snapshot_parts:
            try:
                snap[name] = part()
            except Exception as e:
                log.exception("health snapshot part %s failed", name)
                snap[name] = {"error": type(e).__name__}
        return snap

    def status(self) -> dict:
        return {
            "device_id": self.device_id, "agent": self.version,
            "config_version": self.config.get("version"),
            "broker": {"connected": self.link.connected, **self.link.stats},
            "obd": self.obd.status() if self.obd else None,
            "can": self.can.status() if self.can else None,
            "buffer": self.store.counts(), "store": self.store.status(),
            "ingest": self.ingest.status(), "uplink": self.uplink.status(),
            "last_uplink_seq": self.store.last_uplink_seq,
            "downlink": {"unauthenticated": dict(self.downlink.unauthenticated),
                         "acks": dict(self.downlink.acks)},
            **{name: c.status() for name, c in self.components},
        }

    # -- hooks for features attached by their own modules (issue 6) -------------------------
    def add_sample_listener(self, listener) -> None:
        """``listener(list[Sample])`` sees every batch the drivers deliver, on the driver's thread
        (so it must only queue them)."""
        self.ingest.sample_listeners.append(listener)

    def add_frame_listener(self, listener):
        """``listener(list[Frame])`` sees every frame the CAN buses receive; the acceptance filters
        are lifted while any such listener is attached (raw capture for the technician). Returns
        a function that removes it. Raises RuntimeError without CAN buses."""
        if self.can is None:
            raise RuntimeError("no CAN bus is configured in the local settings")
        captures = self.__dict__.setdefault("_capture_listeners", [])
        if not captures:
            self.can.reader.set_filters(None)
        captures.append(listener)
        self.can.frame_listeners.append(listener)

        def remove() -> None:
            if listener in captures:
                captures.remove(listener)
                self.can.frame_listeners.remove(listener)
            if not captures:
                self.can.apply_can_config(self.config.get("can"))
        return remove

    def add_snapshot_part(self, name: str, part) -> None:
        """``part() -> dict`` is added under ``name`` to :meth:`health_snapshot` (the ``report``
        command)."""
        self.snapshot_parts.append((name, part))

    # -- exit requests (agent/update: exit 75 to be restarted into another slot) ---------------
    exit_code: int | None = None   # set by request_exit; the daemon stops and exits with it

    def request_exit(self, code: int) -> None:
        """Asks the daemon (agent/daemon.py) to stop the agent cleanly and exit with ``code``
        (75: systemd restarts it, see agent/update/trial.py). Returns at once; any thread."""
        log.info("agent: exit with status %d requested", code)
        self.exit_code = code

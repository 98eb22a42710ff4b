"""The composition root: what the running agent is made of, and what talks to what.

:func:`build` makes every component from the local settings (agent/settings.py), each given what
it needs in its constructor, in the order a frame travels::

    vehicle (drivers/: OBD-II, CAN, UDS, GNSS)  ->  ingest  ->  store (the outbox)
        ->  uplink (seal: zstd, HPKE, Ed25519)  ->  MQTT link  ->  cloud
    cloud  ->  MQTT link  ->  downlink (open, check, ack)  ->  config / bookings / commands / releases

and around it: power management and the MCU, the owner's data (consent, location, wipe), the
health rules, the LEDs and button, the technician's control socket, software updates.
:class:`Agent` then starts the components in that order, stops them in reverse, and reports
each one's status under its name.

A few parts need each other both ways (the uplink is woken by components built before it, the
MQTT link hands messages to the downlink built after it). Those calls go through small functions
defined at the top of :func:`build` that name the later component; none of them is called
before :meth:`Agent.start`.

Threads: the OBD poller, the CAN readers, the ingest writer (group commit), the uplink, the MQTT
network thread (which only queues downlink), the downlink worker (checks, commits, then applies:
agent/cloud/downlink.py), the DTC reads of cloud commands, power management, the health rules,
GNSS, the EV reader, the control socket, the updater and the supervisor (config probation,
watchdog). A failure in one is logged and retried, never fatal to the others.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.cloud import cloudconfig
from agent.cloud.bookings import Bookings
from agent.cloud.commands import Commands
from agent.cloud.config_apply import ActiveConfig, ConfigApplier, endpoint
from agent.cloud import downlink as downlink_mod
from agent.cloud.downlink import Downlink, Outcome
from agent.cloud.keys import DeviceKeys, KeyFileError, check_ca_file, check_tls_files
from agent.cloud.mqtt import MqttLink
from agent.component import Component
from agent.device import systemd
from agent.device.indicators import Indicators
from agent.health.monitor import HealthMonitor
from agent.outbox.ingest import Ingest
from agent.outbox.store import Store
from agent.outbox.uplink import Sealer, Uplink, upload_policy
from agent.owner import privacy as privacy_mod
from agent.owner.datakey import DataKey, EventsAtRest
from agent.owner.erase import device_key_files
from agent.owner.location import Location
from agent.owner.owner_data import BehaviourRows, OwnerData
from agent.settings import Settings
from agent.technician.handlers import Technician
from agent.version import agent_version
from agent.vehicle.identity import VehicleIdentity
from drivers.core.backoff import Backoff
from drivers.core.clock import Clock, kernel_ntp_synced

log = logging.getLogger(__name__)

#: Exit status asking systemd to start the agent again (RestartForceExitStatus=75): the updater
#: uses it to restart into another slot (agent/update/trial.py).
RESTART_EXIT_CODE = 75
#: Vehicle states in which a release's "parked" condition holds (agent/update/updater.py).
PARKED_STATES = frozenset({"parked", "settling", "charging", "sleeping"})
UPDATES_NOT_CONFIGURED = "updates not configured"


class Agent:
    """The running agent: its components in start order, and what spans them (status, the
    ``report`` snapshot, the supervisor, exit requests). Built by :func:`build`."""

    def __init__(self, *, settings: Settings, version: str, clock: Clock, store: Store,
                 config: ActiveConfig, applier: ConfigApplier, watchdog: systemd.Watchdog,
                 components: list[tuple[str, Component]], parts: dict[str, Any]):
        self.settings = settings
        self.device_id = settings.device_id
        self.version = version
        self.clock = clock
        self.store = store
        self.active_config = config
        self.applier = applier
        self.watchdog = watchdog
        self.components = components
        # Each part by name, for the technician's status and for tests: ingest, uplink, link,
        # downlink, sealer, obd, can, ev, battery, power, health, privacy, location, owner_data,
        # indicators, technician, updater, identity, bookings, and ``emit_event(body)`` (None where
        # not configured).
        for name, part in parts.items():
            setattr(self, name, part)
        self.exit_code: int | None = None   # set by request_exit; the daemon exits with it
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def config(self) -> dict:
        """The cloud config in force."""
        return self.active_config.current()

    def apply_config(self, doc: dict) -> list[str]:
        return self.applier.apply(doc)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        log.info("agent %s starting as %s (config version %s, next uplink seq %d)", self.version,
                 self.device_id, self.active_config.version, self.store.last_uplink_seq + 1)
        for name in ("ingest", "uplink", "supervisor"):
            self.watchdog.register(name)
        for _, c in self.components:
            c.start()
        self._stop.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervisor.start()
        self.watchdog.start()
        systemd.notify_ready(f"device {self.device_id}, config v{self.active_config.version}")

    def stop(self) -> None:
        log.info("agent stopping")
        systemd.notify_stopping()
        self._stop.set()
        for name, c in reversed(self.components):
            try:
                c.stop()
            except Exception:
                log.exception("stopping %s failed", name)
        self.watchdog.stop()
        self.store.close()
        log.info("agent stopped")

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            self.watchdog.beat("supervisor")
            try:
                self.applier.tick()
            except Exception:
                log.exception("supervisor: probation check failed")

    def request_exit(self, code: int) -> None:
        """Asks the daemon (agent/daemon.py) to stop the agent cleanly and exit with ``code``
        (75: systemd restarts it, see agent/update/trial.py). Returns at once; any thread."""
        log.info("agent: exit with status %d requested", code)
        self.exit_code = code

    # -- reporting ------------------------------------------------------------------------
    def status(self) -> dict:
        named = dict(self.components)
        out = {
            "device_id": self.device_id, "agent": self.version,
            "config_version": self.active_config.version,
            "broker": self.link.status(),
            "obd": self.obd.status() if self.obd else None,
            "can": self.can.status() if self.can else None,
            "buffer": self.store.counts(), "store": self.store.status(),
            "ingest": self.ingest.status(), "uplink": self.uplink.status(),
            "last_uplink_seq": self.store.last_uplink_seq,
            "clock": self.clock.status(),
            "downlink": self.downlink.status(),
        }
        for name, c in named.items():
            if name not in out and name != "link":
                out[name] = c.status()
        return out

    def health_snapshot(self) -> dict:
        """The ``report`` command's snapshot (a ``health`` event of kind ``snapshot``)."""
        snap = {"agent": self.version, "config_version": self.active_config.version,
                "buffer": self.store.counts(), "broker_connected": self.link.connected}
        if self.obd:
            st = self.obd.status()
            snap["obd"] = {k: st.get(k) for k in ("connected", "protocol", "errors", "last_error",
                                                  "fault")}
        try:
            snap["health"] = self.health.snapshot()
        except Exception as e:
            log.exception("health snapshot failed")
            snap["health"] = {"error": type(e).__name__}
        return snap


def build(settings: Settings, *, clock: Clock | None = None, pin_factory: Any = None,
          version: str | None = None) -> Agent:
    """The agent of ``settings``, built but not started. Raises ``LocalFileError`` (a
    ``KeyFileError``, ``DbcError`` or ``ProfileFileError``) when a file the settings name (or
    make it read) cannot be used; agent/daemon.py names the key."""
    # The clock trusts the system time once an NTP client synchronised it ([clock] synced_by).
    clock = clock or Clock(kernel_synced=kernel_ntp_synced if settings.clock.synced_by == "kernel" else None)
    version = version or agent_version()
    s = settings

    # The few calls to parts built further down (see the module docstring).
    def wake_uplink() -> None:
        uplink.wake()

    def emit_event(body: dict) -> None:
        """Queues an event durably and wakes the uplink (events go out ahead of telemetry)."""
        store.add_event(body)
        uplink.wake()

    def vehicle_state() -> str:
        """driving / parked / charging / ... from power management; "driving" without it."""
        state = power.state if power is not None else None
        return str(state) if state is not None else "driving"

    # -- the local files first: a bad one stops the agent before anything starts ----------------
    keys = DeviceKeys.load(s.keys.sign_key, s.keys.enc_key, s.keys.cloud_enc_pub, s.keys.cloud_sign_pubs)
    check_tls_files(s.mqtt.ca_file, s.mqtt.cert_file, s.mqtt.key_file, device_id=s.device_id)
    if s.update is not None and s.update.ca_file is not None:
        try:
            check_ca_file(s.update.ca_file)
        except KeyFileError as e:
            e.key = "update.ca_file"   # the same file may be named by an mqtt key too
            raise
    ev_profiles = _ev_profiles(s) if s.ev.transport != "off" else None

    # -- identity, store, the config in force ---------------------------------------------------
    s.data_dir.mkdir(parents=True, exist_ok=True)
    datakey = DataKey.in_dir(s.data_dir)
    # Events carrying identity data (the VIN) wait for sealing encrypted under the data key.
    store = Store(s.db_path, clock=clock, budget_bytes=s.store.budget_bytes, event_codec=EventsAtRest(datakey))
    clock.raise_floor(store.true_time_floor())   # no earlier than the newest time seen before
    config = ActiveConfig(store)
    watchdog = systemd.Watchdog()
    sealer = Sealer(s.device_id, keys.sign, keys.cloud_enc, clock=clock.now_ms)

    # -- the owner's consent, and the health rules (which need it for driving behaviour) --------
    privacy = privacy_mod.Privacy(store, config=config.current, emit_event=emit_event, clock=clock.now_ms)
    health = HealthMonitor(store=store, emit_event=emit_event, config=config.current, clock=clock.now_ms,
                           driving_allowed=lambda: privacy.allowed("driving_behaviour"))
    privacy.register("driving_behaviour", BehaviourRows(store, health.driving))

    # -- vehicle input -> ingest ------------------------------------------------------------------
    ingest = Ingest(store, heartbeat=lambda: watchdog.beat("ingest"), on_event=wake_uplink,
                    sample_listeners=[health.on_samples])
    bus_activity = None
    can = None
    if s.can.buses:
        from agent.device.vehicle_state import BusActivity
        from agent.vehicle.can_pipeline import CanPipeline
        bus_activity = BusActivity() if s.power is not None else None
        can = CanPipeline(s.can.buses, config.current().get("can"), put_samples=ingest.put_samples,
                          put_frames=ingest.put_frames, clock_us=clock.now_us,
                          frame_listeners=[bus_activity.note_frames] if bus_activity else ())
    obd = None
    if s.obd.enabled:
        from agent.vehicle.obd import ObdPoller
        obd = ObdPoller(s.obd.port, cloudconfig.obd_pids(config.current()), ingest.put_samples,
                        on_vehicle=lambda info: identity.on_vehicle(info),
                        baudrate=s.obd.baudrate or None, timeout_s=s.obd.timeout_s, clock=clock.now_ms,
                        on_dtc=emit_event, on_event=emit_event, dtc_store=store,
                        dtc_period_s=float(config.current().get("obd", {}).get("dtc_period_s", 60)))

    # -- power management and the MCU -------------------------------------------------------------
    power = None
    if s.power is not None:
        from agent.device.power import PowerHooks, PowerManager

        def flush(timeout_s: float) -> bool:
            ingest.flush()
            uplink.seal_pending()
            uplink.wake()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if store.counts()["outbox"] == 0:
                    return True
                time.sleep(0.2)
            return False

        def on_state(state) -> None:
            # PROTOCOL §6 per_drive: location restarts paused at every ignition on.
            if str(state) in ("on", "parked", "sleeping"):
                privacy.on_ignition(str(state) == "on")

        power = PowerManager.from_settings(s.power, hooks=PowerHooks(
            stop_vehicle_requests=obd.hold if obd else (lambda: None),
            resume_vehicle_requests=obd.release if obd else (lambda: None),
            flush=flush, emit_event=emit_event,
            can_activity=bus_activity.quiet_for if bus_activity else (lambda: None),
            alive=lambda: not watchdog.stale(), beat=lambda: watchdog.beat("power"),
            on_state=on_state), wall_ms=clock.now_ms)
        if obd:
            obd.hold()   # requests start held; the power manager's first decision releases them
        watchdog.register("power")

    def vehicle_awake() -> bool:
        return power.vehicle_awake() if power is not None else True

    # -- the EV traction battery (UDS) ------------------------------------------------------------
    ev = battery = None
    if s.ev.transport != "off":
        from agent.health.traction_battery import TractionBatteryHealth
        from agent.vehicle.ev import EvReader
        if s.ev.transport == "can":
            bus = next(b for b in s.can.buses if b["name"] == s.ev.bus)

            def transport():
                from drivers.uds import UdsClient
                return UdsClient.from_setting(bus)
        else:
            def transport():
                from drivers.elm_isotp import ElmIsoTp
                return ElmIsoTp.open_serial(s.ev.port)

        battery = TractionBatteryHealth(store, emit_event, clock=clock.now_ms)

        def on_snapshot(snap) -> None:
            # The SOH history is kept per vehicle, but never under the VIN itself (identity
            # data): under a pseudonym keyed by the owner's data key, which a wipe destroys.
            if snap.vehicle and not snap.vehicle.startswith("profile:"):
                snap = dataclasses.replace(snap, vehicle=datakey.pseudonym(snap.vehicle))
            battery.observe_snapshot(snap)

        ev = EvReader(transport, ingest.put_samples, vehicle_awake, on_snapshot=on_snapshot, profiles=ev_profiles,
                      on_profile=lambda name: store.set_meta("ev_profile", name), clock=clock.now_ms)
        ev.apply_config(config.current())
        battery.apply_config(config.current())

    def battery_report() -> dict:
        if battery is None:
            return {"available": False, "reason": "no EV transport configured ([ev] in agent.toml)"}
        if ev is None:
            return battery.report()
        return battery.report(latest=ev.last_values(), units=ev.last_units())

    identity = VehicleIdentity(store, datakey, emit_event=emit_event, clock=clock,
                               listeners=[lambda info: ev.set_vehicle(info.get("vin"))] if ev else ())

    # -- location (with consent), then the uplink with its body filters ---------------------------
    location = Location(store, privacy, datakey, gpsd_host=s.gnss.host, gpsd_port=s.gnss.port, clock=clock,
                        seal=sealer.seal, wake_uplink=wake_uplink, emit_event=emit_event,
                        interval_s=lambda: upload_policy(config.current(), vehicle_state()).interval_s)
    moved = endpoint(config.current(), s.mqtt.host_port)   # the cloud may have moved it
    link = MqttLink(
        device_id=s.device_id, endpoints=s.mqtt.endpoints if moved in s.mqtt.endpoints else [moved],
        ca_file=s.mqtt.ca_file, cert_file=s.mqtt.cert_file,
        key_file=s.mqtt.key_file, topic_prefix=s.mqtt.topic_prefix, protocol=s.mqtt.protocol,
        keepalive_s=s.mqtt.keepalive_s, session_expiry_s=s.mqtt.session_expiry_s,
        backoff=Backoff(s.mqtt.backoff_min_s, s.mqtt.backoff_max_s), agent_version=version,
        config_version=lambda: config.version, max_inflight=s.uplink.max_inflight + 2,  # + status publishes
        frame_t=s.uplink.frame_t,
        # The network thread only queues downlink; the worker acks it to the broker once committed.
        on_message=lambda suffix, payload, ack: downlink.submit(suffix, payload, ack),
        receive_maximum=downlink_mod.QUEUE_MAX, on_connection=lambda up: uplink.on_connection(up),
        clock=clock)   # certificate dates against the floor while the clock is not synchronised
    uplink = Uplink(store, link, sealer, config=config.current, vehicle_state=vehicle_state,
                    batch_max_samples=s.uplink.batch_max_samples, max_inflight=s.uplink.max_inflight,
                    frame_t=s.uplink.frame_t,
                    heartbeat=lambda: watchdog.beat("uplink"),
                    # positions into telemetry bodies first; the privacy gate always last
                    body_filters=[location.contribute, privacy.body_filter],
                    event_filters=[privacy.body_filter])

    # -- LEDs and button --------------------------------------------------------------------------
    io = None
    gpio_report = {"backend": None, "fallbacks": [], "error": "disabled in the local settings ([gpio] enabled)"}
    if s.gpio.enabled:
        from drivers.gpio import open_io
        opened = open_io(s.gpio.pins, pin_factory=pin_factory, long_press_s=s.gpio.long_press_s)
        io, gpio_report = opened.io, opened.report()   # open_io logs which backend, or why none
    else:
        log.info("GPIO: disabled in the local settings; LEDs and button off")
    gesture = privacy_mod.ButtonGesture(lambda: privacy.toggle("owner_button"))
    if io is not None:
        io.when_pressed = gesture.press   # three short presses: the owner's privacy toggle
    bookings = Bookings(store)

    def vehicle_link() -> str:
        if obd is not None and obd.status().get("connected"):
            return "connected"
        if can is not None and any(b.get("state") == "running" and b.get("frames")
                                   for b in can.status()["buses"].values()):
            return "connected"
        return "searching" if (obd is not None or can is not None) else "none"

    def attention() -> list[str]:
        out = []
        if any(b["status"] in ("scheduled", "checked_in") for b in bookings.list()):
            out.append("booking")
        if store.get_meta("pending_clear_dtc"):
            out.append("clear_dtc_request")
        if health.dtc_state()["severity"] in ("warn", "critical"):
            out.append("trouble_code")
        return out

    indicators = Indicators(io, gpio_report=gpio_report, vehicle=vehicle_link, attention=attention,
                            cloud_connected=lambda: link.connected, location_active=location.location_active,
                            technician_mode_s=s.gpio.technician_mode_s)

    # -- the owner's data, the technician's socket ------------------------------------------------
    def outbox_events() -> int:
        return store.query("SELECT count(*) FROM events")[0][0] + \
            store.query("SELECT count(*) FROM outbox WHERE suffix='up/event'")[0][0]

    owner = OwnerData(privacy, location, datakey, clock=clock, emit_event=emit_event,
                      outbox_events=outbox_events, link_connected=lambda: link.connected,
                      wake_uplink=wake_uplink, key_files=device_key_files(s),
                      confirm_by_button=indicators.confirm_by_button if indicators.has_button else None)
    technician = Technician(
        store=store, clock=clock, socket_path=s.control.socket, group=s.control.group,
        technician_group=s.control.technician_group,
        data_dir=s.data_dir, device_id=s.device_id, version=version,
        agent_status=lambda: agent.status(), broker_endpoint=lambda: f"{link.host}:{link.port}",
        obd=obd, can=can, health=health, indicators=indicators, bookings=bookings, config=config,
        ingest=ingest, identity=identity, emit_event=emit_event, battery_report=battery_report,
        handlers=owner.handlers(), dbc_paths=[b["dbc"] for b in s.can.buses if b.get("dbc")],
        ev_profile=lambda: ev_profiles.get(ev.profile) if ev is not None and ev.profile else None)

    # -- software updates -------------------------------------------------------------------------
    updater, release_handler = _updater(s, clock=clock, version=version, emit_event=emit_event,
                                        power=power, obd=obd, store=store, link=link,
                                        restart=lambda: agent.request_exit(RESTART_EXIT_CODE))

    # -- the downlink and what it applies -----------------------------------------------------------
    def send_ack(*args, **kw) -> int:
        return downlink.send_ack(*args, **kw)

    appliers = [("obd", obd.apply_config)] if obd else []
    appliers += [("can", can.apply_config)] if can else []
    appliers += [("ev", ev.apply_config), ("ev_battery", battery.apply_config)] if ev else []
    appliers += [("health", health.apply_config), ("owner_data", owner.apply_config)]
    applier = ConfigApplier(config, store, link, appliers=appliers, local_endpoint=s.mqtt.host_port,
                            rollback_s=s.mqtt.config_rollback_s, send_ack=send_ack, wake_uplink=wake_uplink)
    commands = Commands(store, read_dtc=obd.read_dtcs_now if obd else None,
                        vehicle_connected=lambda: bool(obd is not None and obd.status().get("connected")),
                        snapshot=lambda: agent.health_snapshot(), delete_data=privacy.delete_data,
                        flush_deleted=privacy.flush_owed, wake_uplink=wake_uplink, clock=clock)
    downlink = Downlink(
        store, sealer.seal, device_id=s.device_id, recipient_key=keys.enc,
        trusted_signers=lambda: keys.trusted_signers,
        handlers={"config": applier.handle, "booking": bookings.handle, "command": commands.handle,
                  "release": release_handler},
        on_ack=wake_uplink, config_version=lambda: config.version)

    # -- start order: the outbox first, then the link, then what feeds and serves them -------------
    # (stopped in reverse: the ingest writes what it holds, the uplink seals and hands it to the
    # link, the link delivers it, in that order)
    components: list[tuple[str, Component]] = [("link", link), ("uplink", uplink), ("ingest", ingest)]
    components += [("obd", obd)] if obd else []
    components += [("can", can)] if can else []
    components += [("power", power)] if power else []
    components += [("ev", ev)] if ev else []
    components += [("health", health), ("gpio", indicators), ("owner_data", owner), ("technician", technician)]
    components += [("update", updater)] if updater else []
    # Last: downlink queued since the link connected is applied to components already running
    # (and stopped first, so nothing is applied to a component being stopped).
    # The config applier first among them: it acks a config left owed and resumes a probation.
    components += [("config", applier), ("commands", commands), ("downlink", downlink)]
    agent = Agent(settings=s, version=version, clock=clock, store=store, config=config, applier=applier,
                  watchdog=watchdog, components=components, parts=dict(
                      ingest=ingest, uplink=uplink, link=link, downlink=downlink, sealer=sealer, obd=obd,
                      can=can, ev=ev, battery=battery, power=power, health=health, privacy=privacy,
                      location=location, owner_data=owner, indicators=indicators, technician=technician,
                      updater=updater, identity=identity, bookings=bookings, commands=commands,
                      emit_event=emit_event))
    return agent


def _ev_profiles(s: Settings) -> dict:
    """The EV profiles, shipped and local (``ev.profiles``), every file checked now."""
    from agent.vehicle.ev_profile import ProfileFileError, load_profiles
    try:
        return load_profiles(s.ev.profiles, strict=True)
    except ProfileFileError as e:
        if s.key_naming(e.path) is None:   # shipped with the agent: read because of ev.transport
            e.key = "ev.transport"
            e.message = f"an EV profile shipped with the agent: {e.message}"
        raise


def _updater(s: Settings, *, clock: Clock, version: str, emit_event: Callable[[dict], None], power, obd,
             store: Store, link: MqttLink, restart: Callable[[], None]):
    """The updater and the ``down/release`` handler (docs/updates.md).

    Updates are optional: without ``[update]``, with ``enabled = false``, or when it cannot be
    used (no pinned TUF root, an update work directory it cannot write), there is no updater and
    a ``down/release`` is answered ``rejected`` "updates not configured" (naming what is missing).

    What the updater is given: ``health`` — store open and writing, broker connected, and the
    vehicle link (the OBD poller connected) when power management says the car is ``on``
    (without power management the car's state is unknown, so the vehicle link is no condition of
    "good"); ``parked`` — from power management (parked, settling, charging and sleeping are
    parked; no decision yet is unknown), without it: parked exactly when there is no vehicle
    link; ``supply_v`` — power management's latest 12 V reading, else None (a release with a
    ``min_supply_v`` then waits); ``restart`` — a clean stop, then exit 75; ``mcu`` — power
    management's MCU link when it is up.
    """
    def not_configured(reason: str):
        def handle(opened) -> Outcome:
            log.warning("update: release seq=%s rejected: %s", opened.seq, reason)
            return Outcome("rejected", reason=reason)
        return handle

    us = s.update
    if us is None:
        return None, not_configured(UPDATES_NOT_CONFIGURED)
    if not us.tuf_root.is_file():
        reason = f"no pinned TUF root at {us.tuf_root} (dongle provision --tuf-root, or update.tuf_root)"
        log.error("update: updates disabled: %s", reason)
        return None, not_configured(f"{UPDATES_NOT_CONFIGURED}: {reason}"[:300])
    from agent.update import slots
    from agent.update.updater import Updater
    try:
        slots.prepare_work(us.layout())   # its own update directory (never the install root)
    except OSError as e:
        log.error("update: updates disabled: %s", e)
        return None, not_configured(f"{UPDATES_NOT_CONFIGURED}: {e}"[:300])

    def obd_connected() -> bool:
        return obd is not None and bool(obd.status().get("connected"))

    def health() -> dict[str, bool | None]:
        vehicle = None
        if power is not None and str(power.state) == "on" and obd is not None:
            vehicle = obd_connected()
        return {"store": store.problem is None, "broker": bool(link.connected), "vehicle": vehicle}

    def parked() -> bool | None:
        if power is None:
            return not obd_connected()
        state = power.state
        if state is None or str(state) == "unknown":
            return None
        return str(state) in PARKED_STATES

    def supply_v() -> float | None:
        v = power.status().get("supply_v") if power is not None else None
        return None if v is None else float(v)

    updater = Updater(us, emit_event=emit_event, parked=parked, supply_v=supply_v, health=health,
                      restart=restart, mcu=lambda: power.mcu if power is not None else None,
                      agent_version=version, clock=clock)
    log.info("update: updates enabled in %s (current %s)", us.root,
             updater.layout.current_version() or "not a slot")
    return updater, updater.handle_release

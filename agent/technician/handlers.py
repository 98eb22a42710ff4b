"""What the technician at the car can ask the running agent (through :mod:`agent.control`).

Requests (``op``): ``status``, ``live``, ``dtc``, ``dtc_clear``, ``bookings``,
``booking_checkin``, ``booking_complete``, ``service_log``, ``config``, ``buffer``, ``capture``.

``dtc_clear`` is the only way trouble codes are cleared, whether the cloud asked for it
(``clear_dtc`` leaves meta ``pending_clear_dtc``, see agent/cloud/commands.py) or not. The CLI
asks the person at the terminal first and sends ``confirmed``; that flag only says the dialogue
took place (any client can set it), so the agent also needs one proof a client cannot forge:

1. the **technician credential**: the requesting process is in the ``control.technician_group``
   group (default ``dongle-tech``), as the kernel reports it for the socket (``SO_PEERGROUPS``,
   :class:`~agent.technician.control.Peer`); an administrator grants it per technician
   (``usermod -aG dongle-tech anna``), as with any other Unix privilege; or
2. **presence at the car**: a short press of the dongle's button within the request (the
   attention LED blinks fast), or technician mode, which a long press started.

Without either (no credential, and no button, or the button not pressed in time) the request is
refused and the refusal recorded. Then the agent clears (mode 04), records who did it and how
(table ``technician_log``) and sends ``dtc_cleared``.

``booking_complete`` appends the service record to the chain (PROTOCOL §5), marks the booking
completed and queues the ``service_record`` and ``booking`` events, all in one transaction.

Local settings: ``[control] socket``, ``group`` (agent/technician/control.py serves them).
"""
from __future__ import annotations

import grp
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drivers.core.text import safe_text
from drivers.core.clock import Clock
from agent.technician import resolution
from agent.technician.control import ControlError, ControlServer, Peer, Reply
from agent.technician.service_log import ServiceLog, ServiceLogError

log = logging.getLogger(__name__)

BUTTON_TIMEOUT_S = 60.0
DTC_TIMEOUT_S = 20.0
MAX_CAPTURE_S = 3600.0


class Technician:
    """The control-socket requests of the technician at the car (see the module docstring).

    Given, by the composition root: the store and clock, the agent's ``status()``, and each
    part of the agent a request needs (OBD poller, CAN pipeline, health rules, indicators,
    bookings, the active config, the ingest's counters, the last vehicle seen). ``handlers``
    adds requests served by other components (the owner's ``privacy`` and ``wipe``)."""

    def __init__(self, *, store, clock: Clock, socket_path, group: str, technician_group: str, data_dir, device_id: str,
                 version: str, agent_status: Callable[[], dict], broker_endpoint: Callable[[], str],
                 obd=None, can=None, health=None, indicators=None, bookings, config,
                 ingest, identity, emit_event: Callable[[dict], None],
                 battery_report: Callable[[], dict], handlers: dict | None = None,
                 dbc_paths: Sequence[str] = (), ev_profile: Callable[[], Any] = lambda: None):
        self._store = store
        self._clock = clock
        self._data_dir = Path(data_dir)
        self._device_id = device_id
        self._version = version
        self._agent_status = agent_status
        self._broker_endpoint = broker_endpoint
        self._obd_poller = obd
        self._can = can
        self._health = health
        self._indicators = indicators
        self._bookings = bookings
        self._config = config
        self._ingest = ingest
        self._identity = identity
        self._emit_event = emit_event
        self._dbc_paths = tuple(dbc_paths)
        self._ev_profile = ev_profile
        self._steps: tuple[Any, dict[str, float]] = (None, {})
        self.service_log = ServiceLog(store, clock=clock.now_ms)
        store.create_tables(
            "technician_log (id INTEGER PRIMARY KEY, ts INTEGER, action TEXT, by TEXT, detail TEXT)")
        requests = {
            "status": self.status_request, "live": self.live, "dtc": self.dtc, "dtc_clear": self.dtc_clear,
            "bookings": self.bookings, "booking_checkin": self.booking_checkin,
            "booking_complete": self.booking_complete, "service_log": self.service_log_request,
            "config": self.config, "buffer": self.buffer, "capture": self.capture,
            "battery": lambda request, peer=None, reply=None: battery_report(),
            **(handlers or {}),
        }
        self.server = ControlServer(socket_path, requests, group=group)
        self.technician_group = technician_group
        self._stopping = threading.Event()

    # -- component ------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self.server.start()
        try:
            grp.getgrnam(self.technician_group)
        except KeyError:
            log.warning("control: the technician group %r does not exist: nobody holds the technician "
                        "credential, so trouble codes are cleared only with the dongle's button "
                        "(groupadd %s; docs/technician.md)", self.technician_group, self.technician_group)

    def stop(self) -> None:
        self._stopping.set()
        self.server.stop()

    def status(self) -> dict:
        return {"control": self.server.status()}

    def apply_config(self, doc: dict) -> list[str]:
        return []

    # -- helpers --------------------------------------------------------------------------
    def _record(self, action: str, by: str, detail: dict) -> None:
        with self._store.batch() as c:
            c.execute("INSERT INTO technician_log(ts, action, by, detail) VALUES (?,?,?,?)",
                      (self._clock.now_ms(), action, by, json.dumps(detail)))

    def _obd(self):
        obd = self._obd_poller
        if obd is None:
            raise ControlError("no_adapter", "no adapter: OBD is disabled in the local settings ([obd] enabled)")
        st = obd.status()
        if not st.get("connected"):
            raise ControlError("no_adapter", f"no adapter: the OBD adapter on {st.get('port')} is not connected "
                                             f"to a vehicle (plugged in? ignition on?)"
                                             + (f" — last error: {st['last_error']}" if st.get("last_error") else ""))
        return obd

    def _booking(self, booking_id: str) -> dict:
        if not isinstance(booking_id, str) or not booking_id:
            raise ControlError("bad_request", "a booking id is needed")
        b = self._bookings.get(booking_id)
        if b is None:
            raise ControlError("unknown_booking", f"unknown booking {safe_text(booking_id, 64)!r}: this dongle has no "
                                                  "such booking (list them: dongle bookings)")
        return b

    def _set_booking_status(self, c, booking_id: str, status: str) -> None:
        c.execute("UPDATE bookings SET status=?, updated_ms=? WHERE booking_id=?", (status, self._clock.now_ms(), booking_id))

    # -- requests -------------------------------------------------------------------------
    def status_request(self, req: dict, peer: Peer, reply: Reply) -> dict:
        st = self._agent_status()
        obd = st.get("obd") or {}
        vehicle = self._identity.last() or {}
        data_dir = self._data_dir
        disk = shutil.disk_usage(data_dir)
        db = self._store.path
        db_bytes = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())
        oldest = self._store.oldest_pending_ms()
        errors = {}
        for name, value in (("obd", obd.get("last_error")), ("ingest", self._ingest.last_error),
                            ("control", self.server.last_error)):
            if value:
                errors[name] = value
        for bus, b in ((st.get("can") or {}).get("buses") or {}).items():
            if b.get("last_error"):
                errors[f"can.{bus}"] = b["last_error"]
        return {
            "device_id": self._device_id, "agent": self._version,
            "vehicle": {"vin": vehicle.get("vin") or obd.get("vin"), "protocol": vehicle.get("protocol") or obd.get("protocol")},
            "adapter": None if self._obd_poller is None else {"port": obd.get("port"), "connected": obd.get("connected"),
                                                   "protocol": obd.get("protocol")},
            "buses": {n: {k: b.get(k) for k in ("state", "frames", "errors", "drops", "queue_drops", "socket_drops",
                                                "rcvbuf", "invalid", "unparsable")}
                      for n, b in ((st.get("can") or {}).get("buses") or {}).items()},
            "broker": {"connected": st["broker"]["connected"], "endpoint": self._broker_endpoint()},
            "config_version": st.get("config_version"),
            "buffer": {"depth": st["buffer"], "oldest_age_s": None if oldest is None else round((self._clock.now_ms() - oldest) / 1000, 1)},
            "disk": {"data_dir": str(data_dir), "free_bytes": disk.free, "total_bytes": disk.total, "db_bytes": db_bytes},
            "clock": {**self._clock.status(), "now_ms": self._clock.now_ms()},
            "technician_mode": bool(self._indicators is not None and self._indicators.technician_mode),
            "pending_clear_dtc": self._store.get_meta("pending_clear_dtc"),
            "health": self._health_summary(),
            "gpio": st.get("gpio"),
            "update": st.get("update"),
            "last_errors": errors,
            # the components' own reports, for --json readers (a technician's script, the device VM tests)
            **{k: st.get(k) for k in ("can", "obd", "store", "ingest", "uplink", "power", "last_uplink_seq")},
        }

    def _health_summary(self) -> dict | None:
        if self._health is None:
            return None
        snap = self._health.snapshot()
        return {"trip": snap["trip"]["current"], "odometer_km": snap["odometer_km"],
                "battery_12v": snap["battery_12v"].get("level"),
                "maintenance": {d["kind"]: d["level"] for d in snap["maintenance"]},
                "dtc": snap["dtc"]["severity"]}

    def resolutions(self) -> dict[str, float]:
        """Signal name → resolution (agent/technician/resolution.py), worked out once per
        config version and EV profile (the DBCs are parsed then, not on every request)."""
        profile = self._ev_profile()
        key = (self._config.version, getattr(profile, "name", None))
        if self._steps[0] != key:
            self._steps = (key, resolution.signal_resolutions(self._config.current(), self._dbc_paths,
                                                              ev_profile=profile))
        return self._steps[1]

    def live(self, req: dict, peer: Peer, reply: Reply) -> dict:
        """The latest value of each signal, rounded to its resolution (given as ``resolution``,
        ``null`` where unknown)."""
        latest = self._health.live() if self._health is not None else {}
        now = self._clock.now_ms()
        steps = self.resolutions()
        return {"signals": [{"name": n, "value": resolution.shown(v, steps.get(n)), "unit": u,
                             "resolution": steps.get(n), "age_s": round((now - t) / 1000, 1)}
                            for n, (t, v, u) in sorted(latest.items())]}

    def dtc(self, req: dict, peer: Peer, reply: Reply) -> dict:
        from agent.health.severity import code_severity, severity
        body = self._obd().read_dtcs_now(DTC_TIMEOUT_S)
        if body is None:
            raise ControlError("no_adapter", "the vehicle did not answer the trouble code request "
                                             "(adapter disconnected or ignition off?)")
        codes = [{**c, "severity": code_severity(c["code"], c["state"], body["mil"])} for c in body["codes"]]
        return {"codes": codes, "mil": body["mil"], "freeze": _freeze_shown(body.get("freeze")),
                "severity": severity(body["codes"], body["mil"]), "ts": body["ts"],
                "pending_clear_dtc": self._store.get_meta("pending_clear_dtc")}

    def dtc_clear(self, req: dict, peer: Peer, reply: Reply) -> dict:
        if req.get("confirmed") is not True:
            raise ControlError("refused", "clearing trouble codes needs a confirmation at the terminal "
                                          "(dongle dtc clear asks for it)")
        obd = self._obd()
        ind = self._indicators
        how = ["terminal"]
        if peer.in_group(self.technician_group):
            how.append(f"credential {self.technician_group}")
        elif ind is not None and ind.has_button:
            if ind.technician_mode:
                how.append("technician mode")
            else:
                timeout = float(req.get("button_timeout_s", BUTTON_TIMEOUT_S))
                reply({"prompt": f"Press the button on the dongle within {timeout:.0f} s to confirm "
                                 "(the attention light blinks fast)."})
                if not ind.confirm_by_button(timeout, self._stopping):
                    self._record("dtc_clear_refused", peer.user, {"reason": "button not pressed"})
                    raise ControlError("refused", f"not confirmed: the dongle's button was not pressed within "
                                                  f"{timeout:.0f} s; nothing was cleared")
                how.append("button")
        else:
            self._record("dtc_clear_refused", peer.user, {"reason": "no button and no technician credential"})
            raise ControlError("not_permitted",
                               f"not permitted: this dongle has no button, so clearing trouble codes needs the "
                               f"technician credential, and user {peer.user} is not in the "
                               f"'{self.technician_group}' group (an administrator grants it: sudo usermod "
                               f"-aG {self.technician_group} {peer.user}; then log in again); nothing was cleared")
        reply({"progress": "clearing trouble codes (mode 04)…"})
        cleared = obd.clear_dtcs(DTC_TIMEOUT_S)
        if cleared is None:
            raise ControlError("no_adapter", "the vehicle did not confirm the clear (adapter disconnected or "
                                             "ignition off?); read the codes again to see what is set")
        pending = self._store.get_meta("pending_clear_dtc")
        by = f"technician {peer.user} ({' + '.join(how)})"
        if pending:
            by += f"; requested by the cloud (command seq {pending.get('ref_seq')})"
        codes = sorted({c for c in cleared if isinstance(c, str)})
        with self._store.batch() as c:
            self._emit_event({"type": "dtc_cleared", "ts": self._clock.now_ms(), "codes": codes, "by": by})
            c.execute("DELETE FROM meta WHERE key='pending_clear_dtc'")
            c.execute("INSERT INTO technician_log(ts, action, by, detail) VALUES (?,?,?,?)",
                      (self._clock.now_ms(), "dtc_clear", peer.user, json.dumps({"codes": codes, "how": how, "cloud_request": pending})))
        log.info("trouble codes cleared by %s: %s", by, ", ".join(codes) or "none were set")
        # what the fresh read after the clear still shows: permanent codes (the ECU erases them
        # once its monitor has passed), or a fault that is back at once
        still = [{"code": code, "state": state} for code, state in
                 ((obd.status().get("dtc") or {}).get("codes") or [])]
        return {"cleared": codes, "by": by, "still_reported": still}

    def bookings(self, req: dict, peer: Peer, reply: Reply) -> dict:
        return {"bookings": self._bookings.list()}

    def booking_checkin(self, req: dict, peer: Peer, reply: Reply) -> dict:
        bid = req.get("booking_id")
        b = self._booking(bid)
        if b["status"] != "scheduled":
            raise ControlError("refused", f"booking {safe_text(bid, 64)} is {b['status']}; only a scheduled booking "
                                          "can be checked in")
        with self._store.batch() as c:
            self._set_booking_status(c, bid, "checked_in")
            self._emit_event({"type": "booking", "ts": self._clock.now_ms(), "booking_id": bid, "status": "checked_in"})
        self._record("booking_checkin", peer.user, {"booking_id": bid})
        return {"booking": self._bookings.get(bid)}

    def booking_complete(self, req: dict, peer: Peer, reply: Reply) -> dict:
        bid = req.get("booking_id")
        b = self._booking(bid)
        if b["status"] != "checked_in":
            hint = " (check it in first: dongle booking checkin ID)" if b["status"] == "scheduled" else ""
            raise ControlError("refused", f"booking {safe_text(bid, 64)} is {b['status']}; only a checked-in "
                                          f"booking can be completed{hint}")
        technician = req.get("technician") or peer.user
        try:
            with self._store.batch() as c:
                record = self.service_log.append(bid, req.get("odometer_km"), req.get("items") or [], technician)
                self._set_booking_status(c, bid, "completed")
                self._emit_event(record)
                self._emit_event({"type": "booking", "ts": record["ts"], "booking_id": bid, "status": "completed"})
        except ServiceLogError as e:
            raise ControlError("bad_request", str(e)) from None
        self._record("booking_complete", peer.user, {"booking_id": bid, "hash": record["hash"]})
        if self._health is not None:
            self._health.wake_maintenance()
        return {"record": record}

    def service_log_request(self, req: dict, peer: Peer, reply: Reply) -> dict:
        out: dict = {"records": self.service_log.records()}
        if req.get("verify"):
            out["verification"] = self.service_log.verify().as_dict()
        return out

    def config(self, req: dict, peer: Peer, reply: Reply) -> dict:
        from agent.cloud.cloudconfig import default_config
        active = self._config.current()
        rows = self._store.query("SELECT doc FROM configs WHERE version < ? ORDER BY version DESC LIMIT 1",
                                      (int(active.get("version", 0)),))
        return {"active": active, "previous": json.loads(rows[0][0]) if rows else None, "default": default_config()}

    def buffer(self, req: dict, peer: Peer, reply: Reply) -> dict:
        return buffer_report(self._store.query, ingest_dropped=dict(self._ingest.dropped), now=self._clock.now_ms())

    def capture(self, req: dict, peer: Peer, reply: Reply) -> dict:
        seconds = req.get("seconds")
        if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_CAPTURE_S:
            raise ControlError("bad_request", f"--seconds must be between 0 and {MAX_CAPTURE_S:g}")
        if self._can is None:
            raise ControlError("no_adapter", "no adapter: no CAN bus is configured on this dongle "
                                             "(local settings [[can.buses]])")
        buf: list = []
        lock = threading.Lock()

        def on_frames(frames) -> None:
            with lock:
                buf.extend(frames)

        remove = self._can.add_capture(on_frames)
        total, buses = 0, set()
        start = time.monotonic()
        try:
            while not self._stopping.is_set():
                elapsed = time.monotonic() - start
                done = elapsed >= seconds
                time.sleep(0 if done else min(0.2, seconds - elapsed))
                with lock:
                    chunk, buf[:] = list(buf), []
                total += len(chunk)
                buses.update(f.bus for f in chunk)
                reply({"elapsed_s": round(min(time.monotonic() - start, seconds), 2), "seconds": seconds,
                       "frames": [[f.bus, f.t_us, f.can_id, int(f.extended), f.data.hex()] for f in chunk]})
                if done:
                    break
        finally:
            remove()
        return {"frames": total, "buses": sorted(buses), "seconds": seconds}


def _freeze_shown(freeze: dict | None) -> dict | None:
    """A freeze frame (``{"code", "values": {PID: {"value", "unit"}}}``) with each value rounded
    to its PID's resolution (and the resolution given)."""
    values = (freeze or {}).get("values")
    if not isinstance(values, dict):
        return freeze
    steps = resolution.obd_steps({"name": pid, "pid": pid} for pid in values)
    return {**freeze, "values": {pid: {**v, "value": resolution.shown(v.get("value"), steps.get(pid)),
                                       "resolution": steps.get(pid)} if isinstance(v, dict) else v
                                 for pid, v in values.items()}}


def buffer_report(query, *, ingest_dropped: dict | None = None, now: int | None = None) -> dict:
    """Buffer depth per kind, oldest item, evictions — from the store (live or read-only)."""
    now = Clock().now_ms() if now is None else now
    depth = {t: query(f"SELECT count(*) FROM {t}")[0][0] for t in ("samples", "events", "outbox")}
    # raw frames are stored as blocks of n frames (agent/outbox/frame_blocks.py; schema 3)
    depth["frames"] = query("SELECT coalesce(sum(n), 0) FROM frames")[0][0] if "n" in {
        r[1] for r in query("PRAGMA table_info(frames)")} else query("SELECT count(*) FROM frames")[0][0]
    depth = {t: depth[t] for t in ("samples", "frames", "events", "outbox")}
    oldest = {
        "samples": query("SELECT min(t_ms) FROM samples")[0][0],
        "frames": (lambda v: v // 1000 if v else None)(query("SELECT min(t_us) FROM frames")[0][0]),
        "events": query("SELECT min(ts) FROM events")[0][0],
        "outbox": query("SELECT min(created_ms) FROM outbox")[0][0],
    }
    outbox = {s: n for s, n in query("SELECT suffix, count(*) FROM outbox GROUP BY suffix")}
    ev = query("SELECT value FROM meta WHERE key='buffer.evictions'")
    return {"depth": depth, "outbox_by_topic": outbox,
            "oldest_age_s": {k: None if v is None else round((now - v) / 1000, 1) for k, v in oldest.items()},
            "evictions": json.loads(ev[0][0]) if ev else 0, "ingest_dropped": ingest_dropped}

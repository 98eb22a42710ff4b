"""EV traction-battery reader: picks a profile, polls the battery ECUs, emits ``ev.*`` samples.

The profile comes from the config's ``ev.profile`` (PROTOCOL §4): ``"off"`` (nothing is read),
a profile name (forced), or ``"auto"`` — the VIN's manufacturer and model codes order the
candidate profiles, and each candidate's ``identify`` request is tried until one gets a
positive answer (so a VIN that cannot be decoded, or a model code we do not know, still finds
its profile; a petrol car finds none). ``on_profile(name | None)`` is called whenever the choice
changes, so the ``vehicle`` event can name it.

Polling happens every ``ev.period_s`` seconds and **only while** ``vehicle_awake()`` is true
(the car is on or charging): a sleeping car is never woken for battery data. A snapshot asks
every request of the profile once; a request the ECU refuses as unsupported (NRC 0x11, 0x12,
0x31) three times is dropped until the profile is chosen again (e.g. the 2019+ Bolt answers only
one of its two capacity identifiers); a snapshot stops early after ``max_silent`` requests in a
row got no answer at all (the car went to sleep, or the link is gone).

Signals (all ``ev.*``; what a profile offers varies, see ``config/ev_profiles/*.json``):

==========================  ======  =================================================
``ev.soc_bms``              %       state of charge as the BMS counts it
``ev.soc_display``          %       state of charge shown to the driver
``ev.soh``                  %       state of health (BMS)
``ev.hx``                   %       Nissan Leaf Hx (conductance-based health)
``ev.capacity_ah``          Ah      usable capacity (Leaf, Bolt)
``ev.pack_v``               V       pack voltage
``ev.pack_i``               A       pack current (sign per profile notes)
``ev.charging``             0/1     the BMS says it is charging
``ev.batt_t``               degC    pack temperature (single sensor)
``ev.batt_t_max`` / ``_min`` degC   warmest / coldest module
``ev.batt_t_max_no`` / ..   —       sensor numbers of those
``ev.module_t.<n>``         degC    module temperatures
``ev.cell_v_max`` / ``_min`` V      highest / lowest cell voltage (BMS or from the cells)
``ev.cell_v_max_no`` / ..   —       cell numbers of those
``ev.cell_v_spread``        mV      highest minus lowest cell voltage
``ev.cell_v_dev``           V       cell deviation as the BMS reports it
``ev.aux_v``                V       12 V auxiliary battery
``ev.charged_ah`` / ..      Ah      cumulative charge in / out (``ev.discharged_ah``)
``ev.charged_kwh`` / ..     kWh     cumulative energy in / out (``ev.discharged_kwh``)
``ev.odometer_km``          km      odometer
==========================  ======  =================================================

Per-cell voltages (``ev.cell_v.<n>``, up to 192 of them) are decoded but not emitted as
samples; they feed ``ev.cell_v_min/max/spread`` and the health check (``on_snapshot``).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivers.core.backoff import Backoff
from drivers.core.clock import Clock
from agent.vehicle.ev_profile import Profile, Request, candidates_for_vin, load_profiles
from drivers.core.model import Sample

log = logging.getLogger(__name__)

#: Every signal name a profile may produce (without the per-cell / per-module index).
SIGNALS = (
    "ev.soc_bms", "ev.soc_display", "ev.soh", "ev.hx", "ev.capacity_ah", "ev.pack_v", "ev.pack_i",
    "ev.charging", "ev.batt_t", "ev.batt_t_max", "ev.batt_t_min", "ev.batt_t_max_no",
    "ev.batt_t_min_no", "ev.module_t", "ev.cell_v_max", "ev.cell_v_min", "ev.cell_v_max_no",
    "ev.cell_v_min_no", "ev.cell_v_spread", "ev.cell_v_dev", "ev.aux_v", "ev.charged_ah",
    "ev.discharged_ah", "ev.charged_kwh", "ev.discharged_kwh", "ev.odometer_km", "ev.cell_v",
)
DEFAULT_PERIOD_S = 60.0
UNSUPPORTED_AFTER = 3


class Transport(Protocol):
    """What both paths offer (``drivers.uds.UdsClient``, ``drivers.elm_isotp.ElmIsoTp``)."""

    def read(self, req: Request) -> Any: ...

    def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@dataclass
class Snapshot:
    """One pass over a profile's requests."""

    t_ms: int
    profile: str
    vehicle: str
    values: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    failed: int = 0


def derive(values: dict[str, float], units: dict[str, str]) -> None:
    """Fills cell min/max (and their numbers) from per-cell values when the ECU gave none, and
    the spread in mV."""
    cells = {int(k.rsplit(".", 1)[1]): v for k, v in values.items() if k.startswith("ev.cell_v.")}
    if cells:
        lo = min(cells, key=cells.get)
        hi = max(cells, key=cells.get)
        if "ev.cell_v_min" not in values:
            values["ev.cell_v_min"], values["ev.cell_v_min_no"] = cells[lo], float(lo)
            units["ev.cell_v_min"], units["ev.cell_v_min_no"] = "V", ""
        if "ev.cell_v_max" not in values:
            values["ev.cell_v_max"], values["ev.cell_v_max_no"] = cells[hi], float(hi)
            units["ev.cell_v_max"], units["ev.cell_v_max_no"] = "V", ""
    if "ev.cell_v_min" in values and "ev.cell_v_max" in values:
        values["ev.cell_v_spread"] = round((values["ev.cell_v_max"] - values["ev.cell_v_min"]) * 1000, 1)
        units["ev.cell_v_spread"] = "mV"


class EvReader:
    """Polls the traction battery while the car is awake. See the module docstring.

    ``transport_factory()`` opens a transport (a :class:`drivers.uds.UdsClient` or
    :class:`drivers.elm_isotp.ElmIsoTp`); it is opened when first needed and reopened with
    backoff after it failed. ``put_samples`` gets the ``ev.*`` samples of each snapshot;
    ``on_snapshot(snapshot)`` (e.g. :meth:`TractionBatteryHealth.observe`) every snapshot.
    """

    def __init__(self, transport_factory: Callable[[], Transport],
                 put_samples: Callable[[list[Sample]], None],
                 vehicle_awake: Callable[[], bool], *,
                 profiles: Mapping[str, Profile] | None = None,
                 on_snapshot: Callable[[Snapshot], None] | None = None,
                 on_profile: Callable[[str | None], None] | None = None,
                 clock: Callable[[], int] | None = None, max_silent: int = 3,
                 backoff: Backoff | None = None):
        self._factory = transport_factory
        self._put = put_samples
        self._awake = vehicle_awake
        self._profiles = dict(profiles) if profiles is not None else load_profiles()
        self._on_snapshot = on_snapshot
        self._on_profile = on_profile
        self._clock = clock or Clock().now_ms
        self._max_silent = max_silent
        self._backoff = backoff or Backoff(2.0, 300.0)
        self._lock = threading.RLock()     # configuration state; never held across I/O
        self._io_lock = threading.Lock()   # the transport: one poll at a time
        self._mode = "auto"
        self._period_s = DEFAULT_PERIOD_S
        self._vin: str | None = None
        self._profile: Profile | None = None
        self._probed_for: tuple[str | None, str] | None = None
        self._refusals: Counter[str] = Counter()
        self._transport: Transport | None = None
        self._retry_at = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.last: Snapshot | None = None
        self.stats: Counter[str] = Counter()

    # -- configuration -------------------------------------------------------------------------

    def apply_config(self, doc: Mapping[str, Any]) -> list[str]:
        """Takes ``ev.profile`` and ``ev.period_s`` from a config document (absent ``ev`` =
        ``auto`` every 60 s). Returns what could not be applied."""
        problems: list[str] = []
        ev = doc.get("ev") if isinstance(doc, Mapping) else None
        mode, period = "auto", DEFAULT_PERIOD_S
        if isinstance(ev, Mapping):
            mode = ev.get("profile", "auto")
            period = ev.get("period_s", DEFAULT_PERIOD_S)
        if not isinstance(mode, str) or (mode not in ("auto", "off") and mode not in self._profiles):
            problems.append(f"ev.profile {mode!r} is not 'auto', 'off' or one of {sorted(self._profiles)}")
            mode = "auto"
        if isinstance(period, bool) or not isinstance(period, (int, float)) \
                or not math.isfinite(period) or period <= 0:
            problems.append(f"ev.period_s {period!r} is not a positive number")
            period = DEFAULT_PERIOD_S
        with self._lock:
            if mode != self._mode:
                self._mode = mode
                self._select(None)
                self._probed_for = None
            self._period_s = float(period)
        self._wake.set()
        return problems

    def set_vehicle(self, vin: str | None) -> None:
        """The VIN the OBD side read (``None`` when unknown); a new VIN re-selects the profile."""
        with self._lock:
            if vin != self._vin:
                self._vin = vin
                if self._mode == "auto":
                    self._select(None)
                    self._probed_for = None
        self._wake.set()

    @property
    def profile(self) -> str | None:
        return self._profile.name if self._profile else None

    def _select(self, profile: Profile | None) -> None:
        if profile is self._profile:
            return
        self._profile = profile
        self._refusals.clear()
        log.info("EV profile: %s", profile.name if profile else "none")
        if self._on_profile is not None:
            try:
                self._on_profile(profile.name if profile else None)
            except Exception:  # noqa: BLE001
                log.exception("on_profile callback failed")

    # -- one poll ------------------------------------------------------------------------------

    def poll_once(self) -> Snapshot | None:
        """Does one snapshot now if the car is awake and a profile is (or can be) chosen.

        Holds only the I/O lock while talking to the car: applying a config (on the MQTT thread)
        or reading the status never waits for a slow or silent ECU."""
        with self._io_lock:
            if self._mode == "off":
                return None
            if not self._awake():
                self.stats["skipped_asleep"] += 1
                return None
            transport = self._open()
            if transport is None:
                return None
            profile = self._choose(transport)
            if profile is None:
                return None
            snap = self._snapshot(transport, profile)
        self._deliver(snap)
        return snap

    def _open(self) -> Transport | None:
        if self._transport is not None:
            return self._transport
        if time.monotonic() < self._retry_at:
            return None
        try:
            self._transport = self._factory()
            self._backoff.failures = 0
        except Exception as e:  # noqa: BLE001 - a missing adapter must not stop the agent
            wait = self._backoff.next()
            self._retry_at = time.monotonic() + wait
            self.stats["open_failures"] += 1
            log.warning("EV transport could not be opened (%s); retry in %.0f s", e, wait)
            return None
        return self._transport

    def _drop_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except Exception:  # noqa: BLE001
                log.debug("closing the EV transport failed", exc_info=True)
        self._retry_at = time.monotonic() + self._backoff.next()

    def _choose(self, transport: Transport) -> Profile | None:
        if self._mode not in ("auto", "off"):
            if self._profile is None or self._profile.name != self._mode:
                self._select(self._profiles[self._mode])
            return self._profile
        if self._profile is not None:
            return self._profile
        key = (self._vin, "auto")
        if self._probed_for == key:
            return None  # probed already for this VIN and found nothing
        for candidate in candidates_for_vin(self._profiles.values(), self._vin):
            if candidate.identify is None:
                continue
            req = candidate.request(candidate.identify)
            outcome = transport.read(req)
            self.stats["probes"] += 1
            if outcome.ok and req.decode(outcome.response) is not None:
                self._select(candidate)
                return candidate
        self._probed_for = key
        log.info("EV: no profile answers for VIN %s", self._vin)
        return None

    def _snapshot(self, transport: Transport, profile: Profile) -> Snapshot:
        snap = Snapshot(t_ms=self._clock(), profile=profile.name,
                        vehicle=self._vin or f"profile:{profile.name}")
        silent = 0
        for req in profile.requests:
            if self._refusals[req.key] >= UNSUPPORTED_AFTER:
                continue
            outcome = transport.read(req)
            if outcome.ok:
                silent = 0
                values = req.decode(outcome.response)
                if values is None:  # too short for min_len: nothing from it
                    snap.failed += 1
                    self.stats["short_answers"] += 1
                    continue
                snap.answered += 1
                self._refusals.pop(req.key, None)
                snap.values.update(values)
                for f in req.fields:
                    if f.name in values:
                        snap.units[f.name] = f.unit
                continue
            snap.failed += 1
            if getattr(outcome, "unsupported", False):
                self._refusals[req.key] += 1
                if self._refusals[req.key] == UNSUPPORTED_AFTER:
                    log.info("EV: %s refuses %s (NRC 0x%02X); no longer asked",
                             profile.name, req.key, outcome.nrc)
                silent = 0
                continue
            if outcome.error in ("timeout", "transport", "closed"):
                silent += 1
                if outcome.error in ("transport", "closed"):
                    self.stats["transport_errors"] += 1
                if silent >= self._max_silent:
                    self.stats["snapshots_cut_short"] += 1
                    if outcome.error != "timeout":
                        self._drop_transport()
                    break
        derive(snap.values, snap.units)
        self.stats["snapshots"] += 1
        return snap

    def _deliver(self, snap: Snapshot) -> None:
        self.last = snap
        samples = [Sample(name, snap.units.get(name, ""), snap.t_ms, float(v))
                   for name, v in snap.values.items() if not name.startswith("ev.cell_v.")]
        if samples:
            try:
                self._put(samples)
            except Exception:  # noqa: BLE001 - a sink failure must not stop polling
                self.stats["sink_errors"] += 1
                log.exception("EV: put_samples failed")
        if self._on_snapshot is not None and snap.values:
            try:
                self._on_snapshot(snap)
            except Exception:  # noqa: BLE001
                log.exception("EV: on_snapshot failed")

    # -- thread --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ev-reader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._io_lock:
            if self._transport is not None:
                try:
                    self._transport.close()
                except Exception:  # noqa: BLE001
                    log.debug("closing the EV transport failed", exc_info=True)
                self._transport = None

    def _run(self) -> None:
        next_due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_due:
                try:
                    self.poll_once()
                except Exception:  # noqa: BLE001 - the reader must survive anything
                    self.stats["internal_errors"] += 1
                    log.exception("EV poll failed")
                next_due = max(next_due + self._period_s, time.monotonic())
            if self._wake.wait(min(1.0, max(0.0, next_due - time.monotonic()))):
                self._wake.clear()

    def status(self) -> dict[str, Any]:
        with self._lock:
            transport = self._transport.status() if self._transport is not None else None
            return {"mode": self._mode, "profile": self.profile, "vin": self._vin,
                    "period_s": self._period_s, "running": self._thread is not None,
                    "last_snapshot_ms": self.last.t_ms if self.last else None,
                    "last_values": len(self.last.values) if self.last else 0,
                    "unsupported": sorted(k for k, n in self._refusals.items() if n >= UNSUPPORTED_AFTER),
                    "transport": transport, **self.stats}

    def last_values(self) -> dict[str, float]:
        """The last snapshot's values (for ``dongle battery``)."""
        return dict(self.last.values) if self.last else {}

    def last_units(self) -> dict[str, str]:
        """The units of :meth:`last_values` (the profile's, "" for counts and numbers)."""
        return dict(self.last.units) if self.last else {}

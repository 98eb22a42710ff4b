"""Is the car on, parked, charging? Pure evidence handling for :mod:`agent.power`.

Three kinds of evidence, none trusted alone:

- **ignition**: the MCU's debounced ignition line (``None`` when there is no MCU);
- **bus activity**: seconds since the last *broadcast* CAN frame (``None`` without CAN).
  :class:`BusActivity` leaves diagnostic traffic (OBD-II/UDS requests and the ECUs' answers)
  out, so the dongle's own polling never counts as the car being awake;
- **12 V trend**: :class:`VoltageTrend`. A level alone says little: a smart alternator lets the
  battery sit at 12.2-12.8 V while the engine runs and an EV's DC-DC converter holds 13-15 V
  while it charges, so the voltage only decides "charging" (together with an awake bus and the
  ignition off), the low-battery cut, and the "engine clearly running" case when there is
  neither an MCU nor a CAN interface.

:func:`decide` turns one :class:`Evidence` into a :class:`VehicleState`. No I/O, no threads,
no wall clock: times are seconds of whatever monotonic clock the caller uses.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from drivers.core.model import Frame

log = logging.getLogger(__name__)

# A 12 V reading outside this range is a measurement error, not a car.
PLAUSIBLE_V = (3.0, 32.0)


class VehicleState(StrEnum):
    ON = "on"                # ignition on (or, without an MCU, the car's bus is awake)
    SETTLING = "settling"    # ignition off, the car's bus still awake: we stay quiet
    PARKED = "parked"        # ignition off and the bus silent: the car is asleep
    CHARGING = "charging"    # ignition off, bus awake, 12 V held high (EV charging, DC-DC on)
    SLEEPING = "sleeping"    # the dongle asked the MCU to cut its power and is shutting down
    UNKNOWN = "unknown"      # no MCU, no CAN and no telling voltage: cannot decide


AWAKE_STATES = frozenset({VehicleState.ON, VehicleState.CHARGING, VehicleState.UNKNOWN})


@dataclass(frozen=True, slots=True)
class Thresholds:
    bus_quiet_s: float = 30.0      # no broadcast frame for this long: the bus sleeps
    charge_v: float = 13.2         # at or above: something charges the 12 V battery
    charge_detect_s: float = 60.0  # ... sustained this long (surface charge decays sooner)


@dataclass(frozen=True, slots=True)
class Evidence:
    ignition: bool | None          # None: unknown (no MCU, or its link is down)
    bus_quiet_s: float | None      # None: no CAN interface
    charging_for_s: float = 0.0    # how long the 12 V has been >= charge_v (sustained)


def decide(ev: Evidence, th: Thresholds = Thresholds()) -> VehicleState:
    """The vehicle state the evidence supports. "parked" needs the ignition off (or unknown)
    *and* a silent bus; a voltage level never makes the car "on" while either says otherwise."""
    silent = None if ev.bus_quiet_s is None else ev.bus_quiet_s >= th.bus_quiet_s
    charging = ev.charging_for_s >= th.charge_detect_s
    if ev.ignition is True:
        return VehicleState.ON
    if ev.ignition is False:
        if silent is None or silent:
            return VehicleState.PARKED
        return VehicleState.CHARGING if charging else VehicleState.SETTLING
    # ignition unknown (no MCU): the bus decides; the voltage only without CAN
    if silent is None:
        return VehicleState.ON if charging else VehicleState.UNKNOWN
    return VehicleState.PARKED if silent else VehicleState.ON


class VoltageTrend:
    """Recent 12 V readings as (monotonic seconds, volts), oldest first, ``window_s`` long.

    "Sustained" means a run of consecutive readings all on one side of a threshold, at least
    ``min_samples`` of them, spanning at least the asked duration from the run's first to its
    last reading: one sample (a cranking dip, a glitch) never counts, and a gap in the readings
    is not extrapolated.
    """

    def __init__(self, window_s: float = 1800.0, *, min_samples: int = 3) -> None:
        self.window_s = window_s
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self._readings: deque[tuple[float, float]] = deque()

    def add(self, t: float, volts: float | None) -> bool:
        """Adds one reading; an implausible or non-numeric one is logged and ignored."""
        if not isinstance(volts, (int, float)) or isinstance(volts, bool):
            log.warning("12 V reading %r is not a number; ignored", volts)
            return False
        v = float(volts)
        if not math.isfinite(v) or not PLAUSIBLE_V[0] <= v <= PLAUSIBLE_V[1]:
            log.warning("12 V reading %.3f V is implausible; ignored", v)
            return False
        with self._lock:
            if self._readings and t < self._readings[-1][0]:
                t = self._readings[-1][0]  # events and polls may interleave out of order
            self._readings.append((t, v))
            while self._readings and self._readings[0][0] < t - self.window_s:
                self._readings.popleft()
        return True

    @property
    def latest(self) -> float | None:
        with self._lock:
            return self._readings[-1][1] if self._readings else None

    @property
    def latest_t(self) -> float | None:
        with self._lock:
            return self._readings[-1][0] if self._readings else None

    def below_for(self, threshold: float) -> float:
        """Span of the current run of readings below ``threshold`` (0 if not sustained)."""
        return self._run(lambda v: v < threshold)

    def at_or_above_for(self, threshold: float) -> float:
        return self._run(lambda v: v >= threshold)

    def _run(self, pred: Callable[[float], bool]) -> float:
        with self._lock:
            if not self._readings or not pred(self._readings[-1][1]):
                return 0.0
            last_t = self._readings[-1][0]
            first_t, n = last_t, 0
            for t, v in reversed(self._readings):
                if not pred(v):
                    break
                first_t, n = t, n + 1
        return last_t - first_t if n >= self.min_samples else 0.0

    def slope_v_per_h(self, span_s: float = 600.0) -> float | None:
        """Least-squares slope of the readings of the last ``span_s`` (for status only)."""
        with self._lock:
            if not self._readings:
                return None
            end = self._readings[-1][0]
            pts = [(t, v) for t, v in self._readings if t >= end - span_s]
        if len(pts) < 2:
            return None
        mt = sum(t for t, _ in pts) / len(pts)
        mv = sum(v for _, v in pts) / len(pts)
        den = sum((t - mt) ** 2 for t, _ in pts)
        if den <= 0:
            return None
        return sum((t - mt) * (v - mv) for t, v in pts) / den * 3600.0


def is_diagnostic(can_id: int, extended: bool) -> bool:
    """OBD-II/UDS request and response identifiers (ISO 15765-4): 11-bit 0x7DF and
    0x7E0-0x7EF; 29-bit 0x18DB33F1 (functional) and 0x18DAxxxx (physical)."""
    if extended:
        return (can_id >> 16) & 0x1FFF in (0x18DA, 0x18DB)
    return can_id == 0x7DF or 0x7E0 <= can_id <= 0x7EF


class BusActivity:
    """When did the car last talk on its own? Feed it every received frame batch (e.g. wrap
    ``CanReader``'s ``on_frames``); :meth:`quiet_for` is the ``can_activity`` hook of
    :class:`agent.power.PowerManager`.

    Diagnostic frames are left out (see :func:`is_diagnostic`): the answers to our own OBD/UDS
    polling must not keep the car "awake" in our eyes. Before the first broadcast frame,
    :meth:`quiet_for` counts from the creation of this object (the bus was opened then).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 exclude: Callable[[int, bool], bool] = is_diagnostic) -> None:
        self._clock = clock
        self._exclude = exclude
        self._since = clock()
        self._last: float | None = None
        self.batches = 0  # batches that held a broadcast frame

    def note_frames(self, frames: Iterable[Frame]) -> None:
        for f in frames:
            if not self._exclude(f.can_id, f.extended):
                self.batches += 1
                self._last = self._clock()
                return

    def note(self) -> None:
        """One broadcast frame seen now (for callers without :class:`Frame` objects)."""
        self.batches += 1
        self._last = self._clock()

    @property
    def seen(self) -> bool:
        """True once any broadcast frame arrived (False behind a diagnostic-only gateway)."""
        return self._last is not None

    def quiet_for(self) -> float:
        return max(0.0, self._clock() - (self._last if self._last is not None else self._since))

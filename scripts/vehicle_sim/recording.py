"""The real RAV4 drive (comma2k19, ../shared/data/comma2k19_rav4) read once into time series.

One pass of ``can.LogReader`` over the candump log; the powertrain signals the twin needs are
decoded with cantools and the DBC that came with the recording (loaded ``strict=False``, see
the data README). What the log and the DBC really have (bus ``can0``, 60.0 s, highway, on
cruise control most of the minute):

=====================  ===================  =====================================================
message (id)           signal               note
=====================  ===================  =====================================================
SPEED (0xB4)           SPEED                km/h, ~41 Hz, the speedometer (~2 % over the wheels)
WHEEL_SPEEDS (0xAA)    WHEEL_SPEED_FL/...   km/h, ~83 Hz, the four wheels; their mean is the
                                            vehicle speed (OBD PID 0D in the twin)
ENGINE_RPM (0x1C4)     RPM, ENGINE_RUNNING  ~42 Hz, 955-2,544 rpm
GAS_PEDAL (0x2C1)      GAS_PEDAL, ETQREAL   pedal % (0 while the cruise control drives) and the
                                            engine's real torque in Nm (-4 to 198): load and
                                            throttle are modelled from the torque
GEAR_PACKET (0x3BC)    GEAR                 always D (0) here
UI_SETTING (0x611)     ODOMETER, UNITS      15,589 → 15,590 miles
VIN_PART_1..3          VIN_1..VIN_17        the car's own VIN, 0x580-0x582
=====================  ===================  =====================================================

There is no coolant, intake, fuel level or voltage signal in the DBC for this car: the drive
model (:mod:`scripts.vehicle_sim.drive`) supplies those.

Times are seconds from the log's first frame (the log itself counts from the device's boot).
:func:`load` caches per process, and keeps the decoded series (not the frames) in a JSON file
under ``$DONGLE_TWIN_CACHE`` (default: the system's temporary directory), keyed by the log's
size and mtime and by :data:`SIGNALS`: an emulator process then starts without reading the
log, or importing python-can at all. ``frames=True`` reads every frame (about 135,000, ~30 MB)
for the CAN side.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scripts.testbed.shared_data import RAV4, RAV4_LOG

if TYPE_CHECKING:
    import cantools

log = logging.getLogger(__name__)

DBC_PATH = RAV4 / "toyota_new_mc_pt_generated.dbc"
POWERTRAIN = "can0"

#: (message, signal) -> series name
SIGNALS = {
    ("SPEED", "SPEED"): "speed_kmh",
    ("WHEEL_SPEEDS", "WHEEL_SPEED_FL"): "wheel_fl_kmh",
    ("WHEEL_SPEEDS", "WHEEL_SPEED_FR"): "wheel_fr_kmh",
    ("WHEEL_SPEEDS", "WHEEL_SPEED_RL"): "wheel_rl_kmh",
    ("WHEEL_SPEEDS", "WHEEL_SPEED_RR"): "wheel_rr_kmh",
    ("ENGINE_RPM", "RPM"): "rpm",
    ("ENGINE_RPM", "ENGINE_RUNNING"): "engine_running",
    ("GAS_PEDAL", "GAS_PEDAL"): "pedal_pct",
    ("GAS_PEDAL", "ETQREAL"): "torque_nm",
    ("GEAR_PACKET", "GEAR"): "gear",
    ("UI_SETTING", "ODOMETER"): "odometer_mi",
}
VIN_MESSAGES = ("VIN_PART_1", "VIN_PART_2", "VIN_PART_3")


@dataclass(frozen=True)
class Series:
    """Samples of one signal; :meth:`at` is the value a receiver holds at ``t`` (the last
    sample at or before it; the first sample before the first)."""

    t: tuple[float, ...]
    v: tuple[float, ...]

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.t, t) - 1
        return self.v[max(i, 0)]

    def between(self, t0: float, t1: float) -> list[float]:
        """Values a receiver held at some moment of ``[t0, t1]``."""
        i0 = max(bisect.bisect_right(self.t, t0) - 1, 0)
        i1 = max(bisect.bisect_right(self.t, t1), i0 + 1)
        return list(self.v[i0:i1])

    @property
    def first(self) -> float:
        return self.v[0]

    @property
    def last(self) -> float:
        return self.v[-1]


@dataclass(frozen=True)
class RecordedFrame:
    t: float            # seconds from the log's first frame
    channel: str
    arbitration_id: int
    is_extended_id: bool
    data: bytes


@dataclass(frozen=True)
class Recording:
    path: Path
    duration_s: float               # first to last frame
    series: dict[str, Series]
    vin: str                        # the VIN the car broadcast (VIN_PART_1..3)
    frames: tuple[RecordedFrame, ...] | None  # every frame, when loaded with frames=True

    def __getitem__(self, name: str) -> Series:
        return self.series[name]


CACHE_VERSION = 1


@functools.cache
def dbc() -> "cantools.database.can.Database":
    import cantools
    return cantools.database.load_file(str(DBC_PATH), strict=False)


_cache: dict[str, Recording] = {}


def _cache_file(path: str) -> Path:
    st = os.stat(path)
    key = json.dumps([CACHE_VERSION, os.path.realpath(path), st.st_size, st.st_mtime_ns,
                      sorted(SIGNALS.items()), VIN_MESSAGES, os.path.getmtime(DBC_PATH)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("DONGLE_TWIN_CACHE") or Path(tempfile.gettempdir()) / "dongle-vehicle-sim")
    return root / f"{Path(path).name}.{digest}.json"


def _from_cache(path: str) -> Recording | None:
    try:
        doc = json.loads(_cache_file(path).read_text())
        series = {n: Series(tuple(t), tuple(v)) for n, (t, v) in doc["series"].items()}
        if set(series) != set(SIGNALS.values()):
            return None
        return Recording(Path(path), float(doc["duration_s"]), series, str(doc["vin"]), None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _to_cache(path: str, rec: Recording) -> None:
    try:
        target = _cache_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"duration_s": rec.duration_s, "vin": rec.vin, "series": {
            n: [list(s.t), list(s.v)] for n, s in rec.series.items()}}))
        tmp.replace(target)
    except OSError as e:
        log.info("recording cache not written: %s", e)


def _read(path: str, frames: bool) -> Recording:
    import can
    db = dbc()
    wanted: dict[int, list[tuple[str, str]]] = {}
    for (msg, sig), name in SIGNALS.items():
        wanted.setdefault(db.get_message_by_name(msg).frame_id, []).append((sig, name))
    vin_ids = {db.get_message_by_name(m).frame_id: m for m in VIN_MESSAGES}
    times: dict[str, list[float]] = {name: [] for name in SIGNALS.values()}
    values: dict[str, list[float]] = {name: [] for name in SIGNALS.values()}
    vin_chars: dict[int, int] = {}
    kept: list[RecordedFrame] = []
    t_first = t_last = None
    with can.LogReader(path) as reader:
        for msg in reader:
            if msg.is_error_frame:
                continue
            if t_first is None:
                t_first = msg.timestamp
            t = msg.timestamp - t_first
            t_last = t
            channel = str(msg.channel) if msg.channel is not None else ""
            if frames:
                kept.append(RecordedFrame(t, channel, msg.arbitration_id, msg.is_extended_id,
                                          bytes(msg.data)))
            if channel != POWERTRAIN:
                continue
            if msg.arbitration_id in wanted:
                decoded = db.decode_message(msg.arbitration_id, msg.data, decode_choices=False)
                for sig, name in wanted[msg.arbitration_id]:
                    times[name].append(t)
                    values[name].append(float(decoded[sig]))
            elif msg.arbitration_id in vin_ids and len(vin_chars) < 17:
                decoded = db.decode_message(msg.arbitration_id, msg.data, decode_choices=False)
                for sig, value in decoded.items():
                    if sig.startswith("VIN_"):
                        vin_chars[int(sig[4:])] = int(value)
    if t_first is None:
        raise ValueError(f"{path}: no frames")
    missing = [n for n, ts in times.items() if not ts]
    if missing:
        raise ValueError(f"{path}: no samples of {', '.join(missing)}")
    vin = "".join(chr(vin_chars[i]) for i in sorted(vin_chars))
    series = {n: Series(tuple(times[n]), tuple(values[n])) for n in times}
    log.info("recording %s: %.1f s, VIN %s", Path(path).name, t_last, vin)
    return Recording(Path(path), float(t_last), series, vin, tuple(kept) if frames else None)


def load(path: str | Path = RAV4_LOG, *, frames: bool = False) -> Recording:
    """The recording at ``path`` (default: the RAV4 minute), decoded; cached per process (a
    copy read with ``frames=True`` serves both kinds of call)."""
    key = str(path)
    cached = _cache.get(key)
    if cached is None and not frames:
        cached = _from_cache(key)
    if cached is None or (frames and cached.frames is None):
        cached = _read(key, frames)
        _to_cache(key, cached)
    _cache[key] = cached
    return cached

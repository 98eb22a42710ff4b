"""The twin's CAN side: the RAV4's buses at the moment the drive clock says.

The same :class:`~scripts.vehicle_sim.drive.Drive` and :class:`~scripts.vehicle_sim.drive.DriveClock`
as the ELM327-emulator's (:mod:`.elm_scenario`), so OBD speed and CAN wheel speed agree at every
moment. What goes on the bus in each phase of a loop:

- ``recorded``: the recording's own frames, at their own spacing;
- ``key_on`` ... ``pull_away`` and ``stop`` ... ``idle`` (made-up phases, the bus awake): every
  recorded identifier at its recorded rate, its payload held from the recording's first frame
  (before) or last frame (after), with the modelled signals written in with the DBC
  (:data:`EDITS`: wheel speeds, speed, rpm and engine-running, pedal and torque, gear, the
  speedometer's speed); the Toyota checksum in the last byte is recomputed where the held
  frame carries a valid one;
- ``parked``: nothing (ignition off, the bus sleeps; agent.vehicle_state sees it parked);
- always: the VIN frames (0x580-0x582) carry the demo car's VIN and UI_SETTING's ODOMETER
  (miles, as the recording's UNITS say) the twin's odometer, so CAN and OBD name one car.

With ``speed`` above 1 each identifier is sent at most at its recorded rate in wall time (a
speed-100 drive would otherwise be 200,000 frames/s): frames are thinned, not hurried.

    python -m scripts.vehicle_sim.can_twin --spec run/demo/twin.json --interface udp_multicast \\
        --channel 239.74.1.2 --port 40000 --only can0
"""
from __future__ import annotations

import argparse
import bisect
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from statistics import median

import can

from scripts.vehicle_sim.replay import ReplayStats, Sender
from scripts.vehicle_sim.drive import Car, Drive, DriveClock, State, load_spec
from scripts.vehicle_sim.recording import RecordedFrame, dbc, load

log = logging.getLogger(__name__)

MILE_KM = 1.609344

#: DBC message -> the modelled signals written into held frames of the made-up phases
EDITS: dict[str, Callable[[State], dict[str, float]]] = {
    "WHEEL_SPEEDS": lambda s: {"WHEEL_SPEED_FL": s.wheel_kmh[0], "WHEEL_SPEED_FR": s.wheel_kmh[1],
                               "WHEEL_SPEED_RL": s.wheel_kmh[2], "WHEEL_SPEED_RR": s.wheel_kmh[3]},
    "SPEED": lambda s: {"SPEED": s.speedo_kmh},
    "ENGINE_RPM": lambda s: {"RPM": s.rpm, "ENGINE_RUNNING": int(s.running)},
    "GAS_PEDAL": lambda s: {"GAS_PEDAL": s.pedal_pct, "GAS_RELEASED": int(s.pedal_pct <= 0),
                            "ETQREAL": s.torque_nm, "ETQLVSC": s.torque_nm},
    "GEAR_PACKET": lambda s: {"GEAR": 0 if s.gear == "D" else 32, "DRIVE_ENGAGED": int(s.gear == "D")},
    "BODY_CONTROL_STATE_2": lambda s: {"UI_SPEED": round(s.speed_kmh)},
}


def toyota_checksum(arbitration_id: int, data: bytes) -> int:
    """The checksum Toyota puts in the last byte: id bytes + length + the other data bytes."""
    return ((arbitration_id >> 8) + (arbitration_id & 0xFF) + len(data) + sum(data[:-1])) & 0xFF


class _Writer:
    """Writes signals into a frame with the DBC, keeping every other bit of it."""

    def __init__(self, message, always: Callable[[State, "CanTwin"], dict[str, float]] | None = None,
                 model: Callable[[State], dict[str, float]] | None = None):
        self.message = message
        self.always = always
        self.model = model
        self._masks: dict[frozenset[str], int] = {}

    def _mask(self, names: frozenset[str]) -> int:
        mask = self._masks.get(names)
        if mask is None:
            raw = {s.name: (-1 if s.is_signed else (1 << s.length) - 1) if s.name in names else 0
                   for s in self.message.signals}
            mask = int.from_bytes(self.message.encode(raw, scaling=False, strict=False), "big")
            self._masks[names] = mask
        return mask

    def write(self, data: bytes, values: dict[str, float]) -> bytes:
        if not values:
            return data
        n = len(data)
        full = bytes(data) + b"\x00" * max(0, self.message.length - n)
        decoded = self.message.decode(full, decode_choices=False, scaling=True)
        decoded.update(values)
        encoded = int.from_bytes(self.message.encode(decoded, strict=False), "big")
        mask = self._mask(frozenset(values))
        old = int.from_bytes(full, "big")
        out = ((old & ~mask) | (encoded & mask)).to_bytes(len(full), "big")[:n]
        return out


@dataclass
class _Id:
    channel: str
    arbitration_id: int
    is_extended_id: bool
    period: float
    phase0: float            # first frame's time modulo the period (keeps ids spread out)
    before: bytes            # held before the recorded phase
    after: bytes             # held after it
    writer: _Writer | None
    checksum: bool           # the held frames carry a valid Toyota checksum


class CanTwin:
    """Frames of the twin's buses by drive time; :meth:`run` sends them as the clock goes."""

    def __init__(self, drive: Drive, clock: DriveClock, *, channels: Collection[str] | None = None,
                 rate_limit: bool = True):
        if drive.rec.frames is None:
            drive = Drive(drive.car, load(drive.rec.path, frames=True))
        self.drive = drive
        self.clock = clock
        self.rate_limit = rate_limit
        self.channels = set(channels) if channels is not None else None
        self.vin = drive.car.vin.encode("ascii")
        frames = [f for f in drive.rec.frames if self.channels is None or f.channel in self.channels]
        self._frames: list[RecordedFrame] = frames
        self._times = [f.t for f in frames]
        self._ids = self._index(frames)
        self._last_sent: dict[tuple[str, int], float] = {}
        self._rec = drive.phase["recorded"]
        self._synthetic = [p for p in drive.phases if p.name not in ("recorded", "parked")]

    def _index(self, frames: list[RecordedFrame]) -> dict[tuple[str, int], _Id]:
        db = dbc()
        times: dict[tuple[str, int], list[float]] = {}
        first: dict[tuple[str, int], RecordedFrame] = {}
        last: dict[tuple[str, int], RecordedFrame] = {}
        for f in frames:
            key = (f.channel, f.arbitration_id)
            times.setdefault(key, []).append(f.t)
            first.setdefault(key, f)
            last[key] = f
        vin_ids = {db.get_message_by_name(f"VIN_PART_{i}").frame_id: i for i in (1, 2, 3)}
        odometer = db.get_message_by_name("UI_SETTING").frame_id
        out = {}
        for key, ts in times.items():
            channel, arb = key
            period = median(b - a for a, b in zip(ts, ts[1:])) if len(ts) > 1 else self.drive.rec.duration_s
            writer = None
            try:
                message = db.get_message_by_frame_id(arb)
            except KeyError:
                message = None
            if message is not None and channel == "can0":
                always = None
                if arb in vin_ids:
                    part = vin_ids[arb]
                    always = lambda s, tw, part=part: {  # noqa: E731
                        f"VIN_{i}": tw.vin[i - 1] for i in range(8 * part - 7, min(17, 8 * part) + 1)}
                elif arb == odometer:
                    always = lambda s, tw: {"ODOMETER": int(s.odometer_km / MILE_KM)}  # noqa: E731
                model = EDITS.get(message.name)
                if always is not None or model is not None:
                    writer = _Writer(message, always, model)
            held = first[key].data, last[key].data
            checksum = all(len(d) > 1 and d[-1] == toyota_checksum(arb, d) for d in held)
            out[key] = _Id(channel, arb, first[key].is_extended_id, period, ts[0] % period,
                           held[0], held[1], writer, checksum)
        return out

    # -- frames by drive time ---------------------------------------------------------------------

    def _min_gap(self, info: _Id) -> float:
        return info.period * max(1.0, self.clock.speed) * 0.9 if self.rate_limit else 0.0

    def _finish(self, info: _Id, data: bytes, state: Callable[[], State], model: bool) -> bytes:
        writer = info.writer
        if writer is None:
            return data
        values: dict[str, float] = {}
        if writer.always is not None:
            values.update(writer.always(state(), self))
        if model and writer.model is not None:
            values.update(writer.model(state()))
        if not values:
            return data
        out = writer.write(data, values)
        if info.checksum:
            out = out[:-1] + bytes((toyota_checksum(info.arbitration_id, out),))
        return out

    def frames(self, t0: float, t1: float) -> Iterator[tuple[float, _Id, bytes]]:
        """``(drive time, identifier, payload)`` of the frames in ``(t0, t1]``, in time order."""
        drive = self.drive
        if t1 <= max(t0, 0.0):
            return
        n = int(max(t0, 0.0) // drive.loop_s)
        while n * drive.loop_s <= t1:
            base = n * drive.loop_s
            # loop-local window (a, b]; a < 0 takes the loop's first moment in
            yield from self._loop_frames(base, t0 - base, min(t1 - base, drive.loop_s))
            n += 1

    def _loop_frames(self, base: float, a: float, b: float) -> Iterator[tuple[float, _Id, bytes]]:
        out: list[tuple[float, _Id, bytes]] = []
        rec = self._rec
        for p in self._synthetic:
            if p.end > a and p.start <= b:
                out += self._synthetic_frames(base, p, a, b)
        if rec.end >= a and rec.start <= b:
            out += self._recorded_frames(base, a - rec.start, b - rec.start)
        out.sort(key=lambda x: x[0])
        return iter(out)

    def _synthetic_frames(self, base: float, p, a: float, b: float) -> list[tuple[float, _Id, bytes]]:
        """Held frames at each identifier's rate, ``u`` in ``(a, b]`` and in phase ``p``."""
        out = []
        before = p.start < self._rec.start
        speed = max(1.0, self.clock.speed) if self.rate_limit else 1.0
        lo, hi = max(a, p.start), min(b, p.end)
        for info in self._ids.values():
            step = info.period * speed
            k = max(0, int((lo - info.phase0) // step))
            while (u := info.phase0 + k * step) <= hi:
                if u > a and p.start <= u < p.end:
                    t = base + u
                    data = info.before if before else info.after
                    out.append((t, info, self._finish(info, data, lambda t=t: self.drive.at(t), True)))
                k += 1
        return out

    def _recorded_frames(self, base: float, lo: float, hi: float) -> list[tuple[float, _Id, bytes]]:
        """The recording's frames with recording time in ``(lo, hi]``."""
        out = []
        i = bisect.bisect_right(self._times, lo)
        j = bisect.bisect_right(self._times, hi)
        offset = base + self._rec.start
        thin = self.rate_limit and self.clock.speed > 1.0
        for f in self._frames[i:j]:
            key = (f.channel, f.arbitration_id)
            info = self._ids[key]
            t = offset + f.t
            if thin:
                last = self._last_sent.get(key)
                if last is not None and 0 <= t - last < self._min_gap(info):
                    continue
                self._last_sent[key] = t
            out.append((t, info, self._finish(info, f.data, lambda t=t: self.drive.at(t), False)))
        return out

    # -- sending ---------------------------------------------------------------------------------

    def run(self, bus: can.BusABC | Mapping[str, can.BusABC], *,
            channel_map: Mapping[str, str] | None = None, stop_event: threading.Event | None = None,
            tick_s: float = 0.01, max_lag_s: float = 1.0, send_timeout_s: float = 1.0) -> ReplayStats:
        """Sends the twin's frames as the drive clock goes, until ``stop_event``. ``bus`` and
        ``channel_map`` as in :func:`scripts.vehicle_sim.replay.replay`. Falling more than ``max_lag_s``
        behind, it skips ahead rather than burst."""
        stats = ReplayStats()
        sender = Sender(bus, channel_map, stats, send_timeout_s=send_timeout_s, what="twin CAN")
        stop_event = stop_event or threading.Event()
        last = self.clock.now()
        while not stop_event.wait(tick_s):
            now = self.clock.now()
            behind = (now - last) / self.clock.speed
            if behind > max_lag_s:
                last = now - max_lag_s * self.clock.speed
            for t, info, data in self.frames(last, now):
                sender.send(can.Message(timestamp=self.clock.wall(t), channel=info.channel,
                                        arbitration_id=info.arbitration_id,
                                        is_extended_id=info.is_extended_id, data=data),
                            info.channel)
            last = now
        return stats


def start_thread(twin: CanTwin, bus: can.BusABC | Mapping[str, can.BusABC], **kwargs) \
        -> tuple[threading.Thread, threading.Event]:
    """Runs :meth:`CanTwin.run` on a daemon thread; set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=twin.run, args=(bus,), kwargs={"stop_event": stop, **kwargs},
                              name="can-twin", daemon=True)
    thread.start()
    return thread, stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.vehicle_sim.can_twin",
                                description="The twin's CAN buses, on the drive clock of a spec file")
    p.add_argument("--spec", required=True, help="twin.json (scripts.vehicle_sim.drive.save_spec)")
    p.add_argument("--interface", default="virtual", help="python-can interface (default virtual)")
    p.add_argument("--channel", required=True, help="channel of that interface, e.g. vcan0")
    p.add_argument("--port", type=int, default=None, help="udp_multicast: UDP port")
    p.add_argument("--bitrate", type=int, default=None)
    p.add_argument("--only", action="append", metavar="CHANNEL",
                   help="send only this recorded channel (repeatable), e.g. --only can0")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    car, clock, _ = load_spec(args.spec)
    twin = CanTwin(Drive(car, load(frames=True)), clock, channels=args.only)
    kwargs = {"interface": args.interface, "channel": args.channel}
    if args.port:
        kwargs["port"] = args.port
    if args.bitrate:
        kwargs["bitrate"] = args.bitrate
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("twin CAN: %s (VIN %s) at drive time %.1f s, speed x%g", car.name, car.vin,
             clock.now(), clock.speed)
    with can.Bus(**kwargs) as bus:
        stats = twin.run(bus, stop_event=stop)
    print(f"sent {stats.sent} frames; failed {stats.failed}, skipped {stats.skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plain data types that flow from the drivers through the pipeline into the store.

Drivers (OBD, CAN, UDS, GNSS) produce these; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Sample(NamedTuple):
    """One value of one configured signal.

    ``name`` is the name the active cloud config gives the signal (PROTOCOL §4), ``unit`` a
    short unit text (``"rpm"``, ``"km/h"``, ``"degC"``, ``"%"``, ``"V"``; ``""`` for none),
    ``t_ms`` the sampling time in ms since the Unix epoch. A named tuple rather than a frozen
    dataclass: a busy car makes hundreds a second, and a tuple is made in a fifth of the time.
    """

    name: str
    unit: str
    t_ms: int
    value: float


@dataclass(frozen=True, slots=True)
class Frame:
    """One raw CAN frame as captured (PROTOCOL §4 telemetry ``frames``).

    ``t_us`` is the capture time in µs since the Unix epoch.
    """

    bus: str
    t_us: int
    can_id: int
    extended: bool
    data: bytes


#: Set in a :class:`FrameBatch` key for an extended (29-bit) id, so it cannot collide with an
#: 11-bit one: ``key = can_id | EXT_FLAG`` when extended, ``can_id`` when not.
EXT_FLAG = 0x8000_0000
STD_MAX = 0x7FF
EXT_MAX = 0x1FFF_FFFF


class FrameBatch:
    """Frames of one bus as parallel columns: the CAN path's unit of work, with no object per
    frame (a busy car delivers thousands of frames a second; a :class:`Frame` each would cost
    more than everything else the agent does with them).

    ``t_us``: capture times, µs since the epoch; ``keys``: CAN id, ``| EXT_FLAG`` when extended;
    ``data``: payloads (``bytes`` or ``bytearray``). Iterating yields :class:`Frame` objects, for
    the few consumers that want them (a technician's capture, tests).
    """

    __slots__ = ("bus", "t_us", "keys", "data")

    def __init__(self, bus: str, t_us: list[int], keys: list[int], data: list):
        self.bus = bus
        self.t_us = t_us
        self.keys = keys
        self.data = data

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        bus = self.bus
        for t, k, d in zip(self.t_us, self.keys, self.data):
            yield Frame(bus, t, k & EXT_MAX, k >= EXT_FLAG, bytes(d))

    def __repr__(self) -> str:
        return f"FrameBatch({self.bus!r}, {len(self)} frames)"

    def take(self, index: list[int]) -> FrameBatch:
        """The frames at ``index`` (in that order)."""
        t, k, d = self.t_us, self.keys, self.data
        return FrameBatch(self.bus, [t[i] for i in index], [k[i] for i in index], [d[i] for i in index])

    @staticmethod
    def of(frames) -> list[FrameBatch]:
        """:class:`Frame` objects (any buses, any order) as one batch per bus, in arrival order."""
        out: dict[str, FrameBatch] = {}
        for f in frames:
            b = _batch_of(out, f.bus)
            b.t_us.append(f.t_us)
            b.keys.append(f.can_id | EXT_FLAG if f.extended else f.can_id)
            b.data.append(f.data)
        return list(out.values())

    @staticmethod
    def join(batches) -> list[FrameBatch]:
        """Batches (any buses) merged into one per bus, each bus's frames in the given order."""
        out: dict[str, FrameBatch] = {}
        for b in batches:
            into = _batch_of(out, b.bus)
            into.t_us += b.t_us
            into.keys += b.keys
            into.data += b.data
        return list(out.values())


def _batch_of(batches: dict[str, FrameBatch], bus: str) -> FrameBatch:
    b = batches.get(bus)
    if b is None:
        b = batches[bus] = FrameBatch(bus, [], [], [])
    return b


def frame_problem(can_id: int, extended: bool, length: int, fd: bool = False) -> str | None:
    """Why a frame cannot be a PROTOCOL §4 frame (None when it can): the id out of range for its
    form (11-bit at most 0x7FF, 29-bit at most 0x1FFFFFFF), or more payload than a classic frame
    (8 bytes) or a CAN FD frame (64) carries."""
    if can_id < 0 or can_id > (EXT_MAX if extended else STD_MAX):
        return f"{'29' if extended else '11'}-bit id {can_id:#x} out of range"
    if length > (64 if fd else 8):
        return f"{length} data bytes on a{' CAN FD' if fd else ' classic'} frame"
    return None

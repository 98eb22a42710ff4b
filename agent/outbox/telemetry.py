"""Builds the columnar telemetry body of PROTOCOL §4 from stored samples and frames (pure).

The body is valid by construction, so it is not validated again before sealing (a JSON Schema
walk costs ~50 µs per raw frame): what goes in was checked where it entered — frames by the CAN
reader (id range for the form, payload length) and again as stored blocks are read
(agent.outbox.frame_blocks), sample values by the store (finite numbers) — and this module only
rearranges it. Sizes come from what the format leaves open (docs/store.md, "Wire format choices"):

* values that are whole numbers are sent as CBOR integers (1–3 bytes for typical values);
  other values are rounded to the nearest IEEE float32 (7 significant digits — finer than any
  OBD or DBC signal's resolution), which the deterministic CBOR of the envelope then writes in
  5 bytes instead of 9;
* frame times, ``frame_t``: ``"t"`` (offsets from ``t0``; the default) with each bus's frames
  ordered by (id, time): payloads of one id sit next to each other and their offsets rise in
  steps of the id's period, which zstd compresses far better (about 20 % smaller on the real
  RAV4 drive); or ``"dt"`` (PROTOCOL rev 1.1: time steps) with each bus's frames in time order,
  as that form requires. On the RAV4 drive ``"t"`` is the smaller (docs/performance.md). Columns
  stay aligned either way; a receiver that wants time order sorts by time.
"""
from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterable

from drivers.core.model import EXT_FLAG, EXT_MAX, Frame, FrameBatch, Sample

_F32 = struct.Struct("<f")
_F32_MAX = 3.4e38
FRAME_T = ("t", "dt")


def wire_value(v: float) -> int | float:
    """The value as sent: an int if whole, else the nearest float32 (a float64 if out of range)."""
    f = float(v)
    if f.is_integer() and abs(f) < 2**53:
        return int(f)
    if not math.isfinite(f) or abs(f) > _F32_MAX or (f != 0 and abs(f) < 1e-30):
        return f
    return _F32.unpack(_F32.pack(f))[0]


class FrameColumns:
    """The raw frames of one envelope: one :class:`FrameBatch` per bus, frames in arrival order
    (the body puts them in wire order)."""

    def __init__(self, batches: Iterable[FrameBatch] = ()) -> None:
        self.buses: dict[str, FrameBatch] = {}
        for b in batches:
            self.add(b)

    def add(self, batch: FrameBatch) -> None:
        have = self.buses.get(batch.bus)
        if have is None:
            self.buses[batch.bus] = FrameBatch(batch.bus, list(batch.t_us), list(batch.keys), list(batch.data))
        else:
            have.t_us += batch.t_us
            have.keys += batch.keys
            have.data += batch.data

    def __len__(self) -> int:
        return sum(map(len, self.buses.values()))

    @property
    def min_t_us(self) -> int | None:
        return min((min(b.t_us) for b in self.buses.values() if b.t_us), default=None)

    @classmethod
    def of(cls, frames: Iterable[Frame]) -> FrameColumns:
        return cls(FrameBatch.of(frames))


def _frame_group(b: FrameBatch, t0_us: int, frame_t: str) -> dict:
    """One bus's frames as a ``frames`` list of the body, in wire order (see the module doc)."""
    t, k, d = b.t_us, b.keys, b.data
    order = sorted(range(len(k)), key=t.__getitem__)            # stable: ties keep arrival order
    if frame_t == "t":
        order.sort(key=k.__getitem__)                            # by (ext, id), then time
    ts = list(map(t0_us.__rsub__, map(t.__getitem__, order)))
    keys = list(map(k.__getitem__, order))
    data = list(map(d.__getitem__, order))
    if frame_t == "t":
        n_std = bisect.bisect_left(keys, EXT_FLAG)                  # sorted: 11-bit ids first
        ext = [False] * n_std + [True] * (len(keys) - n_std)
        ids = keys[:n_std] + [x & EXT_MAX for x in keys[n_std:]]
        return {"bus": b.bus, "t": ts, "id": ids, "ext": ext, "data": data}
    ext = [x >= EXT_FLAG for x in keys]
    ids = [x & EXT_MAX for x in keys]
    dt = [y - x for x, y in zip([0] + ts, ts)]
    return {"bus": b.bus, "dt": dt, "id": ids, "ext": ext, "data": data}


def telemetry_body(samples: list[Sample], frames: FrameColumns | Iterable[Frame], *,
                   frame_t: str = "t") -> dict:
    """``t0`` is the earliest time in the batch (ms); signal offsets are ms, frame times µs in the
    form ``frame_t`` (``"t"`` or ``"dt"``, see the module doc).

    Signals keep the order in which each (name, unit) first appears; values keep their order.
    Frame lists are one per bus, buses in name order.
    """
    if frame_t not in FRAME_T:
        raise ValueError(f"frame_t must be 't' or 'dt', not {frame_t!r}")
    cols = frames if isinstance(frames, FrameColumns) else FrameColumns.of(frames)
    times = [s.t_ms for s in samples]
    min_us = cols.min_t_us
    if min_us is not None:
        times.append(min_us // 1000)
    t0 = min(times) if times else 0
    signals: dict[tuple[str, str], dict] = {}
    for s in samples:
        col = signals.get((s.name, s.unit))
        if col is None:
            col = signals[(s.name, s.unit)] = {"name": s.name, "unit": s.unit, "t": [], "v": []}
        col["t"].append(s.t_ms - t0)
        col["v"].append(wire_value(s.value))
    body: dict = {"t0": t0, "signals": list(signals.values())}
    if min_us is not None:
        body["frames"] = [_frame_group(cols.buses[bus], t0 * 1000, frame_t) for bus in sorted(cols.buses)]
    return body


def frame_times(group: dict) -> list[int]:
    """A received ``frames`` list's times as offsets from ``t0`` (µs), whichever form it carries
    (``t``, or rev 1.1 ``dt``): what a cloud reader does."""
    if "t" in group:
        return list(group["t"])
    out, acc = [], 0
    for step in group["dt"]:
        acc += step
        out.append(acc)
    return out

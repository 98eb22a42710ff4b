"""Builds the columnar telemetry body of PROTOCOL §4 from stored samples and frames (pure).

The format is fixed by the protocol (``t`` is an offset from ``t0``, never a per-element
delta); the size comes from what the format leaves open (docs/store.md, "Wire format choices"):

* values that are whole numbers are sent as CBOR integers (1–3 bytes for typical values);
  other values are rounded to the nearest IEEE float32 (7 significant digits — finer than any
  OBD or DBC signal's resolution), which the deterministic CBOR of the envelope then writes in
  5 bytes instead of 9;
* raw frames are ordered per bus by (id, time), not by time alone: payloads of one id sit
  next to each other and their offsets rise in steps of the id's period, which zstd compresses
  far better (about 20 % smaller on the real RAV4 drive). Columns stay aligned, so a receiver
  that wants time order sorts by ``t``.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterable

from drivers.core.model import Frame, Sample

_F32 = struct.Struct("<f")
_F32_MAX = 3.4e38


def wire_value(v: float) -> int | float:
    """The value as sent: an int if whole, else the nearest float32 (a float64 if out of range)."""
    f = float(v)
    if f.is_integer() and abs(f) < 2**53:
        return int(f)
    if not math.isfinite(f) or abs(f) > _F32_MAX or (f != 0 and abs(f) < 1e-30):
        return f
    return _F32.unpack(_F32.pack(f))[0]


class FrameColumns:
    """Raw frames as the columns of PROTOCOL §4 ``frames``: one group per bus, rows in the order
    they are added, ``t`` still absolute (µs since the epoch) until :func:`telemetry_body` makes
    it an offset from ``t0``.

    This is how a batch of frames is held while it is sealed: four flat columns per bus instead
    of a ``Frame`` object per row (a full batch is ~27,000 frames; this way its working set is
    about a third). Rows should arrive in wire order, :data:`WIRE_ORDER` (the store sorts them
    in SQL); :meth:`of` sorts ``Frame`` objects into it.
    """

    #: The order of rows on the wire, as ``frames`` columns of the store (see the module docstring).
    WIRE_ORDER = ("bus", "ext", "can_id", "t_us")

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}
        self.min_t_us: int | None = None
        self._n = 0
        self._ids: dict[int, int] = {}  # one int object per distinct id, not one per row

    def add(self, bus: str, t_us: int, can_id: int, ext: bool, data: bytes) -> None:
        col = self.groups.get(bus)
        if col is None:
            col = self.groups[bus] = {"bus": bus, "t": [], "id": [], "ext": [], "data": []}
        col["t"].append(t_us)
        col["id"].append(self._ids.setdefault(can_id, can_id))
        col["ext"].append(bool(ext))
        col["data"].append(data)
        if self.min_t_us is None or t_us < self.min_t_us:
            self.min_t_us = t_us
        self._n += 1

    def __len__(self) -> int:
        return self._n

    @classmethod
    def of(cls, frames: Iterable[Frame]) -> FrameColumns:
        cols = cls()
        for f in sorted(frames, key=lambda f: (f.bus, f.extended, f.can_id, f.t_us)):
            cols.add(f.bus, f.t_us, f.can_id, f.extended, f.data)
        return cols


def telemetry_body(samples: list[Sample], frames: Iterable[Frame] | FrameColumns) -> dict:
    """``t0`` is the earliest time in the batch (ms); signal offsets are ms, frame offsets µs.

    Signals keep the order in which each (name, unit) first appears; values keep their order.
    ``frames`` given as :class:`FrameColumns` become the body's columns (their ``t`` is turned
    into offsets in place).
    """
    cols = frames if isinstance(frames, FrameColumns) else FrameColumns.of(frames)
    times = [s.t_ms for s in samples]
    if cols.min_t_us is not None:
        times.append(cols.min_t_us // 1000)
    t0 = min(times) if times else 0
    signals: dict[tuple[str, str], dict] = {}
    for s in samples:
        col = signals.get((s.name, s.unit))
        if col is None:
            col = signals[(s.name, s.unit)] = {"name": s.name, "unit": s.unit, "t": [], "v": []}
        col["t"].append(s.t_ms - t0)
        col["v"].append(wire_value(s.value))
    body: dict = {"t0": t0, "signals": list(signals.values())}
    if len(cols):
        t0_us = t0 * 1000
        for group in cols.groups.values():
            t = group["t"]
            for i in range(len(t)):
                t[i] -= t0_us
        body["frames"] = list(cols.groups.values())
    return body


# -- validation ----------------------------------------------------------------------------
# jsonschema walks every element of every column: ~50 µs per raw frame, i.e. about a second
# for a full 128 KiB envelope — more than building, compressing and encrypting it together.
# The same rules (config/schemas/telemetry.json plus its in-code checks) are applied here
# column by column; jsonschema still checks the structure, on a copy with every column cut to
# its first element.

_UINT_MAX = 2**64 - 1
_POS_RANGES = {"lat": (-90, 90), "lon": (-180, 180), "speed": (0, math.inf), "course": (0, 360)}


def _bad(where: str, what: str):
    from agent.cloud.schemas import SchemaError
    raise SchemaError("telemetry", f"{where}: {what}")


def _uints(col, where: str) -> None:
    for x in col:
        if type(x) is not int or x < 0 or x > _UINT_MAX:
            _bad(where, f"{x!r} is not an unsigned integer")


def _numbers(col, where: str, lo: float = -math.inf, hi: float = math.inf) -> None:
    for x in col:
        if type(x) not in (int, float) or not math.isfinite(x) or not lo <= x <= hi:
            _bad(where, f"{x!r} is not a finite number in [{lo}, {hi}]")


def _same_length(group: dict, keys: tuple[str, ...], where: str) -> None:
    lengths = {k: len(group[k]) for k in keys if isinstance(group.get(k), list)}
    if len(set(lengths.values())) > 1:
        _bad(where, f"columns differ in length: {lengths}")


def _skeleton(body: dict) -> dict:
    def cut(group: dict) -> dict:
        return {k: (v[:1] if isinstance(v, list) else v) for k, v in group.items()}
    out = dict(body)
    if isinstance(body.get("signals"), list):
        out["signals"] = [cut(s) if isinstance(s, dict) else s for s in body["signals"]]
    if isinstance(body.get("frames"), list):
        out["frames"] = [cut(f) if isinstance(f, dict) else f for f in body["frames"]]
    if isinstance(body.get("positions"), dict):
        out["positions"] = cut(body["positions"])
    return out


def validate_telemetry(body: dict) -> None:
    """Raises ``agent.schemas.SchemaError`` unless ``body`` is a valid telemetry body.

    Equivalent to ``agent.schemas.validate("telemetry", body)``, in linear time with a small
    constant."""
    from agent.cloud import schemas
    schemas.validate("telemetry", _skeleton(body))
    for i, s in enumerate(body["signals"]):
        _same_length(s, ("t", "v"), f"signals[{i}]")
        _uints(s["t"], f"signals[{i}].t")
        _numbers(s["v"], f"signals[{i}].v")
    for i, g in enumerate(body.get("frames", ())):
        where = f"frames[{i}]"
        _same_length(g, ("t", "id", "ext", "data"), where)
        _uints(g["t"], f"{where}.t")
        for can_id, ext, data in zip(g["id"], g["ext"], g["data"]):
            if type(ext) is not bool:
                _bad(f"{where}.ext", f"{ext!r} is not a boolean")
            if type(can_id) is not int or can_id < 0 or can_id > (0x1FFFFFFF if ext else 0x7FF):
                _bad(f"{where}.id", f"{can_id!r} is not a valid {'extended' if ext else 'standard'} id")
            if type(data) is not bytes or len(data) > 64:
                _bad(f"{where}.data", "not a byte string of at most 64 bytes")
    pos = body.get("positions")
    if pos is not None:
        _same_length(pos, ("t", "lat", "lon", "speed", "course"), "positions")
        _uints(pos["t"], "positions.t")
        for k, (lo, hi) in _POS_RANGES.items():
            _numbers(pos[k], f"positions.{k}", lo, hi)

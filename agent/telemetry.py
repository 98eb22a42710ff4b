"""Builds the columnar telemetry body of PROTOCOL §4 from stored samples and frames (pure)."""
from __future__ import annotations

from agent.model import Frame, Sample


def telemetry_body(samples: list[Sample], frames: list[Frame]) -> dict:
    """``t0`` is the earliest time in the batch (ms); signal offsets are ms, frame offsets µs.

    Signals keep the order in which each (name, unit) first appears; values keep their order.
    """
    times = [s.t_ms for s in samples] + [f.t_us // 1000 for f in frames]
    t0 = min(times) if times else 0
    signals: dict[tuple[str, str], dict] = {}
    for s in samples:
        col = signals.get((s.name, s.unit))
        if col is None:
            col = signals[(s.name, s.unit)] = {"name": s.name, "unit": s.unit, "t": [], "v": []}
        col["t"].append(s.t_ms - t0)
        v = s.value
        col["v"].append(int(v) if float(v).is_integer() and abs(v) < 2**53 else v)
    body: dict = {"t0": t0, "signals": list(signals.values())}
    if frames:
        t0_us = t0 * 1000
        buses: dict[str, dict] = {}
        for f in frames:
            col = buses.get(f.bus)
            if col is None:
                col = buses[f.bus] = {"bus": f.bus, "t": [], "id": [], "ext": [], "data": []}
            col["t"].append(f.t_us - t0_us)
            col["id"].append(f.can_id)
            col["ext"].append(f.extended)
            col["data"].append(f.data)
        body["frames"] = list(buses.values())
    return body

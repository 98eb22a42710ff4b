"""Numbers shown to people: at the resolution of their signal (agent/technician/resolution.py)."""
from __future__ import annotations

from agent.technician import resolution


def assert_shown_at_resolution(signals) -> None:
    """Each value has no more decimals than its resolution needs (e.g. 33.7 %, not 33.7255 %)."""
    for s in signals:
        places = resolution.decimals(s["resolution"])
        if places is not None:
            assert s["value"] == round(s["value"], places), s
            assert len(repr(float(s["value"])).partition(".")[2]) <= max(places, 1), s

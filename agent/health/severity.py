"""How serious a set of trouble codes is, for the owner's app and the ``dongle dtc`` view.

- ``critical``: a code that means "stop soon" — misfire (P0300-P0312, the MIL flashes for these
  when catalyst-damaging), engine over-temperature (P0217), oil pressure (P0520-P0524), and any
  code with the MIL on that is in the brake/ABS/airbag (C0/B0 generic) families;
- ``warn``: the MIL is on, or any stored or permanent code;
- ``info``: pending codes only (the ECU saw a fault once, not yet confirmed);
- ``ok``: nothing.
"""
from __future__ import annotations

import re

CRITICAL = [re.compile(p) for p in (r"^P030[0-9]$", r"^P031[0-2]$", r"^P0217$", r"^P052[0-4]$")]
CRITICAL_WITH_MIL = [re.compile(p) for p in (r"^C0", r"^B0")]


def code_severity(code: str, state: str, mil: bool) -> str:
    code = code.upper()
    if state in ("stored", "permanent") and any(p.match(code) for p in CRITICAL):
        return "critical"
    if mil and state != "pending" and any(p.match(code) for p in CRITICAL_WITH_MIL):
        return "critical"
    return "warn" if state in ("stored", "permanent") else "info"


def severity(codes: list[dict], mil: bool) -> str:
    """``codes`` as in a ``dtc`` event (``code``, ``state``)."""
    levels = [code_severity(c["code"], c.get("state", "stored"), mil) for c in codes]
    if mil:
        levels.append("warn")
    order = ("ok", "info", "warn", "critical")
    return max(levels, key=order.index, default="ok")

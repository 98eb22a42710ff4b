"""Vehicle Identification Number checks (ISO 3779; check digit per 49 CFR 565 for North America)."""
from __future__ import annotations

import re

_VIN_RE = re.compile(r"^[A-HJ-NPR-Z0-9]{17}$")
_TRANSLIT = {**{str(d): d for d in range(10)},
             **dict(zip("ABCDEFGH", range(1, 9))), **dict(zip("JKLMN", range(1, 6))),
             "P": 7, "R": 9, **dict(zip("STUVWXYZ", range(2, 10)))}
_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)


def check_digit(vin: str) -> str:
    total = sum(_TRANSLIT[c] * w for c, w in zip(vin, _WEIGHTS))
    r = total % 11
    return "X" if r == 10 else str(r)


def validate(vin: str | None) -> tuple[bool, str]:
    """Returns (valid, reason). The check digit (position 9) is mandatory only for vehicles made
    for North America (WMI starting 1–5); elsewhere it is checked only as the 17-character
    alphabet and length, since European and Asian VINs often carry no check digit."""
    if not vin:
        return False, "no VIN"
    if len(vin) != 17:
        return False, f"length {len(vin)}, not 17"
    if not _VIN_RE.match(vin):
        return False, "characters outside the VIN alphabet (I, O, Q or non-alphanumeric)"
    if vin[0] in "12345" and check_digit(vin) != vin[8]:
        return False, f"check digit {vin[8]} does not match {check_digit(vin)}"
    return True, "ok"

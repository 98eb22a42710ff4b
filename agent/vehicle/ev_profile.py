"""EV battery profiles: what to ask a car's battery ECU and how to read the answer.

A profile is a data file, ``config/ev_profiles/<name>.json``, never code. It lists requests —
ECU addresses, the service (``0x22`` ReadDataByIdentifier, ``0x21`` ReadDataByLocalIdentifier,
``0x01`` standard OBD-II mode 01) and the identifier — and, per request, the signals inside the
positive answer. This module loads and checks profiles, decodes answers into values, encodes
values into answers (the ECU simulator uses that), and picks a profile from a VIN.

Signal layout (all of it restated from the public sources each profile names):

- ``bit``: first bit of the field, counted MSB-first from the first byte **after** the response
  service id and the echoed identifier (``62 01 05 | <bit 0 here>``), so byte *n* starts at
  bit ``8 * n``; ``len``: field width in bits; ``order``: ``"big"`` (default) or ``"little"``
  (byte order of a byte-aligned field);
- ``signed``: two's complement; value = ``raw * factor / divisor + offset``;
- ``range`` ``[lo, hi]``: sanity limits. A value outside them is **rejected** (not clamped, not
  emitted) and counted, so a corrupted or misunderstood answer never becomes a reading;
- ``invalid``: raw values that mean "not available" (``0xFF`` …): rejected the same way;
- ``when_len``: the answer lengths (data bytes after service id + identifier) the field exists
  in — the Nissan Leaf's LBC answers 21 01 with 39, 41 or 51 data bytes and the fields move;
- ``array`` ``{"count", "step_bits", "first_index"}``: ``count`` equal fields ``step_bits``
  apart (cell voltages, module temperatures). The signal's name gets ``.<index>`` appended.

Every request has ``min_len`` (data bytes); a shorter answer yields nothing (it is counted).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from drivers.core.local_file import LocalFileError

log = logging.getLogger(__name__)

#: Services a profile may use, and the number of identifier bytes each echoes in its answer.
SERVICES: dict[int, int] = {0x22: 2, 0x21: 1, 0x01: 1}

#: Addressing modes: ``normal_11bit`` (7E4 → 7EC), ``normal_29bit`` (explicit 29-bit ids, e.g.
#: VW MEB 17FC007B → 17FE007B) and ``normal_fixed_29bit`` (ISO 15765-2 18DA<TA><SA>).
ADDRESSING = ("normal_11bit", "normal_29bit", "normal_fixed_29bit")

_NAME_RE = re.compile(r"^ev\.[a-z0-9_]+(\.[0-9]+)?$")


class ProfileError(ValueError):
    """A profile file is malformed; the message names the file and the offending entry."""


@dataclass(frozen=True)
class Field:
    """One decoded quantity of one request (an array field is expanded into several)."""

    name: str
    unit: str
    bit: int
    len: int
    signed: bool = False
    order: str = "big"
    factor: float = 1.0
    divisor: float = 1.0
    offset: float = 0.0
    lo: float = -math.inf
    hi: float = math.inf
    invalid: frozenset[int] = frozenset()
    when_len: frozenset[int] | None = None
    refs: Mapping[str, str] = field(default_factory=dict)  # OBDb vehicle → signal id

    def applies(self, data_len: int) -> bool:
        return (self.when_len is None or data_len in self.when_len) \
            and self.bit + self.len <= 8 * data_len

    def raw(self, data: bytes) -> int:
        if self.order == "little":
            start = self.bit // 8
            value = int.from_bytes(data[start:start + self.len // 8], "little")
        else:
            nbits = 8 * len(data)
            value = (int.from_bytes(data, "big") >> (nbits - self.bit - self.len)) \
                & ((1 << self.len) - 1)
        if self.signed and value >= 1 << (self.len - 1):
            value -= 1 << self.len
        return value

    def scale(self, raw: int) -> float:
        return raw * self.factor / self.divisor + self.offset

    def decode(self, data: bytes) -> float | None:
        """The value, or ``None`` when the field is absent, marked invalid or out of range."""
        if not self.applies(len(data)):
            return None
        raw = self.raw(data)
        if raw in self.invalid:
            return None
        value = self.scale(raw)
        if not (self.lo <= value <= self.hi):
            return None
        return value

    def encode_into(self, data: bytearray, value: float) -> None:
        """Writes ``value`` into ``data`` (the simulator's direction); rounds to the nearest raw."""
        raw = round((value - self.offset) * self.divisor / self.factor)
        top = (1 << (self.len - 1)) - 1 if self.signed else (1 << self.len) - 1
        bottom = -(1 << (self.len - 1)) if self.signed else 0
        raw = max(bottom, min(top, raw)) & ((1 << self.len) - 1)
        if self.order == "little":
            start = self.bit // 8
            data[start:start + self.len // 8] = raw.to_bytes(self.len // 8, "little")
            return
        nbits = 8 * len(data)
        shift = nbits - self.bit - self.len
        whole = int.from_bytes(data, "big")
        whole &= ~(((1 << self.len) - 1) << shift)
        whole |= raw << shift
        data[:] = whole.to_bytes(len(data), "big")


@dataclass(frozen=True)
class Request:
    """One request of a profile: who to ask, what, and the fields of the answer."""

    key: str
    ecu: str
    tx: int
    rx: int
    addressing: str
    service: int
    ident: int
    min_len: int
    fields: tuple[Field, ...]
    length: int | None = None  # the answer length the simulator produces (data bytes)

    @property
    def ident_len(self) -> int:
        return SERVICES[self.service]

    @property
    def payload(self) -> bytes:
        """The request bytes: service id + identifier."""
        return bytes([self.service]) + self.ident.to_bytes(self.ident_len, "big")

    @property
    def extended(self) -> bool:
        return self.addressing != "normal_11bit"

    def data_of(self, response: bytes) -> bytes | None:
        """The data bytes of a positive answer to this request, or ``None`` when ``response``
        is not one (other service, other identifier, negative answer)."""
        head = bytes([self.service + 0x40]) + self.ident.to_bytes(self.ident_len, "big")
        if not response.startswith(head):
            return None
        return bytes(response[len(head):])

    def decode(self, response: bytes) -> dict[str, float] | None:
        """``{signal name: value}`` from a full positive answer (service id included); ``None``
        when it is not an answer to this request or shorter than ``min_len``. Fields that are
        invalid or out of range are left out."""
        data = self.data_of(response)
        if data is None or len(data) < self.min_len:
            return None
        return self.decode_data(data)

    def decode_data(self, data: bytes) -> dict[str, float]:
        out: dict[str, float] = {}
        for f in self.fields:
            value = f.decode(data)
            if value is not None:
                out[f.name] = value
        return out

    def encode(self, values: Mapping[str, float], length: int | None = None) -> bytes:
        """A positive answer carrying ``values`` (fields without a value stay zero)."""
        n = length or self.length or self.min_len
        data = bytearray(n)
        for f in self.fields:
            if f.name in values and (f.when_len is None or n in f.when_len) \
                    and f.bit + f.len <= 8 * n:
                f.encode_into(data, values[f.name])
        return bytes([self.service + 0x40]) + self.ident.to_bytes(self.ident_len, "big") + bytes(data)


@dataclass(frozen=True)
class VinRule:
    wmi: tuple[str, ...]
    pattern: re.Pattern[str] | None  # on the whole VIN


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    vehicles: tuple[str, ...]
    sources: tuple[Mapping[str, Any], ...]
    requests: tuple[Request, ...]
    vin_rules: tuple[VinRule, ...]
    identify: str | None  # key of the request whose positive answer confirms the profile
    probe_order: int
    doc: Mapping[str, Any]

    def request(self, key: str) -> Request:
        for r in self.requests:
            if r.key == key:
                return r
        raise KeyError(key)

    @property
    def signals(self) -> list[str]:
        """Every signal name the profile can produce (array elements included)."""
        seen: dict[str, None] = {}
        for r in self.requests:
            for f in r.fields:
                seen.setdefault(f.name)
        return list(seen)

    def matches_vin(self, vin: str | None) -> int:
        """2 = manufacturer and model code match, 1 = manufacturer only, 0 = no match."""
        if not vin:
            return 0
        vin = vin.upper()
        best = 0
        for rule in self.vin_rules:
            if vin[:3] in rule.wmi:
                best = max(best, 1)
                if rule.pattern is not None and rule.pattern.search(vin):
                    return 2
        return best


# -- loading ------------------------------------------------------------------------------------

def _hex(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16)
        except ValueError:
            pass
    raise ProfileError(f"{what}: {value!r} is not a hex number")


def _fields(spec: Mapping[str, Any], where: str) -> list[Field]:
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProfileError(f"{where}: signal name {name!r} is not ev.<lower_case>")
    try:
        bit, length = int(spec["bit"]), int(spec["len"])
    except (KeyError, TypeError, ValueError):
        raise ProfileError(f"{where} {name}: needs integer 'bit' and 'len'") from None
    order = spec.get("order", "big")
    if order not in ("big", "little") or length < 1 or bit < 0:
        raise ProfileError(f"{where} {name}: bad bit/len/order")
    if order == "little" and (bit % 8 or length % 8):
        raise ProfileError(f"{where} {name}: little-endian fields must be byte aligned")
    lo, hi = spec.get("range", [-math.inf, math.inf])
    when = spec.get("when_len")
    common = dict(
        unit=str(spec.get("unit", "")), len=length, signed=bool(spec.get("signed", False)),
        order=order, factor=float(spec.get("factor", 1)), divisor=float(spec.get("divisor", 1)),
        offset=float(spec.get("offset", 0)), lo=float(lo), hi=float(hi),
        invalid=frozenset(int(x, 16) if isinstance(x, str) else int(x) for x in spec.get("invalid", [])),
        when_len=frozenset(int(x) for x in when) if when else None)
    if common["divisor"] == 0:
        raise ProfileError(f"{where} {name}: divisor 0")
    array = spec.get("array")
    refs = spec.get("obdb", {})
    if not array:
        return [Field(name=name, bit=bit, refs=dict(refs), **common)]
    count, step = int(array["count"]), int(array.get("step_bits", length))
    first = int(array.get("first_index", 1))
    out = []
    for i in range(count):
        index = first + i
        out.append(Field(name=f"{name}.{index}", bit=bit + i * step,
                         refs={v: t.format(index=index) for v, t in refs.items()}, **common))
    return out


def parse_profile(doc: Mapping[str, Any], origin: str = "<profile>") -> Profile:
    """A :class:`Profile` from its JSON document; :class:`ProfileError` if malformed."""
    try:
        name = doc["name"]
        raw_requests = doc["requests"]
    except KeyError as e:
        raise ProfileError(f"{origin}: missing {e.args[0]!r}") from None
    if not doc.get("sources"):
        raise ProfileError(f"{origin}: a profile must name its public sources")
    requests: list[Request] = []
    keys: set[str] = set()
    for i, r in enumerate(raw_requests):
        where = f"{origin} request {r.get('key', i)}"
        service = _hex(r.get("service"), f"{where} service")
        if service not in SERVICES:
            raise ProfileError(f"{where}: service 0x{service:02X} not supported")
        addressing = r.get("addressing", "normal_11bit")
        if addressing not in ADDRESSING:
            raise ProfileError(f"{where}: addressing {addressing!r} unknown")
        key = r.get("key")
        if not key or key in keys:
            raise ProfileError(f"{where}: missing or duplicate key")
        keys.add(key)
        fields: list[Field] = []
        for s in r.get("signals", []):
            fields.extend(_fields(s, where))
        requests.append(Request(
            key=key, ecu=str(r.get("ecu", "")), tx=_hex(r["tx"], f"{where} tx"),
            rx=_hex(r["rx"], f"{where} rx"), addressing=addressing, service=service,
            ident=_hex(r["id"], f"{where} id"), min_len=int(r.get("min_len", 0)),
            fields=tuple(fields), length=int(r["length"]) if "length" in r else None))
    rules = []
    for rule in doc.get("vin", []):
        pattern = rule.get("pattern")
        rules.append(VinRule(wmi=tuple(w.upper() for w in rule.get("wmi", [])),
                             pattern=re.compile(pattern) if pattern else None))
    identify = doc.get("identify")
    if identify is not None and identify not in keys:
        raise ProfileError(f"{origin}: identify names unknown request {identify!r}")
    return Profile(name=name, title=str(doc.get("title", name)),
                   vehicles=tuple(doc.get("vehicles", [])), sources=tuple(doc["sources"]),
                   requests=tuple(requests), vin_rules=tuple(rules), identify=identify,
                   probe_order=int(doc.get("probe_order", 100)), doc=doc)


class ProfileFileError(LocalFileError, ProfileError):
    """A profile file that cannot be read or is malformed (``path``, ``message``)."""


def _load_file(path: Any, origin: str) -> Profile:
    """One profile file (a path or an importlib.resources entry); :class:`ProfileFileError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileFileError(str(path), f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ProfileError(f"{origin}: a profile is a JSON object")
        return parse_profile(doc, origin)
    except (ProfileError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = str(e).removeprefix(f"{origin}: ").removeprefix(origin).strip() or type(e).__name__
        raise ProfileFileError(str(path), f"not a valid EV profile: {what}") from None


def load_profiles(extra: Iterable[str | os.PathLike[str]] = (), *, strict: bool = False) -> dict[str, Profile]:
    """Every profile shipped in ``config/ev_profiles``, then each file of ``extra`` (the local
    setting ``ev.profiles``), by name: a local file with a shipped profile's name replaces it.

    A malformed file: with ``strict`` (the daemon) :class:`ProfileFileError`, so the agent does
    not start with a profile silently missing; otherwise logged and skipped (the others still load)."""
    out: dict[str, Profile] = {}
    folder = resources.files("agent.config").joinpath("ev_profiles")
    files = [(e, e.name, False) for e in sorted(folder.iterdir(), key=lambda e: e.name) if e.name.endswith(".json")]
    files += [(Path(p), str(p), True) for p in extra]
    for entry, origin, local in files:
        try:
            profile = _load_file(entry, origin)
        except ProfileFileError as e:
            if strict:
                raise
            log.error("EV profile %s not loaded: %s", origin, e.message)
            continue
        if profile.name in out and local:
            log.info("EV profile %s: replaced by the local file %s", profile.name, origin)
        out[profile.name] = profile
    return out


def candidates_for_vin(profiles: Iterable[Profile], vin: str | None) -> list[Profile]:
    """Profiles worth trying for ``vin``, best first: model-code matches, then manufacturer
    matches (each by ``probe_order``). Profiles that do not match the VIN at all come last
    only when the VIN is unknown (``None``), as probes; a known VIN of another make yields
    just the generic profiles (those without VIN rules)."""
    scored = []
    for p in profiles:
        score = p.matches_vin(vin)
        if score == 0 and vin and p.vin_rules:
            continue
        scored.append((-score, p.probe_order, p.name, p))
    return [p for *_, p in sorted(scored, key=lambda t: t[:3])]

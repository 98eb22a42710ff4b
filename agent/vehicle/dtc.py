"""Trouble codes: descriptions, and the set of codes a vehicle reports turned into ``dtc`` events.

Descriptions of the SAE J2012 generic codes come from ``config/dtc/sae_generic_codes.csv``
(source and licence in ``config/dtc/README.md``); other codes fall back to python-OBD's table,
then to a text naming the code's system.

:class:`DtcTracker` takes one :class:`DtcReading` per DTC poll and calls ``on_dtc(body)`` with a
PROTOCOL §4 ``dtc`` event body whenever the set of ``(code, state)`` pairs or the MIL changes.
With a ``store`` (``agent.store.Store``), the last reported set survives restarts (meta key
:data:`META_KEY`), so codes cleared while the agent was off are still reported as a change, and
an unchanged set is not reported again after every boot. Without one, the first reading is
reported when it holds codes or the MIL is on.
"""
from __future__ import annotations

import csv
import functools
import importlib.resources
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from drivers.core.clock import Clock
from drivers.obd.diag import DtcReading

log = logging.getLogger(__name__)

STATES = ("stored", "pending", "permanent")
META_KEY = "dtc.last_reported"
TABLE_FILE = "sae_generic_codes.csv"

_SYSTEMS = {"P": "powertrain", "C": "chassis", "B": "body", "U": "network"}


@functools.cache
def descriptions() -> dict[str, str]:
    """``{code: title}`` of the packaged SAE generic code table; ``{}`` (logged) if missing."""
    try:
        text = (importlib.resources.files("agent.config") / "dtc" / TABLE_FILE).read_text("utf-8")
    except (OSError, ModuleNotFoundError) as e:
        log.error("DTC description table not found: %s", e)
        return {}
    table: dict[str, str] = {}
    for row in csv.DictReader(text.splitlines()):
        code, title = (row.get("code") or "").strip().upper(), (row.get("title") or "").strip()
        if code and title:
            table[code] = title
    return table


def describe(code: str) -> str:
    """A description for ``code`` (never empty)."""
    code = code.strip().upper()
    title = descriptions().get(code)
    if title:
        return title
    try:
        from obd.codes import DTC as OBD_DTC  # python-OBD's table (GPL library, a dependency)
        title = OBD_DTC.get(code)
    except ImportError:
        title = None
    if title:
        return title
    system = _SYSTEMS.get(code[:1], "unknown")
    kind = "manufacturer-specific" if code[1:2] in ("1", "3") else "generic"
    return f"{system} code ({kind}), no description known"


def event_body(codes: list[tuple[str, str]], mil: bool, ts: int, *,
               freeze: dict[str, Any] | None = None,
               monitors: dict[str, Any] | None = None) -> dict[str, Any]:
    """A PROTOCOL §4 ``dtc`` event body. ``codes``: ``[(code, state)]``. ``monitors`` (readiness,
    PID 01 01) is an extra key the protocol allows."""
    body: dict[str, Any] = {
        "type": "dtc", "ts": int(ts),
        "codes": [{"code": c, "state": s, "desc": describe(c)} for c, s in codes],
        "mil": bool(mil)}
    if freeze:
        body["freeze"] = freeze
    if monitors:
        body["monitors"] = monitors
    return body


class DtcTracker:
    """Turns readings into ``dtc`` events on change. Thread-safe."""

    def __init__(self, on_dtc: Callable[[dict[str, Any]], None] | None = None, *,
                 store: Any | None = None, clock: Callable[[], int] | None = None):
        self._on_dtc = on_dtc
        self._store = store
        self._clock = clock or Clock().now_ms
        self._lock = threading.Lock()
        self._lists: dict[str, list[str]] = {}  # last known list per state
        self._mil = False
        self._reported: list[list[Any]] | None = self._load()
        self._last_body: dict[str, Any] | None = None
        self.events = 0

    @property
    def last(self) -> dict[str, Any] | None:
        """The body built from the latest reading (reported or not)."""
        with self._lock:
            return dict(self._last_body) if self._last_body else None

    def update(self, reading: DtcReading) -> dict[str, Any] | None:
        """Builds the event body for ``reading`` (``None`` if the vehicle answered nothing) and
        reports it through ``on_dtc`` when the set of codes or the MIL changed."""
        if not reading.answered:
            return None
        with self._lock:
            for state in STATES:
                codes = getattr(reading, state)
                if codes is not None:
                    self._lists[state] = list(codes)
            if reading.mil is not None:
                self._mil = bool(reading.mil)
            pairs = [(c, s) for s in STATES for c in self._lists.get(s, [])]
            body = event_body(pairs, self._mil, reading.ts if reading.ts is not None
                              else self._clock(), freeze=reading.freeze,
                              monitors=reading.monitors)
            key = self._key(pairs, self._mil)
            self._last_body = body
            if self._reported is None:
                changed = bool(pairs) or self._mil
            else:
                changed = key != self._reported
            if not changed:
                self._reported = key
                return body
        if self._report(body, key):
            with self._lock:
                self._reported = key
        return body

    def _report(self, body: dict[str, Any], key: list[list[Any]]) -> bool:
        """True once ``on_dtc`` took the body; a failure is logged and retried at the next
        reading."""
        log.info("DTC set changed: %s, MIL %s",
                 ", ".join(f"{c['code']} ({c['state']})" for c in body["codes"]) or "no codes",
                 "on" if body["mil"] else "off")
        try:
            if self._store is not None and hasattr(self._store, "batch"):
                with self._store.batch():
                    self._emit(body)
                    self._store.set_meta(META_KEY, key)
            else:
                self._emit(body)
                if self._store is not None:
                    self._store.set_meta(META_KEY, key)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the poller
            log.exception("reporting the DTC event failed; retried at the next reading")
            return False
        self.events += 1
        return True

    def _emit(self, body: dict[str, Any]) -> None:
        if self._on_dtc is not None:
            self._on_dtc(body)

    @staticmethod
    def _key(pairs: list[tuple[str, str]], mil: bool) -> list[list[Any]]:
        return [[c, s] for c, s in sorted(set(pairs))] + [["MIL", bool(mil)]]

    def _load(self) -> list[list[Any]] | None:
        if self._store is None:
            return None
        try:
            value = self._store.get_meta(META_KEY)
        except Exception:  # noqa: BLE001
            log.exception("reading the last reported DTC set failed")
            return None
        return value if isinstance(value, list) else None

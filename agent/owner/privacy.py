"""The owner's consent (PROTOCOL §6): what personal data may be collected, how precisely, how long.

Two categories, ``location`` and ``driving_behaviour``, each with a mode from the active
config's ``privacy`` section, evaluated against the agent's clock every time it is asked:

- absent, ``off``, invalid (a consent must end: ``until`` at most 366 days after
  ``granted_at``) or past ``until``: the category is not collected, stored or sent;
- ``location``: ``coarse`` (2 decimals, at most one fix per 60 s, ``prec_m`` 1000) or ``precise``
  (as measured, at most 1 Hz); ``per_drive``: at every ignition on, location starts paused;
- paused at the car (the button gesture or ``dongle privacy pause``): off until resumed at the
  car (the gesture again or ``dongle privacy resume``). No message from the cloud resumes.

:class:`Privacy` is the one place that decides. Collectors register a :class:`CategoryHandler`;
when a category stops (withdrawn by config, expired, paused) the handler stops collecting at once
(within 2 s), its unsent rows are deleted, SQLite's WAL is checkpointed and truncated (the store
runs with ``secure_delete`` so freed pages are zeroed) and a ``privacy`` event gives the count.

The secure flush (checkpoint and truncation) cannot run inside an open transaction (SQLite
refuses: "database table is locked"), so a deletion made inside one — ``delete_data`` from the
downlink worker — only records the flush as owed (meta ``privacy.flush_owed``, committed with the
deletion); the caller runs :meth:`Privacy.flush_owed` after its commit. The privacy thread retries
an owed flush every tick (a reader holding an old snapshot keeps it busy), and :meth:`start` runs
one left owed by a crash.
Rows older than ``retention_days`` are purged every minute, sent or not. :meth:`Privacy.body_filter`
is the last look at every uplink body: whatever the store holds, no location or driving
behaviour field leaves while its category is off.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from drivers.core.clock import Clock

log = logging.getLogger(__name__)

CATEGORIES = ("location", "driving_behaviour")
MODES = {"location": ("off", "coarse", "precise"), "driving_behaviour": ("off", "on")}
DEFAULT_RETENTION_DAYS = {"location": 7, "driving_behaviour": 30}
MAX_CONSENT_MS = 366 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
BY = ("owner_button", "cli", "config", "expiry")

COARSE_DECIMALS = 2
COARSE_PREC_M = 1000
COARSE_MIN_INTERVAL_MS = 60_000
PRECISE_MIN_INTERVAL_MS = 1_000
# Arrival jitter tolerated on top of the receiver's own times (which are exact): see location.py.
ARRIVAL_SLACK_MS = 50

# Health event kinds that are driving behaviour (agent/health/driving.py).
BEHAVIOUR_EVENT_KINDS = frozenset({"harsh_braking", "harsh_acceleration", "speeding"})
BEHAVIOUR_FIELDS = frozenset({"behaviour", "harsh_braking", "harsh_acceleration", "speeding"})
LOCATION_FIELDS = frozenset({"positions", "lat", "lon", "latitude", "longitude", "position", "route"})

META_PAUSED = "privacy.paused"
META_ANNOUNCED = "privacy.announced"
META_FLUSH_OWED = "privacy.flush_owed"


@dataclass(frozen=True)
class Consent:
    """A category's consent as the config states it, evaluated at one instant."""

    category: str
    mode: str                       # the mode in force: "off" unless granted and not expired
    reason: str                     # "absent" | "off" | "invalid" | "expired" | "granted"
    consent_id: str | None = None
    granted_at: int | None = None
    until: int | None = None
    per_drive: bool = False


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def evaluate(doc: dict | None, category: str, now: int) -> Consent:
    """The consent for ``category`` in config ``doc`` at time ``now`` (ms), PROTOCOL §6."""
    entry = ((doc or {}).get("privacy") or {}).get(category)
    if not isinstance(entry, dict):
        return Consent(category, "off", "absent")
    mode = entry.get("mode")
    if mode == "off":
        return Consent(category, "off", "off")
    cid, granted, until = entry.get("consent_id"), _int(entry.get("granted_at")), _int(entry.get("until"))
    per_drive = bool(entry.get("per_drive")) if category == "location" else False
    if mode not in MODES[category] or not isinstance(cid, str) or not cid or granted is None or until is None \
            or until <= granted or until - granted > MAX_CONSENT_MS:
        return Consent(category, "off", "invalid", cid if isinstance(cid, str) else None, granted, until)
    if now >= until:
        return Consent(category, "off", "expired", cid, granted, until, per_drive)
    return Consent(category, mode, "granted", cid, granted, until, per_drive)


def retention_days(doc: dict | None, category: str) -> int:
    days = (((doc or {}).get("privacy") or {}).get("retention_days") or {}).get(category)
    return days if isinstance(days, int) and not isinstance(days, bool) and days >= 1 \
        else DEFAULT_RETENTION_DAYS[category]


def coarsen(value: float) -> float:
    return round(float(value), COARSE_DECIMALS)


def enforce_positions(pos: dict, mode: str) -> dict | None:
    """The ``positions`` block as ``mode`` allows it: coarse → rounded, ≥ 60 s apart,
    ``prec_m`` 1000; precise → ≥ 1 s apart. None if nothing is left."""
    cols = ("t", "lat", "lon", "speed", "course")
    if not isinstance(pos, dict) or not all(isinstance(pos.get(c), list) for c in cols):
        return None
    n = min(len(pos[c]) for c in cols)
    gap = COARSE_MIN_INTERVAL_MS if mode == "coarse" else PRECISE_MIN_INTERVAL_MS
    gap -= ARRIVAL_SLACK_MS if mode == "precise" else 0
    out: dict = {c: [] for c in cols}
    last = None
    for i in sorted(range(n), key=lambda i: pos["t"][i]):
        t = pos["t"][i]
        if last is not None and t - last < gap:
            continue
        last = t
        for c in cols:
            out[c].append(pos[c][i])
    if not out["t"]:
        return None
    if mode == "coarse":
        out["lat"] = [coarsen(v) for v in out["lat"]]
        out["lon"] = [coarsen(v) for v in out["lon"]]
        out["prec_m"] = COARSE_PREC_M
    else:
        prec = pos.get("prec_m")
        out["prec_m"] = int(prec) if isinstance(prec, int) and prec >= 0 else int(math.ceil(float(prec or 0)))
    return out


class CategoryHandler(Protocol):
    """What a collector of one category gives :class:`Privacy`. Every method may be called from
    any thread; ``on_stopped`` must return once collection has stopped."""

    def on_collecting(self, mode: str) -> None: ...
    def on_stopped(self) -> None: ...
    def purge_unsent(self) -> int: ...
    def purge_all(self) -> int: ...
    def purge_older(self, cutoff_ms: int) -> int: ...


class Privacy:
    def __init__(self, store, *, config: Callable[[], dict], emit_event: Callable[[dict], None],
                 clock: Callable[[], int] | None = None, tick_s: float = 0.5, retention_every_s: float = 60.0):
        self.store = store
        self._config = config
        self._emit = emit_event
        self._clock = clock or Clock().now_ms
        self.tick_s = tick_s
        self.retention_every_s = retention_every_s
        self._handlers: dict[str, list[CategoryHandler]] = {c: [] for c in CATEGORIES}
        self._lock = threading.RLock()
        self._running: dict[str, str] = {c: "?" for c in CATEGORIES}   # "?" until the first look
        paused = store.get_meta(META_PAUSED) or {}
        self._paused: dict[str, str | None] = {c: paused.get(c) for c in CATEGORIES}  # by whom, or None
        self._announced: dict[str, str] = dict(store.get_meta(META_ANNOUNCED) or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_retention = 0.0
        self.stripped = {"positions": 0, "events": 0, "fields": 0}
        self.deleted = {c: 0 for c in CATEGORIES}
        self.errors = 0
        self.last_error: str | None = None
        self.ignition_on: bool | None = None
        self._flush_owed = bool(store.get_meta(META_FLUSH_OWED))
        # PROTOCOL §6: freed pages hold no deleted row (zeroed), for every table of the store.
        store.query("PRAGMA secure_delete=ON")

    # -- registration ---------------------------------------------------------------------
    def register(self, category: str, handler: CategoryHandler) -> None:
        self._handlers[category].append(handler)

    # -- the decision ---------------------------------------------------------------------
    def consent(self, category: str) -> Consent:
        return evaluate(self._config(), category, self._clock())

    def _effective(self, category: str, now: int) -> tuple[str, str, Consent]:
        c = evaluate(self._config(), category, now)
        if c.mode == "off":
            return "off", ("expired" if c.reason == "expired" else "withdrawn"), c
        if self._paused.get(category):
            return "off", "paused", c
        return c.mode, "collecting", c

    def mode(self, category: str) -> str:
        """The mode in force right now ("off", "coarse", "precise", "on"): the gate every
        collector checks before it reads or keeps anything."""
        return self._effective(category, self._clock())[0]

    def allowed(self, category: str) -> bool:
        return self.mode(category) != "off"

    def paused(self, category: str = "location") -> bool:
        return bool(self._paused.get(category))

    # -- changes --------------------------------------------------------------------------
    def apply_config(self, doc: dict) -> list[str]:
        """Re-evaluates after a config change (the config callable already returns ``doc``)."""
        problems = []
        for cat in CATEGORIES:
            c = evaluate(doc, cat, self._clock())
            if c.reason == "invalid":
                problems.append(f"privacy.{cat}: consent invalid (needs consent_id, granted_at and an "
                                f"until at most 366 days later); {cat} is not collected")
        self.reconcile("config")
        return problems

    def pause(self, by: str, categories: tuple[str, ...] = CATEGORIES) -> dict:
        """Pauses at once (button gesture, CLI, or ``per_drive`` at ignition on)."""
        with self._lock:
            for cat in categories:
                self._paused[cat] = by
            self.store.set_meta(META_PAUSED, self._paused)
            self.reconcile(by)
        log.info("privacy: paused %s (%s)", ", ".join(categories), by)
        return self.summary()

    def resume(self, by: str, categories: tuple[str, ...] = CATEGORIES) -> dict:
        """Resumes — only at the car: ``by`` is ``owner_button`` or ``cli`` (the local control
        socket). Nothing the cloud sends reaches this."""
        if by not in ("owner_button", "cli"):
            raise ValueError("privacy: resuming happens only at the car (button or dongle CLI)")
        with self._lock:
            for cat in categories:
                self._paused[cat] = None
            self.store.set_meta(META_PAUSED, self._paused)
            self.reconcile(by)
        log.info("privacy: resumed %s (%s)", ", ".join(categories), by)
        return self.summary()

    def toggle(self, by: str = "owner_button") -> dict:
        """The button gesture: pauses if anything is collecting or not paused, else resumes."""
        if any(self._paused.get(c) for c in CATEGORIES):
            return self.resume(by)
        return self.pause(by)

    def on_ignition(self, on: bool) -> None:
        """``per_drive``: at every ignition on, location starts paused until resumed at the car."""
        was, self.ignition_on = self.ignition_on, on
        if on and not was and self.consent("location").per_drive:
            log.info("privacy: ignition on with a per-drive consent: location paused until resumed at the car")
            self.pause("config", ("location",))

    def reconcile(self, by: str | None = None) -> None:
        """Brings every collector in line with the consents now; reports each change."""
        with self._lock:
            now = self._clock()
            for cat in CATEGORIES:
                mode, state, _ = self._effective(cat, now)
                if mode == self._running[cat]:
                    continue
                self._running[cat] = mode
                if mode != "off":
                    self._call(cat, "on_collecting", mode)
                    if self._announced.get(cat) != "collecting":
                        self._announce(cat, "collecting", 0, by or "config")
                    continue
                self._call(cat, "on_stopped")
                deleted = self._purge(cat, "purge_unsent")
                if deleted or self._announced.get(cat) == "collecting":
                    who = "expiry" if state == "expired" else ("config" if state == "withdrawn" else by or "config")
                    self._announce(cat, state, deleted, who)

    def delete_data(self, categories: list[str]) -> dict[str, int]:
        """The ``delete_data`` command: everything held of these categories, sent or not.
        Raises ValueError for a category that is not one of :data:`CATEGORIES` (the command
        schema refuses those before they get here). Called inside the downlink's transaction:
        the deletion commits with the ack, and the caller runs :meth:`flush_owed` after the
        commit. It takes no lock of its own (each handler's purge is one store transaction), so
        it never waits for the privacy thread while the store is held."""
        unknown = [c for c in categories if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"unknown data categories {unknown} (known: {', '.join(CATEGORIES)})")
        counts = {cat: self._purge(cat, "purge_all") for cat in categories}
        log.info("privacy: delete_data %s", counts)
        return counts

    def purge_expired_retention(self) -> dict[str, int]:
        now = self._clock()
        doc = self._config()
        counts = {}
        with self._lock:
            for cat in CATEGORIES:
                cutoff = now - retention_days(doc, cat) * DAY_MS
                counts[cat] = self._purge(cat, "purge_older", cutoff)
        if any(counts.values()):
            log.info("privacy: retention purge %s", counts)
        return counts

    # -- internals ------------------------------------------------------------------------
    def _call(self, cat: str, method: str, *args) -> None:
        for h in self._handlers[cat]:
            try:
                getattr(h, method)(*args)
            except Exception as e:
                self._error(f"{cat} {method}", e)

    def _purge(self, cat: str, method: str, *args) -> int:
        n = 0
        for h in self._handlers[cat]:
            try:
                n += int(getattr(h, method)(*args) or 0)
            except Exception as e:
                self._error(f"{cat} {method}", e)
        if n:
            self.deleted[cat] += n
            self._owe_flush()
            self.flush_owed()
        return n

    def _owe_flush(self) -> None:
        """Records that deleted rows may still be in the WAL (committed with the deletion when
        inside a transaction), until :meth:`flush_owed` has truncated it."""
        self._flush_owed = True
        try:
            self.store.set_meta(META_FLUSH_OWED, True)
        except Exception as e:
            self._error("recording the owed WAL flush", e)

    def flush_owed(self) -> bool:
        """Runs the secure flush if one is owed and the calling thread is not inside a store
        transaction (then it stays owed for the caller to run after its commit). True when
        nothing is owed any more."""
        if not self._flush_owed:
            return True
        if self.store.in_transaction:
            return False
        if not self.secure_flush():
            return False
        self._flush_owed = False
        try:
            self.store.set_meta(META_FLUSH_OWED, None)
        except Exception as e:
            self._error("clearing the owed WAL flush", e)
        return True

    def secure_flush(self) -> bool:
        """Moves the WAL into the database (whose deleted rows are zeroed) and truncates it, so
        neither file holds a deleted row any more. True when the checkpoint completed."""
        for _ in range(20):
            try:
                busy, _, _ = self.store.query("PRAGMA wal_checkpoint(TRUNCATE)")[0]
            except Exception as e:
                self._error("checkpoint", e)
                return False
            if not busy:
                return True
            time.sleep(0.1)  # a reader (e.g. dongle export) holds an old snapshot
        log.warning("privacy: WAL checkpoint stayed busy; retried at the next change")
        return False

    def _announce(self, cat: str, state: str, deleted: int, by: str) -> None:
        body = {"type": "privacy", "ts": self._clock(), "category": cat, "state": state,
                "deleted": int(deleted), "by": by}
        self._announced[cat] = state
        try:
            self.store.set_meta(META_ANNOUNCED, self._announced)
            self._emit(body)
        except Exception as e:
            self._error("privacy event", e)
        log.info("privacy: %s %s by %s (%d unsent rows deleted)", cat, state, by, deleted)

    def _error(self, what: str, e: Exception) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(e).__name__}: {e}"
        log.error("privacy: %s failed: %s", what, e, exc_info=e)

    # -- the sealing gate -----------------------------------------------------------------
    def body_filter(self, body: dict) -> dict | None:
        """Last look at an uplink body (telemetry or event): strips every location field while
        location is off (and enforces coarse/precise on ``positions``), and every driving
        behaviour field while that is off. Returns None for an event that is driving behaviour
        with the category off (the event must not be sent at all)."""
        loc = self.mode("location")
        beh = self.mode("driving_behaviour")
        if "positions" in body:
            pos = enforce_positions(body["positions"], loc) if loc != "off" else None
            if pos is None:
                del body["positions"]
                self.stripped["positions"] += 1
            else:
                body["positions"] = pos
        if "type" in body:
            if beh == "off" and body.get("type") == "health" and body.get("kind") in BEHAVIOUR_EVENT_KINDS:
                self.stripped["events"] += 1
                return None
            for holder in (body, body.get("detail") if isinstance(body.get("detail"), dict) else None):
                if holder is None:
                    continue
                for key in list(holder):
                    if (loc == "off" and key in LOCATION_FIELDS) or (beh == "off" and key in BEHAVIOUR_FIELDS):
                        del holder[key]
                        self.stripped["fields"] += 1
        return body

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.reconcile("config")
        self.flush_owed()   # one left owed by a crash between a deletion and its flush
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="privacy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None
        with self._lock:
            for cat in CATEGORIES:
                self._call(cat, "on_stopped")
                self._running[cat] = "?"

    def tick(self) -> None:
        """One look: expiry, and the retention purge when due. The thread calls it every
        ``tick_s``; tests call it after moving their clock."""
        self.reconcile(None)
        self.flush_owed()
        if time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + self.retention_every_s
            self.purge_expired_retention()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception as e:
                self._error("tick", e)

    def summary(self) -> dict:
        now = self._clock()
        out = {}
        for cat in CATEGORIES:
            mode, state, c = self._effective(cat, now)
            if state == "withdrawn" and c.reason in ("absent", "off", "invalid"):
                state = "off"
            out[cat] = {"mode": mode, "state": state, "consent": c.reason, "consent_id": c.consent_id, "until": c.until,
                        "paused": bool(self._paused.get(cat))}
            if cat == "location":
                out[cat]["per_drive"] = c.per_drive
        return out

    def status(self) -> dict:
        return {**self.summary(), "deleted": dict(self.deleted), "stripped": dict(self.stripped),
                "errors": self.errors, "last_error": self.last_error}

    # -- the local control socket (agent/technician/control.py) --------------------------------------
    def control_handler(self, request: dict, peer=None, reply=None) -> dict:
        """``{"op": "privacy", "action": "pause"|"resume"|"status"}`` from ``dongle privacy``."""
        action = request.get("action", "status")
        if action == "pause":
            return {"privacy": self.pause("cli")}
        if action == "resume":
            return {"privacy": self.resume("cli")}
        if action == "status":
            return {"privacy": self.summary()}
        from agent.technician.control import ControlError
        raise ControlError("bad_request", f"privacy: unknown action {action!r} (pause, resume, status)")


class ButtonGesture:
    """The privacy gesture on the dongle's one button: three short presses (each released
    within ``max_press_s``) within ``window_s``. Distinct from the technician's long press
    (held for seconds): a press held longer than ``max_press_s`` cancels the gesture.

    Feed it ``pressed()`` / ``released()`` from the button driver (any thread), or ``press()``
    once per completed short press (drivers/gpio.py ``DongleIO(on_press=...)``)."""

    def __init__(self, on_gesture: Callable[[], None], *, presses: int = 3, window_s: float = 2.0,
                 max_press_s: float = 0.8, clock: Callable[[], float] = time.monotonic):
        self._on_gesture = on_gesture
        self.presses = presses
        self.window_s = window_s
        self.max_press_s = max_press_s
        self._clock = clock
        self._down_at: float | None = None
        self._taps: list[float] = []
        self._lock = threading.Lock()
        self.gestures = 0

    def pressed(self) -> None:
        with self._lock:
            self._down_at = self._clock()

    def press(self) -> None:
        """One short press, already told apart from a long press by the button driver."""
        with self._lock:
            self._down_at = self._clock()
        self.released()

    def released(self) -> None:
        with self._lock:
            now = self._clock()
            down, self._down_at = self._down_at, None
            if down is None or now - down > self.max_press_s:
                self._taps.clear()   # a long press is the technician's, never part of this gesture
                return
            self._taps = [t for t in self._taps if now - t <= self.window_s] + [down]
            if len(self._taps) < self.presses or now - self._taps[0] > self.window_s:
                return
            self._taps.clear()
            self.gestures += 1
        try:
            self._on_gesture()
        except Exception:
            log.exception("privacy: button gesture handler failed")

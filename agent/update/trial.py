"""The trial of a newly activated agent version, and rollback.

After ``current`` flips to a new version the agent restarts into it on *trial*. It becomes
*good* only when, in one uninterrupted run, the store is open, the broker is connected, the
vehicle link works if the car is on, and all that has held for ``stable_s`` seconds
(:class:`TrialMonitor`, inside the agent). Until then three things roll it back by themselves:

* **crash loop** — ``dongle-update prestart`` (``ExecStartPre=``) counts starts of the trial
  version; ``dongle-update poststop`` (``ExecStopPost=``) records how each run ended (systemd's
  ``$SERVICE_RESULT``/``$EXIT_CODE``/``$EXIT_STATUS``). The start after ``max_starts`` rolls back
  before ``ExecStart=`` resolves the ``current`` link, so that start already runs the old slot.
* **hang** — the watchdog (``WatchdogSec=``) kills the wedged agent, ``poststop`` records
  ``watchdog`` and the restart counts like a crash.
* **no broker / unhealthy** — the in-agent monitor decides on a rollback after ``trial_s``
  seconds of this run without reaching good; the agent cannot change its code itself, so it
  asks the installer (agent.update.request: ``rollback``), which rolls back, and the agent
  restarts into the old slot.
* And if even ``prestart`` cannot run (a slot too broken to start Python), the unit fails after
  ``StartLimitBurst=`` and ``OnFailure=dongle-agent-rollback.service`` runs the *previous*
  slot's ``dongle-update rollback``.

*Good* is the monitor's decision too, carried out by the installer (request ``good``): the
counter becomes the installed one, old slots go and a ``good`` report is queued.

A rollback flips ``current`` back, blocks the release's counter (it is not retried until a
higher ``release_counter`` arrives) and queues a ``rolled_back`` report with the reason; the
agent sends it as an ``update`` event when it runs again.

The functions that change the install state (begin, on_prestart, on_poststop, roll_back,
mark_good) run as root: in the hooks, the rollback unit and the installer, never in the agent.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from drivers.core.clock import Clock
from agent.update import slots, state
from agent.update.slots import Layout

log = logging.getLogger(__name__)

RESTART_EXIT_CODE = 75   # the agent exits with this to be restarted into another slot
MAX_STARTS = 3


def now_ms() -> int:
    """These functions also run in the systemd hooks (``dongle-update``), outside the agent: a
    clock of their own, provisional (and so re-timed by the agent's store) before the time is set."""
    return Clock().now_ms()


def update_event(component: str, frm: str | None, to: str, st: str, reason: str | None = None,
                 **extra: object) -> dict:
    body: dict = {"type": "update", "ts": now_ms(), "component": component,
                  "from": frm or "none", "to": to, "state": st}
    if reason is not None:
        body["reason"] = reason[:500]
    body.update(extra)
    return body


def begin(layout: Layout, version: str, from_version: str | None, counter: int, *,
          max_starts: int = MAX_STARTS) -> None:
    """Records the trial *before* ``current`` flips (a cut in between leaves a stale trial that
    :func:`on_prestart` discards, and the install is redone)."""
    with state.locked(layout) as st:
        st["trial"] = {"version": version, "from": from_version, "release_counter": counter,
                       "started_ms": now_ms(), "starts": 0, "max_starts": max_starts,
                       "failures": []}


def active(layout: Layout) -> dict | None:
    """The trial record if the current slot is on trial."""
    t = state.load(layout).get("trial")
    if t and t.get("version") == layout.current_version():
        return t
    return None


def _failure_reason(failures: list[dict]) -> str:
    if not failures:
        return "crash_loop: the agent kept restarting"
    last = failures[-1]
    result = last.get("result") or "unknown"
    if result == "watchdog":
        return "hang: watchdog timeout"
    if result == "timeout":
        return "hang: start or stop timed out"
    detail = f"{last.get('code') or result} {last.get('status') or ''}".strip()
    return f"crash_loop: {detail}"


def _roll_back_locked(layout: Layout, st: dict, reason: str) -> bool:
    t = st.get("trial")
    if not t:
        return False
    try:
        bad, good = slots.roll_back(layout)
    except slots.SlotError as e:
        log.error("update: cannot roll back %s: %s", t.get("version"), e)
        st["trial"] = None
        return False
    state.block(st, "agent", int(t.get("release_counter", 0)))
    st["trial"] = None
    state.add_report(st, update_event("agent", good, bad or t["version"], "rolled_back", reason))
    log.warning("update: %s rolled back to %s: %s", bad, good, reason)
    return True


def roll_back(layout: Layout, reason: str, version: str | None = None) -> bool:
    """Rolls the trial version back (no-op outside a trial, or when ``version`` is given and
    another one is on trial). True if it rolled back."""
    with state.locked(layout) as st:
        t = st.get("trial")
        if not t or t.get("version") != layout.current_version() \
                or (version is not None and t.get("version") != version):
            return False
        return _roll_back_locked(layout, st, reason)


def on_prestart(layout: Layout) -> str:
    """``ExecStartPre=``: ``normal``, ``trial`` (this start counted) or ``rolled_back``."""
    with state.locked(layout) as st:
        t = st.get("trial")
        if not t:
            return "normal"
        if t.get("version") != layout.current_version():
            log.info("update: discarding a stale trial record of %s", t.get("version"))
            st["trial"] = None
            return "normal"
        t["starts"] = int(t.get("starts", 0)) + 1
        if t["starts"] > int(t.get("max_starts", MAX_STARTS)):
            _roll_back_locked(layout, st, _failure_reason(t.get("failures", [])))
            return "rolled_back"
        log.info("update: start %d of %s on trial", t["starts"], t["version"])
        return "trial"


def on_poststop(layout: Layout, env: Mapping[str, str]) -> None:
    """``ExecStopPost=``: records how a trial run ended (systemd passes $SERVICE_RESULT...)."""
    result = env.get("SERVICE_RESULT", "")
    code, status = env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", "")
    if result == "success" or (code == "exited" and status == str(RESTART_EXIT_CODE)):
        return
    with state.locked(layout) as st:
        t = st.get("trial")
        if t and t.get("version") == layout.current_version():
            t.setdefault("failures", []).append({"result": result, "code": code,
                                                 "status": status, "ts": now_ms()})
            del t["failures"][:-10]


def mark_good(layout: Layout, version: str | None = None) -> dict | None:
    """Ends the trial of ``version`` (default: whatever is on trial and current): its counter
    becomes the installed one and a ``good`` report is queued. Returns the trial, or None if
    that version is not on trial."""
    with state.locked(layout) as st:
        t = st.get("trial")
        if not t or t.get("version") != layout.current_version() \
                or (version is not None and t.get("version") != version):
            return None
        state.raise_counter(st, "agent", int(t["release_counter"]), t["version"])
        st["trial"] = None
        state.add_report(st, update_event("agent", t.get("from"), t["version"], "good"))
    slots.gc(layout)
    return t


Health = Callable[[], Mapping[str, bool | None]]


class TrialMonitor:
    """In the agent: decides *good* or *rollback* (see the module docstring); the installer
    carries the decision out.

    ``health()`` returns ``{"store": bool, "broker": bool, "vehicle": bool | None}``; ``None``
    means not required now (car off). ``running`` is the version this agent runs: only a run of
    the version on trial is judged. ``tick()`` is called periodically; it returns ``"good"`` or
    ``"rollback"`` once (``reason`` says why for a rollback), else None.
    """

    def __init__(self, layout: Layout, health: Health, *, stable_s: float = 300,
                 trial_s: float = 900, monotonic: Callable[[], float] = time.monotonic,
                 running: str | None = None):
        self.layout = layout
        self.health = health
        self.stable_s = stable_s
        self.trial_s = trial_s
        self.running = running if running is not None else layout.current_version()
        self._mono = monotonic
        self._started = monotonic()
        self._healthy_since: float | None = None
        self.last: dict[str, bool | None] = {}
        self.verdict: str | None = None     # "good" or "rollback", once decided
        self.reason: str | None = None

    def tick(self) -> str | None:
        t = active(self.layout)
        if t is None or t.get("version") != self.running or self.verdict is not None:
            return None
        now = self._mono()
        h = dict(self.health())
        self.last = h
        ok = all(v is None or v for v in h.values())
        if ok:
            if self._healthy_since is None:
                self._healthy_since = now
            if now - self._healthy_since >= self.stable_s:
                log.info("update: %s is good", t["version"])
                self.verdict = "good"
                return self.verdict
        else:
            self._healthy_since = None
        if now - self._started >= self.trial_s:
            failing = [k for k, v in h.items() if v is False]
            if "broker" in failing:
                reason = f"no_broker: not connected within {self.trial_s:.0f} s"
            elif failing:
                reason = f"unhealthy: {', '.join(failing)} not working after {self.trial_s:.0f} s"
            else:
                reason = f"unstable: not {self.stable_s:.0f} s healthy within {self.trial_s:.0f} s"
            log.warning("update: %s fails its trial: %s", t["version"], reason)
            self.verdict, self.reason = "rollback", reason
            return self.verdict
        return None

    def status(self) -> dict:
        return {"healthy_since_s": None if self._healthy_since is None
                else round(self._mono() - self._healthy_since, 1),
                "checks": self.last}

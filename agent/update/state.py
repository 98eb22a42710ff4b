"""Persistent update state, in two small JSON files with two owners (docs/updates.md, "Privilege").

**The install state** (``<root>/update/state.json``, /opt/dongle on a device): written only by
code that may change the installed software, which runs as root: the installer
(``dongle-update apply``, dongle-update-install.service), the hooks around every start of the
agent (``dongle-update prestart``/``poststop``) and the ``OnFailure=`` rollback unit, which
runs the *previous* slot's copy of this module. The agent only reads it (it is world-readable;
the agent's unit sees /opt read-only).

* ``agent``: ``version`` and ``release_counter`` of what runs (only ever increases:
  anti-rollback), ``blocked_counter`` (the highest counter that was rolled back);
* ``trial``: the version on trial (agent.update.trial);
* ``reports``: ``update`` event bodies written by code that cannot send events, each
  ``{"id": n, "body": {...}}`` (the last :data:`MAX_REPORTS`); the agent sends those above the
  id it has sent (its own state), so nothing here needs the agent's write;
* ``last_request``: the id, action and result of the last request the installer handled.

**The work state** (``<work>/state.json``, /var/lib/dongle/update on a device): the agent's own:
``mcu`` counters (the agent updates the MCU itself), ``pending`` releases (accepted, not
finished), ``reports_sent`` and the outstanding ``request`` to the installer.

Both are versioned (``format``) and only ever extended with optional keys. Every change is a
read-modify-write under an exclusive ``flock`` (``state.lock`` beside the file) and lands with
write-to-temp, fsync, rename(2), fsync of the directory: a power cut leaves either the old or
the new file. Readers need no lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.update.slots import Layout, write_atomic

log = logging.getLogger(__name__)

FORMAT = 2
MAX_REPORTS = 32


def _counters() -> dict[str, Any]:
    return {"version": None, "release_counter": 0, "blocked_counter": 0}


def empty() -> dict[str, Any]:
    """The install state of a device nothing was installed on by an update yet."""
    return {"format": FORMAT, "agent": _counters(), "trial": None, "reports": [],
            "next_report": 1, "last_request": None}


def empty_work() -> dict[str, Any]:
    return {"format": FORMAT, "mcu": _counters(), "pending": {}, "reports_sent": 0,
            "request": None}


def _load(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return base
    except (OSError, ValueError) as e:
        # Cannot happen with atomic writes short of disk corruption. Starting from empty is
        # safe for trust (a release still needs valid TUF metadata) but forgets the counters:
        # say so loudly.
        log.error("update: state file %s unreadable (%s); starting from an empty state", path, e)
        return base
    if not isinstance(doc, dict):
        log.error("update: state file %s is not a JSON object; starting from an empty state", path)
        return base
    for key, value in doc.items():
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            base[key].update(value)
        else:
            base[key] = value
    return base


def load(layout: Layout) -> dict[str, Any]:
    """The install state (read by anyone)."""
    return _load(layout.state_file, empty())


def load_work(layout: Layout) -> dict[str, Any]:
    """The agent's own state."""
    return _load(layout.work_state_file, empty_work())


@contextlib.contextmanager
def _locked(path: Path, loader) -> Iterator[dict[str, Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name("state.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = loader()
        before = json.dumps(doc, sort_keys=True)
        yield doc
        if json.dumps(doc, sort_keys=True) != before:
            write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[dict[str, Any]]:
    """``with locked(layout) as st: ...`` — the install state, saved on a normal exit (root's)."""
    with _locked(layout.state_file, lambda: load(layout)) as doc:
        yield doc


@contextlib.contextmanager
def work_locked(layout: Layout) -> Iterator[dict[str, Any]]:
    """The same for the agent's work state."""
    with _locked(layout.work_state_file, lambda: load_work(layout)) as doc:
        yield doc


def counters(layout: Layout, component: str) -> dict[str, Any]:
    """A component's counters from the state that owns them (agent: install, mcu: work)."""
    return (load(layout) if component == "agent" else load_work(layout))[component]


def raise_counter(doc: dict[str, Any], component: str, counter: int, version: str) -> None:
    comp = doc[component]
    if counter < comp["release_counter"]:
        raise ValueError(f"{component} release_counter may only go up "
                         f"({comp['release_counter']} -> {counter})")
    comp["release_counter"] = counter
    comp["version"] = version


def block(doc: dict[str, Any], component: str, counter: int) -> None:
    comp = doc[component]
    comp["blocked_counter"] = max(int(comp.get("blocked_counter", 0)), counter)


def add_report(doc: dict[str, Any], body: dict[str, Any]) -> int:
    """Queues an ``update`` event body in the install state for the agent to send; its id."""
    n = int(doc.get("next_report") or 1)
    doc["next_report"] = n + 1
    doc["reports"] = [*doc.get("reports", []), {"id": n, "body": body}][-MAX_REPORTS:]
    return n

"""Persistent update state: one small JSON file next to the slots (``update/state.json``).

It lives in the install root, not in the agent's SQLite store, because the code that reads it
also runs outside the agent: ``dongle-update prestart``/``poststop`` around every start and the
``OnFailure=`` rollback unit, which runs the *previous* slot's copy of this module. Its format
is therefore versioned (``format``) and only ever extended with optional keys.

Every change is a read-modify-write under an exclusive ``flock`` on ``state.lock`` and lands
with write-to-temp, fsync, rename(2), fsync of the directory: a power cut leaves either the old
or the new file.

Per component (``agent``, ``mcu``):

* ``version``: what runs; ``release_counter``: its counter. Only ever increases (anti-rollback).
* ``blocked_counter``: the highest counter that was rolled back or rejected for good; a release
  is retried only with a higher counter.

Global: ``pending`` (a release accepted but not finished, per component), ``trial`` (the agent
version on trial, see agent.update.trial) and ``reports`` (``update`` event bodies written by
code that cannot emit events, e.g. the rollback unit; the agent sends them when it starts).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from agent.update.slots import Layout, write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
COMPONENTS = ("agent", "mcu")


def empty() -> dict[str, Any]:
    return {"format": FORMAT,
            "agent": {"version": None, "release_counter": 0, "blocked_counter": 0},
            "mcu": {"version": None, "release_counter": 0, "blocked_counter": 0},
            "pending": {}, "trial": None, "reports": []}


def load(layout: Layout) -> dict[str, Any]:
    try:
        doc = json.loads(layout.state_file.read_text())
    except FileNotFoundError:
        return empty()
    except (OSError, ValueError) as e:
        # Cannot happen with atomic writes short of disk corruption. Starting from empty is
        # safe for trust (a release still needs valid TUF metadata) but forgets the counters:
        # say so loudly.
        log.error("update: state file %s unreadable (%s); starting from an empty state",
                  layout.state_file, e)
        return empty()
    base = empty()
    for key, value in doc.items():
        if key in COMPONENTS and isinstance(value, dict):
            base[key].update(value)
        else:
            base[key] = value
    return base


def save(layout: Layout, doc: dict[str, Any]) -> None:
    layout.update_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(layout.state_file, json.dumps(doc, sort_keys=True, indent=1).encode())


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[dict[str, Any]]:
    """``with locked(layout) as st: ...`` — st is saved on a normal exit."""
    layout.update_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.update_dir / "state.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = load(layout)
        before = json.dumps(doc, sort_keys=True)
        yield doc
        if json.dumps(doc, sort_keys=True) != before:
            save(layout, doc)
    finally:
        os.close(fd)


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

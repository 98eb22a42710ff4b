"""A pytest plugin: collects every outbound body the test suite produces and checks it against the
data inventory in docs/privacy.md.

Registered from tests/conftest.py (``pytest_plugins = ["tests.support.inventory"]``). It wraps
``agent.protocol.seal`` (bodies an in-process agent seals for the uplink) and
``agent.protocol.open_envelope`` (bodies the reference console opens, which covers agents run as
subprocesses); both stay fully functional. ``tests/test_privacy_inventory.py`` is moved to the end
of the run and fails on any field the inventory does not list.

Paths: ``<scope> <path>`` where scope is ``telemetry``, ``ack`` or ``event:<type>``, map keys are
joined with ``.``, list items are ``[]`` (``signals[].name``); an inventory path ending in ``.*``
covers everything below it.
"""
from __future__ import annotations

import copy
import re
import threading
from pathlib import Path

INVENTORY = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"
UPLINK_KINDS = ("telemetry", "event", "ack")

_lock = threading.Lock()
OUTBOUND: list[tuple[str, dict]] = []
_installed = False


def _record(kind: str, body) -> None:
    if kind in UPLINK_KINDS and isinstance(body, dict):
        try:
            snapshot = copy.deepcopy(body)
        except Exception:
            return
        with _lock:
            if len(OUTBOUND) < 200_000:
                OUTBOUND.append((kind, snapshot))


def install() -> None:
    """Wraps the protocol module once per process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    from agent.cloud import protocol

    seal, open_envelope = protocol.seal, protocol.open_envelope

    def recording_seal(kind, body, *a, **kw):
        _record(kind, body)
        return seal(kind, body, *a, **kw)

    def recording_open(*a, **kw):
        opened = open_envelope(*a, **kw)
        _record(opened.header.get("kind") if hasattr(opened, "header") else kw.get("expected_kind"),
                getattr(opened, "body", None))
        return opened

    protocol.seal = recording_seal
    protocol.open_envelope = recording_open


# -- paths and the inventory ---------------------------------------------------------------

def field_paths(kind: str, body: dict) -> set[str]:
    scope = f"event:{body.get('type')}" if kind == "event" else kind
    out: set[str] = set()

    def walk(v, path: str) -> None:
        if isinstance(v, dict):
            if not v and path:
                out.add(path)
            for k, x in v.items():
                walk(x, f"{path}.{k}" if path else str(k))
        elif isinstance(v, list):
            if not v:
                out.add(f"{path}[]")
            for x in v:
                walk(x, f"{path}[]")
        else:
            out.add(path)
    walk(body, "")
    trailing = re.compile(r"(\[\])+$")   # a list of scalars is listed as the list itself
    return {scope + " " + trailing.sub("", p) for p in out}


def load_inventory(path: Path = INVENTORY) -> set[str]:
    """The first cell (`` `scope path` ``) of every row of the inventory tables."""
    fields = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`([a-z_]+(?::[a-z_]+)?) ([^`]+)`\s*\|", line)
        if m:
            fields.add(f"{m.group(1)} {m.group(2).strip()}")
    return fields


def covered(path: str, inventory: set[str]) -> bool:
    if path in inventory:
        return True
    scope, _, p = path.partition(" ")
    parts = p.split(".")
    return any(f"{scope} {'.'.join(parts[:i])}.*" in inventory for i in range(1, len(parts) + 1))


def unlisted(bodies, inventory: set[str]) -> dict[str, int]:
    missing: dict[str, int] = {}
    for kind, body in bodies:
        for p in field_paths(kind, body):
            if not covered(p, inventory):
                missing[p] = missing.get(p, 0) + 1
    return missing


# -- pytest hooks ------------------------------------------------------------------------

def pytest_configure(config) -> None:
    install()


def pytest_collection_modifyitems(session, config, items) -> None:
    last = [i for i in items if i.nodeid.startswith("tests/test_privacy_inventory.py")]
    if last:
        items[:] = [i for i in items if i not in last] + last

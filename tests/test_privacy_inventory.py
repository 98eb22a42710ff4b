"""Every field that leaves the device is in the data inventory (docs/privacy.md).

tests/support/inventory.py collects every uplink body the suite produces (sealed by an in-process
agent, or opened by the reference console for agents run as processes) and runs this test last.
Run alone, it still checks the bodies of a short scenario it drives itself, with every privacy
path switched on, so it never passes on nothing.
"""
from __future__ import annotations

import time

from agent.cloud import schemas
from agent.owner.datakey import DataKey
from agent.owner.location import TABLE, Location
from agent.owner.privacy import Privacy
from agent.outbox.store import Store
from tests.support import inventory as inv
from tests.support.privacy import config, consent

inv.install()   # also when tests/conftest.py does not register the plugin


def _own_bodies(tmp_path) -> list[tuple[str, dict]]:
    """Bodies this feature produces: a telemetry body with positions, privacy events, the
    delete_data ack, device_wiped — built by the real code paths, checked against the schemas."""
    store = Store(tmp_path / "agent.db")
    emitted: list[dict] = []
    doc = config(1, location=consent("precise"))
    p = Privacy(store, config=lambda: doc, emit_event=emitted.append)
    key = DataKey.in_dir(tmp_path)
    loc = Location(store, p, key)
    p.reconcile("config")
    p.stop()
    now = int(time.time() * 1000)
    with store.batch() as c:
        c.execute(f"INSERT INTO {TABLE}(t_ms, blob) VALUES (?, ?)",
                  (now, key.seal_obj({"lat": 37.7211, "lon": -122.4723, "speed": 7.4, "course": 6.2,
                                      "prec_m": 30, "mode": "precise"}, TABLE.encode())))
    body = p.body_filter(loc.contribute({"t0": now, "signals": [{"name": "engine.rpm", "unit": "rpm",
                                                                 "t": [0], "v": [800]}]}))
    counts = p.delete_data(["location"])
    store.close()
    bodies = [("telemetry", body)] + [("event", e) for e in emitted]
    bodies += [("event", {"type": "device_wiped", "ts": now, "by": "test"}),
               ("ack", {"ref_kind": "command", "ref_seq": 1, "status": "done",
                        "result": {"request_id": "r", "deleted": counts}})]
    for kind, b in bodies:
        schemas.validate(kind, b)
    assert "positions" in body
    return bodies


def test_inventory_parses():
    fields = inv.load_inventory()
    assert "telemetry positions.lat" in fields and "event:privacy deleted" in fields
    assert inv.covered("event:health detail.peak_ms2", fields)
    assert not inv.covered("telemetry positions.altitude", fields)
    assert inv.unlisted([("event", {"type": "vehicle", "ts": 1, "owner_name": "x"})], fields) == \
        {"event:vehicle owner_name": 1}


def test_every_outbound_field_is_in_the_inventory(tmp_path):
    fields = inv.load_inventory()
    bodies = _own_bodies(tmp_path) + list(inv.OUTBOUND)
    missing = inv.unlisted(bodies, fields)
    assert not missing, ("fields leave the device that docs/privacy.md does not list (add them to the "
                         f"inventory with category, purpose, consent and retention): {sorted(missing)}")

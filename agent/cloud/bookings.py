"""Service bookings from the cloud (``down/booking``), kept durably for the technician at the car.

The JSON Schema (config/schemas/booking.json) caps every text field (longer is rejected, not
truncated, so nothing is silently changed). Validation beyond it: a booking must not lie in the
past (checked only once the clock is synchronised), the provider has a name that is not blank,
coordinates must be real ones (not 0,0 "null island"). Text is stored as given through bound
SQL parameters; it is escaped only where it is shown (:func:`drivers.core.text.safe_text`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

from agent.cloud.downlink import Outcome
from agent.outbox.store import Store
from drivers.core.text import safe_text

log = logging.getLogger(__name__)

PAST_GRACE_MS = 60 * 60 * 1000  # a booking up to an hour late is still accepted (check-in runs late)


def _problems(body: dict, now: int | None) -> str | None:
    if body["op"] == "cancel":
        return None
    if now is not None and body["scheduled_at"] < now - PAST_GRACE_MS:
        return f"scheduled_at {body['scheduled_at']} is in the past"
    provider = body["provider"]
    if not provider.get("name", "").strip():
        return "provider has no name"
    lat, lon = provider.get("lat"), provider.get("lon")
    if (lat is None) != (lon is None):
        return "provider has only one of lat/lon"
    if lat is not None and abs(lat) < 1e-6 and abs(lon) < 1e-6:
        return "provider coordinates 0,0 are not a real place"
    return None


class Bookings:
    def __init__(self, store: Store, *, now_ms: Callable[[], int | None] | None = None):
        self.store = store
        self._now_ms = now_ms or store.clock.synced_now_ms
        store.create_tables("bookings (booking_id TEXT PRIMARY KEY, doc TEXT, status TEXT, updated_ms INTEGER)")

    def handle(self, opened) -> Outcome:
        body = opened.body
        problem = _problems(body, self._now_ms())
        if problem:
            return Outcome("rejected", reason=problem)
        bid = body["booking_id"]
        now = self._now_ms() or 0
        with self.store.batch() as c:
            if body["op"] == "cancel":
                cur = c.execute("UPDATE bookings SET status='cancelled', updated_ms=? WHERE booking_id=?",
                                (now, bid))
                if cur.rowcount == 0:
                    return Outcome("rejected", reason=f"unknown booking {bid}")
            else:
                doc = {k: body[k] for k in ("booking_id", "service", "scheduled_at", "provider", "notes")
                       if k in body}
                c.execute("INSERT INTO bookings(booking_id, doc, status, updated_ms) VALUES (?,?,?,?) "
                          "ON CONFLICT(booking_id) DO UPDATE SET doc=excluded.doc, "
                          "status=CASE WHEN bookings.status IN ('checked_in','completed') "
                          "THEN bookings.status ELSE 'scheduled' END, updated_ms=excluded.updated_ms",
                          (bid, json.dumps(doc), "scheduled", now))
        log.info("booking %s: %s", safe_text(bid, 64), body["op"])
        return Outcome("accepted")

    def list(self) -> list[dict]:
        rows = self.store.query("SELECT booking_id, doc, status, updated_ms FROM bookings ORDER BY booking_id")
        return [{**json.loads(doc), "status": status, "updated_ms": upd} for _, doc, status, upd in rows]

    def get(self, booking_id: str) -> dict | None:
        return next((b for b in self.list() if b["booking_id"] == booking_id), None)

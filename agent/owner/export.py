"""``dongle export``: everything the device holds about the vehicle and its use, as JSON Lines.

Read from the store read-only with the data key (format ``dongle-export/1``, docs/privacy.md);
encrypted fields are opened, sealed envelopes are listed by size only.
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2

from agent.owner import location as location_mod
from agent.owner.datakey import KEY_FILE, DataKey, DataKeyError, EventsAtRest, open_secret_meta
from agent.technician.control import open_store_readonly
from drivers.core.clock import Clock

EXPORT_FORMAT = "dongle-export/1"


def _plain(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def export_records(conn: sqlite3.Connection, key: DataKey, *, device_id: str) -> tuple[int, Iterator[dict]]:
    """``(count, records)``: every row of every table as a JSON-ready map (``record`` = table),
    encrypted fields opened with the data key, after one ``export`` header record."""
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}

    def rows() -> Iterator[dict]:
        yield {"record": "export", "format": EXPORT_FORMAT, "device_id": device_id, "exported_at": Clock().now_ms(),
               "tables": counts, "data_key": "present" if key.path.exists() else "absent"}
        for t in tables:
            cur = conn.execute(f'SELECT * FROM "{t}"')
            cols = [d[0] for d in cur.description]
            for raw in cur:
                yield {"record": t, **_decode(t, dict(zip(cols, raw)), key)}

    return sum(counts.values()) + 1, rows()


def _decode(table: str, row: dict, key: DataKey) -> dict:
    try:
        if table == location_mod.TABLE:
            fix = key.open_obj(row.pop("blob"), location_mod.AAD)
            return {**row, **fix}
        if table == "events" and "body" in row:
            row["body"] = EventsAtRest(key).open(cbor2.loads(row["body"]))
        elif table == "outbox":
            payload = row.pop("payload", b"") or b""
            row["bytes"] = len(payload)
            row["note"] = "sealed for the cloud (HPKE); not readable on the device"
        elif table == "meta":
            row["value"] = open_secret_meta(key, row["key"], json.loads(row["value"]))
        elif table == "configs" and "doc" in row:
            row["doc"] = json.loads(row["doc"])
        elif table == "bookings" and "doc" in row:
            row["doc"] = json.loads(row["doc"])
        elif table == "service_log" and "record" in row:
            row["record"] = cbor2.loads(row["record"])
        elif table == "frames" and "block" in row:   # raw frames, a block of columns (docs/store.md)
            from agent.outbox.frame_blocks import decode_frames
            row.update(decode_frames(row["bus"], row.pop("block")))
        elif table == "quarantine" and "row" in row:
            row["row"] = cbor2.loads(row["row"])
    except (DataKeyError, ValueError, cbor2.CBORDecodeError) as e:
        row = {k: v for k, v in row.items() if k not in ("blob",)}
        row["unreadable"] = str(e)
    return _plain(row)


def export(db_path: Path, out: Path, *, data_dir: Path, device_id: str,
           progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Writes the export to ``out`` (mode 0600); returns the number of records."""
    conn = open_store_readonly(db_path)
    key = DataKey(Path(data_dir) / KEY_FILE, create=False)
    try:
        total, records = export_records(conn, key, device_id=device_id)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        n = 0
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
                if n % 200 == 0 or n == total:
                    progress(n, total)
        progress(n, max(n, total))
        return n
    finally:
        conn.close()

"""Erasing the owner's data at rest: the data directory of a stopped agent and the device's keys.

``dongle wipe`` (agent/cli/owner.py) ends here once the running agent has sent ``device_wiped``
and destroyed its data key and keys (agent/owner/owner_data.py): every table dropped with
``secure_delete``, the file vacuumed and its WAL truncated, every other file removed. Only the
uplink ``seq`` counter survives, so a device provisioned again under the same id never reuses a
number the cloud has seen.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.owner.datakey import KEY_FILE, DataKey
from agent.settings import Settings

log = logging.getLogger(__name__)

KEEP_META = ("uplink_seq", "schema_version")
# What `dongle provision` writes (agent/cloud/provision.py ALL_FILES, the pinned TUF root) and the TLS
# certificate the CA signed: all removed, so that provisioning again needs no --force.
PROVISION_FILES = ("device_sign.key", "device_enc.key", "tls.key", "tls.crt", "tls.csr", "device_sign.pub",
                   "device_enc.pub", "cloud_sign.pub", "cloud_enc.pub", "registration.json", "tuf_root.json")


def shred(path: Path) -> bool:
    """Overwrites a file with random bytes, syncs and unlinks it. True if it existed."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        size = path.stat().st_size
        with open(path, "r+b", buffering=0) as f:
            f.write(os.urandom(max(size, 1)))
            os.fsync(f.fileno())
    except OSError as e:
        log.warning("wipe: could not overwrite %s: %s", path, e)
    path.unlink(missing_ok=True)
    return True


def device_key_files(settings: Settings) -> list[Path]:
    """The device's private keys, its TLS certificate and the provisioning files next to them."""
    named = []
    if settings.keys is not None:
        named += [settings.keys.sign_key, settings.keys.enc_key]
    if settings.mqtt is not None:
        named += [settings.mqtt.key_file, settings.mqtt.cert_file]
    paths = [Path(p) for p in named]
    for d in {p.parent for p in paths[:2]}:
        paths += [d / name for name in PROVISION_FILES]
    out, seen = [], set()
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def wipe_data_dir(data_dir: Path, *, db_name: str = "agent.db") -> dict[str, Any]:
    """Clears a stopped agent's data directory (see the module docstring). Idempotent."""
    data_dir = Path(data_dir)
    result: dict[str, Any] = {"key_destroyed": DataKey(data_dir / KEY_FILE).destroy(), "tables": 0,
                              "files_removed": []}
    db = data_dir / db_name
    if db.exists():
        conn = sqlite3.connect(str(db), isolation_level=None)
        try:
            conn.execute("PRAGMA secure_delete=ON")
            keep = {k: v for k, v in conn.execute(
                f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(KEEP_META))})", KEEP_META)} \
                if _has_table(conn, "meta") else {}
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
                conn.execute(f'DROP TRIGGER IF EXISTS "{name}"')
            tables = [r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
            for name in tables:
                conn.execute(f'DELETE FROM "{name}"')
                conn.execute(f'DROP TABLE "{name}"')
            result["tables"] = len(tables)
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", list(keep.items()))
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    for p in sorted(data_dir.rglob("*"), reverse=True):
        if p.name in (db_name, f"{db_name}-wal", f"{db_name}-shm"):
            continue
        if p.is_file() or p.is_symlink():
            shred(p) if p.is_file() else p.unlink()
            result["files_removed"].append(str(p))
        elif p.is_dir():
            try:
                p.rmdir()
            except OSError:
                pass
    return result


def _has_table(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

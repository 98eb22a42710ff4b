"""The owner's data at the car: consent plumbing, ``delete_data``, ``dongle export``, ``dongle wipe``.

:func:`attach` adds to a running :class:`agent.app.Agent` the data key (:mod:`agent.datakey`),
the consent engine (:mod:`agent.privacy`), location collection (:mod:`agent.location`), the
uplink hooks (positions into telemetry bodies; the privacy gate as the *last* body filter), the
privacy button gesture and the control-socket requests ``privacy`` and ``wipe``.

``dongle export --out FILE``: everything the device holds about the vehicle and its use, as
JSON Lines (format in docs/privacy.md), read from the store read-only with the data key; a
progress bar on stderr.

``dongle wipe`` (a new owner, a returned dongle): confirmed at the terminal (type the device id)
and by a short press on the dongle's button. The running agent then sends ``device_wiped``
(waiting up to :data:`WIPED_ACK_S` for the broker's acknowledgement when online), stops
collecting, destroys the data key — first, so every encrypted VIN and position, wherever flash
wear levelling left a copy, is unreadable — and the device's private keys and certificate, and
stops. The CLI then clears the stopped agent's data directory (:func:`wipe_data_dir`): every
table dropped with ``secure_delete``, the file vacuumed and its WAL truncated, every other file
removed. Only the uplink ``seq`` counter survives, so a device provisioned again under the same
id never reuses a number the cloud has seen. Without keys the agent cannot start, and without
its TLS key the broker cannot be reached, until ``dongle provision`` runs again.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2

from agent.owner import location as location_mod
from agent.owner import privacy as privacy_mod
from drivers.core.clock import now_ms
from agent.owner.datakey import KEY_FILE, DataKey, DataKeyError

log = logging.getLogger(__name__)

EXPORT_FORMAT = "dongle-export/1"
WIPED_ACK_S = 15.0
BUTTON_TIMEOUT_S = 60.0
KEEP_META = ("uplink_seq", "schema_version")
# What `dongle provision` writes (agent/cloud/provision.py ALL_FILES, the pinned TUF root) and the TLS
# certificate the CA signed: all removed, so that provisioning again needs no --force.
PROVISION_FILES = ("device_sign.key", "device_enc.key", "tls.key", "tls.crt", "tls.csr", "device_sign.pub",
                   "device_enc.pub", "cloud_sign.pub", "cloud_enc.pub", "registration.json", "tuf_root.json")


# --------------------------------------------------------------------------------------------
# In the agent
# --------------------------------------------------------------------------------------------

class OwnerData:
    """The agent's component for the owner's data (see the module docstring)."""

    def __init__(self, agent, *, gpsd: tuple[str, int] = ("127.0.0.1", 2947)):
        self.agent = agent
        self.datakey = DataKey.in_dir(agent.settings.data_dir)
        self.privacy = privacy_mod.Privacy(agent.store, config=lambda: agent.config, emit_event=agent.emit_event)
        self.location = location_mod.Location(
            agent.store, self.privacy, self.datakey, gpsd_host=gpsd[0], gpsd_port=gpsd[1],
            seal=agent.sealer.seal, interval_s=lambda: agent.uplink.policy().interval_s,
            wake_uplink=agent.uplink.wake, emit_event=agent.emit_event)
        self.behaviour = BehaviourRows(agent)
        self.privacy.register("driving_behaviour", self.behaviour)
        self.gesture = privacy_mod.ButtonGesture(lambda: self.privacy.toggle("owner_button"))
        # Set by the lead's wiring (drivers/gpio.py): waits for a short press, True if pressed.
        self.confirm_by_button: Callable[[float], bool] | None = None
        # How the wiped agent ends itself: SIGTERM to the daemon (tests replace it).
        self.request_shutdown: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGTERM)
        self.wiped = False

    # -- component --------------------------------------------------------------------------
    def start(self) -> None:
        self.privacy.start()
        self.location.start()

    def stop(self) -> None:
        self.location.stop()
        self.privacy.stop()

    def status(self) -> dict:
        return {"privacy": self.privacy.status(), "location": self.location.status(), "wiped": self.wiped}

    def apply_config(self, doc: dict) -> list[str]:
        return self.privacy.apply_config(doc)

    def delete_data(self, categories: list[str]) -> dict[str, int]:
        return self.privacy.delete_data(categories)

    def location_active(self) -> bool:
        return self.location.location_active()

    # -- wipe (control request "wipe") ------------------------------------------------------
    def wipe_request(self, request: dict, peer=None, reply: Callable[[dict], None] | None = None) -> dict:
        from agent.technician.control import ControlError

        reply = reply or (lambda m: None)
        if not request.get("confirmed"):
            raise ControlError("refused", "wipe: not confirmed at the terminal")
        confirm = self.confirm_by_button or _indicators_button(self.agent)
        if confirm is None:
            raise ControlError("refused", "wipe: this dongle has no button to confirm with; nothing was wiped")
        reply({"prompt": f"Press the dongle's button within {BUTTON_TIMEOUT_S:.0f} s to confirm the wipe."})
        if not confirm(BUTTON_TIMEOUT_S):
            raise ControlError("refused", "wipe: the button was not pressed; nothing was wiped")
        by = str(request.get("by") or "owner at the car (terminal and button)")[:200]
        reply({"progress": "confirmed; telling the cloud (device_wiped)"})
        sent = self.send_wiped(by)
        reply({"progress": "destroying the data key and the device's keys"})
        destroyed = self.destroy_keys()
        self.wiped = True
        log.warning("wipe: confirmed by %s; device_wiped %s; keys destroyed; the agent stops", by,
                    "acknowledged" if sent else "not acknowledged (offline)")
        threading.Timer(0.5, self.request_shutdown).start()
        return {"device_wiped_sent": sent, "destroyed": destroyed, "stopping": True}

    def send_wiped(self, by: str, timeout_s: float = WIPED_ACK_S) -> bool:
        """Queues ``device_wiped`` and waits (while connected) for the broker's PUBACK."""
        a = self.agent
        a.emit_event({"type": "device_wiped", "ts": now_ms(), "by": by})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = a.store.query("SELECT count(*) FROM events")[0][0] + \
                a.store.query("SELECT count(*) FROM outbox WHERE suffix='up/event'")[0][0]
            if pending == 0:
                return True
            if not a.link.connected and time.monotonic() > deadline - timeout_s + 3:
                return False
            a.uplink.wake()
            time.sleep(0.1)
        return False

    def destroy_keys(self) -> list[str]:
        """Stops collection, destroys the data key (first), then the device's key files."""
        self.location.on_stopped()
        destroyed = [str(self.datakey.path)] if self.datakey.destroy() else []
        for path in device_key_files(self.agent.settings.data):
            if shred(path):
                destroyed.append(str(path))
        return destroyed


class BehaviourRows:
    """The ``driving_behaviour`` category's handler: the harsh-driving ``health`` events
    (agent/health/driving.py) not yet sealed, in the store's ``events`` table and its in-memory
    overflow, and the detector's episode in progress. The detector itself asks
    :meth:`agent.privacy.Privacy.allowed` before it analyses anything."""

    def __init__(self, agent):
        self.agent = agent

    def _is_behaviour(self, body: dict) -> bool:
        return body.get("type") == "health" and body.get("kind") in privacy_mod.BEHAVIOUR_EVENT_KINDS

    def on_collecting(self, mode: str) -> None:
        pass

    def on_stopped(self) -> None:
        detector = getattr(getattr(self.agent, "health", None), "driving", None)
        if detector is not None:
            detector.reset()

    def _purge(self, older_than: int | None = None) -> int:
        store = self.agent.store
        n = 0
        with store.batch() as c:
            rows = c.execute("SELECT id, ts, body FROM events").fetchall()
            doomed = [rid for rid, ts, body in rows if (older_than is None or ts < older_than)
                      and self._is_behaviour(cbor2.loads(body))]
            c.executemany("DELETE FROM events WHERE id=?", [(rid,) for rid in doomed])
            n += len(doomed)
        memory = getattr(store, "_memory_events", None)   # events waiting for a full disk to clear
        if memory:
            keep = [b for b in memory if not (self._is_behaviour(b) and (older_than is None
                                                                          or b.get("ts", 0) < older_than))]
            n += len(memory) - len(keep)
            memory.clear()
            memory.extend(keep)
        return n

    def purge_unsent(self) -> int:
        return self._purge()

    def purge_all(self) -> int:
        return self._purge()

    def purge_older(self, cutoff_ms: int) -> int:
        return self._purge(cutoff_ms)


def _indicators_button(agent) -> Callable[[float], bool] | None:
    ind = getattr(agent, "indicators", None)
    if ind is not None and getattr(ind, "has_button", False):
        return ind.confirm_by_button
    return None


def attach(agent) -> OwnerData:
    """Adds the owner's-data component to ``agent``. Local settings ``[gnss]`` (``host``,
    ``port``) name gpsd; default 127.0.0.1:2947."""
    g = agent.settings.data.get("gnss") or {}
    owner = OwnerData(agent, gpsd=(str(g.get("host", "127.0.0.1")), int(g.get("port", 2947))))
    agent.owner_data, agent.privacy, agent.location = owner, owner.privacy, owner.location
    up = agent.uplink
    up.body_filters.insert(0, owner.location.contribute)   # positions into telemetry bodies
    up.body_filters.append(owner.privacy.body_filter)       # the gate: keep it the last filter
    up.event_filters.append(owner.privacy.body_filter)      # ... and for events too
    io = getattr(getattr(agent, "indicators", None), "io", None)
    if io is not None and getattr(io, "_on_press", "n/a") is None:   # short presses feed the gesture
        io._on_press = owner.gesture.press
    tech = getattr(agent, "technician", None)
    server = getattr(tech, "server", None)
    if server is not None:
        server.handlers["privacy"] = owner.privacy.control_handler
        server.handlers["wipe"] = owner.wipe_request
    agent.add_component("owner_data", owner)
    return owner


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

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


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def device_key_files(settings_data: dict, base: Path | None = None) -> list[Path]:
    """The device's private keys, its TLS certificate and the provisioning files next to them."""
    base = base or Path(".")
    keys = settings_data.get("keys") or {}
    mqtt = settings_data.get("mqtt") or {}
    named = [keys.get("sign_key"), keys.get("enc_key"), mqtt.get("key_file"), mqtt.get("cert_file")]
    paths = [_resolve(base, v) for v in named if isinstance(v, str)]
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


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

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
        yield {"record": "export", "format": EXPORT_FORMAT, "device_id": device_id, "exported_at": now_ms(),
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
            row["body"] = cbor2.loads(row["body"])
        elif table == "outbox":
            payload = row.pop("payload", b"") or b""
            row["bytes"] = len(payload)
            row["note"] = "sealed for the cloud (HPKE); not readable on the device"
        elif table == "meta":
            value = json.loads(row["value"])
            if isinstance(value, dict) and set(value) == {"enc"}:
                value = key.open_obj(bytes.fromhex(value["enc"]), b"meta:" + row["key"].encode())
            row["value"] = value
        elif table == "configs" and "doc" in row:
            row["doc"] = json.loads(row["doc"])
        elif table == "bookings" and "doc" in row:
            row["doc"] = json.loads(row["doc"])
        elif table == "service_log" and "record" in row:
            row["record"] = cbor2.loads(row["record"])
    except (DataKeyError, ValueError, cbor2.CBORDecodeError) as e:
        row = {k: v for k, v in row.items() if k not in ("blob",)}
        row["unreadable"] = str(e)
    return _plain(row)


def export(db_path: Path, out: Path, *, data_dir: Path, device_id: str,
           progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Writes the export to ``out`` (mode 0600); returns the number of records."""
    from agent.technician.control import open_store_readonly

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


def progress_bar(stream=sys.stderr, width: int = 30) -> Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        fill = int(frac * width)
        stream.write(f"\rexport [{'#' * fill}{'.' * (width - fill)}] {done}/{total} records ({frac:.0%})")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return show


# --------------------------------------------------------------------------------------------
# CLI (registered by agent/cli/main.py's build_parser)
# --------------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from agent.cli import main as cli
    from agent.technician.control import ClientError

    try:
        s = cli.settings_of(args)
        n = export(s.db_path, Path(args.out), data_dir=s.data_dir, device_id=s.device_id,
                   progress=(lambda d, t: None) if args.json else progress_bar())
    except ClientError as e:
        return cli.fail(args, e)
    except OSError as e:
        return cli.fail(args, ClientError("failed", f"export: {e}"))
    if args.json:
        cli.emit_json({"ok": True, "out": str(args.out), "records": n})
    else:
        print(f"exported {n} records to {args.out} (JSON Lines, format {EXPORT_FORMAT}; see docs/privacy.md)")
    return cli.EXIT_OK


def cmd_privacy(args: argparse.Namespace) -> int:
    from agent.cli import main as cli
    from agent.technician.control import ClientError

    try:
        res = cli.ask_agent(args, "privacy", action=args.action)
    except ClientError as e:
        return cli.fail(args, e)
    if args.json:
        cli.emit_json({"ok": True, **res})
        return cli.EXIT_OK
    rows = [(cat, st["mode"], st["state"], "yes" if st["paused"] else "no", st.get("consent_id"),
             cli.when(st.get("until"))) for cat, st in res["privacy"].items()]
    print(cli.table(rows, ["category", "mode", "state", "paused", "consent", "until"]))
    return cli.EXIT_OK


def wipe_cli(args: argparse.Namespace, *, ask: Callable[[str], str] = input, out=sys.stderr,
             wait_stopped_s: float = 60.0) -> int:
    """``dongle wipe``: terminal confirmation, then the agent (button, device_wiped, keys), then
    the data directory once the agent has stopped."""
    from agent.cli import main as cli
    from agent.technician.control import AgentNotRunning, ClientError

    try:
        s = cli.settings_of(args)
        print(f"This erases everything on dongle {s.device_id}: collected data, consents, bookings, the "
              "service records and the device's keys. It cannot be undone; the dongle must be provisioned "
              "again before it can be used.", file=out)
        try:
            answer = ask(f"Type the device id ({s.device_id}) to confirm: ")
        except EOFError:
            answer = ""
        if answer.strip() != s.device_id:
            raise ClientError("refused", "not confirmed at the terminal; nothing was wiped")

        def interim(m: dict) -> None:
            if "prompt" in m or "progress" in m:
                print(m.get("prompt") or m.get("progress"), file=out, flush=True)

        agent_result: dict = {}
        try:
            agent_result = cli.ask_agent(args, "wipe", timeout=None, on_interim=interim, confirmed=True,
                                         by=getattr(args, "by", None) or "owner at the car (dongle wipe)")
        except AgentNotRunning:
            raise ClientError("no_agent", "the agent is not running: start it (sudo systemctl start "
                                          "dongle-agent) so that the button can confirm and the cloud is told; "
                                          "nothing was wiped") from None
        deadline = time.monotonic() + wait_stopped_s
        while time.monotonic() < deadline:
            try:
                control_call_status(s)
            except AgentNotRunning:
                break
            except ClientError:
                pass
            time.sleep(0.2)
        else:
            raise ClientError("timeout", "the agent did not stop after destroying its keys; stop it "
                                         "(sudo systemctl stop dongle-agent) and run dongle wipe again")
        result = wipe_data_dir(s.data_dir)
    except ClientError as e:
        return cli.fail(args, e)
    summary = {"ok": True, "device_wiped_sent": agent_result.get("device_wiped_sent", False),
               "keys_destroyed": agent_result.get("destroyed", []), **result}
    if getattr(args, "json", False):
        cli.emit_json(summary)
    else:
        told = "the cloud was told (device_wiped acknowledged)" if summary["device_wiped_sent"] \
            else "the cloud could not be told (offline)"
        print(f"Wiped: data key and {len(summary['keys_destroyed'])} key file(s) destroyed, "
              f"{result['tables']} tables and {len(result['files_removed'])} files erased; {told}. "
              "Provision the dongle again before use (dongle provision).", file=out)
    return cli.EXIT_OK


def control_call_status(s) -> dict:
    from agent.technician import control
    return control.call(s.socket, "status", timeout=5, group=s.group)


def cmd_wipe(args: argparse.Namespace) -> int:
    return wipe_cli(args)

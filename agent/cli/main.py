"""``dongle``: the technician / operator command line.

Each subcommand is an ``add_<name>_parser(subparsers)`` function that registers its arguments
and sets ``func`` to a ``cmd_<name>(args) -> int`` handler. Exit codes: 0 success, 1 the
operation was refused or failed, 2 bad arguments, 3 it needs the running agent and none runs.

Most commands talk to the running agent over its control socket (agent/technician/control.py); where it
makes sense (``status``, ``dtc``, ``bookings``, ``service-log``, ``config``, ``buffer``) they
fall back to reading the agent's SQLite store read-only when the agent is stopped, and say so.
``capture`` records through the agent's CAN buses, or opens the interfaces itself when no agent
runs. Every command takes ``--json`` (one JSON document on stdout; errors as
``{"ok": false, "code", "error"}``) and otherwise prints a table. The settings file is
``--config FILE`` (default /etc/dongle/agent.toml).
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent import settings as settings_mod
from agent.settings import Settings
from agent.technician import control
from agent.technician.control import AgentNotRunning, ClientError
from agent.version import add_version_option

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------

def safe(text: object, limit: int = 200) -> str:
    """Text from the car or the cloud shown on a terminal: control characters escaped."""
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return s if len(s) <= limit else s[:limit] + "…"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[safe("" if v is None else v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, object]]) -> str:
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {safe('-' if v is None else v, 400)}" for k, v in items)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def emit_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def fail(args: argparse.Namespace, e: ClientError) -> int:
    if getattr(args, "json", False):
        emit_json({"ok": False, "code": e.code, "error": e.message})
    print(f"dongle: {e.message}", file=sys.stderr)
    if e.code == "no_agent":
        return EXIT_NO_AGENT
    return EXIT_FAILED


# --------------------------------------------------------------------------------------------
# Talking to the agent, or reading its store
# --------------------------------------------------------------------------------------------

def settings_of(args: argparse.Namespace) -> Settings:
    """The agent's settings, read as the daemon reads them but without opening its key files."""
    try:
        return settings_mod.load(getattr(args, "config", None) or settings_mod.DEFAULT_PATH, check_files=False)
    except settings_mod.SettingsError as e:
        code = "no_settings" if "not found" in str(e) else "bad_settings"
        raise ClientError(code, str(e)) from None


def ask_agent(args: argparse.Namespace, op: str, *, timeout: float | None = 30.0,
              on_interim: Callable[[dict], None] | None = None, **kw) -> dict:
    s = settings_of(args)
    return control.call(s.control.socket, op, timeout=timeout, on_interim=on_interim, group=s.control.group, **kw)


def offline(args: argparse.Namespace):
    """``(settings, read-only connection)`` to the stopped agent's store."""
    s = settings_of(args)
    return s, control.open_store_readonly(s.db_path)


def _meta(conn, key: str, default=None):
    row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return json.loads(row[0]) if row else default


def _has_table(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _note_offline(args: argparse.Namespace) -> None:
    if not args.json:
        print("(the agent is not running: read from its store, read-only)\n", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# provision
# --------------------------------------------------------------------------------------------

def cmd_provision(args: argparse.Namespace) -> int:
    from agent.cloud.provision import ProvisionError, provision

    try:
        result = provision(args.device_id, args.cloud_sign_pub, args.cloud_enc_pub, args.out, force=args.force,
                           tuf_root=args.tuf_root)
    except ProvisionError as e:
        print(f"dongle provision: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"dongle provision: {e}", file=sys.stderr)
        return 1
    print(f"device_id       {result['device_id']}")
    print(f"kid_sign        {result['kid_sign']}")
    print(f"kid_enc         {result['kid_enc']}")
    print(f"kid_cloud_sign  {result['kid_cloud_sign']}")
    print(f"kid_cloud_enc   {result['kid_cloud_enc']}")
    print(f"registration    {result['paths']['registration.json']}")
    if result.get("tuf_root"):
        print(f"tuf_root        {result['tuf_root']}")
    return 0


def add_provision_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("provision", help="create this device's keys and registration request",
                       description="Create the device's Ed25519, X25519 and TLS keys, the TLS CSR and "
                                   "registration.json in --out (PROTOCOL §1).")
    p.add_argument("--device-id", required=True, help="4-64 characters of [a-z0-9-]; the TLS CN")
    p.add_argument("--cloud-sign-pub", required=True, metavar="PEM", help="the cloud's Ed25519 public key")
    p.add_argument("--cloud-enc-pub", required=True, metavar="PEM", help="the cloud's X25519 public key")
    p.add_argument("--out", required=True, metavar="DIR", help="key directory, e.g. /etc/dongle/keys")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.add_argument("--tuf-root", metavar="FILE", help="the update repository's TUF root metadata to pin "
                                                      "(copied to DIR/tuf_root.json; docs/updates.md)")
    p.set_defaults(func=cmd_provision)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------

def format_status(st: dict) -> str:
    if not st.get("running", True):
        return pairs([("agent", "NOT RUNNING (values from its store)"), ("device", st.get("device_id")),
                      ("vehicle VIN", (st.get("vehicle") or {}).get("vin")),
                      ("config version", st.get("config_version")),
                      ("buffer", ", ".join(f"{k} {v}" for k, v in st["buffer"]["depth"].items())),
                      ("last uplink seq", st.get("last_uplink_seq"))])
    adapter = st.get("adapter")
    rows = [
        ("device", st["device_id"]), ("agent", st["agent"]),
        ("vehicle VIN", st["vehicle"].get("vin") or "unknown"),
        ("protocol", st["vehicle"].get("protocol")),
        ("OBD adapter", "not configured" if adapter is None else
         f"{adapter['port']}: {'connected' if adapter['connected'] else 'NOT CONNECTED'}"),
    ]
    for name, b in (st.get("buses") or {}).items():
        lost = ", ".join(f"{b[k]} {k}" for k in ("drops", "invalid", "unparsable") if b.get(k))
        rows.append((f"CAN {name}", f"{b['state']}, {b['frames']} frames, {b['errors']} errors"
                     + (f" ({lost})" if lost else "")))
    rows += [
        ("broker", f"{st['broker']['endpoint']}: {'connected' if st['broker']['connected'] else 'NOT CONNECTED'}"),
        ("config version", st["config_version"]),
        ("buffer", ", ".join(f"{k} {v}" for k, v in st["buffer"]["depth"].items())
         + f" (oldest {ago(st['buffer']['oldest_age_s'])})"),
        ("disk", f"{st['disk']['free_bytes'] / 1e9:.1f} GB free of {st['disk']['total_bytes'] / 1e9:.1f} GB; "
                 f"store {st['disk']['db_bytes'] / 1e6:.1f} MB"),
        ("clock", "synchronised" if st["clock"]["synced"] else "NOT SYNCHRONISED"),
        ("technician mode", "on" if st.get("technician_mode") else "off"),
    ]
    h = st.get("health")
    if h:
        rows.append(("health", f"battery {h['battery_12v']}, trouble codes {h['dtc']}, maintenance "
                               + (", ".join(f"{k} {v}" for k, v in h["maintenance"].items()) or "-")
                               + (f", odometer {h['odometer_km']:.0f} km" if h.get("odometer_km") is not None else "")
                               + (", in a trip" if h.get("trip") else "")))
    if st.get("pending_clear_dtc"):
        rows.append(("cloud request", "clear trouble codes (confirm with: dongle dtc clear)"))
    for k, v in (st.get("last_errors") or {}).items():
        rows.append((f"last error {k}", v))
    return pairs(rows)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        try:
            st = ask_agent(args, "status")
            st["running"] = True
        except AgentNotRunning:
            s, conn = offline(args)
            from agent.technician.handlers import buffer_report
            st = {"running": False, "device_id": s.device_id, "vehicle": _meta(conn, "vehicle"),
                  "config_version": _meta(conn, "active_config", 0),
                  "buffer": buffer_report(lambda q, p=(): conn.execute(q, p).fetchall()),
                  "last_uplink_seq": int(_meta(conn, "uplink_seq", 0))}
    except ClientError as e:
        return fail(args, e)
    if args.json:
        emit_json(st)
    else:
        print(format_status(st))
    return EXIT_OK


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="vehicle, adapter, broker link, config, buffer, disk, clock, errors")
    _common(p)
    p.set_defaults(func=cmd_status)


# --------------------------------------------------------------------------------------------
# live
# --------------------------------------------------------------------------------------------

def format_live(signals: list[dict]) -> str:
    if not signals:
        return "no signals received yet (is the adapter connected and the ignition on?)"
    return table([(s["name"], f"{s['value']:.6g}", s["unit"], ago(s["age_s"])) for s in signals],
                 ("signal", "value", "unit", "age"))


def cmd_live(args: argparse.Namespace) -> int:
    try:
        while True:
            res = ask_agent(args, "live")
            if args.json:
                print(json.dumps(res["signals"]), flush=True)
            else:
                if not args.once and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                print(format_live(res["signals"]), flush=True)
            if args.once:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    except ClientError as e:
        return fail(args, e)


def add_live_parser(sub) -> None:
    p = sub.add_parser("live", help="a refreshing view of the active signals (Ctrl-C to leave)")
    _common(p)
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    p.set_defaults(func=cmd_live)


# --------------------------------------------------------------------------------------------
# dtc / dtc clear
# --------------------------------------------------------------------------------------------

def format_dtc(res: dict) -> str:
    out = []
    if res.get("source") == "last_reported":
        out.append("(the agent is not running: the codes it last reported)")
    if not res["codes"]:
        out.append(f"No trouble codes. MIL {'ON' if res['mil'] else 'off'}.")
    else:
        out.append(table([(c["code"], c["state"], c.get("severity", ""), c.get("desc", ""))
                          for c in res["codes"]], ("code", "state", "severity", "description")))
        out.append(f"\nMIL (check engine light): {'ON' if res['mil'] else 'off'}; overall severity: "
                   f"{res.get('severity', '-')}")
    if res.get("freeze"):
        out.append("\nFreeze frame:")
        out.append(pairs([(k, v) for k, v in sorted(res["freeze"].items())]))
    if res.get("pending_clear_dtc"):
        out.append("\nThe cloud asked for these codes to be cleared: confirm with `dongle dtc clear`.")
    return "\n".join(out)


def _dtc_offline(args) -> dict:
    from agent.vehicle.dtc import META_KEY, describe
    from agent.health.severity import code_severity, severity
    _, conn = offline(args)
    last = _meta(conn, META_KEY) or []
    mil = any(k == "MIL" and v for k, v in last)
    codes = [{"code": k, "state": v, "desc": describe(k), "severity": code_severity(k, v, mil)}
             for k, v in last if k != "MIL"]
    return {"source": "last_reported", "codes": codes, "mil": mil, "severity": severity(codes, mil),
            "pending_clear_dtc": _meta(conn, "pending_clear_dtc")}


def cmd_dtc(args: argparse.Namespace) -> int:
    if args.action == "clear":
        return cmd_dtc_clear(args)
    try:
        try:
            res = ask_agent(args, "dtc", timeout=60)
            res["source"] = "vehicle"
        except AgentNotRunning:
            res = _dtc_offline(args)
    except ClientError as e:
        return fail(args, e)
    if args.json:
        emit_json(res)
    else:
        print(format_dtc(res))
    return EXIT_OK


def cmd_dtc_clear(args: argparse.Namespace) -> int:
    try:
        res = ask_agent(args, "dtc", timeout=60)
        if not args.json:
            print(format_dtc(res))
        if not res["codes"] and not res["mil"]:
            msg = "no trouble codes are set; nothing to clear"
            emit_json({"ok": True, "cleared": [], "note": msg}) if args.json else print(msg)
            return EXIT_OK
        print(f"\nClear {len(res['codes'])} trouble code(s) from the vehicle? This also resets its "
              "emission readiness monitors.\nType 'yes' to confirm: ", end="", file=sys.stderr, flush=True)
        try:
            answer = input()
        except EOFError:
            answer = ""
        if answer.strip().lower() != "yes":
            raise ClientError("refused", "not confirmed at the terminal; nothing was cleared")

        def interim(m: dict) -> None:
            if "prompt" in m or "progress" in m:
                print(m.get("prompt") or m.get("progress"), file=sys.stderr, flush=True)

        done = ask_agent(args, "dtc_clear", timeout=None, on_interim=interim, confirmed=True,
                         codes_seen=[c["code"] for c in res["codes"]], button_timeout_s=args.button_timeout)
    except ClientError as e:
        return fail(args, e)
    if args.json:
        emit_json({"ok": True, **done})
    else:
        print(f"Cleared: {', '.join(done['cleared']) or 'no codes were set'} (recorded: {done['by']}).")
    return EXIT_OK


def add_dtc_parser(sub) -> None:
    p = sub.add_parser("dtc", help="trouble codes (with descriptions, freeze frame); `dtc clear` clears them",
                       description="Read the vehicle's trouble codes now. `dongle dtc clear` clears them after "
                                   "you confirm at the terminal and, on a dongle with a button, press it.")
    _common(p)
    p.add_argument("action", nargs="?", choices=["clear"], help="clear the codes (asks for confirmation)")
    p.add_argument("--button-timeout", type=float, default=60.0, metavar="S",
                   help="clear: how long the dongle waits for its button to be pressed (default 60)")
    p.set_defaults(func=cmd_dtc)


# --------------------------------------------------------------------------------------------
# bookings / booking checkin / booking complete
# --------------------------------------------------------------------------------------------

def format_bookings(bookings: list[dict]) -> str:
    if not bookings:
        return "no bookings"
    return table([(b["booking_id"], b["status"], when(b.get("scheduled_at")), b.get("service", ""),
                   (b.get("provider") or {}).get("name", ""), b.get("notes", "")) for b in bookings],
                 ("id", "status", "scheduled", "service", "provider", "notes"))


def _bookings_offline(args) -> list[dict]:
    _, conn = offline(args)
    if not _has_table(conn, "bookings"):
        return []
    rows = conn.execute("SELECT doc, status, updated_ms FROM bookings ORDER BY booking_id").fetchall()
    return [{**json.loads(d), "status": s, "updated_ms": u} for d, s, u in rows]


def ask_or_read(args: argparse.Namespace, op: str, read_stopped: Callable[[], dict], **kw) -> dict:
    """Asks the running agent; when none runs, says so and reads its store read-only instead."""
    try:
        return ask_agent(args, op, **kw)
    except AgentNotRunning:
        _note_offline(args)
        return read_stopped()


def cmd_bookings(args: argparse.Namespace) -> int:
    try:
        bookings = ask_or_read(args, "bookings", lambda: {"bookings": _bookings_offline(args)})["bookings"]
    except ClientError as e:
        return fail(args, e)
    emit_json(bookings) if args.json else print(format_bookings(bookings))
    return EXIT_OK


def add_bookings_parser(sub) -> None:
    p = sub.add_parser("bookings", help="the service bookings the cloud sent")
    _common(p)
    p.set_defaults(func=cmd_bookings)


def cmd_booking(args: argparse.Namespace) -> int:
    try:
        if args.action == "checkin":
            res = ask_agent(args, "booking_checkin", booking_id=args.booking_id)
            text = f"Booking {safe(args.booking_id)} checked in."
        else:
            res = ask_agent(args, "booking_complete", booking_id=args.booking_id, odometer_km=args.odometer,
                            items=args.item, **({"technician": args.technician} if args.technician else {}))
            r = res["record"]
            text = (f"Booking {safe(args.booking_id)} completed. Service record #{r['hash'][:16]}… appended "
                    f"(odometer {r['odometer_km']} km, items: {', '.join(r['items'])}, technician {r['technician']}).")
    except ClientError as e:
        return fail(args, e)
    emit_json(res) if args.json else print(text)
    return EXIT_OK


def add_booking_parser(sub) -> None:
    p = sub.add_parser("booking", help="check in or complete a booking")
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = bsub.add_parser("checkin", help="the car has arrived for booking ID")
    _common(c)
    c.add_argument("booking_id", metavar="ID")
    c.set_defaults(func=cmd_booking)
    d = bsub.add_parser("complete", help="the service of booking ID is done: appends the service record")
    _common(d)
    d.add_argument("booking_id", metavar="ID")
    d.add_argument("--odometer", type=float, required=True, metavar="KM", help="odometer reading in km")
    d.add_argument("--item", action="append", required=True, metavar="ITEM",
                   help="work done, repeatable (e.g. oil_change; maintenance kinds count from these)")
    d.add_argument("--technician", help="name recorded (default: your login name)")
    d.set_defaults(func=cmd_booking)


# --------------------------------------------------------------------------------------------
# service-log
# --------------------------------------------------------------------------------------------

def format_service_log(res: dict) -> str:
    recs = res["records"]
    out = [table([(i, when(r.get("ts")), r.get("booking_id"), r.get("odometer_km"), ", ".join(r.get("items", [])),
                   r.get("technician"), r["hash"][:16] + "…") for i, r in enumerate(recs)],
                 ("#", "time", "booking", "km", "items", "technician", "hash"))
           if recs else "the service log is empty"]
    v = res.get("verification")
    if v is not None:
        if v["ok"]:
            out.append(f"\nVERIFIED: all {v['records']} record(s) chain correctly (head {v['head'][:16]}…).")
        else:
            out.append(f"\nTAMPERED: {len(v['problems'])} problem(s) in {v['records']} record(s):")
            out += [f"  record #{p['index']} (booking {p['booking_id']}): {p['problem']}" for p in v["problems"]]
    return "\n".join(out)


def cmd_service_log(args: argparse.Namespace) -> int:
    from agent.technician import service_log
    def read_stopped() -> dict:
        _, conn = offline(args)
        rows = conn.execute(f"SELECT record, hash FROM {service_log.TABLE} ORDER BY idx").fetchall() \
            if _has_table(conn, service_log.TABLE) else []
        res = {"records": [service_log._row_to_record(r, h) for r, h in rows]}
        if args.verify:
            res["verification"] = service_log.verify_rows(rows).as_dict()
        return res

    try:
        res = ask_or_read(args, "service_log", read_stopped, verify=args.verify)
    except ClientError as e:
        return fail(args, e)
    emit_json(res) if args.json else print(format_service_log(res))
    if args.verify and not res["verification"]["ok"]:
        return EXIT_FAILED
    return EXIT_OK


def add_service_log_parser(sub) -> None:
    p = sub.add_parser("service-log", help="the service record chain (PROTOCOL §5)")
    _common(p)
    p.add_argument("--verify", action="store_true", help="recompute every hash; exit 1 if the chain is broken")
    p.set_defaults(func=cmd_service_log)


# --------------------------------------------------------------------------------------------
# config show / diff
# --------------------------------------------------------------------------------------------

def config_changes(old: object, new: object, path: str = "") -> list[dict]:
    """The leaves that differ between two JSON documents: ``[{"path", "old", "new"}]``."""
    if isinstance(old, dict) or isinstance(new, dict):
        if not isinstance(old, dict) and old is not None or not isinstance(new, dict) and new is not None:
            return [] if old == new else [{"path": path, "old": old, "new": new}]
        old, new = old or {}, new or {}
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_changes(old.get(k), new.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [{"path": path, "old": old, "new": new}]


def _configs_offline(args) -> dict:
    from agent.cloud.cloudconfig import default_config
    _, conn = offline(args)
    version = _meta(conn, "active_config")
    docs = {v: json.loads(d) for v, d in conn.execute("SELECT version, doc FROM configs ORDER BY version")}
    active = docs.get(version, default_config())
    prev = [d for v, d in docs.items() if v < int(active.get("version", 0))]
    return {"active": active, "previous": prev[-1] if prev else None, "default": default_config()}


def cmd_config(args: argparse.Namespace) -> int:
    try:
        res = ask_or_read(args, "config", lambda: _configs_offline(args))
    except ClientError as e:
        return fail(args, e)
    active = res["active"]
    if args.action == "show":
        emit_json(active) if args.json else print(json.dumps(active, indent=2, sort_keys=True))
        return EXIT_OK
    other, name = (res["default"], "shipped default") if args.against == "default" else \
        (res["previous"], f"previous (v{(res['previous'] or {}).get('version')})")
    if other is None:
        other, name = res["default"], "shipped default (no previous version stored)"
    changes = config_changes(other, active)
    if args.json:
        emit_json({"against": name, "active_version": active.get("version"), "changes": changes})
        return EXIT_OK
    a = json.dumps(other, indent=2, sort_keys=True).splitlines()
    b = json.dumps(active, indent=2, sort_keys=True).splitlines()
    diff = list(difflib.unified_diff(a, b, fromfile=name, tofile=f"active (v{active.get('version')})", lineterm=""))
    print("\n".join(diff) if diff else f"the active config (v{active.get('version')}) is the same as the {name}")
    return EXIT_OK


def add_config_parser(sub) -> None:
    p = sub.add_parser("config", help="the active cloud config: show, or diff against the previous one")
    _common(p)
    p.add_argument("action", choices=["show", "diff"])
    p.add_argument("--against", choices=["previous", "default"], default="previous",
                   help="diff against the previous version (default) or the shipped default")
    p.set_defaults(func=cmd_config)


# --------------------------------------------------------------------------------------------
# buffer
# --------------------------------------------------------------------------------------------

def format_buffer(res: dict) -> str:
    rows = [(k, res["depth"][k], ago(res["oldest_age_s"][k])) for k in res["depth"]]
    out = [table(rows, ("kind", "depth", "oldest"))]
    if res.get("outbox_by_topic"):
        out.append("\noutbox by topic: " + ", ".join(f"{k} {v}" for k, v in res["outbox_by_topic"].items()))
    out.append(f"evictions: {res['evictions']}")
    if any((res.get("ingest_dropped") or {}).values()):
        out.append("dropped at ingest (queue full): " + ", ".join(f"{k} {v}" for k, v in res["ingest_dropped"].items()))
    return "\n".join(out)


def cmd_buffer(args: argparse.Namespace) -> int:
    from agent.technician.handlers import buffer_report
    def read_stopped() -> dict:
        _, conn = offline(args)
        return buffer_report(lambda q, p=(): conn.execute(q, p).fetchall())

    try:
        res = ask_or_read(args, "buffer", read_stopped)
    except ClientError as e:
        return fail(args, e)
    emit_json(res) if args.json else print(format_buffer(res))
    return EXIT_OK


def add_buffer_parser(sub) -> None:
    p = sub.add_parser("buffer", help="what waits to be sent: depth per kind, oldest item, evictions")
    _common(p)
    p.set_defaults(func=cmd_buffer)


# --------------------------------------------------------------------------------------------
# battery (EV traction battery: readings, trend, projected date, warnings)
# --------------------------------------------------------------------------------------------

def cmd_battery(args: argparse.Namespace) -> int:
    from agent.health.traction_battery import format_battery_report
    try:
        res = ask_agent(args, "battery")
    except ClientError as e:
        return fail(args, e)
    if args.json:
        emit_json(res)
    elif res.get("available") is False:
        print(f"no traction battery data: {safe(res.get('reason'))}")
    else:
        print(format_battery_report(res))
    return EXIT_OK


def add_battery_parser(sub) -> None:
    p = sub.add_parser("battery", help="EV traction battery: readings, SOH trend, projected date, warnings")
    _common(p)
    p.set_defaults(func=cmd_battery)


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr (only when it is a terminal)."""

    def __init__(self, total_s: float, enabled: bool):
        self.total_s = total_s
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, elapsed_s: float, frames: int) -> None:
        if not self.enabled:
            return
        frac = min(1.0, elapsed_s / self.total_s) if self.total_s else 1.0
        bar = "#" * int(frac * 30)
        print(f"\r[{bar:<30}] {elapsed_s:5.1f}/{self.total_s:g} s  {frames} frames", end="",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _writer(out: str):
    import can
    return can.CanutilsLogWriter(out)


def _message(bus: str, t_us: int, can_id: int, ext: bool, data: bytes):
    import can
    return can.Message(timestamp=t_us / 1e6, arbitration_id=can_id, is_extended_id=bool(ext), data=data, channel=bus)


def _capture_direct(args, s: Settings, progress: Progress) -> dict:
    from drivers.can import open_bus
    buses = [b for b in s.can.buses if not args.bus or b.get("name") in args.bus]
    if not buses:
        raise ClientError("no_adapter", f"no adapter: no CAN bus {'named ' + ', '.join(args.bus) + ' ' if args.bus else ''}"
                                        f"is configured in {s.path} ([[can.buses]])")
    opened = []
    try:
        for b in buses:
            try:
                opened.append((b["name"], open_bus(b)))
            except Exception as e:
                raise ClientError("no_adapter", f"no adapter: cannot open CAN bus {b['name']} "
                                                f"({b.get('interface')} {b.get('channel', '')}): {e}") from None
        writer = _writer(args.out)
        n, start = 0, time.monotonic()
        try:
            while (elapsed := time.monotonic() - start) < args.seconds:
                got = False
                for name, bus in opened:
                    msg = bus.recv(0.05 if len(opened) == 1 else 0.0)
                    if msg is not None and not msg.is_error_frame:
                        msg.channel = name
                        writer.on_message_received(msg)
                        n += 1
                        got = True
                if not got and len(opened) > 1:
                    time.sleep(0.005)
                progress.show(elapsed, n)
        finally:
            writer.stop()
        return {"frames": n, "buses": [name for name, _ in opened], "seconds": args.seconds, "via": "direct"}
    finally:
        for _, bus in opened:
            bus.shutdown()


def cmd_capture(args: argparse.Namespace) -> int:
    if args.seconds <= 0:
        print("dongle: --seconds must be above 0", file=sys.stderr)
        return EXIT_USAGE
    progress = Progress(args.seconds, not args.json)
    try:
        s = settings_of(args)
        try:
            if args.direct:
                raise AgentNotRunning("no_agent", "direct capture asked for")
            writer = None
            count = [0]

            def interim(m: dict) -> None:
                nonlocal writer
                if writer is None:
                    writer = _writer(args.out)
                for bus, t_us, can_id, ext, data in m.get("frames", []):
                    if args.bus and bus not in args.bus:
                        continue
                    writer.on_message_received(_message(bus, t_us, can_id, ext, bytes.fromhex(data)))
                    count[0] += 1
                progress.show(m.get("elapsed_s", 0.0), count[0])

            try:
                res = control.call(s.control.socket, "capture", timeout=args.seconds + 30, on_interim=interim,
                                   group=s.control.group, seconds=args.seconds)
            finally:
                if writer is not None:
                    writer.stop()
            if writer is None:
                _writer(args.out).stop()  # an empty capture is still a (valid, empty) file
            res = {**res, "frames": count[0], "via": "agent"}
        except AgentNotRunning:
            res = _capture_direct(args, s, progress)
    except ClientError as e:
        progress.done()
        return fail(args, e)
    except OSError as e:
        progress.done()
        print(f"dongle: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    progress.done()
    res["out"] = str(args.out)
    emit_json(res) if args.json else print(
        f"{res['frames']} frames from {', '.join(res['buses']) or 'no bus'} in {args.seconds:g} s "
        f"written to {args.out} (candump log, {res['via']})")
    return EXIT_OK


def add_capture_parser(sub) -> None:
    p = sub.add_parser("capture", help="record raw CAN frames to a candump log file")
    _common(p)
    p.add_argument("--seconds", type=float, required=True, metavar="N")
    p.add_argument("--out", required=True, metavar="FILE", help="candump -L log file to write")
    p.add_argument("--bus", action="append", metavar="NAME", help="only this bus (repeatable)")
    p.add_argument("--direct", action="store_true",
                   help="open the interfaces here even if the agent runs (socketcan allows both)")
    p.set_defaults(func=cmd_capture)


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------
# the owner's data: export, privacy, wipe (agent/cli/owner.py, imported only when one of these runs)
# --------------------------------------------------------------------------------------------

def _owner_data(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from agent.cli import owner
        return getattr(owner, name)(args)
    return run


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="everything the dongle holds about the vehicle and its use, as JSON Lines",
                       description="Write every record the dongle holds (vehicle, positions, events, consents, "
                                   "bookings, service records, pending data) to FILE as JSON Lines; the "
                                   "format is documented in docs/privacy.md.")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (created mode 0600)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_owner_data("cmd_export"))


def add_privacy_parser(sub) -> None:
    p = sub.add_parser("privacy", help="pause or resume location and driving behaviour collection at the car",
                       description="pause: stop collecting location and driving behaviour at once (unsent data "
                                   "is deleted). resume: start again, within the owner's consent. Resuming is "
                                   "only possible here, at the car (or with the button gesture).")
    p.add_argument("action", choices=("pause", "resume", "status"), nargs="?", default="status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_owner_data("cmd_privacy"))


def add_wipe_parser(sub) -> None:
    p = sub.add_parser("wipe", help="erase the dongle for a new owner or a returned dongle (terminal + button)",
                       description="Erase all data, consents, bookings, the service record copy and the device's "
                                   "keys. Confirm by typing the device id, then by pressing the dongle's button. "
                                   "The cloud is told (device_wiped) when the dongle is online.")
    p.add_argument("--by", help="who confirms (recorded in device_wiped), e.g. a name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_owner_data("cmd_wipe"))


# --------------------------------------------------------------------------------------------

def log_file_candidates(s: Settings | None) -> list[Path]:
    out = []
    if s is not None:
        out += [s.path.resolve().parent / "agent.log", s.data_dir / "agent.log"]
    out.append(Path("/var/log/dongle/agent.log"))
    return out


def cmd_logs(args: argparse.Namespace) -> int:
    if args.file is None and Path("/run/systemd/system").is_dir() and shutil.which("journalctl"):
        cmd = ["journalctl", "-u", "dongle-agent", "-n", str(args.lines), "--no-pager"]
        if args.follow:
            cmd.append("-f")
        if args.json:
            cmd += ["-o", "json"]
        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return EXIT_OK
    try:
        s = settings_of(args)
    except ClientError:
        s = None
    path = Path(args.file) if args.file else next((p for p in log_file_candidates(s) if p.is_file()), None)
    if path is None:
        return fail(args, ClientError("no_logs", "no systemd journal here and no agent log file found (looked at "
                                                 + ", ".join(map(str, log_file_candidates(s))) + "); give one with --file"))
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()[-args.lines:]
            for line in lines:
                print(json.dumps({"line": line.rstrip("\n")}) if args.json else line, end="" if not args.json else "\n")
            while args.follow:
                line = f.readline()
                if line:
                    print(json.dumps({"line": line.rstrip("\n")}) if args.json else line, end="" if not args.json else "\n",
                          flush=True)
                else:
                    time.sleep(0.3)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as e:
        return fail(args, ClientError("not_permitted" if isinstance(e, PermissionError) else "no_logs",
                                      f"cannot read {path}: {e.strerror or e}"))
    return EXIT_OK


def add_logs_parser(sub) -> None:
    p = sub.add_parser("logs", help="the agent's log (journalctl -u dongle-agent, or its log file)")
    _common(p)
    p.add_argument("-n", "--lines", type=int, default=100, help="how many of the last lines (default 100)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--file", help="read this log file instead of the journal")
    p.set_defaults(func=cmd_logs)


# --------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help=f"the agent's settings file (default {settings_mod.DEFAULT_PATH})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dongle", description="In-car telematics dongle tools.")
    add_version_option(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    parser.add_argument("--config", default=os.environ.get("DONGLE_CONFIG", settings_mod.DEFAULT_PATH),
                        metavar="FILE", help=f"the agent's settings file (default {settings_mod.DEFAULT_PATH})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_provision_parser(sub)
    add_status_parser(sub)
    add_live_parser(sub)
    add_dtc_parser(sub)
    add_bookings_parser(sub)
    add_booking_parser(sub)
    add_service_log_parser(sub)
    add_config_parser(sub)
    add_buffer_parser(sub)
    add_capture_parser(sub)
    add_logs_parser(sub)
    add_battery_parser(sub)
    add_export_parser(sub)
    add_privacy_parser(sub)
    add_wipe_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 for --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not logging.getLogger().handlers:
        level = logging.WARNING - 10 * min(args.verbose, 2)
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``dongle status``, ``dongle live``, ``dongle buffer``: what the agent is doing now."""
from __future__ import annotations

import argparse
import sys
import time

from agent.cli.common import (EXIT_OK, add_command, ago, ask_agent, ask_or_read, emit, emit_json, fail, meta, secret_meta,
                              offline, pairs, respond, table)
from agent.technician import resolution
from agent.technician.control import AgentNotRunning, ClientError


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
    gpio = st.get("gpio") or {}
    if gpio:
        rows.append(("GPIO", f"pin backend {gpio['backend']}" if gpio.get("backend") else
                     f"LEDs and button off ({gpio.get('backend_error') or 'no pin backend'})"))
    for k, v in (st.get("last_errors") or {}).items():
        rows.append((f"last error {k}", v))
    text = pairs(rows)
    if st.get("update"):
        from agent.update.updater import format_status as update_text
        text += "\nupdates:\n" + "\n".join("  " + line for line in update_text(st["update"]).splitlines())
    return text


def cmd_status(args: argparse.Namespace) -> int:
    try:
        try:
            st = ask_agent(args, "status")
            st["running"] = True
        except AgentNotRunning:
            s, conn = offline(args)
            from agent.technician.handlers import buffer_report
            st = {"running": False, "device_id": s.device_id, "vehicle": secret_meta(s, conn, "vehicle"),
                  "config_version": meta(conn, "active_config", 0),
                  "buffer": buffer_report(lambda q, p=(): conn.execute(q, p).fetchall()),
                  "last_uplink_seq": int(meta(conn, "uplink_seq", 0))}
    except ClientError as e:
        return fail(args, e)
    return emit(args, st, format_status)


# --------------------------------------------------------------------------------------------
# live
# --------------------------------------------------------------------------------------------

def format_live(signals: list[dict]) -> str:
    if not signals:
        return "no signals received yet (is the adapter connected and the ignition on?)"
    return table([(s["name"], resolution.text(s["value"], s.get("resolution")), s["unit"], ago(s["age_s"]))
                  for s in signals], ("signal", "value", "unit", "age"))


def cmd_live(args: argparse.Namespace) -> int:
    try:
        while True:
            res = ask_agent(args, "live")
            if args.json:
                if args.once:
                    emit_json(res)
                else:
                    emit_json(res, stream=True)
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

    return respond(args, lambda: ask_or_read(args, "buffer", read_stopped), format_buffer)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "status", help="vehicle, adapter, broker link, config, buffer, disk, clock, errors")
    p.set_defaults(func=cmd_status)

    p = add_command(sub, "live", help="a refreshing view of the active signals (Ctrl-C to leave)")
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    p.set_defaults(func=cmd_live)

    p = add_command(sub, "buffer", help="what waits to be sent: depth per kind, oldest item, evictions")
    p.set_defaults(func=cmd_buffer)


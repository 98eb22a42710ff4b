"""``dongle bookings``, ``dongle booking checkin|complete``, ``dongle service-log``: the
workshop visit (docs/technician.md §5–6)."""
from __future__ import annotations

import argparse
import json

from agent.cli.common import (EXIT_FAILED, EXIT_OK, add_command, ask_agent, ask_or_read, emit, fail, has_table,
                              offline, respond, safe, table, when)
from agent.technician.control import ClientError


# --------------------------------------------------------------------------------------------
# bookings / booking checkin / booking complete
# --------------------------------------------------------------------------------------------

def format_bookings(res: dict) -> str:
    bookings = res["bookings"]
    if not bookings:
        return "no bookings"
    return table([(b["booking_id"], b["status"], when(b.get("scheduled_at")), b.get("service", ""),
                   (b.get("provider") or {}).get("name", ""), b.get("notes", "")) for b in bookings],
                 ("id", "status", "scheduled", "service", "provider", "notes"))


def _bookings_offline(args) -> list[dict]:
    _, conn = offline(args)
    if not has_table(conn, "bookings"):
        return []
    rows = conn.execute("SELECT doc, status, updated_ms FROM bookings ORDER BY booking_id").fetchall()
    return [{**json.loads(d), "status": s, "updated_ms": u} for d, s, u in rows]


def cmd_bookings(args: argparse.Namespace) -> int:
    def get() -> dict:
        return {"bookings": ask_or_read(args, "bookings", lambda: {"bookings": _bookings_offline(args)})["bookings"]}
    return respond(args, get, format_bookings)


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
    return emit(args, res, text)


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
            if has_table(conn, service_log.TABLE) else []
        res = {"records": [service_log._row_to_record(r, h) for r, h in rows]}
        if args.verify:
            res["verification"] = service_log.verify_rows(rows).as_dict()
        return res

    try:
        res = ask_or_read(args, "service_log", read_stopped, verify=args.verify)
    except ClientError as e:
        return fail(args, e)
    emit(args, res, format_service_log)
    if args.verify and not res["verification"]["ok"]:
        return EXIT_FAILED
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bookings", help="the service bookings the cloud sent")
    p.set_defaults(func=cmd_bookings)

    p = add_command(sub, "booking", help="check in or complete a booking")
    bsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = add_command(bsub, "checkin", help="the car has arrived for booking ID")
    c.add_argument("booking_id", metavar="ID")
    c.set_defaults(func=cmd_booking)
    d = add_command(bsub, "complete", help="the service of booking ID is done: appends the service record")
    d.add_argument("booking_id", metavar="ID")
    d.add_argument("--odometer", type=float, required=True, metavar="KM", help="odometer reading in km")
    d.add_argument("--item", action="append", required=True, metavar="ITEM",
                   help="work done, repeatable (e.g. oil_change; maintenance kinds count from these)")
    d.add_argument("--technician", help="name recorded (default: your login name)")
    d.set_defaults(func=cmd_booking)

    p = add_command(sub, "service-log", help="the service record chain (PROTOCOL §5)")
    p.add_argument("--verify", action="store_true", help="recompute every hash; exit 1 if the chain is broken")
    p.set_defaults(func=cmd_service_log)

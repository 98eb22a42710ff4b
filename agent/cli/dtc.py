"""``dongle dtc`` and ``dongle dtc clear``: the vehicle's trouble codes (docs/technician.md §3–4)."""
from __future__ import annotations

import argparse

from agent.cli.common import (add_command, ask_agent, emit, fail, interim_printer, meta, offline, pairs,
                              prompt, table)
from agent.technician import resolution
from agent.technician.control import AgentNotRunning, ClientError


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
    freeze = res.get("freeze")
    if freeze:
        out.append(f"\nFreeze frame (the engine when {freeze.get('code', 'the first code')} was stored):")
        values = freeze.get("values") or {}
        out.append(pairs([(pid, f"{resolution.text(v.get('value'), v.get('resolution'))} {v.get('unit', '')}".rstrip())
                          for pid, v in sorted(values.items()) if isinstance(v, dict)]) or "(no values)")
    if res.get("pending_clear_dtc"):
        out.append("\nThe cloud asked for these codes to be cleared: confirm with `dongle dtc clear`.")
    return "\n".join(out)


def _dtc_offline(args) -> dict:
    from agent.health.severity import code_severity, severity
    from agent.vehicle.dtc import META_KEY, describe
    _, conn = offline(args)
    last = meta(conn, META_KEY) or []
    mil = any(k == "MIL" and v for k, v in last)
    codes = [{"code": k, "state": v, "desc": describe(k), "severity": code_severity(k, v, mil)}
             for k, v in last if k != "MIL"]
    return {"source": "last_reported", "codes": codes, "mil": mil, "severity": severity(codes, mil),
            "pending_clear_dtc": meta(conn, "pending_clear_dtc")}


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
    return emit(args, res, format_dtc)


def cmd_dtc_clear(args: argparse.Namespace) -> int:
    try:
        res = ask_agent(args, "dtc", timeout=60)
        if not args.json:
            print(format_dtc(res))
        if not res["codes"] and not res["mil"]:
            return emit(args, {"cleared": [], "note": "no trouble codes are set; nothing to clear"},
                        "no trouble codes are set; nothing to clear")
        distinct = list(dict.fromkeys(c["code"] for c in res["codes"]))
        answer = prompt(f"\nClear {len(distinct)} trouble code(s) from the vehicle? This also resets its "
                        "emission readiness monitors.\nType 'yes' to confirm: ")
        if answer.strip().lower() != "yes":
            raise ClientError("refused", "not confirmed at the terminal; nothing was cleared")
        done = ask_agent(args, "dtc_clear", timeout=None, on_interim=interim_printer, confirmed=True,
                         codes_seen=distinct, button_timeout_s=args.button_timeout)
    except ClientError as e:
        return fail(args, e)
    return emit(args, done, format_cleared)


def format_cleared(d: dict) -> str:
    out = f"Cleared: {', '.join(d['cleared']) or 'no codes were set'} (recorded: {d['by']})."
    still = d.get("still_reported") or []
    if still:
        out += "\nStill reported: " + ", ".join(f"{c['code']} ({c['state']})" for c in still)
        if any(c["state"] == "permanent" for c in still):
            out += ("\n(a permanent code stays until the ECU's own monitor has run and passed: "
                    "drive the car, then read the codes again)")
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "dtc", help="trouble codes (with descriptions, freeze frame); `dtc clear` clears them",
                    description="Read the vehicle's trouble codes now. `dongle dtc clear` clears them after "
                                "you confirm at the terminal and, on a dongle with a button, press it.")
    p.add_argument("action", nargs="?", choices=["clear"], help="clear the codes (asks for confirmation)")
    p.add_argument("--button-timeout", type=float, default=60.0, metavar="S",
                   help="clear: how long the dongle waits for its button to be pressed (default 60)")
    p.set_defaults(func=cmd_dtc)

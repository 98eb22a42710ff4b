"""``dongle battery``: the EV traction battery (readings, SOH trend, projected date, warnings)."""
from __future__ import annotations

import argparse

from agent.cli.common import add_command, ask_agent, respond, safe


def format_battery(res: dict) -> str:
    from agent.health.traction_battery import format_battery_report
    if res.get("available") is False:
        return f"no traction battery data: {safe(res.get('reason'))}"
    return format_battery_report(res)


def cmd_battery(args: argparse.Namespace) -> int:
    return respond(args, lambda: ask_agent(args, "battery"), format_battery)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "battery", help="EV traction battery: readings, SOH trend, projected date, warnings")
    p.set_defaults(func=cmd_battery)

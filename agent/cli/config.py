"""``dongle config show|diff``: the cloud config in force, and what changed."""
from __future__ import annotations

import argparse
import difflib
import json

from agent.cli.common import add_command, ask_or_read, emit, fail, meta, offline
from agent.technician.control import ClientError


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
    version = meta(conn, "active_config")
    docs = {v: json.loads(d) for v, d in conn.execute("SELECT version, doc FROM configs ORDER BY version")}
    active = docs.get(version, default_config())
    prev = [d for v, d in docs.items() if v < int(active.get("version", 0))]
    return {"active": active, "previous": prev[-1] if prev else None, "default": default_config()}


def _text_diff(other: dict, name: str, active: dict) -> str:
    a = json.dumps(other, indent=2, sort_keys=True).splitlines()
    b = json.dumps(active, indent=2, sort_keys=True).splitlines()
    diff = list(difflib.unified_diff(a, b, fromfile=name, tofile=f"active (v{active.get('version')})", lineterm=""))
    return "\n".join(diff) if diff else f"the active config (v{active.get('version')}) is the same as the {name}"


def cmd_config(args: argparse.Namespace) -> int:
    try:
        res = ask_or_read(args, "config", lambda: _configs_offline(args))
    except ClientError as e:
        return fail(args, e)
    active = res["active"]
    if args.action == "show":
        return emit(args, {"config": active}, json.dumps(active, indent=2, sort_keys=True))
    other, name = (res["default"], "shipped default") if args.against == "default" else \
        (res["previous"], f"previous (v{(res['previous'] or {}).get('version')})")
    if other is None:
        other, name = res["default"], "shipped default (no previous version stored)"
    return emit(args, {"against": name, "active_version": active.get("version"),
                       "changes": config_changes(other, active)},
                lambda _: _text_diff(other, name, active))


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "config", help="the active cloud config: show, or diff against the previous one")
    p.add_argument("action", choices=["show", "diff"])
    p.add_argument("--against", choices=["previous", "default"], default="previous",
                   help="diff against the previous version (default) or the shipped default")
    p.set_defaults(func=cmd_config)
